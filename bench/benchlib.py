"""What the benches share: a recipe's shape-world inputs, built by the workflow's own rules, the GPU's name, and
an earlier run's results that a run of part of a bench keeps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_KEYS = ("dataset", "calibration_dataset", "eval_dataset")


def build_shape_inputs(cfg: dict, recipe: dict, model: str | None = None) -> None:
    """At scale shape: the shape world's model (the recipe's, or `model`) and the recipe's data sets, by
    `snakemake --config scale=shape <paths>` (nothing built twice). Other scales: nothing to build."""
    if cfg["scale"] != "shape":
        return
    sw = Path(cfg["results"]["shape"]) / "shape_world"
    paths = [str(sw / "models" / (model or recipe["model"]))] + [str(sw / "data" / recipe[k]) for k in DATA_KEYS
                                                                  if k in recipe]
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", "--resources", "gpu=1", "--scheduler",
                    "greedy", "--config", "scale=shape", "--", *paths], cwd=ROOT, check=True)


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def write_gpu_check(bench: str, flag: str, got: dict | None, needs: str, path: Path) -> None:
    """A bench's GPU-only check: its result (with the GPU's name and the run) written to `path` and printed, or,
    where it returned None for want of a GPU, one line naming the flag and what it needs, and nothing written."""
    if got is None:
        sys.exit(f"{bench}: {flag} needs a CUDA GPU ({needs}) and none is visible; fix: run it on the GPU machine")
    got = {**got, "gpu": gpu_name(), "run": run_stamp()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(got, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(got, indent=1))


def run_stamp() -> str:
    """Where a row comes from, for tables that keep earlier runs' rows: $QUANTUNE_COMMIT where set (a copy of the
    tree whose .git is not its own, as the GPU machine's can be), else the checkout's commit (git_head), and the
    UTC minute."""
    commit = os.environ.get("QUANTUNE_COMMIT") or git_head()
    return f"{commit or '?'} {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}"


def git_head() -> str:
    """git's short id of the checkout's HEAD, `+` when tracked files have changes; "" without git or a .git."""
    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return ""
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+" if dirty else "")
    except OSError:
        return ""


def earlier(path: Path, default):
    """What an earlier run of a bench left in `path` (its JSON), else `default`."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def merged(kept: list[dict], new: list[dict], key, rank) -> list[dict]:
    """`kept` (an earlier run's rows) with `new`'s rows in place of those with the same key(row), sorted by
    rank(row) (stable: rows of equal rank keep their order)."""
    by = {key(r): r for r in kept + new}
    return sorted(by.values(), key=rank)
