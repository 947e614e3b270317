"""LoRA with PEFT: the base model loaded as a recipe says (NF4 double-quant for QLoRA, or full precision), the
recipe's LoraConfig (written once, for training and for counting), target-module checks on the meta device."""
from __future__ import annotations

from typing import Any

from .common import fail


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def compute_dtype(recipe: dict, device: str):
    import torch

    return getattr(torch, recipe["compute_dtype"]) if device == "cuda" else torch.float32


def check_target_modules(m: dict, recipe: dict, where: str) -> None:
    """Instantiate the architecture on the meta device (no weights) and check every LoRA target exists."""
    from .models import meta_model

    try:
        meta = meta_model(m["source"], trust_remote_code=m["trust_remote_code"])
    except Exception as e:  # noqa: BLE001 - remote code may not build on meta; PEFT checks again after loading
        print(f"note: could not pre-check target_modules on the meta device ({type(e).__name__}: {e})")
        return
    check_targets_in(meta, recipe, m["source"], where)


def check_targets_in(meta, recipe: dict, source: str, where: str) -> None:
    """Every LoRA target of the recipe names a module of the (meta-device) model; else one line listing its own."""
    names = {n.rsplit(".", 1)[-1] for n, _ in meta.named_modules()}
    missing = [t for t in recipe["target_modules"] if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, mod in meta.named_modules()
                         if type(mod).__name__ == "Linear" and "." in n})
        raise fail(f"{where}: key target_modules", f"{missing} not in {source}",
                   f"use module names of this model: {', '.join(linear)}")


def load_base(m: dict, recipe: dict, device: str, training: bool):
    """Tokenizer and model, NF4 double-quant (QLoRA) or full precision, as the recipe says."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

    from .models import model_class

    cdt = compute_dtype(recipe, device)
    kwargs: dict[str, Any] = {"trust_remote_code": m["trust_remote_code"], _dtype_kwarg(): cdt}
    if recipe["quantization"] == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=recipe["double_quant"], bnb_4bit_compute_dtype=cdt)
        if device == "cuda":
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    config = AutoConfig.from_pretrained(m["source"], trust_remote_code=m["trust_remote_code"])
    model = model_class(config).from_pretrained(m["source"], **kwargs)
    if device == "cuda" and "device_map" not in kwargs:
        model.to(device)
    tok = AutoTokenizer.from_pretrained(m["source"], trust_remote_code=m["trust_remote_code"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not training:
        model.eval()
    return model, tok


def add_lora(model, recipe: dict, task_type: str):
    from peft import get_peft_model, prepare_model_for_kbit_training

    gc = recipe["gradient_checkpointing"]
    gc_kwargs = {"use_reentrant": False}  # torch warns (and will fail) when it is not given
    if recipe["quantization"] == "nf4":
        loaded = {n: p.dtype for n, p in model.named_parameters()}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs)
        if not recipe["kbit_upcast"]:  # undo its fp32 copies (exact: bf16 -> fp32 -> bf16)
            for n, p in model.named_parameters():
                if p.dtype != loaded[n]:
                    p.data = p.data.to(loaded[n])
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(recipe, task_type))


def lora_config(recipe: dict, task_type: str):
    """The recipe's peft LoraConfig (lora_r, lora_alpha, lora_dropout, target_modules; no bias)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                      target_modules=list(recipe["target_modules"]), bias="none", inference_mode=False,
                      task_type=getattr(TaskType, task_type))


def peft_trainable_line(model) -> str:
    """PEFT's own print_trainable_parameters line ("trainable params: ... || all params: ... || trainable%: ...")."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()
