"""The quantize_compare stage: one table (compare.md, compare.csv) and one plot (compare.png) over quantize
targets, from their measured numbers (results/<target>/metrics.json), beside the published anchors the recipe
lists.

    python -m quantune.quantize_compare --recipe recipes/quant_compare.yaml --out results/quant_compare
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any

from .lib.common import atomic_dir, atomic_savefig, atomic_write_text, read_json, run_cli, write_metrics
from .lib.tables import markdown_table


COLUMNS = [
    ("target", "target"), ("model", "model"), ("method", "method"), ("backend", "backend"), ("bits", "bits"),
    ("group_size", "group"), ("size_mb", "size MB"), ("size_ratio", "size / base"), ("ppl_base", "ppl base"),
    ("ppl_quant", "ppl"), ("ppl_delta", "Δppl"), ("ppl_delta_pct", "Δppl %"), ("ppl_even", "ppl even"),
    ("kl_vs_base", "KL vs base"),
    ("paper_ppl", "paper ppl"),
    ("paper_setting", "paper setting"), ("quant_seconds", "quant s"), ("quant_peak_mem_mb", "peak MB"),
    ("gen_tokens_per_s", "gen tok/s"), ("gen_tokens_per_s_base", "gen tok/s base"),
]


def _anchor_for(row: dict, anchors: list[dict]) -> dict | None:
    """A published number for the same model, method and bits (the group size may differ: stated)."""
    cands = [a for a in anchors if a["model"] == row["model"] and a["method"] == row["method"] and a["bits"] == row["bits"]]
    same_group = [a for a in cands if a.get("group_size") == row["group_size"]]
    return (same_group or cands or [None])[0]


def _group_txt(g) -> str:
    return "per-channel" if g == -1 else ("-" if g in (None, 0) else f"g{g}")


def compare_rows(metrics: list[dict], anchors: list[dict]) -> list[dict]:
    rows = []
    for mt in metrics:
        r = {k: mt.get(k) for k, _ in COLUMNS}
        r["size_mb"] = mt["size_bytes"] / 2**20
        r["ppl_delta_pct"] = 100.0 * mt["ppl_delta"] / mt["ppl_base"]
        a = _anchor_for(r, anchors)
        r["paper_ppl"] = a["ppl"] if a else None
        r["paper_setting"] = f"{_group_txt(a.get('group_size'))}, {a['source']}" if a else None
        rows.append(r)
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def compare(recipe_path: str, out: str, cfg: dict) -> dict:
    from .lib.config import load_recipe, results_dir

    recipe = load_recipe(recipe_path, cfg)
    res = Path(results_dir(cfg))
    metrics = [read_json(res / t / "metrics.json") for t in recipe["targets"]]
    anchors = recipe.get("anchors", [])
    rows = compare_rows(metrics, anchors)
    base_rows = {}
    for mt in metrics:  # one unquantized row per model, from the targets' own "before" measurements
        base_rows.setdefault(mt["model"], {"model": mt["model"], "dtype": mt["dtype"], "ppl": mt["ppl_base"],
                                           "size_mb": mt["size_bytes_base"] / 2**20,
                                           "gen_tokens_per_s": mt.get("gen_tokens_per_s_base"),
                                           "context": mt["eval_context"], "stride": mt["eval_stride"],
                                           "eval": f"{mt['eval_dataset']} {mt['eval_split']}"})
    outp = Path(out)
    with atomic_dir(outp) as tmp:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([k for k, _ in COLUMNS])
        for r in rows:
            w.writerow(["" if r[k] is None else r[k] for k, _ in COLUMNS])
        atomic_write_text(tmp / "compare.csv", buf.getvalue())
        md = [f"# Quantization comparison ({cfg['scale']} scale)", "",
              "Every number is measured by the target named in the row (results/<target>/metrics.json); "
              "ppl is the perplexity of the quantized model reloaded from disk, ppl base that of the unquantized "
              "model on the same text, context and stride. ppl even (llm-compressor methods) is the perplexity "
              "change with its odd, first-order part g.dW removed: the geometric mean of the quantized model's and "
              "of its mirror's (W - dW) perplexity, i.e. the curvature damage that the methods minimise, without "
              "the luck of how the rounding lines up with the text's gradient.", ""]
        md += markdown_table(["model", "dtype", "ppl", "size MB", "gen tok/s", "evaluation"],
                             [[f"{b['model']} (unquantized)", b["dtype"], _fmt(b["ppl"]), _fmt(b["size_mb"]),
                               _fmt(b["gen_tokens_per_s"]), f"{b['eval']}, context {b['context']}, stride {b['stride']}"]
                              for b in base_rows.values()])
        md += [""] + markdown_table([h for _, h in COLUMNS],
                                    [[_fmt(r[k]) if k != "group_size" else _group_txt(r[k]) for k, _ in COLUMNS]
                                     for r in rows])
        if anchors:
            md += ["", "Published anchors (WikiText-2 perplexity; the papers' settings, not runs of this project):", ""]
            md += markdown_table(["model", "method", "bits", "group", "ppl", "source"],
                                 [[a["model"], a["method"], a["bits"], _group_txt(a.get("group_size")), a["ppl"],
                                   a["source"]] for a in anchors])
        atomic_write_text(tmp / "compare.md", "\n".join(md) + "\n")
        _plot(rows, base_rows, tmp / "compare.png", cfg["scale"])
        flat: dict[str, Any] = {"target": recipe["name"], "stage": "quantize_compare", "scale": cfg["scale"],
                                "n_targets": len(rows), "n_anchors": len(anchors)}
        for r in rows:
            for k in ("bits", "ppl_quant", "ppl_delta", "ppl_delta_pct", "ppl_even", "kl_vs_base", "size_mb",
                      "quant_seconds", "gen_tokens_per_s"):
                flat[f"{r['target']}_{k}"] = r[k]
        written = write_metrics(tmp / "metrics.json", flat)
    return written


def _plot(rows: list[dict], base_rows: dict, path: Path, scale: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"rtn": "tab:gray", "gptq": "tab:blue", "awq": "tab:orange", "bnb_int8": "tab:green", "bnb_nf4": "tab:red"}
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    a = ax[0][0]
    for r in rows:
        a.scatter(r["size_mb"], r["ppl_quant"], color=colors.get(r["method"], "k"), s=50)
        a.annotate(r["target"], (r["size_mb"], r["ppl_quant"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for b in base_rows.values():
        a.scatter(b["size_mb"], b["ppl"], marker="*", color="k", s=120)
        a.annotate(f"{b['model']} {b['dtype']}", (b["size_mb"], b["ppl"]), fontsize=7, xytext=(3, -10),
                   textcoords="offset points")
    a.set_xlabel("size on disk (MB)")
    a.set_ylabel("perplexity")
    a.set_title("perplexity vs size")
    names = [r["target"] for r in rows]
    cols = [colors.get(r["method"], "k") for r in rows]
    for axis, key, label in ((ax[0][1], "ppl_delta_pct", "perplexity increase over the unquantized model (%)"),
                             (ax[1][0], "quant_seconds", "quantization wall time (s)"),
                             (ax[1][1], "gen_tokens_per_s", "greedy generation (tokens/s)")):
        vals = [r[key] if r[key] is not None else float("nan") for r in rows]
        axis.barh(names, vals, color=cols)
        axis.set_title(label)
        axis.tick_params(axis="y", labelsize=7)
        axis.invert_yaxis()
    fig.suptitle(f"quant_compare ({scale} scale); bits: " + ", ".join(f"{r['target']}={r['bits']}" for r in rows),
                 fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def _cmd(a) -> None:
    from .lib.config import config_from_args

    m = compare(a.recipe, a.out, config_from_args(a))
    print(f"{m['target']}: {m['n_targets']} targets compared -> {a.out}/compare.md, compare.csv, compare.png")


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    return stage_parser("quantune.quantize_compare", __doc__, _cmd)


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
