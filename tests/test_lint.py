"""Lint: `snakemake --lint` reports nothing, snakefmt (line length 120, the project's) leaves every
Snakefile as it is, hadolint finds nothing in the image recipes, and the shell scripts parse."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent
SNAKEFILES = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk")), ROOT / "tests" / "gpu_workflow" / "Snakefile"]


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}:{shutil.os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/install_slurm.sh")
    return path


def _lints(out: str) -> str:
    return "\n".join(line for line in out.splitlines() if line.startswith(("Lints for", "    * ")))


@pytest.mark.parametrize("snakefile,extra", [
    ("Snakefile", []),
    ("Snakefile", ["--config", "scale=full"]),
    ("tests/gpu_workflow/Snakefile", ["-d", "{tmp}"]),
], ids=["tiny", "full", "gpu_workflow"])
def test_snakemake_lint_reports_nothing(snakefile, extra, tmp_path):
    cmd = [sys.executable, "-m", "snakemake", "--lint", "--nolock", "-s", str(ROOT / snakefile),
           *[e.format(tmp=tmp_path) for e in extra]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Congratulations, your workflow is in a good condition!" in out, \
        f"snakemake --lint ({snakefile}):\n{_lints(out) or out[-3000:]}"


def test_snakefmt_is_clean():
    dirty = []
    for f in SNAKEFILES:
        r = subprocess.run([tool("snakefmt"), "--check", "--line-length", "120", str(f)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            dirty.append(f"{f.relative_to(ROOT)}" + (f" ({r.stderr.strip().splitlines()[-1]})" if r.returncode != 1 else ""))
    assert not dirty, ("snakefmt --line-length 120 would change: " + ", ".join(dirty) +
                       "; fix: .venv/bin/snakefmt --line-length 120 Snakefile rules/ tests/gpu_workflow/Snakefile")


def test_hadolint_finds_nothing_in_the_image_recipes():
    dockerfiles = sorted((ROOT / "containers").glob("*.Dockerfile"))
    assert dockerfiles, "no containers/*.Dockerfile"
    r = subprocess.run([tool("hadolint"), "--no-color", *map(str, dockerfiles)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
