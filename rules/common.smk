# Shared set-up: config and recipe validation (before any job runs), logical-name resolution, and the
# input functions every stage uses.
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from quantune.common import QuantuneError
from quantune.config import (
    check_config,
    load_recipes,
    resolve_dataset,
    resolve_model,
    results_dir,
    tiny_world_dir,
)
from quantune.models import TOKENIZER_OF_FAMILY

try:
    CFG = check_config(config, "config/config.yaml (with --config overrides)")
    RECIPES = load_recipes(CFG, Path(workflow.basedir) / CFG["recipes_dir"])
except QuantuneError as _e:
    sys.stderr.write(f"quantune: error: {_e}\n")
    sys.exit(1)

SCALE = CFG["scale"]
RES = results_dir(CFG)
TW = tiny_world_dir(CFG)
CONFIG_JSON = json.dumps(CFG, sort_keys=True)
ENVS = str(Path(workflow.basedir) / "envs")

# every step is `python -m quantune.<stage>` from this checkout's src/
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={Path(workflow.basedir) / 'src'}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)


wildcard_constraints:
    family="|".join(CFG["tiny_world"]["families"]),
    kind="advertisegen|alpaca|summary_pref",
    tok="bpe|spm",


def recipes_of(stage):
    return sorted(n for n, r in RECIPES.items() if r["stage"] == stage)


def recipe_path(name):
    return str(Path(workflow.basedir) / CFG["recipes_dir"] / f"{name}.yaml")


def model_input(name, key="model"):
    """A model's directory when it is local (tiny world or a path), nothing for a hub id."""
    m = resolve_model(CFG, RECIPES[name][key])
    return [m["source"]] if m["local"] else []


def dataset_input(name, key="dataset"):
    d = resolve_dataset(CFG, RECIPES[name][key])
    return [d["source"]] if d["local"] else []


def gpu_count(name):
    """GPUs a recipe's job asks for: none at tiny scale, the recipe's `gpus` (default 1) at full."""
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
        localrule: True
        input:
            f"{RES}/{_name}/metrics.json",
