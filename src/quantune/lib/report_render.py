"""The report's document: blocks (headings, paragraphs, tables, figures, another file's Markdown) rendered twice,
as Markdown (REPORT.md) and as one self-contained HTML page; numbers as a person reads them; the report's plots."""
from __future__ import annotations

import base64
import html
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tables import markdown_table

MISSING = "—"  # a built target that does not record this field


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


def clip(text: Any, n: int = 140) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


@dataclass
class Block:
    kind: str  # h2 h3 p table figure md
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None
    anchor: str = ""
    grey: frozenset[int] = frozenset()  # table columns whose numbers mean nothing at this scale


# quality columns (perplexity, loss, KL, text scores): at scale shape (random weights) they mean nothing
QUALITY = re.compile(r"ppl|perplex|loss|\bKL\b|\bkl|BLEU|ROUGE|accura|\beven\b|\bodd\b", re.I)


def grey_quality(blocks: list[Block]) -> list[Block]:
    """Mark every table's quality columns as greyed (scale shape: the models have random weights)."""
    for b in blocks:
        if b.kind == "table":
            b.grey = frozenset(i for i, h in enumerate(b.headers) if QUALITY.search(h))
        elif b.kind == "md":  # another file's tables: one line above them says it
            b.text = "*Scale shape: random weights; the quality numbers below mean nothing.*\n\n" + b.text
    return blocks


def H2(text: str, anchor: str) -> Block:
    return Block("h2", text, anchor=anchor)


def H3(text: str) -> Block:
    return Block("h3", text)


def P(text: str) -> Block:
    return Block("p", text)


def T(headers, rows) -> Block:
    return Block("table", headers=list(headers), rows=[[str(c) for c in r] for r in rows])


def F(path, caption: str) -> Block:
    return Block("figure", caption, path=Path(path))


def MD(text: str) -> Block:
    """Another target's markdown, embedded: its headings go three levels down (# -> ####)."""
    return Block("md", re.sub(r"^(#+)", r"\1###", text, flags=re.M))


def link(text: str, path: Path) -> str:
    """A link to a file under results/, made relative to each rendered document (REPORT.md, index.html)."""
    return f"[{text}](@{Path(path).resolve()})"


def _relink(text: str, base: Path) -> str:
    return re.sub(r"\]\(@([^)]+)\)", lambda m: "](" + os.path.relpath(m.group(1), base.resolve()) + ")", text)


def render_markdown(blocks: list[Block], title: str, base: Path) -> str:
    """REPORT.md: figures are linked relative to `base` (the directory REPORT.md is written to)."""
    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "h3":
            lines += [f"### {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            rows = [[f"*{c}*" if i in b.grey and c not in ("", MISSING) else c for i, c in enumerate(r)] for r in b.rows]
            lines += markdown_table(b.headers, rows) + [""]
        elif b.kind == "figure":
            rel = os.path.relpath(b.path, base)
            lines += [f"![{b.text}]({rel})", "", f"*{b.text}*", ""]
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


def _cell_class(c: str, grey: bool = False) -> str:
    if grey:
        return ' class="shape-quality" title="random weights at scale shape: this number means nothing"'
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
padding:16px 12px 12px;font-size:13px;box-sizing:border-box}nav b{display:block;margin-bottom:6px}
nav a{display:block;padding:3px 0;color:#0a58ca;text-decoration:none}
main{margin-left:230px;padding:8px 28px 40px;max-width:1300px;box-sizing:border-box}
h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:34px}h3{margin-top:22px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px;display:block;overflow-x:auto;max-width:fit-content}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top;max-width:420px;background:#fff}
th{background:#f0f3f6}td.missing{color:#9a6700;background:#fff8c5;font-style:italic}td.built{color:#1a7f37}
.shape-quality{color:#8c959f;background:#f6f8fa}
figure{margin:10px 0 18px;display:inline-block;background:#fff;border:1px solid #ddd;padding:6px;max-width:100%}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:12px;color:#57606a;margin-top:4px}
code{background:#eff1f3;padding:1px 4px;border-radius:3px;font-size:12px}
pre{background:#f6f8fa;padding:8px;overflow:auto}
.embedded{border-left:3px solid #d0d7de;padding-left:12px}
"""


def _html_block(b: Block, base: Path) -> str:
    import markdown as mdlib

    if b.kind == "h2":
        return f'<h2 id="{b.anchor}">{html.escape(b.text)}</h2>'
    if b.kind == "h3":
        return f"<h3>{html.escape(b.text)}</h3>"
    if b.kind == "p":
        return f"<p>{_inline_html(_relink(b.text, base))}</p>"
    if b.kind == "table":
        head = "".join(f"<th{_cell_class(h, i in b.grey)}>{html.escape(h)}</th>" for i, h in enumerate(b.headers))
        rows = "".join("<tr>" + "".join(f"<td{_cell_class(c, i in b.grey)}>{_inline_html(c)}</td>"
                                        for i, c in enumerate(r)) + "</tr>" for r in b.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if b.kind == "figure":
        data = base64.b64encode(b.path.read_bytes()).decode("ascii")
        return (f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    return f'<div class="embedded">{mdlib.markdown(b.text, extensions=["tables"])}</div>'


def render_html(blocks: list[Block], title: str, subtitle: str, base: Path) -> str:
    """One self-contained page: images are embedded (data: URLs), so the file can be moved or mailed."""
    nav = [f'<a href="#{b.anchor}">{html.escape(b.text)}</a>' for b in blocks if b.kind == "h2"]
    body = [_html_block(b, base) for b in blocks]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
            f"<nav><b>Contents</b>{''.join(nav)}</nav><main>{''.join(body)}</main></body></html>\n")


def plot(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
         logy: bool = False, marker: str | None = None, integer_x: bool = False, zero_y: bool = False) -> Path | None:
    """One line per series (None when no series has a point), written to `path`; zero_y: the y axis starts at 0
    (costs, so that a ratio reads off the plot)."""
    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import atomic_savefig

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label,
                marker=marker or ("o" if len(pts) < 15 else None))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    elif zero_y:
        ax.set_ylim(bottom=0)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)
    return path


def tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A TensorBoard run's scalars by tag; a resumed run has several event files: one value per step (the later
    file wins)."""
    if not tb_dir.is_dir() or not any(tb_dir.rglob("events.out.tfevents.*")):
        return {}
    from .tb import read_scalars

    return {tag: sorted(dict(pts).items()) for tag, pts in read_scalars(tb_dir).items()}
