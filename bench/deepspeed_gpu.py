"""GPU benchmark of the sft stage's training path: tokens/s and model-FLOPs utilisation of the seed 003
recipe shape under DeepSpeed ZeRO-2 and ZeRO-3, against the GPU's own measured bf16 matmul rate.

    python bench/deepspeed_gpu.py --out bench/results/deepspeed_gpu.json [--steps 10 --warmup 3]

The model is Qwen3-0.6B-shaped (hidden 1024, 28 layers, 16 heads, 8 kv heads, head_dim 128, ffn 3072,
vocab 151936, tied embeddings) with random weights; no hub is reachable here. The training path is the stage's
own: `quantune.sft.training_args` (HF Trainer) with the recipe's full-scale keys (bf16, gradient checkpointing,
micro-batch 8 x 512 tokens, gradient accumulation 4) and the ZeRO files under recipes/deepspeed/, one process
started by the DeepSpeed launcher per configuration. Every sequence is 512 real tokens (no padding), so a step is
8 * 512 * 4 = 16384 tokens. The first `warmup` optimizer steps are not timed; the next `steps` are.

  reference  the GPU's bf16 matmul rate: torch.matmul of two 8192 x 8192 bf16 matrices, 3 warm-up + 20 timed
  MFU        6 * N * tokens/s / reference, N = all parameters (tied embeddings: the embedding matrix once; its
             lookup costs nothing and its use as the LM head is the 2*N_emb of the 6N)
  MFU_attn   (6 * N + 12 * layers * heads * head_dim * seq) * tokens/s / reference (PaLM's formula; it
             counts the full, not the causal, attention matrix)
Neither counts the forward recompute of gradient checkpointing (hardware FLOPs are ~8N per token with it).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
CONFIGS = {  # name: (ZeRO file, gradient checkpointing)
    "zero2": ("recipes/deepspeed/zero2.json", True),
    "zero3": ("recipes/deepspeed/zero3.json", True),
    "zero2_no_gc": ("recipes/deepspeed/zero2.json", False),
}


def matmul_tflops(n: int = 8192, warmup: int = 3, iters: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1000
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * iters / s / 1e12


def recipe_full() -> dict:
    from quantune.lib.config import SCHEMA_DIR, fill_defaults, load_yaml

    raw = load_yaml(ROOT / "recipes" / "qwen3_deepspeed_sft.yaml")
    # the top level is the full scale; the keys the recipe leaves out take the schema's defaults
    schema = load_yaml(SCHEMA_DIR / "recipes" / "sft.schema.yaml")
    return fill_defaults({k: v for k, v in raw.items() if k != "tiny"}, schema)


def worker(a) -> None:
    """One configuration, one rank (started by the DeepSpeed launcher)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Trainer, TrainerCallback

    from quantune.lib.models import count_parameters
    from quantune.sft import training_args

    recipe = recipe_full()
    recipe["deepspeed_config"] = a.zero
    recipe["gradient_checkpointing"] = a.gc
    cuda = torch.cuda.is_available()
    shape = dict(QWEN3_06B)
    if a.smoke:  # a CPU check of this script's plumbing: a tiny model, short sequences, fp32
        shape.update(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                     num_attention_heads=4, num_key_value_heads=2)
        recipe.update(max_seq_len=64, bf16=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seq, micro = recipe["max_seq_len"], recipe["per_device_train_batch_size"]
    accum = recipe["gradient_accumulation_steps"]
    total = a.warmup + a.steps
    with tempfile.TemporaryDirectory() as tmp:
        args = training_args(recipe, tmp, use_cpu=not cuda, max_steps=total, eval_strategy="no", save_strategy="no",
                             load_best_model_at_end=False, logging_steps=1, include_num_input_tokens_seen="no")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen3Config(**shape), dtype=torch.float32)
        model.config.use_cache = False
        params = count_parameters(model)["params_total"]
        g = torch.Generator().manual_seed(0)
        n_rows = total * micro * accum * args.world_size
        ids = torch.randint(0, shape["vocab_size"], (n_rows, seq), generator=g)

        class Rows(torch.utils.data.Dataset):
            def __len__(self):
                return n_rows

            def __getitem__(self, i):
                return {"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids[i]}

        marks: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                sync()
                marks.append(time.perf_counter())

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()])
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens_step = micro * seq * accum * args.world_size
    timed = marks[a.warmup:]  # marks[i] ends step i+1: time from the end of the warm-up to the last step
    dt = marks[-1] - marks[a.warmup - 1]
    res = {"config": a.name, "zero_config": a.zero, "gradient_checkpointing": a.gc, "world_size": args.world_size,
           "params": params, "micro_batch": micro, "seq_len": seq, "grad_accum": accum, "tokens_per_step": tokens_step,
           "warmup_steps": a.warmup, "timed_steps": len(timed), "timed_seconds": dt,
           "step_seconds": [round(b - x, 4) for x, b in zip(marks[a.warmup - 1:-1], marks[a.warmup:])],
           "tokens_per_s": tokens_step * len(timed) / dt,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
           "loss_first": losses[0], "loss_last": losses[-1]}
    Path(a.result).write_text(json.dumps(res, indent=2))


