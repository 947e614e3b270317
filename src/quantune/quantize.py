"""The quantize stage (issue 3, seeds 000 and 001): GPTQ, AWQ and round-to-nearest weight quantization with
llm-compressor (or GPTQ with GPTQModel), load-time LLM.int8 / NF4 with bitsandbytes, and the comparison of
all of them on measured numbers (`quant_compare`).

    python -m quantune.quantize --recipe recipes/gptq_opt67b.yaml --out results/gptq_opt67b
    python -m quantune.quantize --recipe recipes/quant_compare.yaml --out results/quant_compare

The recipe's `stage` picks what runs (quantize or quant_compare). A quantize target writes
results/<target>/model/ (safetensors + config + tokenizer, loadable by transformers), metrics.json (perplexity
of the unquantized and of the quantized model with the same context/stride, size on disk, quantization wall
time and peak memory, greedy tokens/s) and tb/. The perplexity reported for the quantized model is measured
on the model reloaded from model/, i.e. on what a user gets.

Backends: auto-gptq and autoawq are archived upstream (their READMEs point to GPTQModel and llm-compressor);
llm-compressor (GPTQModifier, AWQModifier, QuantizationModifier) is the default, GPTQModel is an opt-in backend
for GPTQ in its own env (envs/gptqmodel.yaml), imported only when a recipe says `backend: gptqmodel`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import time
from pathlib import Path
from typing import Any

from .common import atomic_dir, atomic_savefig, atomic_write_text, fail, read_json, run_cli, write_metrics

# method -> backends that implement it (the first is the default)
METHOD_BACKENDS = {
    "gptq": ("llmcompressor", "gptqmodel"),
    "awq": ("llmcompressor",),
    "rtn": ("llmcompressor",),
    "bnb_int8": ("bitsandbytes",),
    "bnb_nf4": ("bitsandbytes",),
}
# weight bits each backend can store for a method: compressed-tensors packs 1..8-bit integers into int32
# (pack-quantized); GPTQModel's GPTQ kernels pack 2, 3, 4 and 8 bits; bitsandbytes is int8 or 4-bit NF4/FP4
SUPPORTED_BITS = {
    ("llmcompressor", "gptq"): (2, 3, 4, 5, 6, 7, 8),
    ("llmcompressor", "awq"): (2, 3, 4, 5, 6, 7, 8),
    ("llmcompressor", "rtn"): (2, 3, 4, 5, 6, 7, 8),
    ("gptqmodel", "gptq"): (2, 3, 4, 8),
    ("bitsandbytes", "bnb_int8"): (8,),
    ("bitsandbytes", "bnb_nf4"): (4,),
}
CALIBRATED = ("gptq", "awq")  # methods that need calibration data (rtn and bitsandbytes are data-free)
AWQ_KEYS = ("awq_mappings", "duo_scaling", "n_grid")
GPTQ_KEYS = ("damp", "act_order", "block_size")
GROUPED_KEYS = ("group_size", "zero_point", "ignore")
BNB_INT8_KEYS = ("int8_threshold",)
BNB_NF4_KEYS = ("quant_type", "double_quant", "compute_dtype")
LLMC_KEYS = ("sign_split",)  # measured only on llm-compressor's in-memory model
CALIB_KEYS = ("calibration_dataset", "calibration_split", "calibration_samples", "calibration_seq_len",
              "calibration_batch_size")


def backend_of(recipe: dict) -> str:
    return recipe.get("backend") or METHOD_BACKENDS[recipe["method"]][0]


# ================================================================ checks (no heavy imports: run at parse time)

def check_recipe(recipe: dict, where: str) -> None:
    """Checks that need no model: method/backend pairing, bits the backend can store, keys that belong to
    another method, calibration settings. Raised as one line naming the recipe file and key."""
    method, backend = recipe["method"], backend_of(recipe)
    if backend not in METHOD_BACKENDS[method]:
        raise fail(f"{where}: key backend", f"method {method} has no backend {backend!r}",
                   f"use one of: {', '.join(METHOD_BACKENDS[method])}")
    bits = recipe["bits"]
    ok = SUPPORTED_BITS[(backend, method)]
    if bits not in ok:
        raise fail(f"{where}: key bits", f"{bits} bits is outside what backend {backend} supports for {method}",
                   f"use one of: {', '.join(map(str, ok))}")
    foreign = {
        "gptq": AWQ_KEYS + BNB_INT8_KEYS + BNB_NF4_KEYS,
        "awq": GPTQ_KEYS + BNB_INT8_KEYS + BNB_NF4_KEYS,
        "rtn": AWQ_KEYS + GPTQ_KEYS + BNB_INT8_KEYS + BNB_NF4_KEYS + CALIB_KEYS,
        "bnb_int8": AWQ_KEYS + GPTQ_KEYS + GROUPED_KEYS + BNB_NF4_KEYS + CALIB_KEYS + LLMC_KEYS,
        "bnb_nf4": AWQ_KEYS + GPTQ_KEYS + GROUPED_KEYS + BNB_INT8_KEYS + CALIB_KEYS + LLMC_KEYS,
    }[method]
    for key in foreign:
        if key in recipe:
            raise fail(f"{where}: key {key}", f"method {method} does not use it", "remove the key")
    if method in ("gptq", "awq", "rtn") and "group_size" not in recipe:
        raise fail(f"{where}: key group_size", f"method {method} needs a group size",
                   "add group_size: 128 (or -1 for one scale per output channel)")
    gs = recipe.get("group_size")
    if gs is not None and gs != -1 and gs < 1:
        raise fail(f"{where}: key group_size", f"{gs} is not a group size", "use a positive size (e.g. 128) or -1")
    if method in CALIBRATED:
        for key in ("calibration_dataset", "calibration_samples", "calibration_seq_len"):
            if key not in recipe:
                raise fail(f"{where}: key {key}", f"method {method} calibrates on data and needs it", "add the key")
    if backend == "gptqmodel" and "sign_split" in recipe:
        raise fail(f"{where}: key sign_split", "it is measured on llm-compressor's in-memory model only",
                   "remove the key or set backend: llmcompressor")
    if backend == "gptqmodel" and recipe.get("act_order") in ("static", "weight"):
        raise fail(f"{where}: key act_order", f"GPTQModel has no {recipe['act_order']!r} activation order",
                   "use none or group (GPTQModel's desc_act)")
    if recipe["stride"] > recipe["context"]:
        raise fail(f"{where}: key stride", f"stride {recipe['stride']} is larger than context {recipe['context']}",
                   "use a stride of at most the context")


def check_compare_recipe(recipe: dict, recipes: dict[str, dict], where: str) -> None:
    """quant_compare's targets must be quantize recipes."""
    for t in recipe["targets"]:
        if t not in recipes or recipes[t]["stage"] != "quantize":
            found = f"a {recipes[t]['stage']} recipe" if t in recipes else "no recipe"
            known = ", ".join(sorted(n for n, r in recipes.items() if r["stage"] == "quantize")) or "none yet"
            raise fail(f"{where}: key targets", f"{t!r} is {found}", f"name quantize recipes ({known})")


