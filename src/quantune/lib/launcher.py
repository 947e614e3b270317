"""One Snakemake run at a time, started from the web page: a target the workflow knows (never a shell string),
its output followed line by line with Snakemake's own progress ("3 of 5 steps (60%) done"), cancelled with
SIGINT (Snakemake stops its jobs and removes their incomplete outputs), then SIGKILL if it does not end."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import ROOT

PROGRESS = re.compile(r"(\d+) of (\d+) steps \((\d+(?:\.\d+)?)%\) done")
KEEP_LINES = 2000


class Launcher:
    def __init__(self, cores: int, config_items: dict, workdir: Path = ROOT):
        self.cores, self.config_items, self.workdir = cores, config_items, Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.target = ""
        self.lines: list[str] = []
        self.done, self.total = 0, 0
        self.rc: int | None = None
        self.cancelled = False
        self.lock = threading.Lock()

    def command(self, target: str) -> list[str]:
        items = [f"{k}={json.dumps(v)}" for k, v in self.config_items.items()]
        return [sys.executable, "-m", "snakemake", "--cores", str(self.cores), "--config", *items, "--", target]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def locked_by_other(self) -> bool:
        """Snakemake's lock files of this directory, held by a run this page did not start."""
        locks = self.workdir / ".snakemake" / "locks"
        return locks.is_dir() and any(locks.iterdir())

    def start(self, target: str, known: list[str]) -> str:
        """Start `snakemake <target>`; returns a one-line status (why it did not start, if it did not)."""
        with self.lock:
            if target not in known:
                return f"error: {target!r} is not a target of this workflow; fix: choose one of the listed targets"
            if self.running():
                return (f"error: a run is in progress ({self.target}); fix: wait for it to end or cancel it "
                        "(one run at a time)")
            if self.locked_by_other():
                return ("error: another Snakemake run holds this directory's lock (.snakemake/locks); fix: wait for it "
                        "to end, or run `snakemake --unlock` if none is running")
            self.target, self.lines, self.done, self.total, self.rc, self.cancelled = target, [], 0, 0, None, False
            self.proc = subprocess.Popen(self.command(target), cwd=self.workdir, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
            threading.Thread(target=self._follow, args=(self.proc,), daemon=True).start()
            return f"running: snakemake {target}"

    def _follow(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            m = PROGRESS.search(line)
            with self.lock:
                if m:
                    self.done, self.total = int(m.group(1)), int(m.group(2))
                self.lines.append(line.rstrip("\n"))
                del self.lines[:-KEEP_LINES]
        self.rc = proc.wait()

    def cancel(self, grace_s: float = 20.0) -> str:
        if not self.running():
            return "nothing is running"
        proc = self.proc
        self.cancelled = True
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return f"cancelled: snakemake {self.target}"

    def status(self) -> str:
        """One line: running, done, failed with Snakemake's (or the step's) one-line error, or cancelled."""
        if self.proc is None:
            return "no run yet"
        if self.running() or self.rc is None:
            return f"running: snakemake {self.target}"
        if self.cancelled:
            return f"cancelled: snakemake {self.target}"
        if self.rc == 0:
            return f"done: {self.target} is built"
        return f"failed ({self.rc}): {self.first_error()}"

    def first_error(self) -> str:
        """The step's own one-line error (from the log of the job that failed), else Snakemake's first error."""
        with self.lock:
            lines = list(self.lines)
        for ln in lines:
            if ln.strip().startswith("quantune: error:"):
                return ln.strip()
        for ln in lines:
            m = re.match(r"\s*log: (\S+)", ln)
            log = Path(self.workdir, m.group(1)) if m else None
            if log is not None and log.is_file():
                errs = [x.strip() for x in log.read_text(errors="replace").splitlines() if "error:" in x]
                if errs:
                    return errs[-1]
        errors = [ln.strip() for ln in lines if "error" in ln.lower()]
        return errors[0] if errors else "see the log"

    def log(self, last: int = 400) -> str:
        with self.lock:
            return "\n".join(self.lines[-last:])

    def fraction(self) -> float:
        if self.rc == 0 and not self.cancelled:
            return 1.0
        return self.done / self.total if self.total else 0.0

    def wait(self, timeout: float) -> int | None:
        """For tests and scripts: the exit status once the run ends (None on timeout)."""
        end = time.time() + timeout
        while time.time() < end:
            if self.proc is not None and not self.running() and self.rc is not None:
                return self.rc
            time.sleep(0.2)
        return None