def write_results(path: str, dev: str, ref: float, cfg: dict, runs: list[dict]) -> None:
    import deepspeed
    import torch
    import transformers

    base = next((r for r in runs if r["config"] == "zero2"), runs[0])
    for r in runs:
        r["tokens_per_s_vs_zero2"] = r["tokens_per_s"] / base["tokens_per_s"]
    out = {"device": dev, "bf16_matmul_tflops": ref, "matmul": "torch.matmul 8192x8192 bf16, 3 warm-up + 20 timed",
           "model": "Qwen3-0.6B-shaped, random weights (transformers Qwen3Config)", "model_config": cfg,
           "command": "python bench/deepspeed_gpu.py " + " ".join(sys.argv[1:]),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "deepspeed": deepspeed.__version__, "cuda": torch.version.cuda},
           "runs": runs}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "deepspeed_gpu.json"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", default="")
    p.add_argument("--zero", default="")
    p.add_argument("--gc", type=int, default=1)
    p.add_argument("--result", default="")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check of one worker (tiny model, no GPU)")
    a = p.parse_args()
    if a.worker:
        a.gc = bool(a.gc)
        worker(a)
        return
    import torch

    dev = torch.cuda.get_device_name(0)
    ref = matmul_tflops()
    print(f"{dev}: bf16 matmul 8192^3 {ref:.1f} TFLOP/s", flush=True)
    cfg = QWEN3_06B
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    for name in a.configs.split(","):
        zero, gc = CONFIGS[name]
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result = f.name
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", "1",
               "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", "--name", name,
               "--zero", zero, "--gc", str(int(gc)), "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--result", result]
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        if rc != 0:
            print(f"{name}: the DeepSpeed run exited with code {rc}; skipped", flush=True)
            continue
        r = json.loads(Path(result).read_text())
        r["wall_seconds_incl_startup"] = time.time() - t0
        n, L, H, Q, T = r["params"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"], r["seq_len"]
        r["model_tflops"] = 6 * n * r["tokens_per_s"] / 1e12
        r["mfu"] = r["model_tflops"] / ref
        r["mfu_with_attention"] = (6 * n + 12 * L * H * Q * T) * r["tokens_per_s"] / 1e12 / ref
        runs.append(r)
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}% "
              f"(with attention {100 * r['mfu_with_attention']:.1f}%), peak {r['peak_mem_gib']:.1f} GiB", flush=True)
        write_results(a.out, dev, ref, cfg, runs)  # after every configuration: a cut-off run keeps what it measured
    print(json.dumps({r["config"]: round(r["tokens_per_s"]) for r in runs}))


if __name__ == "__main__":
    main()