def match_name(name: str, target: str, module=None) -> bool:
    """compressed-tensors' matching rule (also GPTQModel-free): 're:<regex>' is re.match on the module name,
    anything else is the exact name or, given the module, one of its class names."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or (module is not None and any(c.__name__ == target for c in type(module).__mro__))


def quantized_linears(model, ignore: list[str]) -> list[tuple[str, Any]]:
    """The Linear layers a weight-only scheme targets (llm-compressor semantics: class Linear, minus ignore)."""
    import torch

    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and not any(match_name(name, ign, mod) for ign in ignore)]


def _decoder_blocks(model) -> int:
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "num_layers", None)
    return int(n or 0)


def check_against_model(recipe: dict, model, where: str) -> dict:
    """Checks that need the architecture (a meta-device model): the group size divides every quantized
    layer's input dimension; AWQ mappings exist for the family and each resolves to one smooth layer and its
    balance layers per decoder block. Returns what the run uses (the AWQ mappings)."""
    info: dict[str, Any] = {"architecture": type(model).__name__}
    method = recipe["method"]
    if method not in ("gptq", "awq", "rtn"):
        return info
    layers = quantized_linears(model, recipe.get("ignore", ["lm_head"]))
    if not layers:
        raise fail(f"{where}: key ignore", f"no Linear layer of {info['architecture']} is left to quantize",
                   "ignore fewer modules")
    gs = recipe["group_size"]
    if gs != -1:
        bad = [(n, m.in_features) for n, m in layers if m.in_features % gs]
        if bad:
            name, cols = bad[0]
            divisors = [g for g in (32, 64, 128, 256) if all(m.in_features % g == 0 for _, m in layers)]
            raise fail(f"{where}: key group_size",
                       f"group size {gs} does not divide the input dimension of {len(bad)} layer(s) of "
                       f"{info['architecture']}, e.g. {name} ({cols} inputs)",
                       f"use a group size that divides every layer ({', '.join(map(str, divisors)) or 'none of 32..256'}),"
                       " -1 for per-channel scales, or add those layers to ignore")
    info["quantized_layers"] = len(layers)
    if method == "awq":
        info["awq_mappings"] = _awq_mappings(recipe, model, where)
    return info


def _awq_mappings(recipe: dict, model, where: str) -> list[dict]:
    """The recipe's AWQ mappings (smooth layer -> balance layers), or llm-compressor's registry entry for the
    architecture; either way each must match one smooth layer per decoder block. llm-compressor itself falls
    back to Llama-style names for an unknown architecture, which do not exist in e.g. OPT: refuse that here."""
    arch = type(model).__name__
    if "awq_mappings" in recipe:
        maps = [{"smooth": m["smooth"], "balance": list(m["balance"])} for m in recipe["awq_mappings"]]
        key = "awq_mappings"
    else:
        from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY

        if arch not in AWQ_MAPPING_REGISTRY:
            raise fail(f"{where}: key awq_mappings", f"model family {arch} has no AWQ mappings in llm-compressor "
                       "and the recipe gives none",
                       "write them out (smooth layer -> balance layers per decoder block, as in recipes/awq_opt67b.yaml)")
        maps = [{"smooth": m.smooth_layer, "balance": list(m.balance_layers)} for m in AWQ_MAPPING_REGISTRY[arch]]
        key = f"awq_mappings (llm-compressor's {arch} entry)"
    names = {n: m for n, m in model.named_modules() if n}
    blocks = _decoder_blocks(model)
    import torch

    for i, m in enumerate(maps):
        smooth = [n for n in names if match_name(n, m["smooth"])]
        if not smooth:
            raise fail(f"{where}: key {key}[{i}].smooth", f"{m['smooth']!r} matches no module of {arch}",
                       "write the mappings for this model family (print(model) shows the module names)")
        if blocks and len(smooth) != blocks:
            raise fail(f"{where}: key {key}[{i}].smooth",
                       f"{m['smooth']!r} matches {len(smooth)} modules of {arch}, not one per decoder block "
                       f"({blocks}), e.g. {', '.join(sorted(smooth)[:2])}",
                       r"anchor the regex to the block, e.g. 're:.*layers\.\d+\.final_layer_norm$'")
        for b in m["balance"]:
            bal = [n for n in names if match_name(n, b)]
            if not bal or not all(isinstance(names[n], torch.nn.Linear) for n in bal):
                raise fail(f"{where}: key {key}[{i}].balance", f"{b!r} matches no Linear layer of {arch}",
                           "name the Linear layers that read the smooth layer's output")
            if blocks and len(bal) != blocks:
                raise fail(f"{where}: key {key}[{i}].balance",
                           f"{b!r} matches {len(bal)} layers of {arch}, not one per decoder block ({blocks})",
                           r"anchor the regex to the block, e.g. 're:.*layers\.\d+\.fc1$'")
    return maps


# ================================================================ data

def calibration_samples(cfg: dict, recipe: dict, tokenizer, where: str) -> dict:
    """`calibration_samples` windows of `calibration_seq_len` tokens: documents of the calibration split in a
    seeded random order, tokenized and concatenated, cut into consecutive windows, of which a seeded random
    choice without replacement is kept (the GPTQ paper: 128 random 2048-token C4 segments)."""
    import random

    from .config import resolve_dataset
    from .data import load_split

    n, seq = recipe["calibration_samples"], recipe["calibration_seq_len"]
    ds = resolve_dataset(cfg, recipe["calibration_dataset"], where, "calibration_dataset")
    split = recipe.get("calibration_split", "train")
    rows = load_split(ds, split)
    docs = [r["text"] for r in rows if r["text"].strip()]
    rng = random.Random(recipe.get("seed", 0))
    rng.shuffle(docs)
    want = 4 * n * seq  # a pool four times what is kept, so that the windows come from many documents
    stream: list[int] = []
    for i in range(0, len(docs), 256):
        for ids in tokenizer([d + "\n\n" for d in docs[i:i + 256]], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
        if len(stream) >= want:
            break
    windows = len(stream) // seq
    if windows < n:
        raise fail(f"{where}: key calibration_samples",
                   f"the calibration text ({ds['source']}, split {split}) has {len(stream)} tokens, fewer than "
                   f"{n} x {seq}", "lower calibration_samples or calibration_seq_len, or give more text")
    picks = sorted(rng.sample(range(windows), n))
    return {"input_ids": [stream[k * seq:(k + 1) * seq] for k in picks], "pool_tokens": len(stream),
            "source": ds["source"], "split": split}


def eval_ids(cfg: dict, recipe: dict, tokenizer, where: str):
    from .config import resolve_dataset
    from .data import join_text, load_split
    from .evaluate import token_stream

    ds = resolve_dataset(cfg, recipe["eval_dataset"], where, "eval_dataset")
    return token_stream(tokenizer, join_text(load_split(ds, recipe.get("eval_split", "test"))),
                        recipe.get("max_eval_tokens"))


# ================================================================ measurement

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
        self.rss_mb = _vm_hwm_mb()


def _vm_hwm_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    from .tb import peak_memory_mb

    return peak_memory_mb()


from .models import pick_device as _device  # noqa: E402  (shared with the other stages)


def _weights_bytes(model) -> int:
    """Bytes of the model's tensors as loaded (parameters + buffers, shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _first_window_logits(model, ids, context: int):
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


