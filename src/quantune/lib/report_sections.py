"""The report's sections, each for the targets of one or more stages (the metrics.json `stage`, declared in
config/schemas/metrics/): the shared table helpers, the tiny world, baseline evaluation, quantization,
quantize_compare, DeepSpeed SFT, and the every-field table of any other stage. The LoRA sections are in
report_lora.py."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .report_render import MISSING, MD, Block, F, H3, P, T, clip, fmt, link, plot, tb_scalars
from .report_targets import Target, declared_values, provenance_key, stage_schema


@dataclass
class Ctx:
    results: Path
    figures: Path
    targets: dict[str, Target]

    def of_stage(self, *stages: str, built: bool = True) -> list[Target]:
        return [t for t in self.targets.values() if t.stage in stages and (t.built or not built)]


Column = tuple[str, Callable[[Target], Any]]


def col(header: str, key: str) -> Column:
    return header, lambda t: t.get(key)


def pair(header: str, a: str, b: str, sep: str) -> Column:
    return header, lambda t: f"{fmt(t.get(a))}{sep}{fmt(t.get(b))}"


def table(ts: list[Target], cols: list[Column]) -> Block:
    """One row per target: name, status, then each column (empty cells for a target that is not built)."""
    rows = []
    for t in ts:
        cells = [fmt(f(t)) for _, f in cols] if t.built else [""] * len(cols)
        rows.append([f"`{t.name}`", t.status_cell()] + cells)
    return T(["target", "status"] + [c for c, _ in cols], rows)


def artifact_figures(t: Target) -> list[Block]:
    """The PNG files a target wrote beside its metrics.json (its own plots), embedded as they are."""
    if not t.built:
        return []
    return [F(p, f"{t.name}/{p.name} (written by the target)") for p in sorted(t.dir.glob("*.png"))]


def artifact_tables(t: Target) -> list[Block]:
    """The Markdown tables a target wrote beside its metrics.json, embedded, and links to its CSV files."""
    out: list[Block] = []
    for p in sorted(t.dir.glob("*.md")):
        out += [P(f"From `{t.name}/{p.name}`:"), MD(p.read_text(encoding="utf-8"))]
    links = [link(f"`{p.name}`", p) for p in sorted(t.dir.glob("*.csv"))]
    return out + ([P("Data: " + ", ".join(links))] if links else [])


def figure(path: Path | None, caption: str) -> list[Block]:
    """A plot the report drew (none when it had no points)."""
    return [F(path, caption)] if path else []


def section_end(ts: list[Target]) -> list[Block]:
    """The end of a section: every target's own plots, then the code they were built from."""
    return [b for t in ts for b in artifact_figures(t)] + [provenance_note(ts)]


def provenance_note(ts: list[Target]) -> Block:
    commits = sorted({str(t.get("git_commit", "?")) for t in ts if t.built})
    return P(f"Code: git {', '.join(f'`{c}`' for c in commits)} (per-target versions in [Provenance](#provenance))."
             if commits else "")


def every_field(t: Target) -> Block:
    """Every field of a target's metrics.json but write_metrics' provenance keys."""
    items = [(k, v) for k, v in sorted(t.metrics.items()) if not provenance_key(k)]
    return T(["field", "value"], [[k, clip(fmt(v), 120)] for k, v in items])


class Section:
    key = ""
    title = ""
    stages: tuple[str, ...] = ()

    def render(self, ts: list[Target], ctx: Ctx) -> list[Block]:
        raise NotImplementedError


