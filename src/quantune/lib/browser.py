"""TensorBoard on localhost, looked at in a real browser (Debian's headless Chromium through Selenium).

Used by tests/test_tensorboard_browser.py and by `python -m quantune.report tensorboard-screenshot`.
Everything stays on 127.0.0.1; the processes started here (TensorBoard, its data server, chromedriver,
Chromium) are ended when the context managers exit. Chromium and ChromeDriver come from Debian
(scripts/install_browser.sh); Selenium is always given both paths, so it never downloads either.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from .common import fail, free_port

CHROMIUM = os.environ.get("QUANTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("QUANTUNE_CHROMEDRIVER", "/usr/bin/chromedriver")
# the flags Chromium needs on these machines: no sandbox as root, no GPU, and no background traffic
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def http_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (localhost only)
        return json.loads(r.read().decode("utf-8"))


class TensorBoard:
    """A TensorBoard server on 127.0.0.1:<port> over `logdir`, in its own process group."""

    def __init__(self, logdir: str | Path, port: int | None = None, log: str | Path | None = None):
        self.logdir, self.port = Path(logdir), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="tensorboard-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "TensorBoard":
        exe = Path(sys.executable).with_name("tensorboard")
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tensorboard.main"]
        cmd += ["--logdir", str(self.logdir), "--host", "127.0.0.1", "--port", str(self.port),
                "--reload_interval", "2"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise fail("tensorboard", f"exited with {self.proc.returncode}: {self.log_tail()}",
                           "check that tensorboard is installed in this environment")
            with contextlib.suppress(OSError, ValueError):
                http_json(f"{self.url}/data/environment", timeout=2)
                return self
            time.sleep(0.5)
        raise fail("tensorboard", f"no answer on {self.url} after {timeout:.0f} s: {self.log_tail()}", "see its log")

    def runs(self) -> list[str]:
        return http_json(f"{self.url}/data/runs")

    def scalar_tags(self) -> dict[str, list[str]]:
        return {run: sorted(tags) for run, tags in http_json(f"{self.url}/data/plugin/scalars/tags").items()}

    def wait_for_runs(self, runs: set[str], timeout: float = 90.0) -> list[str]:
        """Poll until every run in `runs` is listed (the first scan of a large logdir takes a while)."""
        deadline, listed = time.time() + timeout, []
        while time.time() < deadline:
            listed = self.runs()
            if runs <= set(listed):
                return listed
            time.sleep(1.0)
        return listed

    def log_tail(self, n: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # the server and its data-server child share the process group this Popen started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def check_browser_tools() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (Python package)")
    if missing:
        raise fail("browser", f"missing {', '.join(missing)}", "run scripts/install_browser.sh")


@contextlib.contextmanager
def headless_chromium(width: int = 1600, height: int = 2000) -> Iterator["object"]:
    """A Selenium WebDriver on Debian's Chromium with a fresh profile; quit (both processes) on exit."""
    check_browser_tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="quantune-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        opts.add_argument(a)
    service = Service(executable_path=CHROMEDRIVER, log_output=os.path.join(profile, "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        yield driver
    finally:
        driver.quit()  # ends Chromium and the chromedriver process this Service started
        shutil.rmtree(profile, ignore_errors=True)


def timeseries_url(base: str, run_regex: str, tag_regex: str) -> str:
    q = urllib.parse.urlencode({"runFilter": run_regex, "tagFilter": tag_regex})
    return f"{base}/?{q}#timeseries"


def scalar_cards(driver, timeout: float = 60.0, min_cards: int = 1) -> dict[str, dict]:
    """{tag: {"rows": [[run, smoothed, value, step, relative time], ...], "element": card}} of the scalar cards
    TensorBoard's time-series dashboard shows, once their data tables are filled."""
    from selenium.webdriver.common.by import By

    deadline, cards = time.time() + timeout, {}
    while time.time() < deadline:
        cards = {}
        for c in driver.find_elements(By.CSS_SELECTOR, "scalar-card"):
            try:
                tag = c.find_element(By.CSS_SELECTOR, "tb-truncated-path.tag").get_attribute("title")
                rows = [[cell.text.strip() for cell in r.find_elements(By.CSS_SELECTOR, "tb-data-table-content-cell")
                         if cell.text.strip()]  # the first cell is the run's color dot
                        for r in c.find_elements(By.CSS_SELECTOR, "tb-data-table-content-row")]
            except Exception:  # a card re-rendered under us: read again
                cards = {}
                break
            cards[tag] = {"rows": [r for r in rows if any(r)], "element": c}
        if len(cards) >= min_cards and all(v["rows"] for v in cards.values()):
            return cards
        time.sleep(1.0)
    return cards


def colored_fraction(png: bytes, min_spread: int = 25) -> float:
    """Share of pixels in a PNG that are colored (a plotted series), not gray (grid, axes, text, white).
    TensorBoard's run colors all have a channel spread of at least 36 (its darkest, Slate #425066);
    grays have none."""
    import io

    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return float(((px.max(axis=2) - px.min(axis=2)) > min_spread).mean())


def screenshot_tensorboard(logdir: str | Path, run_regex: str, out: str | Path,
                           tag_regex: str = "^(train|eval|system)/") -> dict:
    """Serve `logdir`, open the time-series view filtered to one run, wait for its charts, screenshot."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with TensorBoard(logdir) as tb, headless_chromium() as driver:
        driver.get(timeseries_url(tb.url, run_regex, tag_regex))
        cards = scalar_cards(driver)
        if not cards:
            raise fail(str(logdir), f"TensorBoard shows no scalar card for run {run_regex!r} and tags {tag_regex!r}",
                       "build a target that logs to TensorBoard first (e.g. tiny_world)")
        tmp = out.with_name(f".{out.name}.tmp.png")
        driver.save_screenshot(str(tmp))
        os.replace(tmp, out)
        return {"url": timeseries_url(tb.url, run_regex, tag_regex), "tags": sorted(cards), "screenshot": str(out)}
