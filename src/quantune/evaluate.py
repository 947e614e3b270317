"""Evaluation: perplexity with a stated context and stride, greedy generation speed, and the
`evaluate` stage (a base model's numbers, the "before" of every quantization and fine-tuning target).

    python -m quantune.evaluate --recipe recipes/eval_opt67b.yaml --out results/eval_opt67b
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from .common import fail, progress, run_cli, write_metrics


def token_stream(tokenizer, text: str, max_tokens: int | None = None):
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise fail("evaluation text", "fewer than 2 tokens", "give the evaluation data set some text")
    return ids.to(torch.long)


def perplexity(model, input_ids, context: int, stride: int, device: str | None = None) -> dict:
    """Sliding-window perplexity (the Hugging Face `perplexity` recipe): windows of `context` tokens,
    moved by `stride`; only tokens not scored by an earlier window are scored, each with up to
    context-1 tokens of left context. stride == context gives disjoint windows."""
    import torch
    import torch.nn.functional as F

    if stride > context or stride < 1:
        raise fail("perplexity", f"stride {stride} must be in 1..context ({context})", "lower the stride")
    device = device or next(model.parameters()).device
    n = input_ids.numel()
    nll, count, prev_end = 0.0, 0, 0
    model.eval()
    windows = 1 + max(0, math.ceil((n - context) / stride))
    with torch.no_grad(), progress(total=windows, desc="perplexity", unit="window") as bar:
        for begin in range(0, n, stride):
            end = min(begin + context, n)
            trg = end - max(prev_end, begin + 1)  # tokens newly scored in this window
            ids = input_ids[begin:end].unsqueeze(0).to(device)
            logits = model(ids).logits[0, :-1].float()
            tgt = ids[0, 1:]
            losses = F.cross_entropy(logits, tgt, reduction="none")
            if trg > 0:
                nll += losses[-trg:].sum().item()
                count += trg
            prev_end = end
            bar.update(1)
            if end == n:
                break
    mean = nll / max(count, 1)
    return {"ppl": math.exp(mean), "nll": mean, "tokens_scored": count, "context": context, "stride": stride}


def seq2seq_perplexity(model, input_ids, context: int) -> dict:
    """Continuation perplexity of an encoder-decoder: encoder reads the first half of each window,
    the decoder is scored on the second half."""
    import torch

    half = context // 2
    nll, count = 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for begin in range(0, input_ids.numel() - context + 1, context):
            w = input_ids[begin:begin + context].to(device)
            out = model(input_ids=w[:half][None], labels=w[half:][None])
            nll += out.loss.item() * (context - half)
            count += context - half
    if count == 0:
        raise fail("evaluation text", f"shorter than one window of {context} tokens", "give more text")
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens_scored": count, "context": context, "stride": context}


def generation_speed(model, tokenizer, prompt: str, new_tokens: int) -> dict:
    """Greedy generation of exactly `new_tokens` tokens; tokens per second of the decode loop."""
    import torch

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(**enc, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    n_new = out.shape[-1] - (0 if model.config.is_encoder_decoder else enc["input_ids"].shape[-1])
    text = tokenizer.decode(out[0][-n_new:], skip_special_tokens=True)
    return {"gen_tokens": int(n_new), "gen_seconds": dt, "gen_tokens_per_s": n_new / dt, "gen_text": text}


def evaluate_model(model, tokenizer, text: str, *, context: int, stride: int, max_tokens: int | None,
                   prompt: str, new_tokens: int) -> dict:
    ids = token_stream(tokenizer, text, max_tokens)
    if model.config.is_encoder_decoder:
        ppl = seq2seq_perplexity(model, ids, context)
    else:
        ppl = perplexity(model, ids, context, stride)
    out = {f"eval_{k}": v for k, v in ppl.items()}
    if new_tokens:
        out.update(generation_speed(model, tokenizer, prompt, new_tokens))
    return out


# ---------------------------------------------------------------- the evaluate stage

def eval_text(cfg: dict, recipe: dict) -> str:
    from .config import resolve_dataset
    from .data import join_text, load_split

    ds = resolve_dataset(cfg, recipe["dataset"])
    return join_text(load_split(ds, recipe["split"]))


def run(recipe_path: str, out: str, cfg: dict) -> dict:
    import torch

    from .config import load_recipe, resolve_model
    from .models import count_parameters, load_model, pick_device
    from .tb import TBWriter, peak_memory_mb

    recipe = load_recipe(recipe_path, cfg)
    m = resolve_model(cfg, recipe["model"], must_exist=True)
    device = pick_device(recipe, recipe_path)
    dtype = recipe.get("dtype", "float32") if device == "cuda" else "float32"
    t0 = time.time()
    model, tok = load_model(m["source"], trust_remote_code=m["trust_remote_code"], dtype=dtype)
    model.to(device)
    load_s = time.time() - t0
    text = eval_text(cfg, recipe)
    res = evaluate_model(model, tok, text, context=recipe["context"], stride=recipe["stride"],
                         max_tokens=recipe.get("max_eval_tokens"), prompt=recipe["prompt"],
                         new_tokens=recipe["gen_tokens"])
    metrics = {"target": recipe["name"], "stage": "evaluate", "scale": cfg["scale"], "model": recipe["model"],
               "model_source": m["source"], "dataset": recipe["dataset"], "split": recipe["split"],
               "device": device, "dtype": dtype, "load_seconds": load_s, "peak_mem_mb": peak_memory_mb(),
               **count_parameters(model), **res}
    outp = Path(out)
    with TBWriter(outp / "tb") as tb:
        tb.scalars({"eval/ppl": metrics["eval_ppl"], "eval/loss": metrics["eval_nll"],
                    "system/gen_tokens_per_s": metrics.get("gen_tokens_per_s")}, 0)
        tb.final(metrics)
        tb.text("generation", metrics.get("gen_text", ""))
    return write_metrics(outp / "metrics.json", metrics)


def _cmd(a) -> None:
    from .config import config_from_args

    m = run(a.recipe, a.out, config_from_args(a))
    print(f"{m['target']}: ppl {m['eval_ppl']:.3f} over {m['eval_tokens_scored']} tokens "
          f"(context {m['eval_context']}, stride {m['eval_stride']})")


def build_parser() -> argparse.ArgumentParser:
    from .config import stage_parser

    p = stage_parser("quantune.evaluate", __doc__, _cmd)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
