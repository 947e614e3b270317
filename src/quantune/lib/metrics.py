"""What each stage's metrics.json holds, declared in config/schemas/metrics/<stage>.schema.yaml (JSON Schema;
write_metrics' provenance keys in common.schema.yaml), and the check of a built file against its declaration.

    python -m quantune.lib.metrics check results            # every metrics.json under the directory
"""
from __future__ import annotations

import argparse
import json
from functools import lru_cache
from pathlib import Path

from .common import ROOT, fail, run_cli
from .config import unknown_keys

METRICS_SCHEMAS = ROOT / "config" / "schemas" / "metrics"


@lru_cache(maxsize=None)
def _registry():
    import yaml
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    schemas = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(METRICS_SCHEMAS.glob("*.yaml"))}
    reg = Registry().with_resources(
        [(n, Resource.from_contents(s, default_specification=DRAFT202012)) for n, s in schemas.items()])
    return schemas, reg


def declared_stages() -> list[str]:
    return sorted(n.split(".")[0] for n in _registry()[0] if n != "common.schema.yaml")


def check_metrics(path: str | Path) -> dict:
    """The metrics.json at `path`, checked against its stage's declaration; else one line naming file and key."""
    import jsonschema

    path = Path(path)
    m = json.loads(path.read_text(encoding="utf-8"))
    stage = m.get("stage") if isinstance(m, dict) else None
    schemas, reg = _registry()
    if f"{stage}.schema.yaml" not in schemas:
        raise fail(f"{path}: key stage", f"no declaration for stage {stage!r}",
                   f"add config/schemas/metrics/{stage}.schema.yaml (declared: {', '.join(declared_stages())})")
    v = jsonschema.Draft202012Validator(schemas[f"{stage}.schema.yaml"], registry=reg)
    errors = sorted(v.iter_errors(m), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        e = errors[0]
        key = ".".join(map(str, e.absolute_path))
        if e.validator == "additionalProperties":
            extra = unknown_keys(e)
            key, what = (extra[0], "undeclared key") if extra else (key, e.message)
        else:
            what = e.message[:200]
        raise fail(f"{path}: key {key or '(top level)'}", what,
                   f"declare it in config/schemas/metrics/{stage}.schema.yaml or fix the stage that writes it")
    return m


def _cmd_check(a) -> None:
    files = [p for d in a.dirs for p in (sorted(Path(d).rglob("metrics.json")) if Path(d).is_dir() else [Path(d)])]
    for f in files:
        check_metrics(f)
    print(f"ok: {len(files)} metrics.json files match their stage's declaration")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantune.lib.metrics", description=__doc__.splitlines()[0])
    sub = p.add_subparsers()
    c = sub.add_parser("check", help="check built metrics.json files against their stage's declaration")
    c.add_argument("dirs", nargs="+")
    c.set_defaults(func=_cmd_check)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
