"""Reports: gather finished targets' metrics into tables, plots and one page.

    python -m quantune.report build --results results [--recipes recipes] [--md results/REPORT.md]
        [--html results/report/index.html] [--figures results/report/figures]
    python -m quantune.report tensorboard-screenshot --logdir results --run REGEX --out PNG

`build` reads what exists under the results directory and never builds anything: every target that has a
metrics.json is reported from it (its `stage` field says which section it belongs to); every target the
report knows of (a recipe, or a target name listed in a section below) that has none is listed as
"not built". A number the report shows is one a target measured and wrote; a field a target does not
record is shown as "—", never as 0.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .lib.common import atomic_write_text, run_cli
from .lib.tables import markdown_table

# ================================================================ discovery

NOT_TARGET_DIRS = {"logs", "benchmarks", "report", "full"}
MISSING = "—"  # a built target that does not record this field


@dataclass
class Target:
    name: str
    dir: Path
    metrics: dict | None = None
    recipe_stage: str | None = None
    status: str = "not built"  # built | not built | unreadable
    note: str = ""

    @property
    def built(self) -> bool:
        return self.metrics is not None

    @property
    def stage(self) -> str | None:
        return (self.metrics or {}).get("stage") or self.recipe_stage

    def get(self, key: str, default: Any = None) -> Any:
        return (self.metrics or {}).get(key, default)


def recipe_stages(recipes_dir: str | Path | None) -> dict[str, str]:
    """{recipe name: stage} read from the recipe files (stage only; the workflow validates recipes)."""
    import yaml

    out: dict[str, str] = {}
    if recipes_dir is None or not Path(recipes_dir).is_dir():
        return out
    for p in sorted(Path(recipes_dir).glob("*.yaml")):
        try:
            r = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            r = {}
        out[p.stem] = str(r.get("stage", "?")) if isinstance(r, dict) else "?"
    return out


def discover(results: str | Path, stages: dict[str, str], expected: list[str] = ()) -> dict[str, Target]:
    """Every target under `results` with a metrics.json, plus every recipe and expected name (not built)."""
    results = Path(results)
    names = set(stages) | set(expected)
    if results.is_dir():
        for d in results.iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in NOT_TARGET_DIRS:
                if (d / "metrics.json").is_file():
                    names.add(d.name)
    out: dict[str, Target] = {}
    for name in sorted(names):
        d = results / name
        t = Target(name=name, dir=d, recipe_stage=stages.get(name))
        mf = d / "metrics.json"
        if mf.is_file():
            try:
                m = json.loads(mf.read_text(encoding="utf-8"))
                if not isinstance(m, dict):
                    raise ValueError("not a JSON object")
                t.metrics, t.status = m, "built"
            except (ValueError, UnicodeDecodeError) as e:
                t.status, t.note = "unreadable", f"{mf}: {e}"
        elif d.is_dir():
            t.note = "no metrics.json yet: running, interrupted or failed"
        elif name not in stages:
            t.note = "no recipe yet"
        out[name] = t
    return out


def fmt(v: Any, digits: int = 4) -> str:
    """A number as a person reads it: ints with separators, floats with `digits` significant digits."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"
    return str(v)


def pick(m: dict | None, keys: list[str]) -> tuple[str | None, Any]:
    """The first of `keys` that `m` records (a target's field names differ between stages)."""
    for k in keys:
        if m and k in m and m[k] is not None and m[k] != "":
            return k, m[k]
    return None, None


def size_mb(m: dict | None, keys: list[str]) -> tuple[str | None, float | None]:
    """A size field in MiB, whatever unit its name says (_bytes, _mb, _gb)."""
    k, v = pick(m, keys)
    if k is None or not isinstance(v, (int, float)):
        return None, None
    if k.endswith("_bytes") or k.endswith("bytes"):
        return k, v / 2**20
    if k.endswith("_gb") or k.endswith("gib"):
        return k, v * 1024
    return k, float(v)


# ================================================================ blocks (one model, two renderings)


@dataclass
class Block:
    kind: str  # h2 h3 p table figure pre md
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None
    anchor: str = ""


def H2(text, anchor):
    return Block("h2", text, anchor=anchor)


def H3(text):
    return Block("h3", text)


def P(text):
    return Block("p", text)


def T(headers, rows):
    return Block("table", headers=list(headers), rows=[[str(c) for c in r] for r in rows])


def F(path, caption):
    return Block("figure", caption, path=Path(path))


def MD(text):
    """Another target's markdown, embedded: its headings go three levels down (# -> ####)."""
    return Block("md", re.sub(r"^(#+)", r"\1###", text, flags=re.M))


def _link(text: str, path: Path) -> str:
    """A link to a file under results/, made relative to each rendered document (REPORT.md, index.html)."""
    return f"[{text}](@{Path(path).resolve()})"


def _relink(text: str, base: Path) -> str:
    import os

    return re.sub(r"\]\(@([^)]+)\)", lambda m: "](" + os.path.relpath(m.group(1), base.resolve()) + ")", text)


