"""The quantization backends of the quantize stage: llm-compressor (GPTQModifier, AWQModifier, and
QuantizationModifier for round-to-nearest), GPTQModel (GPTQ in its own env, CUDA only) and bitsandbytes
(LLM.int8 / NF4 at load time). Each is imported only when a recipe uses it."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from .common import fail


def _scheme(recipe: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    gs = recipe["group_size"]
    args = dict(num_bits=recipe["bits"], type="int", symmetric=not recipe["zero_point"])
    args.update(strategy="channel") if gs == -1 else args.update(strategy="group", group_size=gs)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))}


def llmcompressor_modifiers(recipe: dict, awq_mappings: list[dict] | None = None) -> list:
    """The llm-compressor recipe of a method: GPTQModifier, AWQModifier + QuantizationModifier, or
    QuantizationModifier alone (round-to-nearest, min-max observer), all with the same scheme."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = list(recipe["ignore"])
    method = recipe["method"]
    if method == "gptq":
        order = recipe["act_order"]
        return [GPTQModifier(config_groups=_scheme(recipe), ignore=ignore, dampening_frac=recipe["damp"],
                             block_size=recipe["block_size"], actorder=None if order == "none" else order)]
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

        maps = [AWQMapping(m["smooth"], list(m["balance"])) for m in awq_mappings or []]
        return [AWQModifier(mappings=maps, duo_scaling=recipe["duo_scaling"], n_grid=recipe["n_grid"]),
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


class _Float32Batches:
    """A list of tensors read one at a time as float32 (no copy of the whole list)."""

    def __init__(self, tensors: list):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, i):
        return self.tensors[i].float()

    def __iter__(self):
        return (t.float() for t in self.tensors)


@contextlib.contextmanager
def fp32_awq_loss():
    """llm-compressor 0.14.0.1's AWQ grid search sums each batch's squared error in the model's dtype
    (mse_loss(reduction="sum") of fp16 outputs): past 65,504 the sum is inf, every grid point is non-finite and
    it raises "No finite loss was found" (seen at scale shape: random OPT-6.7b in fp16, batches of 8 x 512 x
    4096 outputs; upstream vllm-project/llm-compressor#2213). The loss is taken on float32 reads of each batch
    instead; at float32 (the tiny scale) nothing changes."""
    from llmcompressor.modifiers.transform.awq import AWQModifier

    orig = AWQModifier._compute_loss
    AWQModifier._compute_loss = lambda self, a, b: orig(self, _Float32Batches(a), _Float32Batches(b))
    try:
        yield
    finally:
        AWQModifier._compute_loss = orig


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
        kwargs = dict(dataset=DataLoader(rows, batch_size=recipe["calibration_batch_size"], shuffle=False,
                                         collate_fn=default_data_collator))
    losses: list[float] = []
    with _cpu_safe_calibration(), fp32_awq_loss(), _gptq_losses(losses):
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
    qcfg = GPTQConfig(bits=recipe["bits"], group_size=recipe["group_size"], sym=not recipe["zero_point"],
                      desc_act=recipe["act_order"] == "group", damp_percent=recipe["damp"])
    model = GPTQModel.load(source, qcfg)
    calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples["input_ids"]]
    model.quantize(calib, batch_size=recipe["calibration_batch_size"])
    model.save(str(save_dir))
    tokenizer.save_pretrained(save_dir)


def bnb_config(recipe: dict):
    import torch
    from transformers import BitsAndBytesConfig

    if recipe["method"] == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=recipe["int8_threshold"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe["quant_type"],
                              bnb_4bit_use_double_quant=recipe["double_quant"],
                              bnb_4bit_compute_dtype=getattr(torch, recipe["compute_dtype"]))
