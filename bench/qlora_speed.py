"""QLoRA speed against the seed's configuration, through the lora_sft stage's own run (issue 17's bench): the
`linear` and `cosine` recipes (seed 000's QLoRA of ChatGLM3-6B on AdvertiseGen) as committed, and variants that
change only how the same rows are computed: the same rows per optimizer step, learning-rate schedule, steps,
seed and data order, and the Trainer's loss (a token-level mean over the optimizer step's rows).

    python bench/qlora_speed.py --out bench/results                     # scale shape, on the GPU machine
    python bench/qlora_speed.py --scale tiny --out /tmp/qs              # the same code on the tiny GLM, CPU
    python bench/qlora_speed.py --settings linear --variants fast --out DIR   # seed and one variant
    python bench/qlora_speed.py --variants seed_again fast lean linear:one_micro_batch   # one_micro_batch: linear only

Variants (recipe overrides; `seed` twice, so that the loss tolerance is the seed configuration's own run-to-run
spread): the recipe's speed modes seed, fast (packed + the step's rows in one micro-batch + checkpointing off
+ each decoder block compiled, torch_compile: auto's choice on a GPU; liger-kernel's fused linear cross-entropy
where it is installed) and lean (packed, checkpointing on, twice the written micro-batch at half the accumulation;
liger's loss as fast), fast_no_liger and lean_no_liger (the mode with liger_kernel: false), fast_upcast (fast
with PEFT's fp32 copies of the unquantized weights, kbit_upcast: true), fast_eager (fast without compilation),
lean_compile (lean with each checkpointed decoder block compiled), lean_written (lean's switches at the written
micro-batch), then single switches on the seed configuration: upcast_off (kbit_upcast: false), packed
(padding-free rows), no_gc (gradient checkpointing off), one_micro_batch (batch x accumulation, accumulation 1,
checkpointing off), max_length (every row padded to the length limits). A variant that fails
(out of GPU memory) is a row with its one-line error; the next one still runs.
Each run is the stage's `train` on a copy of the recipe in a temporary directory (scale shape: the shape caps'
steps; every step's loss recorded on the GPU and read at the end, the Trainer logging at the recipe's own steps:
a log at every step would wait for each step's end, as users' runs do not; the bench's runs up to commit 9496ad6
logged every step). Writes qlora_speed.json (rows: setting, variant, overrides,
real_tokens_per_s, pad_fraction, seconds_per_step, peak_gib, loss at each step, gpu) and qlora_speed.md with the
ratios to the first seed run and each variant's largest per-step loss difference from it against the two seed
runs' difference.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml
from benchlib import build_shape_inputs, gpu_name, run_stamp

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"linear": "qlora_chatglm_linear", "cosine": "qlora_chatglm_cosine"}


def variants(r: dict) -> dict[str, dict]:
    one = {"per_device_train_batch_size": r["per_device_train_batch_size"] * r["gradient_accumulation_steps"],
           "gradient_accumulation_steps": 1}
    seed = {"speed": "seed"}  # the recipe's keys as written (the committed recipes run speed: fast)
    return {
        "seed": seed, "seed_again": seed,
        "fast": {"speed": "fast"}, "lean": {"speed": "lean"},  # the recipe's modes (lora_sft.speed_settings)
        "fast_no_liger": {"speed": "fast", "liger_kernel": False},  # the modes without liger's fused loss
        "lean_no_liger": {"speed": "lean", "liger_kernel": False},
        "fast_upcast": {"speed": "fast", "kbit_upcast": True},  # fast with PEFT's fp32 unquantized weights
        "fast_eager": {"speed": "fast", "torch_compile": False},  # fast without compiling the decoder blocks
        "fast_no_workers": {"speed": "fast", "dataloader_num_workers": 0},  # fast collating on the training process
        "lean_compile": {"speed": "lean", "torch_compile": True},  # lean with compiled (checkpointed) decoder blocks
        "upcast_off": {**seed, "kbit_upcast": False},  # the seed configuration with them in compute_dtype
        # one switch at a time, on the seed configuration: what each part of fast is worth
        "packed": {**seed, "padding": "packed"},
        "no_gc": {**seed, "gradient_checkpointing": False},
        "one_micro_batch": {**seed, **one, "gradient_checkpointing": False},
        "max_length": {**seed, "padding": "max_length"},  # every row padded to the length limits (what the seed avoided)
        # lean's switches at the written micro-batch (what lean was before it took twice the rows a micro-batch)
        "lean_written": {**seed, "padding": "packed", "kbit_upcast": False},
    }


def run_one(name: str, variant: str, over: dict, cfg: dict, tmp: Path) -> dict:
    from quantune.lora_sft import train

    r = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text(encoding="utf-8"))
    # the recipe's own logging steps, as users run it: every step's loss is recorded without a log at every step,
    # which would read each back from the GPU (record_losses: train_loss_by_step)
    keys = {"record_losses": True, "save_steps": 10_000, "max_eval_samples": 8, **over}
    if cfg["scale"] == "tiny":  # the tiny block wins over the recipe's keys at tiny scale
        r.setdefault("tiny", {}).update(max_steps=12, **keys)
    else:  # scale shape: the shape caps bound the steps (shape_world.caps.max_steps)
        r.update(keys)
    d = tmp / variant
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.yaml"  # keeps the recipe's name: its checks apply
    path.write_text(yaml.safe_dump(r, allow_unicode=True), encoding="utf-8")
    t0 = time.perf_counter()
    m = train(str(path), str(d / "out"), cfg)  # QUANTUNE_PROFILE (--profile) set by main: profiled
    wall = time.perf_counter() - t0
    losses = {int(k): v for k, v in m["train_loss_by_step"].items()}
    return {"setting": name, "variant": variant, "mode": m["speed"], "speed_changes": m["speed_changes"],
            "overrides": over, "scale": cfg["scale"],
            "batch": f"{m['batch_size']} x {m['gradient_accumulation_steps']}", "padding": m["padding"],
            "gradient_checkpointing": m["gradient_checkpointing"], "steps": m["global_step"],
            "real_tokens_per_s": m.get("real_tokens_per_s", m["tokens_per_s"]), "pad_fraction": m.get("pad_fraction"),
            "computed_tokens_per_s": m.get("computed_tokens_per_s"),
            "seconds_per_step": m.get("seconds_per_step"), "peak_gib": round(m["peak_mem_mb"] / 1024, 3),
            "peak_mem_kind": m["peak_mem_kind"], "losses": [losses[s] for s in sorted(losses)],
            "liger_kernel": m["liger_kernel"], "kbit_upcast": m.get("kbit_upcast"),
            "torch_compile_regions": m.get("torch_compile_regions"),
            "packed_attention": m.get("packed_attention"),
            "speed_note": m.get("speed_note", ""), "run_seconds": round(wall, 1),
            "load_seconds": round(m["load_seconds"], 1), "data_seconds": round(m["data_seconds"], 1),
            "eval_seconds": round(m["eval_seconds"], 1), "train_runtime": m.get("train_runtime"),
            "device": m["device"], "gpu": gpu_name(), "run": run_stamp()}


def reset_gpu(fp32_precision: str) -> None:
    """Free what a failed run left on the GPU and restart the peak counter, so the next variant measures its own,
    and drop dynamo's compiled graphs, so that it compiles as a process of its own would: the decoder blocks of every
    run share one code object, whose graphs count towards dynamo's limit (8) across the runs of a process; past it a
    block whose inputs match none of them runs eager (on an H200 the linear fast run, after the cosine one in the
    same process, reached it in its trials). Puts back the process's fp32 matmul precision as it was before the
    first run (`fp32_precision`): transformers turns TF32 on for the whole process as it builds a compiling run's
    arguments, once a process (its enable_tf32 is cached), so every later run would compute and compile under it
    where a process of its own would not (in the run of c681ddd, every run after cosine's fast one)."""
    import gc

    import torch
    from transformers import training_args

    torch._dynamo.reset()
    torch.backends.fp32_precision = fp32_precision
    training_args.enable_tf32.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))


