"""The one place that validates the workflow config and the recipes, and resolves logical names.

A recipe is a YAML file under recipes/: real-scale values at the top level, and an optional `tiny:` block
(the recipe's tiny scale profile) whose keys replace top-level keys when the workflow runs at scale tiny. At scale
shape the real values run on the shape world, with only the config's `shape_world.caps` and the recipe's own
`shape:` block (caps only) lowering steps and rows scored or generated.
Every recipe names its `stage`; `config/schemas/recipes/<stage>.schema.yaml` fixes the keys that stage reads.

    python -m quantune.lib.config check [--config config/config.yaml] [--set scale=full]
"""
from __future__ import annotations

import argparse
import copy
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .common import ROOT, QuantuneError, fail, run_cli

SCHEMA_DIR = ROOT / "config" / "schemas"
SCALES = ("tiny", "shape", "full")


# ---------------------------------------------------------------- loading

def load_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise fail(str(path), "file not found", "check the path (relative to the workflow directory)")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise fail(where, f"invalid YAML ({getattr(e, 'problem', e)})", "fix the YAML syntax") from None


def _local_defs(node) -> list[str]:
    """The names of the `#/$defs/...` a schema fragment refers to, at any depth."""
    if isinstance(node, list):
        return [n for x in node for n in _local_defs(x)]
    if not isinstance(node, dict):
        return []
    ref = node.get("$ref", "")
    return ([ref.rsplit("/", 1)[1]] if isinstance(ref, str) and ref.startswith("#/$defs/") else []) + \
        [n for k, v in node.items() if k != "$ref" for n in _local_defs(v)]


@lru_cache(maxsize=None)
def _schema(name: str) -> dict:
    """A schema file (relative to SCHEMA_DIR) made self-contained: a property whose `$ref` points into another file
    (`lora_sft.schema.yaml#/properties/liger_kernel`: a key two stages share, written once) becomes what it points at,
    its own keywords beside the `$ref` winning, and the `$defs` that needs come along; the validator, the defaults
    and the web form then read one schema."""
    schema = load_yaml(SCHEMA_DIR / name)
    for key, prop in (schema.get("properties") or {}).items():
        ref = prop.get("$ref", "") if isinstance(prop, dict) else ""
        if not ref or ref.startswith("#"):
            continue
        where = f"{SCHEMA_DIR / name}: key {key}"
        other_name, _, pointer = ref.partition("#")
        other = _schema(str(Path(name).parent / other_name))
        target: Any = other
        for part in filter(None, pointer.split("/")):
            if not isinstance(target, dict) or part not in target:
                raise fail(where, f"$ref {ref!r} points at nothing", f"name a key of {other_name}")
            target = target[part]
        for local in _local_defs(target):  # what it takes from its own file's $defs comes along
            theirs = (other.get("$defs") or {}).get(local)
            if theirs is None:
                raise fail(where, f"{other_name} has no $defs {local!r}", f"define it in {other_name}")
            if schema.setdefault("$defs", {}).setdefault(local, theirs) != theirs:
                raise fail(where, f"$defs {local!r} differs from {other_name}'s", "remove one of them")
        schema["properties"][key] = {**copy.deepcopy(target), **{k: v for k, v in prop.items() if k != "$ref"}}
    return schema


def shape_caps() -> list[str]:
    """The keys scale shape may cap (shape_world.caps, a recipe's shape: block): the config schema's list."""
    return _schema("config.schema.yaml")["properties"]["shape_world"]["properties"]["caps"]["propertyNames"]["enum"]


