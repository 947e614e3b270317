"""Full-parameter SFT speed against seed 003's configuration, through the sft stage and its DeepSpeed launcher
(issue 18's bench): recipes/qwen3_deepspeed_sft.yaml as written (`speed: seed`, twice: the run-to-run spread),
`speed: fast`, and single switches on the seed configuration, each the stage's own run of a copy of the recipe
with only those keys changed and the same epochs (--epochs, default 1): the same rows per optimizer step,
schedule, data order and loss.

    python bench/sft_speed.py --out bench/results                    # scale shape, on the GPU machine
    python bench/sft_speed.py --scale tiny --out /tmp/ss             # the same code on the tiny Qwen3, CPU
    python bench/sft_speed.py --flce-check --out /tmp/ss             # GPU: liger's fused linear CE, chunk sizes
    python bench/sft_speed.py --mm-check --out /tmp/ss               # GPU: host and GPU cost of a matmul call

Variants: seed, seed_again, fast (packed rows, the step's rows in one micro-batch, checkpointing off,
liger-kernel's fused linear cross-entropy and each decoder block compiled, dynamic shapes: what liger_kernel: auto
and torch_compile: auto turn on for it on a GPU; the first step, which pays the compilation, is outside the rates
as every run's first step is), fast_eager (fast without compilation, liger's in-block kernels then on too),
fast_no_liger (fast without liger), fast_rounded and fast_rounded_256 (fast with each packed micro-batch rounded
up to a multiple of 1,024 or 256 positions by a filler row: packed_multiple_of), seed_zero0 and fast_zero0 (under
recipes/deepspeed/zero0.json, ZeRO-0's bf16 wrapper, which `deepspeed_config: auto` picked for one GPU until its
initial zero-gradient AdamW step was found; auto now picks ZeRO-1),
then single switches on the seed configuration: packed, no_gc, one_micro_batch (the step's rows in one padded
micro-batch, checkpointing off). Each row holds the stage's own figures from metrics.json: real tokens/s over the
optimizer steps' seconds, MFU against the matmul rate the run measured (bf16 on a GPU), peak memory, the eval
loss per epoch; a variant that fails is a row with its one-line error. Writes sft_speed.json and sft_speed.md
(ratios to the first seed run; eval-loss differences beside the two seed runs'). Run it where
scripts/gpu_check.sh has installed the stack (PYTHONPATH set); the shape world is built by the workflow's rules.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from benchlib import build_shape_inputs, gpu_name, run_stamp, write_gpu_check

from quantune.lib.tb import read_scalars

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "qwen3_deepspeed_sft.yaml"


def variants(r: dict) -> dict[str, dict]:
    seed = {"speed": "seed"}
    one = {"per_device_train_batch_size": r["per_device_train_batch_size"] * r["gradient_accumulation_steps"],
           "gradient_accumulation_steps": 1}
    return {"seed": seed, "seed_again": seed, "fast": {"speed": "fast"},
            "fast_no_liger": {"speed": "fast", "liger_kernel": False},
            "fast_eager": {"speed": "fast", "torch_compile": False},
            "fast_no_workers": {"speed": "fast", "dataloader_num_workers": 0},
            "fast_rounded": {"speed": "fast", "packed_multiple_of": 1024},
            "fast_rounded_256": {"speed": "fast", "packed_multiple_of": 256},
            "fast_cublaslt": {"speed": "fast", "blas_library": "cublaslt"},
            "fast_rounded_256_cublaslt": {"speed": "fast", "packed_multiple_of": 256, "blas_library": "cublaslt"},
            "seed_zero0": {**seed, "deepspeed_config": "recipes/deepspeed/zero0.json"},
            "fast_zero0": {"speed": "fast", "deepspeed_config": "recipes/deepspeed/zero0.json"},
            "packed": {**seed, "padding": "packed"}, "no_gc": {**seed, "gradient_checkpointing": False},
            "one_micro_batch": {**seed, **one, "gradient_checkpointing": False}}


def run_one(variant: str, over: dict, scale: str, epochs: int, tmp: Path, sets: list[str],
            profile: Path | None = None, logging_steps: int | None = None) -> dict:
    raw = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    keys = {**over, "num_train_epochs": epochs, "keep_checkpoints": False,
            **({"logging_steps": logging_steps} if logging_steps else {})}
    if scale == "tiny":
        raw.setdefault("tiny", {}).update(keys)
    else:
        raw.update(keys)
    d = tmp / variant
    d.mkdir(parents=True, exist_ok=True)
    path = d / RECIPE.name  # keeps the recipe's name: its checks apply
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "quantune.sft", "--recipe", str(path), "--out", str(d / "out"), "--set",
           f"scale={scale}", *(x for kv in sets for x in ("--set", kv))]
    env = {**os.environ, **({"QUANTUNE_PROFILE": str(profile / f"profile_{variant}")} if profile else {})}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    row = {"variant": variant, "overrides": over, "scale": scale, "epochs": epochs, "run_seconds": round(wall, 1)}
    if p.returncode != 0:
        lines = (p.stdout + p.stderr).splitlines()
        errs = [ln for ln in lines if ln.startswith("quantune: error:")] or \
            [ln for ln in lines if re.search(r"\w(Error|Exception|Unsupported)\b", ln)] or lines[-1:]
        return {**row, "error": errs[-1][:600], "stderr_tail": "\n".join(p.stderr.splitlines()[-60:])}
    m = json.loads((d / "out" / "metrics.json").read_text())
    tb = read_scalars(d / "out" / "tb")
    per_step = {tag: [v for _, v in sorted(tb.get(f"train/{tag}", []))] for tag in ("loss", "grad_norm")}
    return {**row, "mode": m["speed"], "speed_changes": m.get("speed_changes", {}),
            "batch": f"{m['per_device_train_batch_size']} x {m['gradient_accumulation_steps']}",
            "padding": m["padding"], "gradient_checkpointing": m["gradient_checkpointing"],
            "liger_kernel": m["liger_kernel"], "torch_compile_regions": m.get("torch_compile_regions"),
            "packed_attention": m.get("packed_attention"),
            "speed_note": m.get("speed_note", ""),
            "zero_stage": m["zero_stage"], "steps": m["global_step"], "real_tokens_per_s": m["real_tokens_per_s"],
            "pad_fraction": m["pad_fraction"], "mfu": m["mfu"], "matmul_tflops": m["matmul_tflops"],
            "matmul_dtype": m["matmul_dtype"], "peak_gib": round(m["peak_mem_mb"] / 1024, 3),
            "eval_loss": [m[f"eval_loss_epoch{e}"] for e in range(epochs + 1) if f"eval_loss_epoch{e}" in m],
            "train_loss": per_step["loss"], "grad_norm": per_step["grad_norm"],
            "device": m["device"], "gpu": gpu_name(), "run": run_stamp()}


def write(rows: list[dict], out: Path) -> None:
    from quantune.lib.tables import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_speed.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    ok = [r for r in rows if "error" not in r]
    md = ["# Full-parameter SFT speed against seed 003's configuration (sft stage, DeepSpeed)", "",
          "`python bench/sft_speed.py --out bench/results`: each variant is the stage's run of the recipe with only "
          "the listed keys changed (same rows per optimizer step, schedule, epochs, seed, data order). Real tokens/s "
          "over the optimizer steps' seconds after each run's first (warm-up) one; MFU against the matmul rate the "
          "run measured. Speed ratios against the faster "
          "of the two `seed` runs; eval-loss diff: the largest per-epoch difference from the first; train-loss diff: the "
          "largest difference of the Trainer's logged train losses from the first's (logged every recipe logging_steps, "
          "or --logging-steps; nan where none was logged)."
          + (f" {ok[0]['gpu']}, run {ok[0].get('run', '-')}." if ok else ""), ""]
    if ok and ok[0]["variant"] == "seed":
        base = ok[0]
        rate = max(r["real_tokens_per_s"] for r in ok if r["variant"] in ("seed", "seed_again"))
        def diff(r, key="eval_loss"):
            return max((abs(a - b) for a, b in zip(r.get(key) or [], base.get(key) or [])), default=float("nan"))

        md += markdown_table(
            ["variant", "mode", "batch", "padding", "checkpointing", "liger", "ZeRO", "real tokens/s", "x seed", "MFU",
             "matmul TFLOP/s", "peak GiB", "eval-loss diff", "train-loss diff"],
            [[r["variant"], r["mode"], r["batch"], r["padding"], r["gradient_checkpointing"], r["liger_kernel"],
              r["zero_stage"],
              f"{r['real_tokens_per_s']:.0f}", f"{r['real_tokens_per_s'] / rate:.2f}",
              f"{r['mfu']:.1%}", f"{r['matmul_tflops']:.3g} ({r['matmul_dtype']})", r["peak_gib"], f"{diff(r):.2e}",
              f"{diff(r, 'train_loss'):.2e}"]
             for r in ok]) + [""]
    md += [f"- {r['variant']}: {r['speed_note']}" for r in ok if r["speed_note"]]
    md += [f"- {r['variant']}: failed: {r['error']}" for r in rows if "error" in r]
    (out / "sft_speed.md").write_text("\n".join(md) + "\n", encoding="utf-8")


def flce_check(tokens: int = 12_288, consts: tuple = (1, 2, 4, 8, 16), repeats: int = 5) -> dict | None:
    """On a GPU: liger-kernel's fused linear cross-entropy (what the fast mode runs at the LM head) at Qwen3-0.6B's
    hidden size and vocabulary (config/hub_configs/qwen3-0.6b.json) on `tokens` bf16 positions (about one fast-mode
    optimizer step of the recipe's rows), for several `chunk_mem_const` (liger's default 1 gives chunks of
    next_pow2(tokens / ceil(vocab / hidden)) rows: 128 here): seconds for forward + backward (liger computes the
    gradients in the forward), the peak memory it adds, and its loss and gradients against chunk_mem_const 1's;
    None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = "cuda"
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hub = json.loads((ROOT / "config" / "hub_configs" / "qwen3-0.6b.json").read_text(encoding="utf-8"))
    h, v = hub["hidden_size"], hub["vocab_size"]
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(tokens, h, device=device, dtype=torch.bfloat16, generator=g)
    w0 = (torch.randn(v, h, device=device, dtype=torch.bfloat16, generator=g) * h ** -0.5)
    target = torch.randint(0, v, (tokens,), device=device, generator=g)
    target[::7] = -100  # some positions masked, as pads and prompts are

    def step(const):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = liger_fused_linear_cross_entropy(x, w, target, chunk_mem_const=const)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    out, ref = {"tokens": tokens, "hidden": h, "vocab": v, "dtype": "bfloat16"}, None
    for const in consts:
        step(const)  # warm-up (Triton compiles)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(repeats):
            loss, gx, gw = step(const)
        torch.cuda.synchronize()
        row = {"seconds": round((time.perf_counter() - t0) / repeats, 5),
               "peak_extra_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)}
        if ref is None:
            ref = (loss, gx, gw)
        else:
            row.update(loss_diff=abs(loss - ref[0]).item(),
                       grad_input_rel=((gx - ref[1]).float().norm() / ref[1].float().norm()).item(),
                       grad_weight_rel=((gw - ref[2]).float().norm() / ref[2].float().norm()).item())
        out[f"chunk_mem_const {const}"] = row
    return out


def mm_check(tokens: int = 12_288, calls: int = 48, repeats: int = 3) -> dict | None:
    """On a GPU: the host's cost of a matmul call against the GPU's, at the fast step's matmul shapes (Qwen3-0.6B's
    projections on `tokens` bf16 positions, forward and weight-gradient products), under each BLAS library torch
    offers (torch.backends.cuda.preferred_blas_library: cublas, cublaslt) and with the token count fixed or changing
    at every call, as packed rows change it at every step. Host microseconds a call: `calls` calls of each shape
    issued back to back and timed on the host before any synchronisation (fewer than the launch queue holds, so the
    host does not wait for the GPU); GPU microseconds a call: CUDA events around the same calls. The fast step's
    profile has each aten::mm call costing about as much host time as GPU time (sft_profile.md): this says whether the
    library's per-call work is the cause. None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    hub = json.loads((ROOT / "config" / "hub_configs" / "qwen3-0.6b.json").read_text(encoding="utf-8"))
    h, inter = hub["hidden_size"], hub["intermediate_size"]
    q, kv = hub["num_attention_heads"] * hub["head_dim"], hub["num_key_value_heads"] * hub["head_dim"]
    dev, dt = "cuda", torch.bfloat16
    shapes = [(h, q), (h, kv), (h, inter), (q, h), (inter, h)]  # (in, out): q, k/v, gate/up, o, down projections
    weights = {s_: torch.randn(*s_, device=dev, dtype=dt) for s_ in shapes}
    x = {d: torch.randn(tokens, d, device=dev, dtype=dt) for s_ in shapes for d in s_}  # inputs and output gradients
    default = torch.backends.cuda.preferred_blas_library()
    out: dict = {"tokens": tokens, "calls_per_shape": calls, "default_library": str(default), "shapes": shapes}

    def products(dynamic: bool):
        for i in range(calls):
            m = tokens - 8 * i if dynamic else tokens
            for (k, n), w in weights.items():
                yield x[k][:m], w  # forward: (m, k) @ (k, n)
                yield x[k][:m].t(), x[n][:m]  # weight gradient: (k, m) @ (m, n)

    for lib in ("cublas", "cublaslt"):
        try:
            torch.backends.cuda.preferred_blas_library(lib)
        except Exception as e:  # a torch build without the choice
            out[lib] = {"error": f"{type(e).__name__}: {e}"}
            continue
        for dynamic in (False, True):
            pairs = list(products(dynamic))
            for a, b in pairs[: 2 * len(weights)]:  # warm-up: handles, heuristics, workspaces
                torch.mm(a, b)
            host = gpu = 0.0
            for _ in range(repeats):
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                t0 = time.perf_counter()
                for a, b in pairs:
                    torch.mm(a, b)
                host += time.perf_counter() - t0
                e1.record()
                torch.cuda.synchronize()
                gpu += e0.elapsed_time(e1) / 1e3
            n = repeats * len(pairs)
            out[f"{lib}, {'changing' if dynamic else 'fixed'} token count"] = {
                "host_us_per_call": round(host / n * 1e6, 2), "gpu_us_per_call": round(gpu / n * 1e6, 2)}
    torch.backends.cuda.preferred_blas_library(default)
    return out


def main(argv=None) -> int:
    from quantune.lib.config import _parse_set, load_config, load_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=None, help="only these variants (seed always runs first)")
    p.add_argument("--scale", default="shape", choices=["tiny", "shape"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--logging-steps", type=int, default=None,
                   help="log the train loss every N optimizer steps (default: the recipe's own, as users run it; 1 gives "
                        "every step's loss for the train-loss column, and a synchronisation at every step)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override (dotted keys), for every run")
    p.add_argument("--profile", action="store_true", help="profile steps 3-4 of every run with torch.profiler "
                   "(OUT/profile_VARIANT/profile.txt); the rates then include the profiler: a separate run")
    p.add_argument("--flce-check", action="store_true", help="only flce_check (GPU): OUT/sft_flce_check.json")
    p.add_argument("--mm-check", action="store_true", help="only mm_check (GPU): OUT/sft_mm_check.json")
    a = p.parse_args(argv)
    if a.flce_check:
        write_gpu_check("sft_speed", "--flce-check", flce_check(), "liger's Triton kernels", a.out / "sft_flce_check.json")
        return 0
    if a.mm_check:
        write_gpu_check("sft_speed", "--mm-check", mm_check(), "cuBLAS", a.out / "sft_mm_check.json")
        return 0
    cfg = load_config(overrides={"scale": a.scale, **_parse_set(a.set)})
    recipe = load_recipe(RECIPE, cfg)
    build_shape_inputs(cfg, recipe)
    rows = []
    (ROOT / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sft-speed-", dir=ROOT / "results") as tmp:
        for v, over in variants(recipe).items():
            if a.variants and v != "seed" and v not in a.variants:
                continue
            print(f"sft_speed: {v} {over}", flush=True)
            rows.append(run_one(v, over, a.scale, a.epochs, Path(tmp), a.set, a.out.resolve() if a.profile else None,
                                a.logging_steps))
            write(rows, a.out)  # after each run: a later failure keeps what finished
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