def write(rows: list[dict], out: Path) -> None:
    from quantune.lib.tables import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "qlora_speed.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    md = ["# QLoRA speed against the seed's configuration (lora_sft stage)", "",
          "`python bench/qlora_speed.py --out bench/results`: each variant is the stage's run of the recipe with only "
          "the listed keys changed (same rows per optimizer step, schedule, steps, seed, data order). Rates over the "
          "optimizer steps after each run's first (warm-up) one. Speed ratios are against the faster of the two `seed` "
          "runs (the first run of a process is the slower one), memory ratios and loss diff against the first; loss diff: "
          "the largest per-step difference from it, beside the two seed runs' own and one_micro_batch's (the same "
          "rows grouped otherwise: bf16's summation-order noise).", ""]
    for name in dict.fromkeys(r["setting"] for r in rows):
        failed = [r for r in rows if r["setting"] == name and "error" in r]
        rs = [r for r in rows if r["setting"] == name and "error" not in r]
        if not rs or rs[0]["variant"] != "seed":
            md += [f"## {name}", "", *(f"- {r['variant']}: failed: {r['error']}" for r in failed), ""]
            continue
        base = rs[0]
        rate = max(r["real_tokens_per_s"] for r in rs if r["variant"] in ("seed", "seed_again"))
        noise = next((max_diff(r["losses"], base["losses"]) for r in rs if r["variant"] == "seed_again"), None)
        md += [f"## {name} ({base['scale']}, {base['gpu']}, run {base.get('run', '-')}; seed runs' loss spread: "
               f"{'-' if noise is None else f'{noise:.2e}'})", ""]
        md += markdown_table(
            ["variant", "mode", "batch", "padding", "checkpointing", "fp32 upcast", "liger loss", "real tokens/s",
             "padding computed", "x seed", "s / step", "peak GiB", "x seed peak", "max loss diff"],
            [[r["variant"], r["mode"], r["batch"], r["padding"], r["gradient_checkpointing"],
              {None: "-", 1: "yes", 0: "no"}[r.get("kbit_upcast")], "yes" if r.get("liger_kernel") else "no",
              f"{r['real_tokens_per_s']:.0f}",
              "-" if r["pad_fraction"] is None else f"{r['pad_fraction']:.1%}",
              f"{r['real_tokens_per_s'] / rate:.2f}", f"{r['seconds_per_step']:.3f}",
              r["peak_gib"], f"{r['peak_gib'] / base['peak_gib']:.2f}", f"{max_diff(r['losses'], base['losses']):.2e}"]
             for r in rs]) + [""] + [f"- {r['variant']}: {r['speed_note']}" for r in rs if r.get("speed_note")] \
            + [f"- {r['variant']}: failed: {r['error']}" for r in failed] + [""]
    (out / "qlora_speed.md").write_text("\n".join(md), encoding="utf-8")