def _collect() -> None:
    """Return the memory of objects the caller has just dropped (model = None) to the OS / CUDA cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ================================================================ backends

def _scheme(recipe: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    gs = recipe["group_size"]
    args = dict(num_bits=recipe["bits"], type="int", symmetric=not recipe.get("zero_point", False))
    args.update(strategy="channel") if gs == -1 else args.update(strategy="group", group_size=gs)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))}


def llmcompressor_modifiers(recipe: dict, awq_mappings: list[dict] | None = None) -> list:
    """The llm-compressor recipe of a method: GPTQModifier, AWQModifier + QuantizationModifier, or
    QuantizationModifier alone (round-to-nearest, min-max observer), all with the same scheme."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = list(recipe.get("ignore", ["lm_head"]))
    method = recipe["method"]
    if method == "gptq":
        order = recipe.get("act_order", "static")
        return [GPTQModifier(config_groups=_scheme(recipe), ignore=ignore, dampening_frac=recipe.get("damp", 0.01),
                             block_size=recipe.get("block_size", 128), actorder=None if order == "none" else order)]
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

        maps = [AWQMapping(m["smooth"], list(m["balance"])) for m in awq_mappings or []]
        return [AWQModifier(mappings=maps, duo_scaling=recipe.get("duo_scaling", True), n_grid=recipe.get("n_grid", 20)),
                QuantizationModifier(config_groups=_scheme(recipe), ignore=ignore)]
    return [QuantizationModifier(config_groups=_scheme(recipe), ignore=ignore)]


