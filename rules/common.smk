# Shared set-up: config and recipe validation (before any job runs), logical-name resolution, and the
# input functions every stage uses.
import hashlib
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from quantune.lib.common import QuantuneError
from quantune.lib.config import (
    check_config,
    job_config,
    load_recipes,
    referenced_targets,
    resolve_dataset,
    resolve_model,
    results_dir,
    pretrain_settings,
    shape_config_of,
    shape_world_dir,
    tiny_world_dir,
)
from quantune.lib.models import TOKENIZER_OF_FAMILY, cpu_has_avx2

# the config and every recipe (schema with defaults, each stage's check, the targets recipes read), once
try:
    CFG = check_config(config, "config/config.yaml (with --config overrides)")
    RECIPES = load_recipes(CFG, Path(workflow.basedir) / CFG["recipes_dir"])
except QuantuneError as _e:
    sys.stderr.write(f"quantune: error: {_e}\n")
    sys.exit(1)

SCALE = CFG["scale"]
RES = results_dir(CFG)
TW = tiny_world_dir(CFG)
SW = shape_world_dir(CFG)
ENVS = str(Path(workflow.basedir) / "envs")

# every step is `python -m quantune.<stage>` from this checkout's src/, run by the Python that runs Snakemake
# (the project's .venv, even when it is not activated) unless a conda env is active (--use-conda)
VENV_BIN = str(Path(sys.executable).parent)
# Tiny scale on x86: torch's own CPU kernels and MKL's GEMM held to their AVX2 code paths, so that a CPU with
# AVX-512 computes what an AVX2-only CPU computes (both change the tiny world's numbers; fixed threads too).
CPU_PINS = "export ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2; " if SCALE == "tiny" and cpu_has_avx2() else ""
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={Path(workflow.basedir) / 'src'}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    f'[ -n "${{{{CONDA_PREFIX:-}}}}" ] || export PATH="{VENV_BIN}:$PATH"; {CPU_PINS}'
)

# Per-job GPUs: the shell command of a step starts with GPU_RUN (see rules/evaluate.smk). The step
# replaces the shell (exec: SLURM's SIGTERM at a time limit or preemption reaches it, not a shell in between)
# and sees exactly the GPUs it holds in CUDA_VISIBLE_DEVICES: locally the wrapper takes resources.gpu free
# GPUs of the host (file locks; none for gpu=0), under SLURM it keeps SLURM's choice (src/quantune/gpus.py).
from quantune.lib.gpus import GPU_RUN  # "exec python -m quantune.lib.gpus run --gpus {resources.gpu} -- "


def image_of(env):
    """A rule's container, built from envs/<env>.yaml by containers/generate.py: a local
    containers/<env>.sif when one was built, else <registry>/quantune-<env>:<tag>, tag = the generated
    Dockerfile's content hash (QUANTUNE_IMAGE_REGISTRY, default ghcr.io/quantune). Use with --sdm apptainer."""
    base = Path(workflow.basedir) / "containers"
    if (base / f"{env}.sif").is_file():
        return str(base / f"{env}.sif")
    dockerfile = base / f"{env}.Dockerfile"
    if not dockerfile.is_file():
        sys.stderr.write(
            f"quantune: error: {dockerfile}: no container recipe for envs/{env}.yaml; "
            "fix: python containers/generate.py\n"
        )
        sys.exit(1)
    tag = hashlib.sha256(dockerfile.read_bytes()).hexdigest()[:12]
    registry = os.environ.get("QUANTUNE_IMAGE_REGISTRY", "ghcr.io/quantune").rstrip("/")
    return f"docker://{registry}/quantune-{env}:{tag}"


wildcard_constraints:
    family="|".join(CFG["tiny_world"]["families"]),
    kind="advertisegen|alpaca|summary_pref",
    tok="bpe|spm",


def recipes_of(stage):
    return sorted(n for n, r in RECIPES.items() if r["stage"] == stage)


def names_of(stage, keep=lambda r: True):
    """A rule's `name` wildcard constraint: the recipes of its stage (a pattern no target matches when none)."""
    return "|".join(n for n in recipes_of(stage) if keep(RECIPES[n])) or f"no-{stage}-recipes"


def recipe_path(name):
    return str(Path(workflow.basedir) / CFG["recipes_dir"] / f"{name}.yaml")


def job_json(name):
    """A job's params: the part of the config its recipe reads (config.job_config), as JSON."""
    return json.dumps(job_config(CFG, RECIPES[name]), sort_keys=True)


def model_input(name, key="model"):
    """A model's directory when it is local (tiny world or a path), nothing for a hub id."""
    m = resolve_model(CFG, RECIPES[name][key])
    return [m["source"]] if m["local"] else []


def dataset_input(name, key="dataset"):
    d = resolve_dataset(CFG, RECIPES[name][key])
    return [d["source"]] if d["local"] else []


def gpu_count(name):
    """GPUs a recipe's job asks for: none at tiny scale, the recipe's `gpus` (default 1) at shape and full."""
    return 0 if SCALE == "tiny" else int(RECIPES[name].get("gpus", 1))


def tiny_world_targets():
    return [f"{TW}/metrics.json"]


def all_targets():
    out = tiny_world_targets() if SCALE == "tiny" else []
    return out + [f"{RES}/{n}/metrics.json" for n in sorted(RECIPES)]


# one named target per recipe: `snakemake <recipe name>` builds results/<recipe name>/
for _name in sorted(RECIPES):

    rule:
        name:
            _name
        input:
            f"{RES}/{_name}/metrics.json",
        localrule: True


# ---- the report's input stamp (rules/report.smk) ----
import contextlib
import hashlib

REPORT_READS = ("metrics.json", "*.png", "*.md", "*.csv", "comparison.json", "generations.jsonl")


def _report_stamp():
    """Digest of what the report reads (and of the recipes' names and stages): it changes when a target is
    built, rebuilt or removed, or a recipe is added."""
    res = Path(RES)
    files = [res / "report" / "tensorboard.png"]
    if res.is_dir():
        for d in sorted(res.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and d.name not in ("logs", "benchmarks", "report", "full"):
                for pat in REPORT_READS:
                    files += d.glob(pat)
                files += d.glob("**/tb/**/events.out.tfevents.*")
    h = hashlib.sha1(json.dumps({n: r["stage"] for n, r in RECIPES.items()}, sort_keys=True).encode())
    for f in sorted(set(files)):
        with contextlib.suppress(OSError):
            st = f.stat()
            h.update(f"{f} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _report_inputs_file():
    """results/report/.inputs.sha1 holding the digest above; touched only when the digest changes."""
    f = Path(RES) / "report" / ".inputs.sha1"
    digest = _report_stamp()
    if not f.is_file() or f.read_text().strip() != digest:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"{digest}\n")
    return str(f)


def _done(target):
    return f"{RES}/{target}/metrics.json"


def read_targets(name):
    """The metrics.json of every target a recipe reads (quant_compare's targets, the adapters, the GGUF chain)."""
    return [_done(t) for t in referenced_targets(RECIPES[name])]