class TinyWorld(Section):
    key, title, stages = "tiny-world", "The tiny world (base models)", ("tiny_world",)

    def render(self, ts, ctx):
        out = [P("Small pretrained models of every family the recipes use, trained on text that ships with the "
                 "machine (tiny scale only). Held-out perplexity before and after pretraining.")]
        built = [t for t in ts if t.built]
        if not built:
            return out + [table(ts, [])]
        t = built[0]
        fams = [f for f in declared_values("pretrain", "family") if t.get(f"{f}_ppl_heldout") is not None]
        fields = ("params_total", "ppl_heldout_untrained", "ppl_heldout", "ppl_ratio_trained_vs_untrained",
                  "train_loss_last", "train_seconds")
        out.append(T(["family", "parameters", "held-out ppl untrained", "held-out ppl trained", "ratio",
                      "last train loss", "train s"], [[f] + [fmt(t.get(f"{f}_{k}")) for k in fields] for f in fams]))
        curves = {f: tb_scalars(t.dir / "models" / f / "tb").get("train/loss", []) for f in fams}
        out += figure(plot(ctx.figures / "tiny_world_pretrain_loss.png", curves, "step", "train/loss",
                           "tiny world: pretraining loss per family (TensorBoard train/loss)", logy=True),
                      "Pretraining loss per family, read from results/tiny_world/models/<family>/tb")
        return out + [provenance_note(ts)]


class Evaluate(Section):
    key, title, stages = "evaluate", "Base-model evaluation (the \"before\")", ("evaluate",)

    def render(self, ts, ctx):
        cols = [col("model", "model"), col("source", "model_source"), pair("data/split", "dataset", "split", "/"),
                pair("context/stride", "eval_context", "eval_stride", "/"), col("perplexity", "eval_ppl"),
                col("tokens scored", "eval_tokens_scored"), col("gen tokens/s", "gen_tokens_per_s"),
                col("peak mem MiB", "peak_mem_mb"), col("parameters", "params_total"), col("scale", "scale")]
        return [P("Perplexity with the stated context and stride, and greedy generation speed, of the unquantized "
                  "models: the baselines of the quantization section."), table(ts, cols), provenance_note(ts)]


def baseline_for(t: Target, ctx: Ctx) -> Target | None:
    """The evaluate target of a quantize target's model, data, split, context, stride and scale (or None)."""
    same = (("model", "model"), ("eval_dataset", "dataset"), ("eval_split", "split"), ("eval_context", "eval_context"),
            ("eval_stride", "eval_stride"), ("scale", "scale"))
    return next((b for b in ctx.of_stage("evaluate") if all(t.get(q) == b.get(e) for q, e in same)), None)


def quant_values(t: Target, ctx: Ctx) -> dict[str, Any]:
    """What the report shows of a quantize target (quantize.schema.yaml's keys)."""
    size = t.get("size_bytes")
    b = baseline_for(t, ctx)
    return {"method": t.get("method"), "bits": t.get("bits"), "group": t.get("group_size"), "ppl": t.get("ppl_quant"),
            "base": t.get("ppl_base"), "delta": t.get("ppl_delta"), "kl": t.get("kl_vs_base"),
            "size": size / 2**20 if size is not None else None, "ratio": t.get("size_ratio"),
            "time": t.get("quant_seconds"), "mem": t.get("quant_peak_mem_mb"),
            "evaluate": f"`{b.name}`: {fmt(b.get('eval_ppl'))}" if b else MISSING}


class Quantization(Section):
    key, title, stages = "quantization", "Quantization (GPTQ, AWQ, RTN, bitsandbytes)", ("quantize",)
    cols = [("method", "method"), ("bits", "bits"), ("group", "group"), ("ppl", "ppl"),
            ("ppl unquantized", "base"), ("Δppl", "delta"), ("KL vs unquantized", "kl"),
            ("evaluate target's ppl", "evaluate"), ("size MiB", "size"), ("size ratio", "ratio"),
            ("quantize s", "time"), ("peak mem MiB", "mem")]

    def render(self, ts, ctx):
        out = [P("Post-training quantization of OPT and bitsandbytes loading. Each target measures the unquantized "
                 "and the quantized model on the same token ids, context and stride (ppl unquantized, Δppl); the "
                 "evaluate target of the same model, data, context and stride is listed beside it.")]
        rows, pts = [], {}
        for t in ts:
            if not t.built:
                rows.append([f"`{t.name}`", t.status_cell()] + [""] * len(self.cols))
                continue
            v = quant_values(t, ctx)
            rows.append([f"`{t.name}`", "built"] + [fmt(v[k]) for _, k in self.cols])
            if v["ppl"] is not None and v["size"] is not None:
                pts.setdefault(str(v["method"]), []).append((v["size"], v["ppl"]))
        out.append(T(["target", "status"] + [h for h, _ in self.cols], rows))
        out += figure(plot(ctx.figures / "quantization_ppl_vs_size.png", pts, "model size (MiB)", "perplexity",
                           "quantization: perplexity vs size", marker="o"),
                      "Perplexity vs size of every built quantization target (report's plot)")
        return out + section_end(ts)