@contextlib.contextmanager
def _cpu_safe_calibration():
    """llm-compressor 0.14.0.1's AWQ pins its activation cache (IntermediatesCache.pin_memory) before every
    grid search, which raises "Cannot access accelerator device" on a machine without one. Pinning only
    speeds up host-to-GPU copies, so on CPU it is skipped; with a GPU nothing is changed."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    orig = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = orig


@contextlib.contextmanager
def _gptq_losses(sink: list):
    """Collect GPTQ's per-layer reconstruction losses that llm-compressor logs (METRIC 'error <loss>')."""
    from loguru import logger

    def _take(msg):
        rec = msg.record
        m = re.match(r"error ([0-9.eE+-]+)", rec["message"])
        if rec["level"].name == "METRIC" and rec["function"] == "GPTQ" and m:
            sink.append(float(m.group(1)))

    hid = logger.add(_take, level="METRIC", format="{message}")
    try:
        yield
    finally:
        logger.remove(hid)


def quantize_llmcompressor(model, tokenizer, recipe: dict, samples: dict | None, awq_mappings) -> dict:
    """Run llm-compressor's oneshot on `model` in place; returns extra numbers (GPTQ losses)."""
    from llmcompressor import oneshot

    kwargs: dict[str, Any] = {}
    if samples is not None:
        # equal-length token windows as a plain DataLoader (oneshot takes one as is): no `datasets` Arrow table
        # and fingerprinting in between (Dataset.from_dict fails under Python 3.12 + dill 0.4 on the GPU image)
        import torch
        from torch.utils.data import DataLoader
        from transformers import default_data_collator

        rows = [{"input_ids": torch.tensor(s, dtype=torch.long), "attention_mask": torch.ones(len(s), dtype=torch.long)}
                for s in samples["input_ids"]]
        kwargs = dict(dataset=DataLoader(rows, batch_size=recipe.get("calibration_batch_size", 1), shuffle=False,
                                         collate_fn=default_data_collator))
    losses: list[float] = []
    with _cpu_safe_calibration(), _gptq_losses(losses):
        oneshot(model=model, processor=tokenizer, recipe=llmcompressor_modifiers(recipe, awq_mappings), **kwargs)
    out = {}
    if losses:
        out = {"gptq_layers": len(losses), "gptq_loss_mean": sum(losses) / len(losses), "gptq_loss_max": max(losses),
               "_gptq_losses": losses}
    return out


