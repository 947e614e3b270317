"""A recipe as a form made from its stage's schema (config/schemas/recipes/<stage>.schema.yaml), checked by the
workflow's own loader (load_recipe, then the targets it reads), and saved as a new recipe file."""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .common import QuantuneError, atomic_write_text, fail

UNSET = "(unset)"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BLOCKS = ("tiny", "shape")  # the scale blocks, edited as YAML


@dataclass
class Field:
    key: str
    kind: str  # bool | int | number | enum | text | yaml (numbers are typed as text: empty leaves the key unset)
    choices: list = field(default_factory=list)
    help: str = ""


def _resolve(prop: dict, schema: dict) -> dict:
    ref = prop.get("$ref", "")
    if ref.startswith("#/$defs/"):
        return {**schema["$defs"][ref.rsplit("/", 1)[1]], **{k: v for k, v in prop.items() if k != "$ref"}}
    return prop


def fields_of(stage: str) -> list[Field]:
    """The stage's recipe keys as form fields (stage and name aside), then the scale blocks."""
    from .config import _schema, recipe_schema_name

    schema = _schema(recipe_schema_name(stage))
    out = []
    for key, prop in schema.get("properties", {}).items():
        if key in ("stage", "name"):
            continue
        p = _resolve(prop, schema)
        types = p.get("type", [])
        types = [types] if isinstance(types, str) else list(types)
        if "enum" in p:
            kind = "enum"
        elif types and set(types) <= {"boolean", "null"}:
            kind = "bool"
        elif types and set(types) <= {"integer", "null"}:
            kind = "int"
        elif types and set(types) <= {"integer", "number", "null"}:
            kind = "number"
        elif types and set(types) <= {"string", "null"}:
            kind = "text"
        else:
            kind = "yaml"
        help_ = p.get("description", "") + (f" (default {p['default']!r})" if "default" in p else "")
        out.append(Field(key, kind, [str(c) for c in p.get("enum", [])], help_.strip()))
    return out + [Field(b, "yaml", help=f"the keys replaced at scale {b}") for b in BLOCKS]


def ordered(fields: list[Field], raw: dict) -> list[Field]:
    """The recipe's own keys first, in its order, then the rest of the schema's."""
    pos = {k: i for i, k in enumerate(raw)}
    return sorted(fields, key=lambda f: pos.get(f.key, len(pos)))


def form_value(f: Field, raw: dict) -> Any:
    """What the form shows for one key of a recipe file."""
    v = raw.get(f.key)
    if f.kind in ("bool", "enum"):
        return UNSET if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
    if v is None:
        return ""
    if f.kind in ("text", "int", "number"):
        return str(v)
    return yaml.safe_dump(v, allow_unicode=True, default_flow_style=isinstance(v, list)).strip()


def recipe_from_form(stage: str, fields: list[Field], values: list, where: str) -> dict:
    """The recipe a form holds: unset fields left out, YAML fields parsed (a bad one is one line naming the key)."""
    out: dict[str, Any] = {"stage": stage}
    for f, v in zip(fields, values):
        if v is None or v == "" or v == UNSET:
            continue
        if f.kind == "bool":
            out[f.key] = v == "true"
        elif f.kind == "enum":
            out[f.key] = _enum_value(v)
        elif f.kind in ("int", "number"):
            out[f.key] = _number(v)
        elif f.kind == "yaml":
            try:
                out[f.key] = yaml.safe_load(v)
            except yaml.YAMLError as e:
                raise fail(f"{where}: key {f.key}", f"not valid YAML ({str(e).splitlines()[0]})",
                           "write a YAML value, e.g. [a, b] or key: value") from None
        else:
            out[f.key] = v
    return out


def _number(v: Any) -> Any:
    """3 -> 3, 2e-4 -> 0.0002; anything else stays text, for the schema to name its type."""
    for conv in (int, float):
        try:
            return conv(str(v).strip())
        except ValueError:
            pass
    return v


def _enum_value(v: str) -> Any:
    """An enum choice as the schema has it: numbers stay numbers."""
    parsed = yaml.safe_load(v)
    return parsed if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else v


def check(recipe: dict, name: str, cfg: dict, recipes_dir: Path, others: dict[str, dict]) -> str:
    """The workflow's checks of a recipe saved as recipes/<name>.yaml: '' when valid, else its one-line error."""
    from .config import check_references, load_recipe

    shown = str(Path(recipes_dir) / f"{name}.yaml")
    try:
        recipe_file(name, recipes_dir)
    except QuantuneError as e:
        return f"quantune: error: {e}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
        try:
            loaded = load_recipe(path, cfg)
            rec = {**{n: r for n, r in others.items() if n != name}, name: loaded}
            check_references(rec, {n: str(Path(recipes_dir) / f"{n}.yaml") for n in rec})
        except QuantuneError as e:
            return f"quantune: error: {str(e).replace(str(path), shown)}"
    return ""


def recipe_file(name: str, recipes_dir: Path) -> Path:
    """recipes/<name>.yaml for a target name, never a path outside the recipes directory."""
    rdir = Path(recipes_dir).resolve()
    path = (rdir / f"{name}.yaml").resolve()
    if not NAME.match(name or "") or path.parent != rdir:
        raise fail(str(rdir / f"{name}.yaml"), f"{name!r} is not a target name",
                   "use letters, digits, '_', '-' or '.', starting with a letter or digit")
    return path


def save(recipe: dict, name: str, recipes_dir: Path, overwrite: bool) -> Path:
    """recipes/<name>.yaml, written atomically; an existing file only with overwrite."""
    path = recipe_file(name, recipes_dir)
    if path.exists() and not overwrite:
        raise fail(str(path), "exists already", "choose another name, or tick 'overwrite' to replace it")
    atomic_write_text(path, yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False))
    return path
