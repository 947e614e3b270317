"""Shared fixtures. `tiny_world` builds the real tiny world once per test session through Snakemake,
into a temporary results directory (or QUANTUNE_TEST_RESULTS when set, to reuse a build)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def loss_and_grads(model, batch):
    """A batch's loss and the gradients it leaves, by parameter name (packed-against-padded tests)."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def snakemake(*args: str, results: str | Path | None = None, check: bool = True, timeout: int = 3000):
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nolock", *args]
    if results is not None:
        item = f"results={json.dumps({'tiny': str(results), 'full': str(Path(results) / 'full')})}"
        if "--config" in cmd:  # one --config option: a second one would replace the first's items
            cmd.insert(cmd.index("--config") + 1, item)
        else:
            cmd += ["--config", item]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="session")
def results_root(tmp_path_factory) -> Path:
    env = os.environ.get("QUANTUNE_TEST_RESULTS")
    return Path(env) if env else tmp_path_factory.mktemp("results")


@pytest.fixture(scope="session")
def tiny_world(results_root) -> Path:
    """Build the tiny world for real (tokenizers, corpus, data sets, six pretrained base models)."""
    # code-change triggers would rebuild a reused tiny world whenever a rule is edited; mtime/params/input suffice
    snakemake("tiny_world", "--rerun-triggers", "mtime", "params", "input", results=results_root)
    return results_root / "tiny_world"


@pytest.fixture()
def cfg():
    from quantune.lib.config import load_config

    return load_config()