def main(argv=None) -> int:
    import torch

    from quantune.lib.common import QuantuneError, out_of_memory_line
    from quantune.lib.config import load_config, load_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--variants", nargs="*", default=None,
                   help="only these variants (seed always runs first); SETTING:VARIANT for one setting only")
    p.add_argument("--scale", default="shape", choices=["tiny", "shape"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override (dotted keys)")
    p.add_argument("--profile", action="store_true", help="profile steps 3-4 of every run with torch.profiler "
                   "(OUT/profile_SETTING_VARIANT/profile.txt); the rates then include the profiler: a separate run")
    p.add_argument("--without-seed", action="store_true",
                   help="with --profile only: skip the seed run (its profile; the table of ratios needs it)")
    a = p.parse_args(argv)
    if a.without_seed and not a.profile:
        p.error("--without-seed: only with --profile (every ratio is against the seed run)")
    a.out = a.out.resolve()
    os.chdir(ROOT)  # the stage runs in-process and reads the workflow's results paths from the repository root
    cfg = load_config(overrides={"scale": a.scale, **dict(kv.split("=", 1) for kv in a.set)})
    rows = []
    fp32_precision = torch.backends.fp32_precision  # this process's, before any run: reset_gpu puts it back
    (ROOT / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qlora-speed-", dir=ROOT / "results") as tmp:
        for s in a.settings:
            name = SETTINGS[s]
            recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml", cfg)
            build_shape_inputs(cfg, recipe)
            for v, over in variants(recipe).items():
                if a.variants and v != "seed" and v not in a.variants and f"{s}:{v}" not in a.variants:
                    continue
                if v == "seed" and a.without_seed:
                    continue
                print(f"qlora_speed: {name} {v} {over}", flush=True)
                if a.profile:
                    os.environ["QUANTUNE_PROFILE"] = str(a.out / f"profile_{s}_{v}")
                try:
                    rows.append(run_one(name, v, over, cfg, Path(tmp) / s))
                except Exception as e:  # a one-line error of the stage, or out of GPU memory as the CLI says it
                    if not isinstance(e, QuantuneError) and type(e).__name__ != "OutOfMemoryError":
                        raise
                    line = str(e) if isinstance(e, QuantuneError) else out_of_memory_line(f"{name} {v}", e)
                    rows.append({"setting": name, "variant": v, "overrides": over, "error": line})
                finally:
                    reset_gpu(fp32_precision)
                write(rows, a.out)  # after each run: a later failure keeps what finished
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
