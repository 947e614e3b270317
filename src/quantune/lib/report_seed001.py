"""Seed 001's table of LLM quantization methods, rebuilt from measured numbers: each method is found by the value
its stage declares for it (quantize's `method`, lora_sft's `quantization`), in the built targets' metrics.json
and, for the targets not built yet, in their recipes."""
from __future__ import annotations

from typing import Any

from .report_lora import compare_score
from .report_render import MISSING, Block, P, T, fmt
from .report_sections import Ctx, quant_values
from .report_targets import Target

SEED001 = [
    # method, the seed's (bits, compression, accuracy claim), what measures it: (stage, declared key, value) or None
    ("LLM.int8 (bitsandbytes)", ("8-bit", "medium (about 50%)", "good, small loss"),
     ("quantize", "method", "bnb_int8")),
    ("bitsandbytes NF4 (4-bit at load)", ("4-bit", "not in the seed's table", "seed 001 task 1.3: quick low-memory "
     "deployment"), ("quantize", "method", "bnb_nf4")),
    ("AutoAWQ / AWQ", ("4-bit", "high (about 75%)", "fairly good, slight drop"), ("quantize", "method", "awq")),
    ("QLoRA", ("4-bit + LoRA", "high", "training and inference"), ("lora_sft", "quantization", "nf4")),
    ("GPTQ", ("3-4 bit", "very high", "better than plain very-low-bit"), ("quantize", "method", "gptq")),
    ("SmoothQuant", ("mixed (W8A8)", "high", "optimised for very low bit"), None),
    ("Pruning + quantization", ("low-bit + sparsity", "very high", "depends on the pruning"), None),
]


def _u(v: Any, unit: str) -> str:
    return MISSING if v is None else f"{fmt(v)} {unit}"


def method_targets(sel: tuple[str, str, str], ctx: Ctx) -> tuple[list[Target], list[Target]]:
    """(built, not built) targets of a method: metrics.json's value for a built one, the recipe's otherwise."""
    stage, key, value = sel
    ts = sorted(ctx.targets.values(), key=lambda t: t.name)
    built = [t for t in ts if t.built and t.stage == stage and t.get(key) == value]
    planned = [t for t in ts if not t.built and t.stage == stage and t.recipe.get(key) == value]
    return built, planned


def _qlora_row(t: Target, ctx: Ctx) -> list[str]:
    quality = f"eval ppl {fmt(t.get('eval_ppl'))}"
    scored = compare_score(t, ctx)
    if scored:
        quality += f"; BLEU-4 {fmt(scored[1])} (greedy, `{scored[0].name}`)"
    trainable = f"trainable {fmt(t.get('params_trainable_pct'))}% of {fmt(t.get('params_total'))} params"
    return [f"`{t.name}`", quality, trainable, f"peak {_u(t.get('peak_mem_mb'), 'MiB')}"]


def _quant_row(t: Target, ctx: Ctx) -> list[str]:
    v = quant_values(t, ctx)
    quality = f"ppl {fmt(v['ppl'])}"
    if v["delta"] is not None:
        quality += f" (Δ {fmt(v['delta'])} vs baseline {fmt(v['base'])})"
    size = _u(v["size"], "MiB") + (f", ratio {fmt(v['ratio'])}" if v["ratio"] is not None else "")
    name = f"`{t.name}` ({fmt(v['bits'])}-bit)" if v["bits"] is not None else f"`{t.name}`"
    return [name, quality, size, f"peak {_u(v['mem'], 'MiB')}; quantize {_u(v['time'], 's')}"]


def seed001_table(ctx: Ctx) -> list[Block]:
    rows = []
    for method, claims, sel in SEED001:
        seed = "; ".join(claims)
        built, planned = method_targets(sel, ctx) if sel else ([], [])
        if not built:
            why = "no target in this project" if sel is None else "its targets are not built"
            names = ", ".join(f"`{t.name}`" for t in planned) + " (not built)" if planned else MISSING
            rows.append([method, seed, names, f"not measured ({why})", "not measured", "not measured", MISSING])
        for t in built:
            cells = _qlora_row(t, ctx) if sel[0] == "lora_sft" else _quant_row(t, ctx)
            rows.append([method, seed] + cells + [f"{t.get('scale', MISSING)}, `{t.get('git_commit', '?')}`"])
    return [P("Seed 001's table of LLM quantization methods, rebuilt: the seed's own claims (translated) beside "
              "what this project measured. \"not measured\" means no built target measures it; at tiny scale the "
              "numbers come from tiny models and say nothing about the real ones."),
            T(["method", "seed 001 says (bits; compression; accuracy)", "project target", "measured quality",
               "measured size / trainable", "measured memory / time", "scale, commit"], rows)]