class QuantCompare(Section):
    key, title, stages = "quant-compare", "Quantization comparison table (quantize_compare)", ("quantize_compare",)

    def render(self, ts, ctx):
        out = []
        for t in ts:
            if not t.built:
                out.append(table([t], []))
                continue
            out.append(P(f"`{t.name}` compares {fmt(t.get('n_targets'))} quantize targets beside "
                         f"{fmt(t.get('n_anchors'))} published numbers."))
            out += artifact_tables(t) + artifact_figures(t)
        return out + [provenance_note(ts)]


class SFT(Section):
    key, title, stages = "sft", "DeepSpeed SFT (Qwen3)", ("sft",)

    def render(self, ts, ctx):
        cols = [col("model", "model"), col("ZeRO", "zero_stage"), col("world", "world_size"),
                pair("epochs run/planned", "epochs_run", "epochs_planned", "/"), col("best epoch", "best_epoch"),
                col("best eval loss", "best_eval_loss"), col("best eval ppl", "best_eval_ppl"),
                col("saved model eval ppl", "saved_model_eval_ppl"), col("tokens/s", "train_tokens_per_s"),
                col("peak mem MiB", "peak_mem_mb")]
        out = [P("Full-parameter supervised fine-tuning under DeepSpeed; evaluation loss and perplexity per epoch "
                 "(epoch 0 is before training)."), table(ts, cols)]
        series = {}
        for t in (t for t in ts if t.built):  # eval_loss_epoch<N>, eval_ppl_epoch<N> for N = 0 .. epochs_run
            ep = {e: (t.get(f"eval_loss_epoch{e}"), t.get(f"eval_ppl_epoch{e}"))
                  for e in range(int(t.get("epochs_run") or 0) + 1)}
            ep = {e: v for e, v in ep.items() if v[0] is not None}
            if ep:
                rows = [[str(e), fmt(lo), fmt(pp)] for e, (lo, pp) in ep.items()]
                out += [H3(f"{t.name}: eval per epoch"), T(["epoch", "eval loss", "eval ppl"], rows)]
                series[t.name] = [(e, pp) for e, (_, pp) in ep.items() if pp is not None]
        out += figure(plot(ctx.figures / "sft_eval_ppl.png", series, "epoch", "eval perplexity",
                           "SFT: evaluation perplexity per epoch", marker="o", integer_x=True),
                      "Evaluation perplexity per epoch (report's plot from metrics.json eval_ppl_epoch<N>)")
        return out + section_end(ts)


class StageFields(Section):
    """A declared stage without a section of its own: every field of its targets' metrics.json."""

    def __init__(self, stage: str):
        self.key, self.title, self.stages = stage, f"Stage {stage}", (stage,)

    def render(self, ts, ctx):
        out = [P(f"{(stage_schema(self.stages[0]) or {}).get('title', self.stages[0])}: every field.")]
        for t in ts:
            out.append(H3(t.name))
            out += [every_field(t)] + artifact_tables(t) + artifact_figures(t) if t.built else [table([t], [])]
        return out + [provenance_note(ts)]


class Other(Section):
    key, title = "other", "Other targets"

    def render(self, ts, ctx):
        out = [P("Targets whose stage has no declaration in config/schemas/metrics/ (or whose metrics.json is "
                 "unreadable): every field of their metrics.json.")]
        for t in ts:
            out.append(H3(f"{t.name} (stage {t.stage or 'unknown'})"))
            out += [every_field(t)] + artifact_figures(t) if t.built else [table([t], [])]
        return out