def quantize_gptqmodel(source: str, tokenizer, recipe: dict, samples: dict, save_dir: Path, where: str) -> None:
    """GPTQ with GPTQModel (the maintained successor of auto-gptq; CUDA kernels). Imported only here."""
    try:
        from gptqmodel import GPTQConfig, GPTQModel
    except ImportError:
        raise fail(f"{where}: key backend", "backend gptqmodel is selected but the gptqmodel package is not installed",
                   "run with --use-conda: envs/gptqmodel.yaml (GPTQModel 7.6.0, on a CUDA GPU), "
                   "or set backend: llmcompressor") from None
    qcfg = GPTQConfig(bits=recipe["bits"], group_size=recipe["group_size"], sym=not recipe.get("zero_point", False),
                      desc_act=recipe.get("act_order", "none") == "group", damp_percent=recipe.get("damp", 0.01))
    model = GPTQModel.load(source, qcfg)
    calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples["input_ids"]]
    model.quantize(calib, batch_size=recipe.get("calibration_batch_size", 1))
    model.save(str(save_dir))
    tokenizer.save_pretrained(save_dir)


def bnb_config(recipe: dict):
    import torch
    from transformers import BitsAndBytesConfig

    if recipe["method"] == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=recipe.get("int8_threshold", 6.0))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.get("quant_type", "nf4"),
                              bnb_4bit_use_double_quant=recipe.get("double_quant", True),
                              bnb_4bit_compute_dtype=getattr(torch, recipe.get("compute_dtype", "bfloat16")))


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

    from .evaluate import perplexity

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


# ================================================================ the quantize stage

def _check_backend_installed(recipe: dict, where: str) -> None:
    import importlib.util

    backend = backend_of(recipe)
    module = {"llmcompressor": "llmcompressor", "gptqmodel": "gptqmodel", "bitsandbytes": "bitsandbytes"}[backend]
    if importlib.util.find_spec(module) is None:
        env = "envs/gptqmodel.yaml" if backend == "gptqmodel" else "envs/quantize.yaml"
        raise fail(f"{where}: key backend", f"backend {backend} is selected but the {module} package is not installed",
                   f"run with --use-conda: {env}" + (" (on a CUDA machine)" if backend == "gptqmodel" else ""))
    if backend == "gptqmodel":
        import torch

        if not torch.cuda.is_available():
            raise fail(f"{where}: key backend", "GPTQModel quantizes with CUDA kernels and no GPU is visible",
                       "run on a GPU node (resources: gpu=1) or set backend: llmcompressor")


