"""Measuring a model: perplexity with a stated context and stride (strided sliding windows, as in the
transformers perplexity guide), an encoder-decoder's loss over fixed windows, greedy generation speed, peak
memory and time of a block, size in bytes, KL divergence to a reference model, and sign_split (the odd and even
parts of a weight perturbation's effect on perplexity)."""
from __future__ import annotations

import math
import time
from pathlib import Path

from .common import fail, progress


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

    device = device or next(model.parameters()).device
    model.eval()

    def losses(begin: int, end: int):
        ids = input_ids[begin:end].unsqueeze(0).to(device)
        return F.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")

    with torch.no_grad():
        return windowed_nll(losses, input_ids.numel(), context, stride)


def sliding_windows(n: int, context: int, stride: int):
    """perplexity's windows over n tokens: (begin, end, scored), `scored` the window's last tokens that no earlier
    window scored."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        yield begin, end, end - max(prev_end, begin + 1)
        prev_end = end
        if end == n:
            break


def windowed_nll(losses, n: int, context: int, stride: int) -> dict:
    """Mean NLL over sliding_windows, `losses(begin, end)` giving the window's per-token losses (position i
    predicting token i + 1): torch-free, so that a llama.cpp process scores with the same windows."""
    if stride > context or stride < 1:
        raise fail("perplexity", f"stride {stride} must be in 1..context ({context})", "lower the stride")
    nll, count = 0.0, 0
    windows = 1 + max(0, math.ceil((n - context) / stride))
    with progress(total=windows, desc="perplexity", unit="window") as bar:
        for begin, end, scored in sliding_windows(n, context, stride):
            if scored > 0:
                nll += float(losses(begin, end)[-scored:].sum())
                count += scored
            bar.update(1)
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


# ---------------------------------------------------------------- memory, size, KL, sign_split

def synced_clock() -> float:
    """time.perf_counter() once the GPU (if any) has finished the work queued so far."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def profile_report(prof, label: str, wall: float, rows: int = 40, name_width: int | None = None) -> str:
    """A finished torch.profiler run as text: `label`, the wall seconds it covered and the GPU's busy seconds in them
    (the kernels' own time), then the `rows` operators and kernels with the most GPU time and with the most CPU
    self time, which say whether the work waited on the GPU or on Python."""
    import torch

    events = prof.key_averages()
    # self device time in microseconds (self_cuda_time_total before torch 2.4), of the kernels alone: an operator's
    # row repeats its kernels' time, and user annotations on the GPU span theirs
    by_gpu = "self_device_time_total" if events and hasattr(events[0], "self_device_time_total") \
        else "self_cuda_time_total"
    kernels = [e for e in events  # as torch's table sums its "Self CUDA time total"
               if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", 0)]
    gpu = sum(getattr(e, by_gpu) for e in kernels) / 1e6
    width = {"max_name_column_width": name_width} if name_width else {}
    text = [f"{label}: wall {wall:.3f} s, GPU kernels {gpu:.3f} s ({gpu / wall:.0%} busy)", "", "by GPU time:",
            events.table(sort_by=by_gpu, row_limit=rows, **width), "",
            "by CPU time:", events.table(sort_by="self_cpu_time_total", row_limit=rows, **width)]
    idle = gpu_idle_by_host_op(prof.events(), rows)
    if idle:
        text += ["", idle]
    return "\n".join(text) + "\n"


def gpu_idle_by_host_op(events, rows: int = 25, min_gap_us: float = 5.0) -> str:
    """Where the GPU waited on the host, from a profile's timeline (torch.profiler's FunctionEvents, start and end
    in microseconds on one clock): the stretches between the first and last kernel when no kernel ran, each of at
    least `min_gap_us`, charged to the host operators running meanwhile, by the outermost operator of each thread
    (what the step was doing: a compiled graph's call, the optimizer step, the loss) and by the innermost one (what
    the host itself was busy with; where threads overlap, the latest-started of the shallowest). A stretch where the
    host ran nothing named counts as "(no operator)". Empty without GPU kernels."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == cuda and not getattr(e, "is_user_annotation", False))
    if not kernels:
        return ""
    gaps, end = [], kernels[0][1]
    for s, e in kernels[1:]:
        if s - end >= min_gap_us:
            gaps.append((end, s))
        end = max(end, e)
    host = [e for e in events if e.device_type != cuda and not e.name.startswith("cuda")]
    depth = {}
    for e in host:
        d, p = 0, e.cpu_parent
        while p is not None:
            d, p = d + 1, p.cpu_parent
        depth[id(e)] = d
    # one sweep over the host operators' starts and ends and the gaps' bounds; each piece of a gap between two
    # consecutive points is charged to the outermost and the innermost operator running over it
    points = sorted([(e.time_range.start, 1, i) for i, e in enumerate(host)]
                    + [(e.time_range.end, 0, i) for i, e in enumerate(host)]
                    + [(t, 2, -1) for g in gaps for t in g])
    outer: dict[str, float] = {}
    inner: dict[str, float] = {}
    active: set[int] = set()
    in_gap, last = False, None
    for t, kind, i in points:
        if in_gap and last is not None and t > last:
            if active:
                ranked = sorted(active, key=lambda j: (depth[id(host[j])], -host[j].time_range.start))
                for table, j in ((outer, ranked[0]), (inner, ranked[-1])):
                    table[host[j].name] = table.get(host[j].name, 0.0) + (t - last)
            else:
                outer["(no operator)"] = outer.get("(no operator)", 0.0) + (t - last)
                inner["(no operator)"] = inner.get("(no operator)", 0.0) + (t - last)
        last = t
        if kind == 2:
            in_gap = not in_gap
        elif kind == 1:
            active.add(i)
        else:
            active.discard(i)
    total = sum(b - a for a, b in gaps)
    span = kernels[-1][1] - kernels[0][0]
    lines = [f"GPU idle between its first and last kernel: {total / 1e3:.1f} ms of {span / 1e3:.1f} ms "
             f"({len(gaps)} stretches of at least {min_gap_us:g} us), by the host operator running meanwhile:"]
    for title, table in (("outermost operator", outer), ("innermost operator", inner)):
        lines += ["", f"| {title} | GPU idle ms |", "| --- | --- |"]
        lines += [f"| {k[:90]} | {v / 1e3:.2f} |" for k, v in sorted(table.items(), key=lambda kv: -kv[1])[:rows]]
    return "\n".join(lines)


class PeakMemory:
    """Peak memory of a block: the CUDA allocator's peak when a GPU is in use, and the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs where the kernel allows; else the lifetime peak)."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_scope = "block"
        except OSError:
            self.rss_scope = "process"
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None
        self.rss_mb = vm_hwm_mb()


def vm_hwm_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    from .tb import peak_memory_mb

    return peak_memory_mb()


def weights_bytes(model) -> int:
    """Bytes of the model's tensors as loaded (parameters + buffers, shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def first_window_logits(model, ids, context: int):
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(ids[:context].unsqueeze(0).to(device)).logits[0].float().cpu()


def kl_reference(model, ids, context: int, max_tokens: int):
    """log-probabilities (float16, CPU) of the unquantized model on disjoint windows of the first `max_tokens`
    evaluation tokens: the reference for `kl_divergence`."""
    import torch

    device = next(model.parameters()).device
    n = min(max_tokens, ids.numel()) // context * context
    out = []
    with torch.no_grad():
        for b in range(0, n, context):
            logits = model(ids[b:b + context].unsqueeze(0).to(device)).logits[0].float()
            out.append(torch.log_softmax(logits, -1).to(torch.float16).cpu())
    return out


def kl_divergence(model, ids, context: int, reference) -> dict:
    """Mean per-token KL(unquantized || quantized) in nats over the reference windows. Unlike the perplexity
    change, it is never negative and does not move with the first-order effect of a perturbation (which is
    large for a small, undertrained model): it measures how far the quantized model's predictions moved."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i, ref in enumerate(reference):
            b = i * context
            lq = torch.log_softmax(model(ids[b:b + context].unsqueeze(0).to(device)).logits[0].float(), -1).cpu()
            lp = ref.float()
            total += (lp.exp() * (lp - lq)).sum(-1).sum().item()
            count += lp.shape[0]
    return {"kl_vs_base": total / max(count, 1), "kl_tokens": count}


def release_memory() -> None:
    """Return the memory of objects the caller has just dropped (model = None) to the OS / CUDA cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sign_split(model, ids, context: int, stride: int, original: dict | None = None) -> dict:
    """Splits the change in log-perplexity that quantization made into its odd and its even part in the weight
    change. W are the weights the quantizer rounded (RTN: the originals; AWQ: after its function-preserving
    smoothing; GPTQ, which overwrites its weights: `original`, copied before), dW = Q(W) - W for every quantized
    Linear; NLL(W + dW) is the quantized model, NLL(W - dW) its mirror, every other parameter as quantized.
    odd = (NLL(W+dW) - NLL(W-dW)) / 2 is the first-order term g.dW (g: the evaluation text's gradient), whose
    sign is how the rounding happens to line up with g, i.e. luck, and it is zero on average over the sign;
    even = (NLL(W+dW) + NLL(W-dW)) / 2 - NLL(W) is the damage through the loss's curvature, the part that a
    quantizer's objective (GPTQ's Hessian-weighted error, AWQ's output error) reduces. On a model far from a
    minimum of the evaluation text the odd term can outweigh the difference between two methods' even terms.
    The in-memory llm-compressor model (fake-quantized, not yet saved) is left as it was: the weights are
    kept on the CPU and put back, and quantization is enabled again."""
    import torch
    from compressed_tensors.quantization import disable_quantization, enable_quantization, forward_quantize

    

    mods = [(n, m) for n, m in model.named_modules()
            if hasattr(m, "weight_scale") and getattr(m, "quantization_scheme", None) is not None]
    kept = {n: m.weight.detach().to("cpu", copy=True) for n, m in mods}
    ref = original if original is not None else kept
    nll = {}
    try:
        model.apply(disable_quantization)
        for sign in (0, 1, -1):
            with torch.no_grad():
                for n, m in mods:
                    w = ref[n].to(m.weight.device, m.weight.dtype)
                    if sign:
                        q = forward_quantize(m, kept[n].to(m.weight.device), "weight", m.quantization_scheme.weights)
                        w = w + sign * (q - w)
                    m.weight.data = w
            nll[sign] = perplexity(model, ids, context, stride)["nll"]
    finally:
        with torch.no_grad():
            for n, m in mods:
                m.weight.data = kept[n].to(m.weight.device)
        model.apply(enable_quantization)
    return {"nll_fp": nll[0], "nll_mirror": nll[-1], "nll_odd": (nll[1] - nll[-1]) / 2,
            "nll_even": (nll[1] + nll[-1]) / 2 - nll[0], "sign_split_layers": len(mods)}


def split_metrics(split: dict, base: dict) -> dict:
    """sign_split's numbers for metrics.json (none when it did not run): the odd and even parts of the change in
    NLL per token, the mirror's perplexity and the even part as a perplexity (the geometric mean of ppl_quant and
    ppl_mirror when W is the unquantized model's function, which nll_fp_vs_base checks)."""
    import math

    if not split:
        return {}
    return {"nll_odd": split["nll_odd"], "nll_even": split["nll_even"],
            "nll_fp_vs_base": split["nll_fp"] - base["nll"], "ppl_mirror": math.exp(split["nll_mirror"]),
            "ppl_even": math.exp(base["nll"] + split["nll_even"]), "sign_split_layers": split["sign_split_layers"]}


def matmul_tflops(device: str, n: int | None = None, warmup: int = 3, iters: int = 10) -> tuple[float, str]:
    """This machine's dense matmul rate (TFLOP/s) and its dtype: bf16 n x n products on a GPU (n 8192), fp32 on the
    CPU (n 1024): the denominator of a training run's model-FLOPs utilisation, measured in the same run."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = n or (8192 if device == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    rate = 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12
    del a, b
    release_memory()
    return rate, str(dtype).removeprefix("torch.")


def train_flops_per_token(config, params: int, seq_len: float) -> float:
    """Model FLOPs of training on one token: 6N (forward and backward of every weight) plus PaLM's attention term
    12 x layers x (heads x head_dim) x sequence length (the full attention matrix; causal masking not discounted).
    Gradient checkpointing's recomputed forward is not counted (hardware FLOPs are ~8N with it)."""
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * params + 12.0 * layers * heads * head_dim * seq_len

