#!/usr/bin/env bash
# Set up quantune on a fresh Debian machine: system packages (apt), then the project virtualenv (.venv)
# with the pinned CPU stack (requirements.lock). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh
apt_install fortunes-zh   # Chinese text for the tiny world (Debian's fortunes-zh)

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and exactly 2.13.0: on the CPU machines that is a local CPU wheel, never a CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
# DS_BUILD_OPS=0: DeepSpeed's C++/CUDA ops are compiled on first use, not at install time
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c requirements.lock -e ".[quantize,metrics,clean,deepspeed,webui,dev]"
# the GGUF toolchain (llama-cpp-python built from source, gguf, llama.cpp's converter from the same sdist)
bash scripts/install_llamacpp.sh
# a single-node SLURM + MariaDB accounting, the SLURM executor plugin, hadolint, snakefmt, uv (the SLURM and env tests)
bash scripts/install_slurm.sh
# Debian's headless Chromium + ChromeDriver and Selenium (the TensorBoard browser test)
bash scripts/install_browser.sh
.venv/bin/python -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed on the CPU side'"
echo "quantune: set up in $(pwd)/.venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