def _split_metrics(split: dict, base: dict) -> dict:
    """sign_split's numbers for metrics.json (none when it did not run): the odd and even parts of the change in
    NLL per token, the mirror's perplexity and the even part as a perplexity (the geometric mean of ppl_quant and
    ppl_mirror when W is the unquantized model's function, which nll_fp_vs_base checks)."""
    import math

    if not split:
        return {}
    return {"nll_odd": split["nll_odd"], "nll_even": split["nll_even"],
            "nll_fp_vs_base": split["nll_fp"] - base["nll"], "ppl_mirror": math.exp(split["nll_mirror"]),
            "ppl_even": math.exp(base["nll"] + split["nll_even"]), "sign_split_layers": split["sign_split_layers"]}


def run(recipe_path: str, out: str, cfg: dict) -> dict:
    import torch

    from .config import load_recipe, resolve_model
    from .evaluate import generation_speed, perplexity
    from .models import count_parameters, load_model, meta_model
    from .tb import TBWriter

    where = recipe_path
    recipe = load_recipe(recipe_path, cfg)
    if recipe["stage"] == "quant_compare":
        return compare(recipe_path, out, cfg)
    if recipe["stage"] != "quantize":
        raise fail(f"{where}: key stage", f"{recipe['stage']!r} is not a stage of quantune.quantize",
                   "use stage: quantize or quant_compare")
    # ---- every check before any work: recipe, backend, architecture, calibration and evaluation data
    check_recipe(recipe, where)
    _check_backend_installed(recipe, where)
    method, backend = recipe["method"], backend_of(recipe)
    m = resolve_model(cfg, recipe["model"], where, must_exist=True)
    info = check_against_model(recipe, meta_model(m["source"], trust_remote_code=m["trust_remote_code"]), where)
    device = _device(recipe, where)
    dtype = recipe.get("dtype", "float32") if device == "cuda" else "float32"
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or min(os.cpu_count() or 1, 2))))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m["source"], trust_remote_code=m["trust_remote_code"])
    samples = calibration_samples(cfg, recipe, tok, where) if method in CALIBRATED else None
    ids = eval_ids(cfg, recipe, tok, where)
    ctx, stride = recipe["context"], recipe["stride"]
    if ids.numel() < ctx:
        raise fail(f"{where}: key context", f"the evaluation text has {ids.numel()} tokens, fewer than one window",
                   "lower context or give more evaluation text")

    # ---- the unquantized model: perplexity and generation speed (the "before")
    model, tok = load_model(m["source"], trust_remote_code=m["trust_remote_code"], dtype=dtype)
    model.to(device)
    base_bytes = _weights_bytes(model)
    params = count_parameters(model)
    base = perplexity(model, ids, ctx, stride)
    kl_ref = kl_reference(model, ids, ctx, recipe.get("kl_tokens", 16384))
    gen_base = generation_speed(model, tok, recipe["prompt"], recipe["gen_tokens"]) if recipe["gen_tokens"] else {}
    extra: dict[str, Any] = {}
    split: dict[str, Any] = {}
    outp = Path(out)
    with atomic_dir(outp) as tmp:
        save_dir = tmp / "model"
        # ---- quantize (timed: wall seconds and peak memory of this block alone)
        if backend == "llmcompressor":
            if method in ("gptq", "awq") and m["local"]:
                model.config._name_or_path = m["source"]  # llm-compressor re-reads the config from here
            do_split = recipe.get("sign_split", True)
            original = None
            if do_split and method == "gptq":  # GPTQ overwrites the weights it rounds: keep them (CPU) for sign_split
                original = {n: mod.weight.detach().to("cpu", copy=True)
                            for n, mod in quantized_linears(model, list(recipe.get("ignore", ["lm_head"])))}
            with PeakMemory() as pk:
                extra = quantize_llmcompressor(model, tok, recipe, samples, info.get("awq_mappings"))
            ref_logits = _first_window_logits(model, ids, ctx)
            if do_split:  # before the save, which compresses the in-memory weights
                split = sign_split(model, ids, ctx, stride, original)
                original = None
            model.save_pretrained(save_dir, save_compressed=True)
            tok.save_pretrained(save_dir)
            fmt = "compressed-tensors (pack-quantized)"
            model = None
            _collect()
        elif backend == "gptqmodel":
            model = None
            _collect()
            with PeakMemory() as pk:
                quantize_gptqmodel(m["source"], tok, recipe, samples, save_dir, where)
            ref_logits, fmt = None, "gptq (GPTQModel)"
        else:  # bitsandbytes: quantization happens while loading
            model = None
            _collect()
            with PeakMemory() as pk:
                model, _ = load_model(m["source"], trust_remote_code=m["trust_remote_code"], dtype=dtype,
                                      quantization_config=bnb_config(recipe), device_map={"": device})
            # save before any forward pass: with bitsandbytes 0.50.2 on CPU, a forward pass first changes what
            # save_pretrained writes for NF4 (the reloaded model's logits then differ by ~0.06; saved first: 0.0)
            model.save_pretrained(save_dir)
            tok.save_pretrained(save_dir)
            ref_logits = _first_window_logits(model, ids, ctx)
            fmt = f"bitsandbytes {'int8' if method == 'bnb_int8' else recipe.get('quant_type', 'nf4')}"
            model = None
            _collect()
        # ---- the saved model, reloaded: what a user gets
        qmodel, qtok = load_model(str(save_dir), trust_remote_code=m["trust_remote_code"],
                                  device_map={"": device} if method.startswith("bnb") or device == "cuda" else None)
        qmodel.eval()
        quant = perplexity(qmodel, ids, ctx, stride)
        kl = kl_divergence(qmodel, ids, ctx, kl_ref)
        reload_diff = None
        if ref_logits is not None:
            reload_diff = (_first_window_logits(qmodel, ids, ctx) - ref_logits).abs().max().item()
        gen = generation_speed(qmodel, qtok, recipe["prompt"], recipe["gen_tokens"]) if recipe["gen_tokens"] else {}
        size = _safetensors_bytes(save_dir)
        metrics = {
            "target": recipe["name"], "stage": "quantize", "scale": cfg["scale"], "model": recipe["model"],
            "model_source": m["source"], "architecture": info["architecture"], "method": method, "backend": backend,
            "format": fmt, "bits": recipe["bits"], "group_size": recipe.get("group_size"),
            "zero_point": recipe.get("zero_point"), "act_order": recipe.get("act_order"), "damp": recipe.get("damp"),
            "quantized_layers": info.get("quantized_layers"), "device": device, "dtype": dtype,
            "calibration_dataset": recipe.get("calibration_dataset"),
            "calibration_samples": len(samples["input_ids"]) if samples else None,
            "calibration_seq_len": recipe.get("calibration_seq_len"),
            "calibration_pool_tokens": samples["pool_tokens"] if samples else None,
            "eval_dataset": recipe["eval_dataset"], "eval_split": recipe.get("eval_split", "test"),
            "eval_context": ctx, "eval_stride": stride, "eval_tokens_scored": quant["tokens_scored"],
            "ppl_base": base["ppl"], "ppl_quant": quant["ppl"], "ppl_delta": quant["ppl"] - base["ppl"],
            "ppl_ratio": quant["ppl"] / base["ppl"], **kl, **_split_metrics(split, base),
            "size_bytes_base": base_bytes, "size_bytes": size, "size_ratio": size / base_bytes,
            "quant_seconds": pk.seconds, "quant_peak_rss_mb": pk.rss_mb, "quant_peak_rss_scope": pk.rss_scope,
            "quant_peak_gpu_mb": pk.gpu_mb, "quant_peak_mem_mb": pk.gpu_mb if pk.gpu_mb is not None else pk.rss_mb,
            "reload_max_abs_logit_diff": reload_diff,
            "gen_tokens": gen.get("gen_tokens"), "gen_tokens_per_s": gen.get("gen_tokens_per_s"),
            "gen_tokens_per_s_base": gen_base.get("gen_tokens_per_s"), "gen_text": gen.get("gen_text"),
            **params, **{k: v for k, v in extra.items() if not k.startswith("_")},
        }
        with TBWriter(tmp / "tb") as tb:
            for i, loss in enumerate(extra.get("_gptq_losses", [])):
                tb.scalars({"quant/gptq_layer_loss": loss}, i, system=False)
            tb.scalars({"quant/ppl_base": base["ppl"], "quant/ppl": quant["ppl"],
                        "quant/ppl_delta": metrics["ppl_delta"], "quant/kl_vs_base": kl["kl_vs_base"],
                        **({"quant/ppl_even": metrics["ppl_even"], "quant/ppl_mirror": metrics["ppl_mirror"],
                            "quant/nll_odd": metrics["nll_odd"]} if "ppl_even" in metrics else {}),
                        "quant/bits": recipe["bits"],
                        "quant/size_mb": size / 2**20, "quant/size_ratio": metrics["size_ratio"],
                        "quant/seconds": pk.seconds, "quant/peak_mem_mb": metrics["quant_peak_mem_mb"],
                        "eval/ppl": quant["ppl"], "eval/loss": quant["nll"],
                        "system/gen_tokens_per_s": gen.get("gen_tokens_per_s")}, 0)
            tb.final(metrics)
            tb.text("generation", gen.get("gen_text", ""))
        written = write_metrics(tmp / "metrics.json", metrics)
    return written


