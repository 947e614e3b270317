"""A target as the report sees it, and the keys its stage declares.

The report reads a metrics.json only through Target.get, which refuses a key that the target's stage does not
declare in config/schemas/metrics/<stage>.schema.yaml (its `properties`, or a key its `patternProperties`
match; common.schema.yaml for a target whose stage has no declaration): a report that asks for a name no stage
writes fails in the tests instead of showing "—" forever."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .metrics import _registry, declared_stages
from .report_render import MISSING


class UndeclaredKey(LookupError):
    """The report asked a target for a key its stage does not declare (a bug in the report)."""


def stage_schema(stage: str | None) -> dict | None:
    """config/schemas/metrics/<stage>.schema.yaml, or None for a stage without a declaration."""
    return _registry()[0].get(f"{stage}.schema.yaml") if stage in declared_stages() else None


@lru_cache(maxsize=None)
def _declaration(stage: str | None) -> tuple[frozenset[str], tuple[re.Pattern, ...]]:
    s = stage_schema(stage) or _registry()[0]["common.schema.yaml"]
    return frozenset(s.get("properties", {})) | {"stage"}, tuple(map(re.compile, s.get("patternProperties", {})))


def declares(stage: str | None, key: str) -> bool:
    props, patterns = _declaration(stage)
    return key in props or any(p.search(key) for p in patterns)


def provenance_key(key: str) -> bool:
    """A key write_metrics adds to every metrics.json (common.schema.yaml: git_commit, written_at, version_*)."""
    return declares("common", key) and key != "stage"


def declared_values(stage: str, key: str) -> list:
    """The values a stage's schema allows for `key` (its enum or const)."""
    p = (stage_schema(stage) or {}).get("properties", {}).get(key, {})
    return list(p.get("enum", [p["const"]] if "const" in p else []))


def nested_fields(stage: str, key: str, depth: int = 1) -> list[str]:
    """The field names an object-valued key declares `depth` levels down, in the schema's order
    (e.g. lora_sweep's runs: {"<rank>": {field: value}} -> the fields)."""
    s = (stage_schema(stage) or {}).get("properties", {}).get(key, {})
    for _ in range(depth):
        s = s.get("additionalProperties") or {}
    return list(s.get("properties", {}))


def scales() -> list[str]:
    """The scales a metrics.json may record (common.schema.yaml's scale)."""
    return list(_registry()[0]["common.schema.yaml"]["$defs"]["scale"]["enum"])


def declared_targets(scale: str) -> dict[str, str]:
    """{target: stage} for the stages whose schema fixes the target's name (`target: {const: ...}`, e.g. the tiny
    world); a stage whose schema declares no `scale` exists at scale tiny only."""
    out = {}
    for stage in declared_stages():
        props = stage_schema(stage).get("properties", {})
        if "const" in props.get("target", {}) and (scale == "tiny" or "scale" in props):
            out[props["target"]["const"]] = stage
    return out


@dataclass
class Target:
    name: str
    dir: Path
    metrics: dict | None = None
    recipe: dict = field(default_factory=dict)  # the recipe's keys ({"stage": ...} at least), {} without a recipe
    status: str = "not built"  # built | not built | unreadable
    note: str = ""

    @property
    def built(self) -> bool:
        return self.metrics is not None

    @property
    def stage(self) -> str | None:
        return (self.metrics or {}).get("stage") or self.recipe.get("stage")

    def declares(self, key: str) -> bool:
        return declares(self.stage, key)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a key the target's stage declares (default when the target does not record it)."""
        if not self.declares(key):
            schema = f"{self.stage}.schema.yaml" if stage_schema(self.stage) else "common.schema.yaml"
            raise UndeclaredKey(f"report reads {key!r} of target {self.name}, which config/schemas/metrics/{schema} "
                                "does not declare")
        return (self.metrics or {}).get(key, default)

    def obj(self, key: str) -> dict:
        """An object-valued declared key ({} when absent, or when a file written before the key was nested holds
        something else there)."""
        v = self.get(key)
        return v if isinstance(v, dict) else {}

    def status_cell(self) -> str:
        if self.built:
            return "built"
        if self.status == "unreadable":
            return f"unreadable ({self.note})"
        return "not built" + (f" ({self.note})" if self.note else "")

    def value_or_missing(self, key: str) -> str:
        """A column every stage may or may not declare (e.g. scale: the tiny world has none)."""
        return str(self.get(key, MISSING)) if self.declares(key) else MISSING
