"""The report's LoRA sections: LoRA / QLoRA training runs and their comparison (stages lora_sft, lora_compare),
the rank sweep (lora_sweep) and seed 004's chain LoRA -> merge -> GGUF -> llama.cpp (merge, gguf_convert,
gguf_quantize, gguf_evaluate)."""
from __future__ import annotations

import json

from .report_render import MISSING, Block, H3, P, T, clip, fmt, link, plot, tb_scalars
from .report_sections import (Ctx, Section, artifact_figures, artifact_tables, col, every_field, figure, pair,
                              provenance_note, section_end, table)
from .report_targets import Target, nested_fields

SCORES = ("bleu4", "rouge1", "rouge2", "rougeL")  # lora_compare.schema.yaml: scores.<system>.<mode>.<score>


class LoRA(Section):
    key, title, stages = "qlora", "LoRA / QLoRA fine-tuning (lora_sft, lora_compare)", ("lora_sft", "lora_compare")

    def render(self, ts, ctx):
        sft = [t for t in ts if t.stage == "lora_sft"]
        cols = [col("model", "model"), col("quant", "quantization"), col("scheduler", "lr_scheduler_type"),
                col("warmup", "warmup_ratio"), pair("batch×accum", "batch_size", "gradient_accumulation_steps", "×"),
                col("LoRA r", "lora_r"), col("steps", "global_step"),
                pair("loss first→last", "train_loss_first", "train_loss_last", " → "), col("eval loss", "eval_loss"),
                col("eval ppl", "eval_ppl"), col("trainable %", "params_trainable_pct"),
                col("tokens/s", "tokens_per_s"), col("peak mem MiB", "peak_mem_mb"), col("train s", "train_runtime")]
        out = [P("LoRA adapters (QLoRA: on a 4-bit NF4 base), and their comparison on held-out prompts."),
               H3("Training runs"), table(sft, cols)]
        curves, lrs = {}, {}
        for t in (t for t in sft if t.built):
            s = tb_scalars(t.dir / "tb")
            curves[t.name], lrs[t.name] = s.get("train/loss", []), s.get("train/lr", [])
        out += figure(plot(ctx.figures / "lora_train_loss.png", curves, "optimizer step", "train/loss",
                           "LoRA / QLoRA training loss (TensorBoard train/loss)"),
                      "Training loss of every built LoRA/QLoRA run (report's plot from tb/)")
        out += figure(plot(ctx.figures / "lora_train_lr.png", lrs, "optimizer step", "train/lr",
                           "learning-rate schedules"),
                      "Learning rate per step: linear vs cosine schedules (report's plot from tb/)")
        for t in (t for t in ts if t.stage == "lora_compare"):
            out += [H3(f"Comparison: {t.name}")] + (compare_blocks(t) if t.built else [table([t], [])])
        return out + [provenance_note(ts)]


