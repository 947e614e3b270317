#!/usr/bin/env bash
# Install what the browser test (tests/test_tensorboard_browser.py) needs: Debian's headless Chromium and its
# ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver), and the Selenium client in the project venv.
# Selenium is always given both paths, so it never downloads a browser or a driver of its own.
# selenium 4.51.0: the newest release that fits requirements.lock (4.52.0 needs a newer certifi).
# Safe to run again: it only adds what is missing. Called from scripts/setup.sh (after the venv exists).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh
apt_install chromium chromium-driver fonts-wqy-microhei   # a CJK font: the Chinese text of screenshots

VENV_PY=${VENV_PY:-.venv/bin/python}
if [ -x "$VENV_PY" ]; then
  "$VENV_PY" -c "import importlib.metadata as m; assert m.version('selenium') == '4.51.0'" 2>/dev/null || "$VENV_PY" -m pip install -q -c requirements.lock "selenium==4.51.0"
fi
echo "quantune: browser test tools: $(/usr/bin/chromium --version 2>/dev/null | head -1); $(/usr/bin/chromedriver --version 2>/dev/null | head -1)"