def render_markdown(blocks: list[Block], title: str, base: Path) -> str:
    """REPORT.md: figures are linked relative to `base` (the directory REPORT.md is written to)."""
    import os

    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "h3":
            lines += [f"### {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines += markdown_table(b.headers, b.rows) + [""]
        elif b.kind == "figure":
            rel = os.path.relpath(b.path, base)
            lines += [f"![{b.text}]({rel})", "", f"*{b.text}*", ""]
        elif b.kind == "pre":
            lines += ["```", b.text, "```", ""]
        elif b.kind == "md":
            lines += b.text.splitlines() + [""]
    return _relink("\n".join(lines).rstrip() + "\n", base)


_INLINE = re.compile(r"`([^`]+)`|\[([^\]]+)\]\(([^)\s]+)\)|\*\*([^*]+)\*\*")


def _inline_html(text: str) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1))}</code>")
        elif m.group(2) is not None:
            out.append(f'<a href="{html.escape(m.group(3))}">{html.escape(m.group(2))}</a>')
        else:
            out.append(f"<strong>{html.escape(m.group(4))}</strong>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _cell_class(c: str) -> str:
    if c.startswith("not built") or c.startswith("not measured") or c.startswith("unreadable"):
        return ' class="missing"'
    if c == "built":
        return ' class="built"'
    return ""


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
header{background:#24292f;color:#fff;padding:14px 28px;margin-left:230px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d1d9;font-size:13px}
nav{position:fixed;top:0;left:0;bottom:0;width:230px;overflow:auto;background:#fff;border-right:1px solid #ddd;
padding:16px 12px 12px;font-size:13px;box-sizing:border-box}nav b{display:block;margin-bottom:6px}nav a{display:block;padding:3px 0;color:#0a58ca;text-decoration:none}
main{margin-left:230px;padding:8px 28px 40px;max-width:1300px;box-sizing:border-box}
h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:34px}h3{margin-top:22px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px;display:block;overflow-x:auto;max-width:fit-content}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top;max-width:420px;background:#fff}
th{background:#f0f3f6}td.missing{color:#9a6700;background:#fff8c5;font-style:italic}td.built{color:#1a7f37}
figure{margin:10px 0 18px;display:inline-block;background:#fff;border:1px solid #ddd;padding:6px;max-width:100%}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:12px;color:#57606a;margin-top:4px}
code{background:#eff1f3;padding:1px 4px;border-radius:3px;font-size:12px}pre{background:#f6f8fa;padding:8px;overflow:auto}
.embedded{border-left:3px solid #d0d7de;padding-left:12px}
"""


def render_html(blocks: list[Block], title: str, subtitle: str, base: Path) -> str:
    """One self-contained page: images are embedded (data: URLs), so the file can be moved or mailed."""
    import markdown as mdlib

    body, nav = [], []
    for b in blocks:
        if b.kind == "h2":
            nav.append(f'<a href="#{b.anchor}">{html.escape(b.text)}</a>')
            body.append(f'<h2 id="{b.anchor}">{html.escape(b.text)}</h2>')
        elif b.kind == "h3":
            body.append(f"<h3>{html.escape(b.text)}</h3>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_html(_relink(b.text, base))}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td{_cell_class(c)}>{_inline_html(c)}</td>" for c in r) + "</tr>"
                           for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "pre":
            body.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "md":
            body.append(f'<div class="embedded">{mdlib.markdown(b.text, extensions=["tables"])}</div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
            f"<nav><b>Contents</b>{''.join(nav)}</nav><main>{''.join(body)}</main></body></html>\n")


# ================================================================ plots


def _plot(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
          logy: bool = False, marker: str | None = None, integer_x: bool = False) -> Path | None:
    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker=marker or ("o" if len(pts) < 15 else None))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    if not tb_dir.is_dir() or not any(tb_dir.rglob("events.out.tfevents.*")):
        return {}
    from .lib.tb import read_scalars

    # a resumed run has several event files: one value per step (the later file wins)
    return {tag: sorted(dict(pts).items()) for tag, pts in read_scalars(tb_dir).items()}


# ================================================================ sections


@dataclass
class Ctx:
    results: Path
    figures: Path
    targets: dict[str, Target]
    scale: str = "tiny"


def _status_cell(t: Target) -> str:
    if t.built:
        return "built"
    if t.status == "unreadable":
        return f"unreadable ({t.note})"
    return "not built" + (f" ({t.note})" if t.note else "")


def _rows_for(ts: list[Target], cols: list[tuple[str, Callable[[Target], Any]]]) -> list[list[str]]:
    rows = []
    for t in ts:
        if t.built:
            rows.append([f"`{t.name}`", "built"] + [fmt(f(t)) for _, f in cols])
        else:
            rows.append([f"`{t.name}`", _status_cell(t)] + [""] * len(cols))
    return rows


def _table(ts, cols):
    return T(["target", "status"] + [c for c, _ in cols], _rows_for(ts, cols))


def _f(key: str | list[str]):
    keys = [key] if isinstance(key, str) else key
    return lambda t: pick(t.metrics, keys)[1]


def _artifact_figures(t: Target, skip: set[str] = frozenset()) -> list[Block]:
    """The PNG files a target wrote beside its metrics.json (its own plots), embedded as they are."""
    if not t.built:
        return []
    return [F(p, f"{t.name}/{p.name} (written by the target)") for p in sorted(t.dir.glob("*.png")) if p.name not in skip]


def _provenance_note(ts: list[Target]) -> str:
    built = [t for t in ts if t.built]
    if not built:
        return ""
    commits = sorted({str(t.get("git_commit", "?")) for t in built})
    return f"Code: git {', '.join(f'`{c}`' for c in commits)} (per-target versions in [Provenance](#provenance))."


class Section:
    key = ""
    title = ""
    expected: list[str] = []
    stages: set[str] = set()

    def claims(self, t: Target) -> bool:
        return t.name in self.expected or (t.stage in self.stages and self.extra_claim(t))

    def extra_claim(self, t: Target) -> bool:
        return True

    def render(self, ts: list[Target], ctx: Ctx) -> list[Block]:
        raise NotImplementedError


class TinyWorld(Section):
    key, title, expected, stages = "tiny-world", "The tiny world (base models)", ["tiny_world"], {"tiny_world"}

    def render(self, ts, ctx):
        t = ts[0] if ts else None
        out = [P("Small pretrained models of every family the recipes use, trained on text that ships with the "
                 "machine (tiny scale only). Held-out perplexity before and after pretraining.")]
        if t is None or not t.built:
            return out + [_table(ts, [])]
        m = t.metrics
        fams = sorted({k[: -len("_ppl_heldout")] for k in m if k.endswith("_ppl_heldout")})
        rows = [[f, fmt(m.get(f"{f}_params_total")), fmt(m.get(f"{f}_ppl_heldout_untrained")),
                 fmt(m.get(f"{f}_ppl_heldout")), fmt(m.get(f"{f}_ppl_ratio_trained_vs_untrained")),
                 fmt(m.get(f"{f}_train_loss_last")), fmt(m.get(f"{f}_train_seconds"))] for f in fams]
        out.append(T(["family", "parameters", "held-out ppl untrained", "held-out ppl trained", "ratio",
                      "last train loss", "train s"], rows))
        curves = {f: _scalars(t.dir / "models" / f / "tb").get("train/loss", []) for f in fams}
        fig = _plot(ctx.figures / "tiny_world_pretrain_loss.png", curves, "step", "train/loss",
                    "tiny world: pretraining loss per family (TensorBoard train/loss)", logy=True)
        if fig:
            out.append(F(fig, "Pretraining loss per family, read from results/tiny_world/models/<family>/tb"))
        return out + [P(_provenance_note(ts))]


class Evaluate(Section):
    key, title, stages = "evaluate", "Base-model evaluation (the \"before\")", {"evaluate"}
    expected = ["eval_opt67b", "eval_opt27b"]

    def render(self, ts, ctx):
        cols = [("model", _f("model")), ("source", _f("model_source")), ("data/split",
                 lambda t: f"{fmt(t.get('dataset'))}/{fmt(t.get('split'))}"),
                ("context/stride", lambda t: f"{fmt(t.get('eval_context'))}/{fmt(t.get('eval_stride'))}"),
                ("perplexity", _f("eval_ppl")), ("tokens scored", _f("eval_tokens_scored")),
                ("gen tokens/s", _f("gen_tokens_per_s")), ("peak mem MiB", _f("peak_mem_mb")),
                ("parameters", _f("params_total")), ("scale", _f("scale"))]
        return [P("Perplexity with the stated context and stride, and greedy generation speed, of the unquantized "
                  "models: the baselines of the quantization section."), _table(ts, cols), P(_provenance_note(ts))]


QUANT_EXPECTED = ["rtn_opt67b", "gptq_opt67b", "awq_opt67b", "rtn_opt67b_w3", "gptq_opt67b_w3", "awq_opt67b_w3",
                  "bnb_int8_opt27b", "bnb_nf4_opt27b"]
# field names the report reads from a quantization target's metrics.json (the first one present wins)
Q_METHOD = ["method", "quant_method", "quantization", "algorithm", "scheme"]
Q_BITS = ["bits", "w_bits", "wbits", "weight_bits", "num_bits"]
Q_GROUP = ["group_size", "groupsize"]
Q_PPL = ["ppl_quant", "eval_ppl", "ppl", "quant_ppl", "ppl_quantized"]
Q_BASE_PPL = ["ppl_base", "baseline_ppl", "fp_ppl", "fp16_ppl", "base_ppl", "ref_ppl", "eval_ppl_baseline", "ppl_baseline"]
Q_DELTA = ["ppl_delta", "eval_ppl_delta", "delta_ppl"]
Q_SIZE = ["model_size_mb", "size_mb", "weights_mb", "model_mb", "disk_mb", "model_bytes", "size_bytes",
          "weight_bytes", "weights_bytes", "disk_bytes", "model_size_bytes"]
Q_BASE_SIZE = ["size_bytes_base", "baseline_size_mb", "fp_size_mb", "baseline_bytes", "fp_bytes", "baseline_model_bytes"]
Q_RATIO = ["size_ratio", "compression_ratio", "size_ratio_vs_fp", "size_ratio_vs_baseline"]
Q_TIME = ["quant_seconds", "quantize_seconds", "calibration_seconds", "quantization_seconds"]
Q_SPEED = ["gen_tokens_per_s", "tokens_per_s"]
Q_MEM = ["quant_peak_mem_mb", "peak_mem_mb", "gpu_peak_mem_mb"]
QUANT_STAGES = {"quantize", "quantization", "quant", "ptq", "gptq", "awq", "rtn", "bnb", "bnb_load", "bitsandbytes"}


def _method_of(t: Target) -> str:
    _, v = pick(t.metrics, Q_METHOD)
    if v:
        return str(v)
    n = t.name.lower()
    for key, label in (("gptq", "GPTQ"), ("awq", "AWQ"), ("rtn", "RTN"), ("int8", "LLM.int8"), ("nf4", "NF4")):
        if key in n:
            return label
    return MISSING


def _baseline_for(t: Target, ctx: Ctx) -> Target | None:
    """The evaluate target measured on the same model, data, split, context and stride (or None)."""
    for b in ctx.targets.values():
        if b.built and b.stage == "evaluate" and b.get("model") == t.get("model") and b.get("model") is not None:
            same = all(t.get(k) is None or t.get(k) == b.get(k)
                       for k in ("dataset", "split", "eval_context", "eval_stride", "scale"))
            if same and t.get("eval_context") is not None:
                return b
    return None


def quant_row_values(t: Target, ctx: Ctx) -> dict[str, Any]:
    m = t.metrics or {}
    _, ppl = pick(m, Q_PPL)
    _, base = pick(m, Q_BASE_PPL)
    _, delta = pick(m, Q_DELTA)
    how = "recorded by the target"
    if base is None and ppl is not None:
        b = _baseline_for(t, ctx)
        if b is not None:
            base, how = b.get("eval_ppl"), f"vs `{b.name}` (same model, data, context, stride)"
    if delta is None and ppl is not None and base is not None:
        delta = ppl - base
        how = how if how != "recorded by the target" else "ppl − baseline ppl, both recorded by the target"
    _, size = size_mb(m, Q_SIZE)
    _, ratio = pick(m, Q_RATIO)
    if ratio is None and size is not None:
        _, bsize = size_mb(m, Q_BASE_SIZE)
        if bsize:
            ratio = size / bsize
    return {"method": _method_of(t), "bits": pick(m, Q_BITS)[1], "group": pick(m, Q_GROUP)[1], "ppl": ppl,
            "base": base, "delta": delta, "delta_how": how if delta is not None else "", "size": size,
            "ratio": ratio, "time": pick(m, Q_TIME)[1], "speed": pick(m, Q_SPEED)[1], "mem": pick(m, Q_MEM)[1]}


class Quantization(Section):
    key, title, expected, stages = "quantization", "Quantization (GPTQ, AWQ, RTN, bitsandbytes)", QUANT_EXPECTED, QUANT_STAGES

    def render(self, ts, ctx):
        out = [P("Post-training quantization of OPT and bitsandbytes loading; perplexity on the same text, "
                 "context and stride as the baselines above. Δppl comes from the target, or is computed against "
                 "the evaluate target with the same model, data, context and stride (said in the last column).")]
        rows = []
        for t in ts:
            if not t.built:
                rows.append([f"`{t.name}`", _status_cell(t)] + [""] * 11)
                continue
            v = quant_row_values(t, ctx)
            rows.append([f"`{t.name}`", "built", v["method"], fmt(v["bits"]), fmt(v["group"]), fmt(v["ppl"]),
                         fmt(v["base"]), fmt(v["delta"]), fmt(v["size"]), fmt(v["ratio"]), fmt(v["time"]),
                         fmt(v["mem"]), v["delta_how"] or MISSING])
        out.append(T(["target", "status", "method", "bits", "group", "ppl", "baseline ppl", "Δppl", "size MiB",
                      "size ratio", "quantize s", "peak mem MiB", "Δppl source"], rows))
        pts = {}
        for t in ts:
            v = quant_row_values(t, ctx) if t.built else {}
            if v.get("ppl") is not None and v.get("size") is not None:
                pts.setdefault(v["method"], []).append((v["size"], v["ppl"]))
        fig = _plot(ctx.figures / "quantization_ppl_vs_size.png", pts, "model size (MiB)", "perplexity",
                    "quantization: perplexity vs size", marker="o")
        if fig:
            out.append(F(fig, "Perplexity vs size of every built quantization target (report's plot)"))
        for t in ts:
            out += _artifact_figures(t)
        return out + [P(_provenance_note(ts))]


class QuantCompare(Section):
    key, title, expected, stages = "quant-compare", "Quantization comparison table (quantize_compare)", ["quant_compare"], {"quantize_compare"}

    def render(self, ts, ctx):
        out = []
        for t in ts:
            if not t.built:
                out.append(_table([t], []))
                continue
            for p in sorted(t.dir.glob("*.md")):
                out += [P(f"From `{t.name}/{p.name}`:"), MD(p.read_text(encoding="utf-8"))]
            links = [_link(f"`{p.name}`", p) for p in sorted(t.dir.glob("*.csv"))]
            if links:
                out.append(P("Data: " + ", ".join(links)))
            out += _artifact_figures(t)
        return out + [P(_provenance_note(ts))]


QLORA_EXPECTED = ["qlora_chatglm_steps100", "qlora_chatglm_linear", "qlora_chatglm_cosine", "qlora_compare"]
SCORE_RE = re.compile(r"^(?P<sys>[A-Za-z0-9]+)_(?P<mode>greedy|sampled)_(?P<metric>bleu4|rouge1|rouge2|rougeL)$")


class QLoRA(Section):
    key, title, expected, stages = "qlora", "QLoRA / LoRA fine-tuning (ChatGLM3 on AdvertiseGen)", QLORA_EXPECTED, {"lora_sft", "lora_compare"}

    def extra_claim(self, t):
        return not t.name.startswith("lora_rank_sweep")

    def render(self, ts, ctx):
        sft = [t for t in ts if t.stage == "lora_sft" or (not t.built and t.name != "qlora_compare" and t.stage != "lora_compare")]
        cmp_ = [t for t in ts if t not in sft]
        cols = [("model", _f("model")), ("quant", _f("quantization")), ("scheduler", _f("lr_scheduler_type")),
                ("warmup", _f(["warmup_ratio", "warmup_steps"])),
                ("batch×accum", lambda t: f"{fmt(t.get('batch_size'))}×{fmt(t.get('gradient_accumulation_steps'))}"),
                ("LoRA r", _f("lora_r")), ("steps", _f("global_step")),
                ("loss first→last", lambda t: f"{fmt(t.get('train_loss_first'))} → {fmt(t.get('train_loss_last'))}"),
                ("eval loss", _f("eval_loss")), ("eval ppl", _f("eval_ppl")),
                ("trainable %", _f("params_trainable_pct")), ("tokens/s", _f("tokens_per_s")),
                ("peak mem MiB", _f("peak_mem_mb")), ("train s", _f("train_runtime"))]
        out = [P("Adapters trained with LoRA on a 4-bit (NF4) base, and their comparison on held-out prompts."),
               H3("Training runs"), _table(sft, cols)]
        curves, lrs = {}, {}
        for t in sft:
            if t.built:
                s = _scalars(t.dir / "tb")
                curves[t.name], lrs[t.name] = s.get("train/loss", []), s.get("train/lr", [])
        fig = _plot(ctx.figures / "lora_train_loss.png", curves, "optimizer step", "train/loss",
                    "LoRA / QLoRA training loss (TensorBoard train/loss)")
        if fig:
            out.append(F(fig, "Training loss of every built LoRA/QLoRA run (report's plot from tb/)"))
        fig = _plot(ctx.figures / "lora_train_lr.png", lrs, "optimizer step", "train/lr", "learning-rate schedules")
        if fig:
            out.append(F(fig, "Learning rate per step: linear vs cosine schedules (report's plot from tb/)"))
        for t in cmp_:
            out.append(H3(f"Comparison: {t.name}"))
            if not t.built:
                out.append(_table([t], []))
                continue
            out += self._compare(t)
        return out + [P(_provenance_note(ts))]

    def _compare(self, t: Target) -> list[Block]:
        m = t.metrics
        scores: dict[tuple[str, str], dict[str, float]] = {}
        for k, v in m.items():
            g = SCORE_RE.match(k)
            if g:
                scores.setdefault((g["sys"], g["mode"]), {})[g["metric"]] = v
        out = [P(f"{fmt(m.get('num_prompts'))} held-out prompts from `{fmt(m.get('dataset'))}` split `{fmt(m.get('split'))}`, "
                 f"at most {fmt(m.get('max_new_tokens'))} new tokens; adapters {m.get('adapters', MISSING)}. "
                 "BLEU-4 and ROUGE F1 ×100.")]
        order = sorted(scores, key=lambda sm: (sm[0] != "base", sm[0], sm[1]))
        out.append(T(["model", "decoding", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"],
                     [[s, mode] + [fmt(scores[(s, mode)].get(k)) for k in ("bleu4", "rouge1", "rouge2", "rougeL")]
                      for s, mode in order]))
        out += _artifact_figures(t)
        cj = t.dir / "comparison.json"
        if cj.is_file():
            try:
                rows = json.loads(cj.read_text(encoding="utf-8")).get("rows", [])
            except ValueError:
                rows = []
            systems = list(rows[0]["generations"]) if rows else []
            if rows:
                out.append(H3("Side by side (greedy, first 6 prompts)"))
                out.append(T(["prompt", "reference"] + systems,
                             [[_clip(r["prompt"], 80), _clip(r["reference"])]
                              + [_clip(r["generations"][s]["greedy"]["text"]) for s in systems] for r in rows[:6]]))
                out.append(P(f"All generations (greedy and sampled): {_link(f'`{t.name}/comparison.json`', cj)}, "
                             f"{_link(f'`{t.name}/comparison.md`', t.dir / 'comparison.md')}."))
        return out


def _clip(text: Any, n: int = 140) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


class SFT(Section):
    key, title, expected, stages = "sft", "DeepSpeed SFT (Qwen3)", ["qwen3_deepspeed_sft"], {"sft"}

    def render(self, ts, ctx):
        cols = [("model", _f("model")), ("ZeRO", _f("zero_stage")), ("world", _f("world_size")),
                ("epochs run/planned", lambda t: f"{fmt(t.get('epochs_run'))}/{fmt(t.get('epochs_planned'))}"),
                ("best epoch", _f("best_epoch")), ("best eval loss", _f("best_eval_loss")),
                ("best eval ppl", _f("best_eval_ppl")), ("saved model eval ppl", _f("saved_model_eval_ppl")),
                ("tokens/s", _f("train_tokens_per_s")), ("peak mem MiB", _f("peak_mem_mb"))]
        out = [P("Full-parameter supervised fine-tuning under DeepSpeed; evaluation loss and perplexity per epoch "
                 "(epoch 0 is before training)."), _table(ts, cols)]
        series = {}
        for t in ts:
            if not t.built:
                continue
            ep = sorted(int(k[len("eval_loss_epoch"):]) for k in t.metrics if re.fullmatch(r"eval_loss_epoch\d+", k))
            if ep:
                out.append(H3(f"{t.name}: eval per epoch"))
                out.append(T(["epoch", "eval loss", "eval ppl"],
                             [[str(e), fmt(t.get(f"eval_loss_epoch{e}")), fmt(t.get(f"eval_ppl_epoch{e}"))] for e in ep]))
                series[t.name] = [(e, t.get(f"eval_ppl_epoch{e}")) for e in ep if t.get(f"eval_ppl_epoch{e}") is not None]
        fig = _plot(ctx.figures / "sft_eval_ppl.png", series, "epoch", "eval perplexity",
                    "SFT: evaluation perplexity per epoch", marker="o", integer_x=True)
        if fig:
            out.append(F(fig, "Evaluation perplexity per epoch (report's plot from metrics.json eval_ppl_epoch<N>)"))
        for t in ts:
            out += _artifact_figures(t)
        return out + [P(_provenance_note(ts))]


GGUF_EXPECTED = ["lora_sft_qwen", "merge_lora_qwen", "gguf_f16_qwen", "gguf_q8_0", "gguf_q4_k_m", "gguf_q4_0", "gguf_eval"]


class GGUF(Section):
    key, title, expected = "gguf", "LoRA → merge → GGUF (llama.cpp)", GGUF_EXPECTED
    stages = {"merge", "gguf_convert", "gguf_quantize", "gguf_evaluate"}

    def render(self, ts, ctx):
        files = [t for t in ts if t.stage in ("gguf_convert", "gguf_quantize") or t.name.startswith("gguf_") and t.name != "gguf_eval"]
        evals = [t for t in ts if t.stage == "gguf_evaluate" or t.name == "gguf_eval"]
        chain = [t for t in ts if t not in files and t not in evals]
        cols = [("stage", lambda t: t.stage), ("train loss first→last",
                 lambda t: f"{fmt(t.get('train_loss_first'))} → {fmt(t.get('train_loss_last'))}" if t.stage == "lora_sft" else MISSING),
                ("eval loss", _f("eval_loss")), ("merge max |Δlogit|", _f("merge_max_abs_logit_diff")),
                ("parameters", _f("params_total"))]
        out = [P("Seed 004's export chain: LoRA SFT, merge into the base, GGUF f16, llama.cpp quantization, then "
                 "perplexity, speed and generations with llama-cpp-python."), H3("Adapter and merge"), _table(chain, cols)]
        fcols = [("type", _f(["ftype", "outtype"])), ("file MiB", lambda t: size_mb(t.metrics, ["gguf_file_bytes"])[1]),
                 ("bits/weight", _f("gguf_bits_per_weight")), ("output tensor", _f("type_output")),
                 ("layer matrices", _f("types_layer_matrices")),
                 ("seconds", _f(["quantize_seconds", "convert_seconds"]))]
        out += [H3("GGUF files"), _table(files, fcols), H3("Size, speed and perplexity (gguf_eval)")]
        for t in evals:
            if not t.built:
                out.append(_table([t], []))
                continue
            m = t.metrics
            names = [k[: -len("_file_bytes")] for k in m if k.endswith("_file_bytes") and f"{k[:-len('_file_bytes')]}_ppl" in m]
            names.sort(key=lambda n: -m[f"{n}_file_bytes"])
            base = next((k[: -len("_ppl_ratio_vs_hf")] for k in m if k.endswith("_ppl_ratio_vs_hf")), None)
            rows = [["transformers (merged, reference)", MISSING, fmt(m.get("hf_ppl")), MISSING, MISSING, MISSING,
                     MISSING, MISSING]]
            for n in names:
                rows.append([f"`{n}`", fmt(m[f"{n}_file_bytes"] / 2**20), fmt(m.get(f"{n}_ppl")),
                             fmt(m.get(f"{n}_ppl_ratio_vs_{base}")), fmt(m.get(f"{n}_pp_tokens_per_s")),
                             fmt(m.get(f"{n}_tg_tokens_per_s")), fmt(m.get(f"{n}_tg_speedup_vs_{base}")),
                             fmt(m.get(f"{n}_greedy_agree_mean"))])
            out.append(P(f"`{t.name}`: {fmt(m.get('dataset'))}/{fmt(m.get('split'))}, context {fmt(m.get('context'))}, stride "
                         f"{fmt(m.get('stride'))}, {fmt(m.get('tokens_scored'))} tokens scored, {fmt(m.get('threads'))} "
                         f"threads, n_gpu_layers {fmt(m.get('n_gpu_layers'))}; ratios are vs `{base}`."))
            out.append(T(["model", "file MiB", "ppl", "ppl ratio", "prompt tokens/s", "gen tokens/s", "gen speed-up",
                          "greedy tokens agreeing with transformers (mean)"], rows))
            pts = {n: [(m[f"{n}_file_bytes"] / 2**20, m[f"{n}_ppl"])] for n in names}
            fig = _plot(ctx.figures / f"{t.name}_ppl_vs_size.png", pts, "file size (MiB)", "perplexity",
                        "GGUF: perplexity vs file size", marker="o")
            if fig:
                out.append(F(fig, f"{t.name}: perplexity vs file size per GGUF (report's plot)"))
            gj = t.dir / "generations.jsonl"
            if gj.is_file():
                gens = [json.loads(ln) for ln in gj.read_text(encoding="utf-8").splitlines() if ln.strip()]
                if gens:
                    out.append(T(["prompt", "transformers"] + names,
                                 [[_clip(g.get("prompt"), 60), _clip(g.get("transformers"), 100)]
                                  + [_clip(g.get(n, MISSING), 100) for n in names] for g in gens[:3]]))
        for t in ts:
            out += _artifact_figures(t)
        return out + [P(_provenance_note(ts))]


RANK_RE = re.compile(r"^(?:r|rank|lora_r)_?(?P<r>\d+)_(?P<field>.+)$")


class RankSweep(Section):
    key, title, expected, stages = "rank-sweep", "LoRA rank sweep", ["lora_rank_sweep"], {"lora_rank_sweep", "rank_sweep", "lora_sweep"}

    def claims(self, t):
        return t.name.startswith("lora_rank_sweep") or t.stage in self.stages

    def render(self, ts, ctx):
        out = [P("LoRA rank against quality and cost.")]
        for t in ts:
            if not t.built:
                out.append(_table([t], []))
                continue
            piv: dict[int, dict[str, Any]] = {}
            for k, v in t.metrics.items():
                g = RANK_RE.match(k)
                if g and isinstance(v, (int, float)):
                    piv.setdefault(int(g["r"]), {})[g["field"]] = v
            if piv:
                fields = sorted({f for d in piv.values() for f in d})
                out.append(H3(f"{t.name}: per rank"))
                out.append(T(["rank"] + fields, [[str(r)] + [fmt(piv[r].get(f)) for f in fields] for r in sorted(piv)]))
            else:
                out.append(_generic_table(t))
            for p in sorted(t.dir.glob("*.md")):
                out += [P(f"From `{t.name}/{p.name}`:"), MD(p.read_text(encoding="utf-8"))]
            out += _artifact_figures(t)
        return out + [P(_provenance_note(ts))]


SKIP_GENERIC = re.compile(r"^(version_|git_commit$|written_at$)")


def _generic_table(t: Target) -> Block:
    items = [(k, v) for k, v in sorted(t.metrics.items()) if not SKIP_GENERIC.match(k)]
    return T(["field", "value"], [[k, _clip(fmt(v), 120)] for k, v in items])


class Other(Section):
    key, title = "other", "Other targets"

    def claims(self, t):
        return True

    def render(self, ts, ctx):
        out = [P("Targets whose stage has no section of its own: every field of their metrics.json.")]
        for t in ts:
            out.append(H3(f"{t.name} (stage {t.stage or 'unknown'})"))
            out.append(_generic_table(t) if t.built else _table([t], []))
            out += _artifact_figures(t)
        return out


SECTIONS: list[Section] = [TinyWorld(), Evaluate(), Quantization(), QuantCompare(), QLoRA(), SFT(), GGUF(), RankSweep()]
EXPECTED = [n for s in SECTIONS for n in s.expected]


def assign(targets: dict[str, Target]) -> dict[str, list[Target]]:
    """Each target goes to the first section that names it, then to the first whose stages hold its stage."""
    out: dict[str, list[Target]] = {s.key: [] for s in SECTIONS + [Other()]}
    for t in targets.values():
        sec = next((s for s in SECTIONS if t.name in s.expected), None)
        sec = sec or next((s for s in SECTIONS if s.claims(t)), None)
        if sec is None:
            if not t.built and t.status != "unreadable" and t.recipe_stage is None:
                continue  # pragma: no cover (expected names always have a section)
            sec = Other()
        out[sec.key].append(t)
    order = {n: i for s in SECTIONS for i, n in enumerate(s.expected)}
    for k in out:
        out[k].sort(key=lambda t: (order.get(t.name, 1000), t.name))
    return out


# ================================================================ seed 001's method table


SEED001 = [
    # method, seed's bits, seed's compression, seed's accuracy claim, how the project measures it
    ("LLM.int8 (bitsandbytes)", "8-bit", "medium (about 50%)", "good, small loss", "int8"),
    ("bitsandbytes NF4 (4-bit at load)", "4-bit", "not in the seed's table", "seed 001 task 1.3: quick low-memory "
     "deployment", "nf4"),
    ("AutoAWQ / AWQ", "4-bit", "high (about 75%)", "fairly good, slight drop", "awq"),
    ("QLoRA", "4-bit + LoRA", "high", "training and inference", "qlora"),
    ("GPTQ", "3-4 bit", "very high", "better than plain very-low-bit", "gptq"),
    ("SmoothQuant", "mixed (W8A8)", "high", "optimised for very low bit", None),
    ("Pruning + quantization", "low-bit + sparsity", "very high", "depends on the pruning", None),
]


def _u(v: Any, unit: str) -> str:
    return MISSING if v is None else f"{fmt(v)} {unit}"


def _method_targets(kind: str, targets: dict[str, Target]) -> list[Target]:
    out = []
    for t in targets.values():
        if not t.built:
            continue
        n, st = t.name.lower(), t.stage
        meth = str(pick(t.metrics, Q_METHOD)[1] or "").lower()
        if kind == "qlora":
            if st == "lora_sft" and str(t.get("quantization", "")).lower() in ("nf4", "fp4", "4bit"):
                out.append(t)
        elif st in QUANT_STAGES or n in QUANT_EXPECTED or st in ("bnb",):
            if kind in n or kind in meth.replace(".", "").replace("llm", ""):
                out.append(t)
    return sorted(out, key=lambda t: t.name)


def seed001_table(targets: dict[str, Target], ctx: Ctx) -> list[Block]:
    rows = []
    for method, bits, comp, acc, kind in SEED001:
        ts = _method_targets(kind, targets) if kind else []
        seed = f"{bits}; {comp}; {acc}"
        if not ts:
            planned = [n for n in (QLORA_EXPECTED[:3] if kind == "qlora" else QUANT_EXPECTED) if kind and kind in n]
            why = "no target in this project" if kind is None else "its targets are not built"
            rows.append([method, seed, ", ".join(f"`{n}`" for n in planned) + " (not built)" if planned else MISSING,
                         f"not measured ({why})", "not measured", "not measured", MISSING])
            continue
        for t in ts:
            if kind == "qlora":
                cmp_ = next((c for c in targets.values() if c.built and c.stage == "lora_compare"), None)
                label = next((lab for lab, tgt in (x.split("=", 1) for x in str((cmp_ and cmp_.get("adapters")) or "").split(",") if "=" in x)
                              if tgt == t.name), None)
                bleu = cmp_.get(f"{label}_greedy_bleu4") if cmp_ is not None and label else None
                quality = (f"eval ppl {fmt(t.get('eval_ppl'))}" + (f"; BLEU-4 {fmt(bleu)} (greedy, `{cmp_.name}`)" if bleu is not None else ""))
                rows.append([method, seed, f"`{t.name}`", quality,
                             f"trainable {fmt(t.get('params_trainable_pct'))}% of {fmt(t.get('params_total'))} params",
                             f"peak {_u(t.get('peak_mem_mb'), 'MiB')}", f"{t.get('scale', MISSING)}, `{t.get('git_commit', '?')}`"])
                continue
            v = quant_row_values(t, ctx)
            quality = f"ppl {fmt(v['ppl'])}" + (f" (Δ {fmt(v['delta'])} vs baseline {fmt(v['base'])})" if v["delta"] is not None else "")
            size = (f"{fmt(v['size'])} MiB" if v["size"] is not None else MISSING) + (f", ratio {fmt(v['ratio'])}" if v["ratio"] is not None else "")
            rows.append([method, seed, f"`{t.name}` ({fmt(v['bits'])}-bit)" if v["bits"] is not None else f"`{t.name}`",
                         quality, size, f"peak {_u(v['mem'], 'MiB')}; quantize {_u(v['time'], 's')}",
                         f"{t.get('scale', MISSING)}, `{t.get('git_commit', '?')}`"])
    return [P("Seed 001's table of LLM quantization methods, rebuilt: the seed's own claims (translated) beside "
              "what this project measured. \"not measured\" means no built target measures it; at tiny scale the "
              "numbers come from tiny models and say nothing about the real ones."),
            T(["method", "seed 001 says (bits; compression; accuracy)", "project target", "measured quality",
               "measured size / trainable", "measured memory / time", "scale, commit"], rows)]


# ================================================================ the whole report


def _provenance(targets: dict[str, Target]) -> Block:
    rows = []
    for t in targets.values():
        if not t.built:
            continue
        m = t.metrics
        others = ", ".join(f"{k[8:]} {v}" for k, v in sorted(m.items())
                           if k.startswith("version_") and k not in ("version_python", "version_torch", "version_transformers"))
        rows.append([f"`{t.name}`", str(m.get("stage", MISSING)), str(m.get("scale", MISSING)),
                     f"`{m.get('git_commit', MISSING)}`", str(m.get("written_at", MISSING)),
                     str(m.get("version_python", MISSING)), str(m.get("version_torch", MISSING)),
                     str(m.get("version_transformers", MISSING)), others or MISSING])
    return T(["target", "stage", "scale", "git commit", "written at (UTC)", "python", "torch", "transformers",
              "other libraries"], rows)


def build_report(results: str | Path, stages: dict[str, str], md_out: str | Path | None = None,
                 html_out: str | Path | None = None, figures: str | Path | None = None,
                 tb_screenshot: str | Path | None = None, scale: str | None = None) -> dict:
    """Scan `results`, write REPORT.md and the HTML page; return what was found (for tests and logs)."""
    results = Path(results)
    figures = Path(figures) if figures else results / "report" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    scale = scale or ("full" if results.name == "full" else "tiny")
    # the tiny world exists at tiny scale only
    targets = discover(results, stages, [n for n in EXPECTED if scale == "tiny" or n != "tiny_world"])
    ctx = Ctx(results=results, figures=figures, targets=targets, scale=scale)
    by_sec = assign(targets)
    built = [t for t in targets.values() if t.built]
    missing = [t for t in targets.values() if not t.built]

    blocks: list[Block] = [H2("Overview", "overview"), P(
        f"Results directory `{results}`; {len(built)} targets built, {len(missing)} not built. Every number below is "
        "read from a target's `metrics.json` (or its TensorBoard events); a target that is not built is listed as "
        f"\"not built\", and a field a built target does not record is shown as \"{MISSING}\"."
        + (" Scale tiny: tiny models on a tiny corpus, numbers that test the pipeline, not the real models."
           if scale == "tiny" else ""))]
    rows = []
    for sec in SECTIONS + [Other()]:
        for t in by_sec[sec.key]:
            rows.append([sec.title, f"`{t.name}`", _status_cell(t), str(t.stage or MISSING),
                         str(t.get("written_at", "")), f"`{t.get('git_commit')}`" if t.built else ""])
    blocks.append(T(["section", "target", "status", "stage", "written at (UTC)", "git commit"], rows))
    blocks += [H2("Seed 001: quantization methods, measured", "seed001")] + seed001_table(targets, ctx)
    for sec in SECTIONS + [Other()]:
        ts = by_sec[sec.key]
        if not ts:
            continue
        blocks.append(H2(sec.title, sec.key))
        blocks += [b for b in sec.render(ts, ctx) if not (b.kind == "p" and not b.text)]
    blocks.append(H2("TensorBoard", "tensorboard"))
    runs = sorted(str(p.parent.relative_to(results)) for p in results.rglob("events.out.tfevents.*")
                  if not any(part.startswith(".") for part in p.relative_to(results).parts))
    runs = sorted(set(runs))
    blocks.append(P(f"`tensorboard --logdir {results}` lists {len(runs)} runs, named by their directory: "
                    + ", ".join(f"`{r}`" for r in runs[:60]) + ("…" if len(runs) > 60 else "") + ". Tags: "
                    "`train/loss`, `train/lr`, `train/grad_norm`, `eval/loss`, `eval/ppl`, `quant/...`, "
                    "`system/tokens_per_s`, `system/peak_mem_mb`, `system/wall_s`, `final/<metric>`."))
    if tb_screenshot and Path(tb_screenshot).is_file():
        blocks.append(F(tb_screenshot, "TensorBoard's time-series view of the tiny OPT pretraining run "
                                       "(headless Chromium screenshot)"))
    blocks += [H2("Provenance", "provenance"), P("Each row traces a target to the code (git commit; -dirty: "
               "uncommitted changes) and library versions that produced it."), _provenance(targets)]

    title = "quantune report"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md_out = Path(md_out) if md_out else results / "REPORT.md"
    html_out = Path(html_out) if html_out else results / "report" / "index.html"
    atomic_write_text(md_out, render_markdown(blocks, title, md_out.parent).replace(
        f"# {title}\n", f"# {title}\n\nBuilt {stamp} from `{results}`. HTML version: "
        f"`{html_out.relative_to(md_out.parent) if html_out.is_relative_to(md_out.parent) else html_out}`.\n", 1))
    atomic_write_text(html_out, render_html(blocks, title, f"built {stamp} from {results}; {len(built)} targets "
                                                           f"built, {len(missing)} not built", html_out.parent))
    return {"built": sorted(t.name for t in built), "not_built": sorted(t.name for t in missing),
            "sections": {k: [t.name for t in v] for k, v in by_sec.items()}, "runs": runs,
            "figures": sorted(str(b.path) for b in blocks if b.kind == "figure")}


def _cmd_build(a) -> None:
    stages = json.loads(a.recipe_stages) if a.recipe_stages else recipe_stages(a.recipes)
    r = build_report(a.results, stages, a.md, a.html, a.figures, a.tensorboard_png, a.scale)
    print(f"report: {len(r['built'])} targets built ({', '.join(r['built']) or 'none'}); "
          f"{len(r['not_built'])} not built ({', '.join(r['not_built']) or 'none'}); {len(r['runs'])} TensorBoard runs")


def _cmd_tb_screenshot(a) -> None:
    from .lib.browser import screenshot_tensorboard

    info = screenshot_tensorboard(a.logdir, a.run, a.out, tag_regex=a.tags)
    print(json.dumps(info))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantune.report", description=__doc__.splitlines()[0])
    sub = p.add_subparsers()
    b = sub.add_parser("build", help="REPORT.md and the HTML report from whatever is built under --results")
    b.add_argument("--results", required=True)
    b.add_argument("--recipes", default="recipes", help="recipes directory (target names and stages)")
    b.add_argument("--recipe-stages", default=None, help='{"<recipe>": "<stage>"} instead of reading --recipes')
    b.add_argument("--md", default=None, help="default: <results>/REPORT.md")
    b.add_argument("--html", default=None, help="default: <results>/report/index.html")
    b.add_argument("--figures", default=None, help="default: <results>/report/figures")
    b.add_argument("--tensorboard-png", default=None, help="a TensorBoard screenshot to embed, when it exists")
    b.add_argument("--scale", choices=["tiny", "full"], default=None, help="default: full if --results ends in full/")
    b.set_defaults(func=_cmd_build)
    s = sub.add_parser("tensorboard-screenshot", help="serve --logdir with TensorBoard on localhost and screenshot "
                                                      "one run's scalars in headless Chromium")
    s.add_argument("--logdir", required=True)
    s.add_argument("--run", required=True, help="run name regex, e.g. ^tiny_world/models/opt/tb$")
    s.add_argument("--tags", default="^(train|eval|system)/", help="tag regex")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_tb_screenshot)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