def _key_path(err) -> str:
    parts = [str(p) for p in err.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def unknown_keys(err) -> list[str]:
    """The keys an additionalProperties error is about: neither a declared property nor matched by a declared
    patternProperties pattern."""
    pats = [re.compile(p) for p in err.schema.get("patternProperties", {})]
    return sorted(k for k in set(err.instance) - set(err.schema.get("properties", {}))
                  if not any(p.search(k) for p in pats))


def _explain(err) -> tuple[str, str]:
    """Turn a jsonschema error into (what, fix) for the one-line message."""
    v = err.validator
    if v == "additionalProperties":
        extra = unknown_keys(err)
        known = sorted(err.schema.get("properties", {}))
        return (f"unknown key {extra[0]!r}" if extra else err.message,
                f"remove it or use one of: {', '.join(known)}" if known else "remove it")
    if v == "required":
        return err.message, "add the key"
    if v == "enum":
        return f"value {err.instance!r} is not allowed", f"use one of: {', '.join(map(str, err.validator_value))}"
    if v == "propertyNames":
        return f"unknown name {err.instance!r}", "use one of the names the schema lists"
    if v == "type":
        return f"value {err.instance!r} has the wrong type", f"give a {err.validator_value}"
    if v == "anyOf" and all(map(_alternative, err.validator_value)):
        return f"value {err.instance!r} is not allowed", f"give {' or '.join(map(_alternative, err.validator_value))}"
    return err.message, "see the schema in config/schemas/"


def _alternative(s: dict) -> str:
    """One branch of an anyOf as a fix names it (a constant, or a type and its lower bound), '' if it cannot."""
    if "const" in s:
        return str(s["const"])
    if set(s) <= {"type", "minimum"} and isinstance(s.get("type"), str):
        return f"an {s['type']}" + (f" >= {s['minimum']}" if "minimum" in s else "")
    return ""


def validate(obj: Any, schema_name: str, source: str) -> None:
    validate_schema(obj, _schema(schema_name), source)


def validate_schema(obj: Any, schema: dict, source: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        err = errors[0]
        # prefer the deepest error: it names the key a user has to change
        err = max(errors, key=lambda e: len(e.absolute_path))
        what, fix = _explain(err)
        key = _key_path(err)
        if err.validator == "additionalProperties":
            extra = unknown_keys(err)
            if extra:
                key = ".".join([*map(str, err.absolute_path), extra[0]])
        raise fail(f"{source}: key {key}", what, fix)


# ---------------------------------------------------------------- config

def check_config(cfg: dict, source: str = "config/config.yaml") -> dict:
    """Validate the workflow config (after --config overrides) and cross-check its references."""
    validate(cfg, "config.schema.yaml", source)
    fams = cfg["tiny_world"]["families"]
    for name, fam in fams.items():
        if fam["model_type"] != name:
            raise fail(f"{source}: key tiny_world.families.{name}.model_type",
                       f"{fam['model_type']!r} differs from the family name", f"set it to {name!r}")
    for name, m in cfg["models"].items():
        if m["tiny"] not in fams:
            raise fail(f"{source}: key models.{name}.tiny", f"family {m['tiny']!r} is not in tiny_world.families",
                       "add the family or pick another")
    return _check_entries(cfg, source)


def _check_entries(cfg: dict, source: str) -> dict:
    """The models' and data sets' own checks (local paths exist, a source at full scale, hub configs), and the
    default of results.shape (<tiny>/shape) for a config that overrides `results` without it."""
    cfg["results"].setdefault("shape", f"{cfg['results']['tiny']}/shape")
    for name, m in cfg["models"].items():
        if m.get("path") and not Path(m["path"]).exists():
            raise fail(f"{source}: key models.{name}.path", f"{m['path']} does not exist",
                       "point it at a local model directory or remove the key to use the hub id")
        if cfg["scale"] == "full" and not m.get("path") and not m.get("hub"):
            raise fail(f"{source}: key models.{name}", "neither hub nor path is set", "set one of them")
        for key in ("hub_config", "shape_config"):
            if m.get(key):
                _check_hub_config(m[key], f"{source}: key models.{name}.{key}")
    for name, d in cfg["datasets"].items():
        if d.get("path") and not Path(d["path"]).exists():
            raise fail(f"{source}: key datasets.{name}.path", f"{d['path']} does not exist",
                       "point it at a local JSON/JSONL file or directory, or remove the key to use the hub id")
    return cfg


# ---------------------------------------------------------------- a job's config

JOB_KEYS = ("scale", "results", "recipes_dir", "models", "datasets")
MODEL_KEYS = ("model", "base_model", "tokenizer_model")
DATASET_KEYS = ("dataset", "eval_dataset", "calibration_dataset", "check_dataset")


def job_config(cfg: dict, recipe: dict) -> dict:
    """The part of the config one recipe's job reads: the scale, the results directories and the models and data
    sets the recipe names (at scale shape also the shape world's caps, which change the recipe). A rule passes
    this (not the whole config), so an edit to one model's entry changes the params of the jobs that use that
    model only."""
    out = {"scale": cfg["scale"], "results": cfg["results"], "recipes_dir": cfg["recipes_dir"],
           "models": {recipe[k]: cfg["models"][recipe[k]] for k in MODEL_KEYS if k in recipe},
           "datasets": {recipe[k]: cfg["datasets"][recipe[k]] for k in DATASET_KEYS if k in recipe}}
    if cfg["scale"] == "shape":
        out["shape_world"] = cfg["shape_world"]
    return out


@lru_cache(maxsize=None)
def _job_schema() -> dict:
    full = _schema("config.schema.yaml")
    return {**full, "required": list(JOB_KEYS),
            "properties": {k: full["properties"][k] for k in (*JOB_KEYS, "shape_world")}}


def check_job_config(cfg: dict, source: str = "--job-json") -> dict:
    """Validate a job's config (job_config's shape: the config schema's entries for the keys it holds)."""
    validate_schema(cfg, _job_schema(), source)
    return _check_entries(cfg, source)


def hub_config_path(path: str) -> Path:
    """A `hub_config` file: relative paths are relative to the workflow directory."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def _check_hub_config(path: str, where: str) -> None:
    import json

    p = hub_config_path(path)
    if not p.is_file():
        raise fail(where, f"{path} does not exist", "point it at a copy of the hub model's config.json")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise fail(where, f"{path} is not valid JSON ({e})", "copy the hub model's config.json as it is") from None
    if not isinstance(d, dict) or not isinstance(d.get("model_type"), str):
        raise fail(where, f"{path} has no model_type", "copy the hub model's config.json as it is")


def load_config(path: str | os.PathLike = ROOT / "config" / "config.yaml", overrides: dict | None = None) -> dict:
    cfg = load_yaml(path) or {}
    for k, v in (overrides or {}).items():
        _set_dotted(cfg, k, v)
    return check_config(cfg, str(path))


def _set_dotted(cfg: dict, key: str, value: Any) -> None:
    """Set a dotted key; a name that itself holds dots (models.opt-2.7b.path) matches the existing key."""
    node, rest = cfg, key
    while "." in rest:
        head = next((k for k in sorted(node, key=len, reverse=True)
                     if isinstance(k, str) and rest.startswith(k + ".")), rest.split(".", 1)[0])
        node = node.setdefault(head, {})
        rest = rest[len(head) + 1:]
    node[rest] = value


def results_dir(cfg: dict) -> str:
    return cfg["results"][cfg["scale"]]


def pretrain_settings(cfg: dict, family: str) -> dict:
    """The tiny world's pretraining settings for one family: `steps` from steps_by_family where it names the family."""
    hp = {k: v for k, v in cfg["tiny_world"]["pretrain"].items() if k != "steps_by_family"}
    hp["steps"] = cfg["tiny_world"]["pretrain"].get("steps_by_family", {}).get(family, hp["steps"])
    return hp


def tiny_world_dir(cfg: dict) -> str:
    return f"{cfg['results']['tiny']}/tiny_world"


def shape_world_dir(cfg: dict) -> str:
    return f"{cfg['results']['shape']}/shape_world"


def shape_config_of(cfg: dict, name: str) -> str:
    """The config.json the shape world builds a model from: its shape_config, else its hub_config."""
    m = cfg["models"][name]
    path = m.get("shape_config") or m.get("hub_config")
    if not path:
        raise fail(f"config/config.yaml: key models.{name}", "no hub_config at scale shape",
                   "add hub_config: config/hub_configs/<name>.json (a copy of the hub config.json)")
    return str(hub_config_path(path))


def resolve_model(cfg: dict, name: str, where: str = "recipe", key: str = "model", must_exist: bool = False) -> dict:
    """Logical model name -> {source, family, trust_remote_code, local}. A local path always wins. At full scale
    a model with a `hub_config` also gets hub_config: the absolute path of the repository's copy of its config.json.

    must_exist: a step about to load the model asks for this, so a local model without config.json (a tiny-world
    model that was never built, a wrong `path`) is one line naming the path and the fix, not a hub lookup."""
    if name not in cfg["models"]:
        raise fail(f"{where}: key {key}", f"unknown model {name!r}",
                   f"use one of: {', '.join(sorted(cfg['models']))} (or add it to config/config.yaml models)")
    m = cfg["models"][name]
    trust = bool(m.get("trust_remote_code", False))
    if cfg["scale"] == "shape":  # the shape world's random-weight model (native architecture: no remote code)
        source = f"{shape_world_dir(cfg)}/models/{name}"
        if must_exist and not (Path(source) / "config.json").is_file():
            raise fail(f"{where}: key {key}", f"the shape-world model {name!r} is not built ({source}/config.json "
                       "is missing)", f"build it first: snakemake --config scale=shape {source}")
        return {"source": source, "family": m["tiny"], "trust_remote_code": False, "local": True}
    if m.get("path"):
        if must_exist and not (Path(m["path"]) / "config.json").is_file():
            raise fail(f"{where}: key {key}", f"{m['path']} (models.{name}.path) has no config.json",
                       f"point models.{name}.path in config/config.yaml at a model directory")
        return {"source": m["path"], "family": m["tiny"], "trust_remote_code": trust, "local": True}
    if cfg["scale"] == "tiny":
        source = f"{tiny_world_dir(cfg)}/models/{m['tiny']}"
        if must_exist and not (Path(source) / "config.json").is_file():
            raise fail(f"{where}: key {key}", f"the tiny-world model {name!r} is not built ({source}/config.json "
                       "is missing)", "build it first: snakemake --cores 2 tiny_world")
        return {"source": source, "family": m["tiny"], "trust_remote_code": False, "local": True}
    out = {"source": m["hub"], "family": m["tiny"], "trust_remote_code": trust, "local": False}
    if m.get("hub_config"):
        out["hub_config"] = str(hub_config_path(m["hub_config"]))
    return out


def resolve_dataset(cfg: dict, name: str, where: str = "recipe", key: str = "dataset") -> dict:
    """Logical data set name -> {source, format, hub_config, data_files, local}."""
    if name not in cfg["datasets"]:
        raise fail(f"{where}: key {key}", f"unknown data set {name!r}",
                   f"use one of: {', '.join(sorted(cfg['datasets']))} (or add it to config/config.yaml datasets)")
    d = cfg["datasets"][name]
    out = {"format": d["format"], "hub_config": d.get("hub_config"), "data_files": d.get("data_files")}
    if cfg["scale"] == "shape":
        if name not in cfg.get("shape_world", {}).get("data", {}):
            raise fail("config/config.yaml: key shape_world.data", f"no entry for data set {name!r}",
                       f"add shape_world.data.{name} (format, rows, lengths)")
        return {**out, "source": f"{shape_world_dir(cfg)}/data/{name}", "local": True, "hub_config": None,
                "data_files": None}
    if d.get("path"):
        return {**out, "source": d["path"], "local": True, "hub_config": None, "data_files": None}
    if cfg["scale"] == "tiny":
        return {**out, "source": f"{tiny_world_dir(cfg)}/data/{d['tiny']}", "local": True,
                "hub_config": None, "data_files": None}
    if not d.get("hub"):
        raise fail(f"config/config.yaml: key datasets.{name}", "no hub id and no path at scale full",
                   f"set datasets.{name}.path to a local file")
    return {**out, "source": d["hub"], "local": False}


# ---------------------------------------------------------------- recipes

def recipe_schema_name(stage: str) -> str:
    return f"recipes/{stage}.schema.yaml"


def known_stages() -> list[str]:
    return sorted(p.name.split(".")[0] for p in (SCHEMA_DIR / "recipes").glob("*.schema.yaml"))


# each stage's own cross-key check, "module:function" under quantune, called as check(recipe, cfg, where) after
# the schema (defaults filled); it returns the recipe with the defaults that depend on other keys filled too.
STAGE_CHECKS = {
    "quantize": "quantize:check",
    "lora_sft": "lora_sft:check_sft_recipe",
    "lora_sweep": "lora_sweep:check_sweep_recipe",
    "sft": "sft:check_recipe",
}

# the targets a recipe reads, checked once all recipes are loaded: stage -> [(key, stages the target may have)]
REFERENCES = {
    "quantize_compare": [("targets", ("quantize",))],
    "lora_compare": [("adapters", ("lora_sft",))],
    "merge": [("adapter", ("lora_sft",))],
    "gguf_convert": [("merged", ("merge",))],
    "gguf_quantize": [("gguf", ("gguf_convert",))],
    "gguf_evaluate": [("ggufs", ("gguf_convert", "gguf_quantize")), ("reference", ("merge",))],
}


def fill_defaults(recipe: dict, schema: dict) -> dict:
    """The schema's top-level `default`s for the keys the recipe leaves out."""
    out = dict(recipe)
    for key, prop in schema.get("properties", {}).items():
        if key not in out and isinstance(prop, dict) and "default" in prop:
            out[key] = copy.deepcopy(prop["default"])
    return out


def stage_check(recipe: dict, cfg: dict, where: str) -> dict:
    import importlib

    spec = STAGE_CHECKS.get(recipe["stage"])
    if spec is None:
        return recipe
    module, func = spec.split(":")
    return getattr(importlib.import_module(f"quantune.{module}"), func)(recipe, cfg, where)


def load_recipe(path: str | os.PathLike, cfg: dict) -> dict:
    """Load, validate and scale one recipe: the schema (with its defaults), logical names, then the stage's own
    check. Returns the recipe as the step will run it."""
    path = Path(path)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise fail(str(path), "a recipe must be a mapping", "start the file with `stage: <stage>`")
    stage = raw.get("stage")
    if stage not in known_stages():
        raise fail(f"{path}: key stage", f"unknown stage {stage!r}", f"use one of: {', '.join(known_stages())}")
    tiny = raw.get("tiny") or {}
    if not isinstance(tiny, dict):
        raise fail(f"{path}: key tiny", "must be a mapping of keys to replace at tiny scale", "indent its keys")
    shape = raw.get("shape") or {}
    for k in shape if isinstance(shape, dict) else ["(top level)"]:
        if k not in shape_caps():
            raise fail(f"{path}: key shape.{k}", "scale shape runs the full recipe; its block only caps steps and rows",
                       f"remove it or use one of: {', '.join(shape_caps())}")
    base = {k: v for k, v in raw.items() if k not in ("tiny", "shape")}
    validate(base, recipe_schema_name(stage), str(path))
    scaled = copy.deepcopy(base)
    for k, v in tiny.items():
        if k in ("stage", "name"):
            raise fail(f"{path}: key tiny.{k}", "cannot change at tiny scale", "move it out of the tiny block")
        scaled[k] = v
    # the tiny profile must itself produce a valid recipe (catches unknown keys and wrong types inside it)
    validate(scaled, recipe_schema_name(stage), f"{path} (tiny block)")
    if cfg["scale"] == "shape":
        scaled = shape_recipe(base, {**cfg["shape_world"]["caps"], **shape}, _schema(recipe_schema_name(stage)))
        rename = cfg["models"].get(base.get("model"), {}).get("shape_modules", {})
        if rename and "target_modules" in scaled:  # the shape model's names for the recipe's LoRA targets
            scaled["target_modules"] = [n for t in scaled["target_modules"] for n in rename.get(t, [t])]
        validate(scaled, recipe_schema_name(stage), f"{path} (shape caps)")
    recipe = fill_defaults(scaled if cfg["scale"] != "full" else base, _schema(recipe_schema_name(stage)))
    recipe["name"] = recipe.get("name") or path.stem
    if recipe["name"] != path.stem:
        raise fail(f"{path}: key name", f"{recipe['name']!r} differs from the file name", f"set it to {path.stem!r}")
    for key in MODEL_KEYS:
        if key in recipe:
            resolve_model(cfg, recipe[key], where=str(path), key=key)
    for key in DATASET_KEYS:
        if key in recipe:
            resolve_dataset(cfg, recipe[key], where=str(path), key=key)
    recipe["scale"] = cfg["scale"]
    if cfg["scale"] == "shape":  # what the caps replaced: the full recipe's values (None: the key was unset)
        recipe["shape_full"] = {k: base.get(k) for k in shape_caps() if k in scaled and scaled[k] != base.get(k)}
    return stage_check(recipe, cfg, str(path))


def shape_recipe(base: dict, caps: dict, schema: dict) -> dict:
    """The full recipe at scale shape: each cap the stage has lowers that key (a recipe's smaller value stays);
    a LoRA run's max_steps caps its epochs too (max_steps wins over num_train_epochs in transformers)."""
    out = copy.deepcopy(base)
    props = schema.get("properties", {})
    for k, cap in caps.items():
        if k in props:
            out[k] = min(out[k], cap) if isinstance(out.get(k), int) else cap
    return out


def check_references(recipes: dict[str, dict], paths: dict[str, str]) -> None:
    """Every target a recipe reads (REFERENCES) is a recipe of a stage that makes what it reads."""
    for name, r in sorted(recipes.items()):
        for key, stages in REFERENCES.get(r["stage"], []):
            refs = r[key]
            items = refs.items() if isinstance(refs, dict) else [(None, t) for t in (refs if isinstance(refs, list) else [refs])]
            for label, ref in items:
                if ref in recipes and recipes[ref]["stage"] in stages:
                    continue
                found = f"a recipe of stage {recipes[ref]['stage']}" if ref in recipes else "no recipe"
                known = ", ".join(n for s in stages for n in sorted(recipes) if recipes[n]["stage"] == s)
                raise fail(f"{paths[name]}: key {key if label is None else f'{key}.{label}'}", f"{ref!r} is {found}",
                           f"name a recipe of stage {' or '.join(stages)} ({known or 'none yet'})")


def referenced_targets(recipe: dict) -> list[str]:
    """The targets whose outputs a recipe's job reads (REFERENCES), in the recipe's order."""
    out = []
    for key, _ in REFERENCES.get(recipe["stage"], []):
        refs = recipe[key]
        out += list(refs.values()) if isinstance(refs, dict) else (refs if isinstance(refs, list) else [refs])
    return out


SWEEP_ONLY_KEYS = ("ranks", "alpha_per_rank", "eval_prompts_split", "num_prompts", "max_new_tokens",
                   "generation_batch_size")


def sweep_run_recipe(recipe: dict, rank: int, where: str) -> dict:
    """One run of a `lora_sweep` recipe: the lora_sft recipe with lora_r = rank and lora_alpha = alpha_per_rank x
    rank, validated against the lora_sft schema (the sweep's own keys are dropped). `name` stays the sweep's."""
    if recipe.get("stage") != "lora_sweep":
        raise fail(f"{where}: key stage", f"{recipe.get('stage')!r} is not lora_sweep", "give a lora_sweep recipe")
    ranks = list(recipe["ranks"])
    if rank not in ranks:
        raise fail(f"{where}: key ranks", f"rank {rank} is not in the sweep {ranks}",
                   f"use one of: {', '.join(map(str, ranks))}, or add it to ranks")
    run = {k: v for k, v in recipe.items() if k not in SWEEP_ONLY_KEYS + ("name", "scale", "description", "shape_full")}
    run.update(stage="lora_sft", lora_r=int(rank), lora_alpha=recipe["alpha_per_rank"] * int(rank))
    validate(run, recipe_schema_name("lora_sft"), f"{where} (rank {rank})")
    run = fill_defaults(run, _schema(recipe_schema_name("lora_sft")))
    run["name"], run["scale"] = recipe["name"], recipe["scale"]
    if "shape_full" in recipe:
        run["shape_full"] = recipe["shape_full"]
    return run


def load_recipes(cfg: dict, recipes_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """Every recipe of the directory, each checked (load_recipe), then the targets they read (check_references)."""
    rdir = Path(recipes_dir or (ROOT / cfg["recipes_dir"]))
    paths = {p.stem: p for p in sorted(rdir.glob("*.yaml"))}
    out = {name: load_recipe(p, cfg) for name, p in paths.items()}
    check_references(out, {n: str(p) for n, p in paths.items()})
    return out


# ---------------------------------------------------------------- CLI

def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise fail("--set", f"{item!r} is not KEY=VALUE", "write e.g. --set scale=full")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The config options every stage command takes (Snakemake passes --config-json)."""
    p.add_argument("--config", default=str(ROOT / "config" / "config.yaml"), help="config file")
    p.add_argument("--config-json", default=None, help="the effective config as JSON")
    p.add_argument("--job-json", default=None,
                   help="the part of the config one job reads, as JSON (what Snakemake passes: config.job_config)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE override (dotted keys)")


def stage_parser(module: str, doc: str, func, out_required: bool = True) -> argparse.ArgumentParser:
    """The parser every stage command starts from: --recipe, --out and the config options."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=out_required, default=None)
    add_config_args(p)
    p.set_defaults(func=func)
    return p


def config_from_args(a) -> dict:
    import json

    if getattr(a, "job_json", None):
        cfg = json.loads(a.job_json)
        for k, v in _parse_set(a.set).items():
            _set_dotted(cfg, k, v)
        return check_job_config(cfg)
    if a.config_json:
        cfg = json.loads(a.config_json)
        for k, v in _parse_set(a.set).items():
            _set_dotted(cfg, k, v)
        return check_config(cfg, "--config-json")
    return load_config(a.config, _parse_set(a.set))


def _cmd_check(args) -> None:
    cfg = config_from_args(args)
    recipes = load_recipes(cfg, args.recipes)
    print(f"ok: {args.config} (scale {cfg['scale']}) and {len(recipes)} recipes are valid")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantune.lib.config", description=__doc__.splitlines()[0])
    sub = p.add_subparsers()
    c = sub.add_parser("check", help="validate config and every recipe")
    add_config_args(c)
    c.add_argument("--recipes", default=None)
    c.set_defaults(func=_cmd_check)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["QuantuneError", "load_config", "load_recipe", "load_recipes", "resolve_model", "resolve_dataset"]