def compare_blocks(t: Target) -> list[Block]:
    """A lora_compare target: its scores per system and decoding, and the first generations side by side."""
    scores, adapters = t.obj("scores"), t.obj("adapters")
    out = [P(f"{fmt(t.get('num_prompts'))} held-out prompts from `{fmt(t.get('dataset'))}` split "
             f"`{fmt(t.get('split'))}`, at most {fmt(t.get('max_new_tokens'))} new tokens; adapters "
             f"{', '.join(f'{lab} = `{tgt}`' for lab, tgt in adapters.items()) or MISSING}. BLEU-4 and ROUGE F1 ×100.")]
    rows = [[s, mode] + [fmt(by.get(k)) for k in SCORES]
            for s in sorted(scores, key=lambda s: (s in adapters, s)) for mode, by in sorted(scores[s].items())]
    out.append(T(["model", "decoding", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"], rows) if rows else every_field(t))
    out += artifact_figures(t)
    cj = t.dir / "comparison.json"
    try:
        gens = json.loads(cj.read_text(encoding="utf-8")).get("rows", []) if cj.is_file() else []
    except ValueError:
        gens = []
    if gens:
        systems = list(gens[0]["generations"])
        out += [H3("Side by side (greedy, first 6 prompts)"),
                T(["prompt", "reference"] + systems,
                  [[clip(r["prompt"], 80), clip(r["reference"])]
                   + [clip(r["generations"][s]["greedy"]["text"]) for s in systems] for r in gens[:6]]),
                P(f"All generations (greedy and sampled): {link(f'`{t.name}/comparison.json`', cj)}, "
                  f"{link(f'`{t.name}/comparison.md`', t.dir / 'comparison.md')}.")]
    return out


def compare_score(t: Target, ctx: Ctx, score: str = "bleu4", mode: str = "greedy") -> tuple[Target, float] | None:
    """The first built lora_compare target that scored adapter target `t`, and its score."""
    for c in ctx.of_stage("lora_compare"):
        label = next((lab for lab, tgt in c.obj("adapters").items() if tgt == t.name), None)
        v = c.obj("scores").get(label, {}).get(mode, {}).get(score) if label else None
        if v is not None:
            return c, v
    return None


class RankSweep(Section):
    key, title, stages = "rank-sweep", "LoRA rank sweep", ("lora_sweep",)

    def render(self, ts, ctx):
        out = [P("LoRA rank against quality and cost: one lora_sft run per rank.")]
        fields = nested_fields("lora_sweep", "runs")
        for t in ts:
            if not t.built:
                out.append(table([t], []))
                continue
            runs = t.obj("runs")
            out.append(H3(f"{t.name}: per rank"))
            rows = [[r] + [fmt(runs[r].get(f)) for f in fields] for r in sorted(runs, key=int)]
            out.append(T(["rank"] + fields, rows) if runs else every_field(t))
            out += artifact_tables(t) + artifact_figures(t)
        return out + [provenance_note(ts)]


GGUF_FILE_KEYS = {  # stage -> (its GGUF type key, its seconds key)
    "gguf_convert": ("outtype", "convert_seconds"), "gguf_quantize": ("ftype", "quantize_seconds")}
GGUF_EVAL = [  # gguf_evaluate.schema.yaml's <t>_<field> (ratios: <t>_<ratio>_vs_<first GGUF>)
    ("ppl", "ppl"), ("ppl ratio", "ppl_ratio_vs_{b}"), ("prompt tokens/s", "pp_tokens_per_s"),
    ("gen tokens/s", "tg_tokens_per_s"), ("gen speed-up", "tg_speedup_vs_{b}"),
    ("greedy tokens agreeing with transformers (mean)", "greedy_agree_mean")]


class GGUF(Section):
    key, title = "gguf", "LoRA → merge → GGUF (llama.cpp)"
    stages = ("merge", "gguf_convert", "gguf_quantize", "gguf_evaluate")

    def render(self, ts, ctx):
        merges = [t for t in ts if t.stage == "merge"]
        files = [t for t in ts if t.stage in GGUF_FILE_KEYS]
        mcols = [col("model", "model"), pair("LoRA r/alpha", "lora_r", "lora_alpha", "/"),
                 col("modules", "lora_target_modules"), col("merge max |Δlogit|", "merge_max_abs_logit_diff"),
                 col("adapter max |Δlogit|", "adapter_max_abs_logit_delta"), col("tolerance", "logit_tolerance"),
                 ("merged MiB", lambda t: t.get("merged_bytes") / 2**20), col("parameters", "params_total")]
        fcols = [("type", lambda t: t.get(GGUF_FILE_KEYS[t.stage][0])),
                 ("file MiB", lambda t: t.get("gguf_file_bytes") / 2**20), col("bits/weight", "gguf_bits_per_weight"),
                 col("output tensor", "type_output"), col("layer matrices", "types_layer_matrices"),
                 ("seconds", lambda t: t.get(GGUF_FILE_KEYS[t.stage][1]))]
        out = [P("Seed 004's export chain: a LoRA SFT adapter (in the LoRA section), merged into its base, GGUF f16, "
                 "llama.cpp quantization, then perplexity, speed and generations with llama-cpp-python."),
               H3("Merge"), table(merges, mcols), H3("GGUF files"), table(files, fcols),
               H3("Size, speed and perplexity (gguf_evaluate)")]
        for t in (t for t in ts if t.stage == "gguf_evaluate"):
            out += gguf_eval_blocks(t, ctx) if t.built else [table([t], [])]
        return out + section_end(ts)


def gguf_eval_blocks(t: Target, ctx: Ctx) -> list[Block]:
    """A gguf_evaluate target: one row per GGUF target it measured (<t>_ppl recorded), largest file first."""
    names = [g.name for g in ctx.of_stage(*GGUF_FILE_KEYS, built=False) if t.get(f"{g.name}_ppl") is not None]
    names.sort(key=lambda n: -(t.get(f"{n}_file_bytes") or 0))
    b = next((n for n in names if t.get(f"{n}_ppl_ratio_vs_hf") is not None), None)
    rows = [["transformers (merged, reference)", MISSING, fmt(t.get("hf_ppl"))] + [MISSING] * (len(GGUF_EVAL) - 1)]
    for n in names:
        size = t.get(f"{n}_file_bytes")
        vals = [t.get(f"{n}_{k.format(b=b)}") if b or "{b}" not in k else None for _, k in GGUF_EVAL]
        rows.append([f"`{n}`", fmt(size / 2**20 if size is not None else None)] + [fmt(v) for v in vals])
    out = [P(f"`{t.name}`: {fmt(t.get('dataset'))}/{fmt(t.get('split'))}, context {fmt(t.get('context'))}, stride "
             f"{fmt(t.get('stride'))}, {fmt(t.get('tokens_scored'))} tokens scored, {fmt(t.get('threads'))} threads, "
             f"n_gpu_layers {fmt(t.get('n_gpu_layers'))}; reference `{fmt(t.get('reference'))}`; ratios are vs `{b}`."),
           T(["model", "file MiB"] + [h for h, _ in GGUF_EVAL], rows)]
    pts = {n: [(t.get(f"{n}_file_bytes") / 2**20, t.get(f"{n}_ppl"))] for n in names if t.get(f"{n}_file_bytes")}
    out += figure(plot(ctx.figures / f"{t.name}_ppl_vs_size.png", pts, "file size (MiB)", "perplexity",
                       "GGUF: perplexity vs file size", marker="o"),
                  f"{t.name}: perplexity vs file size per GGUF (report's plot)")
    gj = t.dir / "generations.jsonl"
    gens = [json.loads(ln) for ln in gj.read_text(encoding="utf-8").splitlines() if ln.strip()] if gj.is_file() else []
    if gens:
        out.append(T(["prompt", "transformers"] + names,
                     [[clip(g.get("prompt"), 60), clip(g.get("transformers"), 100)]
                      + [clip(g.get(n, MISSING), 100) for n in names] for g in gens[:3]]))
    return out
