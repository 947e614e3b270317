"""GPU benchmark of the lora_sft stage's QLoRA step loop: real (non-pad) tokens/s and peak memory of
a ChatGLM3-6B-shaped model in NF4 with the `linear` and `cosine` recipes' settings, batches padded to their
longest row (the stage's SFTCollator, padding: longest) against batches padded to the maximum length
(padding: max_length, prompt + answer limits). The ratio dynamic/padded is the speed-up of dynamic padding.

    python bench/qlora_gpu.py --out bench/results/qlora_gpu.json [--steps-dynamic 8 --steps-padded 2]
    python bench/qlora_gpu.py --shape tiny --out /tmp/q.json     # a CPU smoke run of the same code

Model: transformers' native GLM (GlmConfig) shaped like THUDM/chatglm3-6b (hidden 4096, 28 layers, 32 heads,
2 kv heads = ChatGLM3's multi_query_group_num, head_dim 128, ffn 13696, vocab 65024, qkv bias, half-rotary),
random bf16 weights (no hub here; ChatGLM3's remote code cannot be loaded). The decoder's linear layers are
replaced by bitsandbytes Linear4bit (NF4, double quantization = compress_statistics, bf16 compute), the modules
`from_pretrained(quantization_config=BitsAndBytesConfig(...))` builds, without writing and re-reading 12 GB of
random weights; lm_head stays bf16 as there. Then the stage's own path: peft prepare_model_for_kbit_training
(gradient checkpointing on, as the full recipes set) and LoRA r 8 (alpha 32, dropout 0.05) on q/k/v_proj, the
native equivalent of ChatGLM3's fused query_key_value: quantune.lib.lora.add_lora, the stage's own set-up. A step = forward + backward under bf16 autocast
(the Trainer's bf16=True) + AdamW step on the LoRA weights, one micro-batch per optimizer step (gradient
accumulation only changes how often the small LoRA optimizer step runs). The first step of each configuration
is not timed, and before the first configuration `--warmup` more steps run untimed (CUDA context, kernel
selection, allocator): in a first run without them the first configuration measured came out 2x slower per
token than the second.

Rows: AdvertiseGen-like lengths (prompt uniform 40..80 tokens + ChatGLM3's 2 prefix tokens, answer uniform
60..150 + eos; fixed seed), built by the stage's tokenize_example layout (labels -100 on the prompt).
Recipe values (batch, lengths, gradient checkpointing) are read from recipes/qlora_chatglm_{linear,cosine}.yaml (full scale).
If a padded configuration runs out of GPU memory, it is retried with half the micro-batch (and twice the
accumulation, the same rows per optimizer step); the JSON says so.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHATGLM3_6B = dict(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                   num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=8192,
                   attention_bias=True, partial_rotary_factor=0.5, rms_norm_eps=1.5625e-07, pad_token_id=0,
                   eos_token_id=2, tie_word_embeddings=False)
TINY = dict(CHATGLM3_6B, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            head_dim=32, vocab_size=4096)
SETTINGS = ("linear", "cosine")


def recipe(name: str) -> dict:
    import yaml

    r = yaml.safe_load((ROOT / "recipes" / f"qlora_chatglm_{name}.yaml").read_text())
    return {k: v for k, v in r.items() if k != "tiny"}


def make_rows(n: int, seed: int, vocab: int, scale: float = 1.0) -> list[dict]:
    from quantune.lib.prompts import IGNORE_INDEX

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = [64790, 64792][: 2] if vocab > 64792 else [3, 4]  # ChatGLM3's [gMASK] sop
        p = p + [rng.randrange(100, vocab) for _ in range(int(rng.randint(40, 80) * scale))]
        a = [rng.randrange(100, vocab) for _ in range(int(rng.randint(60, 150) * scale))] + [2]
        rows.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})
    return rows


def quantize_nf4_inplace(model, compute_dtype):
    """Swap every decoder nn.Linear for a bitsandbytes NF4 Linear4bit (double quant) holding its weights."""
    import bitsandbytes as bnb
    import torch

    for parent_name, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or cname == "lm_head":
                continue
            dev = child.weight.device
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4").to(dev)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, cname, q)
    model.is_loaded_in_4bit = True  # what from_pretrained(load_in_4bit) sets; peft reads it
    return model


def build_model(shape: dict, device: str, r: dict, lora_r: int):
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from quantune.lib.lora import add_lora

    cdt = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = GlmConfig(**shape)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(cdt)  # build in bf16 directly (6B in fp32 would be 25 GB)
    try:
        with torch.device(device):
            model = GlmForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model = quantize_nf4_inplace(model, cdt)
    if device == "cuda":
        torch.cuda.empty_cache()
    # the stage's own LoRA set-up (prepare_model_for_kbit_training + LoraConfig), on the native q/k/v_proj
    model = add_lora(model, {**r, "quantization": "nf4", "lora_r": lora_r,
                             "target_modules": ["q_proj", "k_proj", "v_proj"]}, "CAUSAL_LM")
    kinds = {type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj")}
    assert any("bnb" in k for k in kinds), f"LoRA layers are not bitsandbytes 4-bit layers: {kinds}"
    return model


def run_config(model, rows, r, padding: str, steps: int, device: str, micro: int, accum: int,
               warmup: int = 1) -> dict:
    import torch

    from quantune.lib.prompts import SFTCollator

    max_len = r["max_input_length"] + r["max_output_length"]
    col = SFTCollator(0, padding, max_len if padding == "max_length" else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(r["learning_rate"]))
    cdt = torch.bfloat16 if device == "cuda" else torch.float32
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, real, padded, losses = [], 0, 0, []
    pos = 0
    for step in range(steps + warmup):  # the first `warmup` steps are not timed
        t0 = time.perf_counter()
        step_real = step_pad = 0
        for _ in range(accum):
            batch = col(rows[pos:pos + micro])
            pos += micro
            step_real += int(batch["attention_mask"].sum())
            step_pad += batch["input_ids"].numel()
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device_type=device, dtype=cdt, enabled=device == "cuda"):
                loss = model(**batch).loss / accum
            loss.backward()
            losses.append(float(loss.detach()) * accum)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step >= warmup:
            times.append(dt)
            real += step_real
            padded += step_pad
    total = sum(times)
    out = {"padding": padding, "micro_batch": micro, "grad_accum": accum, "rows_per_step": micro * accum,
           "timed_steps": steps, "seconds": total, "seconds_per_step": total / steps,
           "real_tokens_per_s": real / total, "processed_tokens_per_s": padded / total,
           "pad_fraction": 1 - real / padded, "mean_real_tokens_per_row": real / (steps * micro * accum),
           "loss_last": losses[-1], "step_seconds": [round(t, 4) for t in times]}
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del opt
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=["chatglm3-6b", "tiny"], default="chatglm3-6b")
    ap.add_argument("--steps-dynamic", type=int, default=8)
    ap.add_argument("--steps-padded", type=int, default=2)
    ap.add_argument("--settings", default="linear,cosine")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps before the first configuration")
    ap.add_argument("--repeat-first", action="store_true", help="time the first dynamic configuration again at "
                    "the end (an order-effect check)")
    ap.add_argument("--lora-r", type=int, default=8, help="one model for both settings (linear's r 4 vs 8: no "
                    "measurable speed difference, 0.03%% of the parameters)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = CHATGLM3_6B if a.shape == "chatglm3-6b" else TINY
    scale = 1.0 if a.shape == "chatglm3-6b" else 0.25
    res: dict = {"command": "python " + " ".join(sys.argv), "device": device,
                 "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "shape": a.shape,
                 "torch": torch.__version__, "results": {}}
    for lib in ("transformers", "peft", "bitsandbytes"):
        res[lib] = __import__(lib).__version__
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, out)

    t0 = time.time()
    recipes = {s: recipe(s) for s in a.settings.split(",")}
    if a.shape == "tiny":
        for r in recipes.values():
            r["max_input_length"] //= 8
            r["max_output_length"] //= 8
            r["per_device_train_batch_size"] = max(2, r["per_device_train_batch_size"] // 4)
    first = next(iter(recipes.values()))
    model = build_model(shape, device, first, a.lora_r)
    res["build_seconds"] = time.time() - t0
    trainable, total = model.get_nb_trainable_parameters()
    res["params"] = {"trainable": trainable, "total": total, "lora_r": a.lora_r,
                     "target_modules": "q_proj,k_proj,v_proj"}
    print(json.dumps(res["params"]), flush=True)
    # untimed warm-up of the whole path (CUDA context, cuBLAS/bitsandbytes kernels, allocator) before any config:
    # without it the first configuration measured pays these costs
    r0 = first
    rows0 = make_rows(r0["per_device_train_batch_size"] * a.warmup, seed=1, vocab=shape["vocab_size"], scale=scale)
    t_w = time.time()
    if a.warmup > 0:
        run_config(model, rows0, r0, "longest", 1, device, r0["per_device_train_batch_size"], 1, warmup=a.warmup - 1)
    res["global_warmup"] = {"steps": a.warmup, "seconds": time.time() - t_w}
    for s, r in recipes.items():
        res["results"][s] = {}
        bs = r["per_device_train_batch_size"]
        rows = make_rows(bs * (max(a.steps_dynamic, a.steps_padded) + 1) * 4, seed=8, vocab=shape["vocab_size"],
                         scale=scale)
        res["results"][s]["recipe"] = {k: r[k] for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                          "max_input_length", "max_output_length", "lora_r",
                                                          "lora_alpha", "lr_scheduler_type", "gradient_checkpointing")}
        for padding, steps in (("longest", a.steps_dynamic), ("max_length", a.steps_padded)):
            micro, accum = bs, 1
            while True:
                try:
                    m = run_config(model, rows, r, padding, steps, device, micro, accum)
                    break
                except torch.OutOfMemoryError:
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    res["results"][s].setdefault("oom", []).append(f"{padding}: micro-batch {micro} x {accum}")
                    if micro == 1:
                        m = {"padding": padding, "error": "out of memory at micro-batch 1"}
                        break
                    micro, accum = micro // 2, accum * 2
            res["results"][s][padding] = m
            print(s, padding, json.dumps(m), flush=True)
            save()
        d, p = res["results"][s]["longest"], res["results"][s]["max_length"]
        if "real_tokens_per_s" in d and "real_tokens_per_s" in p:
            res["results"][s]["speedup_dynamic_vs_padded"] = d["real_tokens_per_s"] / p["real_tokens_per_s"]
        save()
    if a.repeat_first:
        s, r = next(iter(recipes.items()))
        bs = r["per_device_train_batch_size"]
        rows = make_rows(bs * (a.steps_dynamic + 1), seed=8, vocab=shape["vocab_size"], scale=scale)
        res["results"][s]["longest_repeat"] = run_config(model, rows, r, "longest", a.steps_dynamic, device, bs, 1)
        print(s, "longest (repeat)", json.dumps(res["results"][s]["longest_repeat"]), flush=True)
    res["wall_seconds"] = time.time() - t0
    save()
    print(json.dumps({s: v.get("speedup_dynamic_vs_padded") for s, v in res["results"].items()}))


if __name__ == "__main__":
    main()