# ================================================================ quant_compare

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
    from .config import load_recipe, load_recipes, results_dir

    recipe = load_recipe(recipe_path, cfg)
    rdir = Path(recipe_path).resolve().parent
    check_compare_recipe(recipe, load_recipes(cfg, rdir), recipe_path)
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
        md += ["| model | dtype | ppl | size MB | gen tok/s | evaluation |", "| --- | --- | --- | --- | --- | --- |"]
        for b in base_rows.values():
            md.append(f"| {b['model']} (unquantized) | {b['dtype']} | {_fmt(b['ppl'])} | {_fmt(b['size_mb'])} | "
                      f"{_fmt(b['gen_tokens_per_s'])} | {b['eval']}, context {b['context']}, stride {b['stride']} |")
        md += ["", "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        for r in rows:
            md.append("| " + " | ".join(_fmt(r[k]) if k != "group_size" else _group_txt(r[k]) for k, _ in COLUMNS) + " |")
        if anchors:
            md += ["", "Published anchors (WikiText-2 perplexity; the papers' settings, not runs of this project):", "",
                   "| model | method | bits | group | ppl | source |", "| --- | --- | --- | --- | --- | --- |"]
            for a in anchors:
                md.append(f"| {a['model']} | {a['method']} | {a['bits']} | {_group_txt(a.get('group_size'))} | "
                          f"{a['ppl']} | {a['source']} |")
        atomic_write_text(tmp / "compare.md", "\n".join(md) + "\n")
        _plot(rows, base_rows, tmp / "compare.png", cfg["scale"])
        flat: dict[str, Any] = {"target": recipe["name"], "stage": "quant_compare", "scale": cfg["scale"],
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


# ================================================================ CLI

def _cmd(a) -> None:
    from .config import config_from_args

    m = run(a.recipe, a.out, config_from_args(a))
    if m["stage"] == "quantize":
        print(f"{m['target']}: {m['method']} {m['bits']}-bit ({m['backend']}): ppl {m['ppl_base']:.3f} -> "
              f"{m['ppl_quant']:.3f} (context {m['eval_context']}, stride {m['eval_stride']}), "
              f"{m['size_bytes'] / 2**20:.1f} MB, quantized in {m['quant_seconds']:.1f} s")
    else:
        print(f"{m['target']}: {m['n_targets']} targets compared -> {a.out}/compare.md, compare.csv, compare.png")


def build_parser() -> argparse.ArgumentParser:
    from .config import stage_parser

    p = stage_parser("quantune.quantize", __doc__, _cmd)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
