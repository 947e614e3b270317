"""Models: the tiny world's tokenizers and model families, loading any model by source, the device and
the CPU threads a step runs with.

A source is a local directory or a hub id (config.resolve_model decides which); the loading code is the
same at both scales, and `trust_remote_code` is passed only where the config opts in.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import ROOT, atomic_dir, fail, read_json, write_json

SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}
SEQ2SEQ_FAMILIES = {"mt5"}
# Llama-family models get a SentencePiece tokenizer: llama.cpp's converter reads tokenizer.model without
# the BPE pre-tokenizer hash check that a locally trained byte-level BPE cannot pass.
TOKENIZER_OF_FAMILY = {"opt": "bpe", "glm": "bpe", "qwen3": "bpe", "gpt2": "bpe", "mt5": "bpe", "llama": "spm"}


# ---------------------------------------------------------------- tokenizers

def corpus_texts(corpus_dir: str | Path, split: str = "train") -> list[str]:
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise fail(str(path), "corpus split not found", "build it first: snakemake tiny_world")
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_bpe_tokenizer(texts: list[str], vocab_size: int, min_frequency: int):
    """A byte-level BPE (GPT-2 style) trained on the texts, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[SPECIAL[k] for k in ("pad_token", "eos_token", "bos_token", "unk_token")],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **SPECIAL)


def train_spm_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """A SentencePiece BPE with byte fallback (Llama style), saved as tokenizer.model + transformers files."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts for t in t.split("\n") if t.strip()]), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=0.98,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>",
        unk_piece="<unk>", split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=2, minloglevel=2, train_extremely_large_corpus=False,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(str(out_dir), legacy=False, **SPECIAL)


def build_tokenizer(kind: str, corpus_dir: str, out: str, vocab_size: int, min_frequency: int) -> dict:
    texts = corpus_texts(corpus_dir)
    with atomic_dir(out) as tmp:
        tok = (train_bpe_tokenizer(texts, vocab_size, min_frequency) if kind == "bpe"
               else train_spm_tokenizer(texts, vocab_size, tmp))
        tok.save_pretrained(tmp)
        sample = texts[0][:200]
        stats = {"kind": kind, "vocab_size": len(tok), "roundtrip_ok": tok.decode(tok(sample)["input_ids"],
                                                                               skip_special_tokens=True) == sample}
        held = corpus_texts(corpus_dir, "test")
        n_chars = sum(len(t) for t in held)
        n_tok = sum(len(x) for x in tok(held, add_special_tokens=False)["input_ids"])
        stats["chars_per_token_heldout"] = round(n_chars / max(n_tok, 1), 4)
        write_json(tmp / "tokenizer_stats.json", stats)
    return stats


# ---------------------------------------------------------------- models

def tiny_config(family: str, spec: dict[str, Any], tokenizer):
    from transformers import AutoConfig

    spec = dict(spec)
    model_type = spec.pop("model_type")
    if model_type != family:
        raise fail(f"tiny_world.families.{family}.model_type", f"{model_type!r} differs from {family!r}", "make them equal")
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    if family in SEQ2SEQ_FAMILIES:
        ids["decoder_start_token_id"] = tokenizer.pad_token_id
        spec.setdefault("tie_word_embeddings", False)
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **ids, **spec)


def model_class(family_or_config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    mt = getattr(family_or_config, "model_type", family_or_config)
    return AutoModelForSeq2SeqLM if mt in SEQ2SEQ_FAMILIES or mt in ("t5", "mt5") else AutoModelForCausalLM


def init_model(family: str, spec: dict, tokenizer_dir: str, seed: int = 0):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = tiny_config(family, spec, tok)
    torch.manual_seed(seed)
    model = model_class(cfg).from_config(cfg)
    return model, tok


def load_model(source: str, *, trust_remote_code: bool = False, dtype=None, device_map=None,
               quantization_config=None, seq2seq: bool | None = None):
    """Load a tokenizer and model from a local directory or hub id (the same code at both scales)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    p = Path(source)
    looks_local = source.startswith((".", "/")) or p.exists() or source.count("/") > 1
    if looks_local and not (p / "config.json").is_file():
        raise fail(source, "no model here (config.json missing)",
                   "build the tiny world (snakemake tiny_world) or fix models.<name>.path in config/config.yaml")
    cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    cls = model_class(cfg) if seq2seq is None else model_class("mt5" if seq2seq else "causal")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = cls.from_pretrained(source, **kwargs)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


# threads that page-lock a pinned block (PyTorch's allocator option pinned_num_register_threads, a power of 2)
PAGE_LOCK_THREADS = 8


def parallel_page_locking(threads: int = PAGE_LOCK_THREADS) -> bool:
    """PyTorch's pinned-memory allocator takes each block from one cudaHostAlloc call; its allocator options
    pinned_use_cuda_host_register and pinned_num_register_threads (PYTORCH_ALLOC_CONF) allocate the block and
    page-lock it with cudaHostRegister across `threads` threads instead. On an H100 machine that took the fast
    path's move of OPT-6.7B to the CPU and back from 6.4 s to 2.7 s (page-locking 1.51 -> 3.14 GiB/s in 128 MiB
    blocks; bench/results/quant_offload_check.json, the earlier figures at `git show
    6af5722:bench/results/quant_offload_check.json`). Set for this process; False where this torch does not take
    them."""
    import torch

    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    try:
        setter(f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}")
    except (RuntimeError, ValueError):
        return False
    return True


def to_host(model) -> bool:
    """Move every parameter and buffer of `model` to CPU memory, page-locked where CUDA allows it (copies between it
    and the GPU then run at DMA speed, not through pageable memory), as model.to("cpu") does otherwise: each
    tensor's .data is replaced, so tied parameters stay one. Falls back to pageable memory where pinning fails.
    Returns whether the memory is pinned."""
    import torch

    pin = torch.cuda.is_available()
    if pin:
        parallel_page_locking()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is None or t.device.type == "cpu":
                    continue
                try:
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
                except RuntimeError:  # no page-locked memory left: the rest pageable
                    pin = False
                    host = torch.empty(t.shape, dtype=t.dtype)
                t.data = host.copy_(t.data)
    return pin


def pick_device(recipe: dict, where: str) -> str:
    """The recipe's `device` (auto | cpu | cuda) on this machine; cuda without a GPU is one clear error."""
    import torch

    want = recipe.get("device", "auto")
    if want == "cuda" and not torch.cuda.is_available():
        raise fail(f"{where}: key device", "cuda requested but no GPU is visible",
                   "run on a GPU node (resources: gpu=1) or set device: auto")
    return "cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def cpu_has_avx2() -> bool:
    """An x86 CPU with AVX2 (Linux: /proc/cpuinfo), whose kernels the tiny world pins (rules/common.smk)."""
    try:
        return any(line.startswith("flags") and " avx2" in line for line in open("/proc/cpuinfo", encoding="utf-8"))
    except OSError:
        return False


def set_cpu_threads() -> int:
    """torch's intra-op threads for a step on the CPU: OMP_NUM_THREADS (Snakemake sets it to the rule's `threads`),
    else 2. A fixed count rather than the machine's cores: float reductions split differently over another thread
    count, so tiny-scale numbers agree across machines only at the same count."""
    import os

    import torch

    n = max(1, int(os.environ.get("OMP_NUM_THREADS") or 2))
    torch.set_num_threads(n)
    return n


def _build_on_meta(config, trust_remote_code: bool):
    import torch

    with torch.device("meta"):
        return model_class(config).from_config(config, trust_remote_code=trust_remote_code)


def meta_model(source: str, *, trust_remote_code: bool = False):
    """The architecture at `source` (local directory or hub id) on the meta device: shapes and module names for
    the checks before any work, no weights."""
    from transformers import AutoConfig

    return _build_on_meta(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code), trust_remote_code)


def model_config_json(m: dict, where: str) -> tuple[dict, str]:
    """The serialized config.json of a resolved model (config.resolve_model) and where it was read: the local
    directory (tiny world or `path`), else the repository's copy named by the model's `hub_config`. No hub access."""
    if m["local"]:  # resolved with must_exist: config.json is there
        p = Path(m["source"]) / "config.json"
        return read_json(p), str(p)
    if m.get("hub_config"):
        p = Path(m["hub_config"])
        return read_json(p), str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
    raise fail(f"{where}: key model", f"{m['source']} has no config.json here (no hub_config in config/config.yaml)",
               "add hub_config: config/hub_configs/<name>.json (a copy of the hub config.json) to the model's entry")


def meta_model_from_config(config_json: dict, *, trust_remote_code: bool = False):
    """The model a config.json describes, built on the meta device (no weights, no memory), with its output
    embedding tied or untied as the checkpoint would load it.

    Why untie by hand: transformers 5's MT5Config.__post_init__ forces tie_word_embeddings=True ("official weights
    have False serialized, but we have to tie always"), so from_config ties lm_head to shared. Loading the real
    mT5 / mt0 weights does not: the checkpoint holds shared.weight and a different lm_head.weight and
    from_pretrained keeps them apart ("both are present in the checkpoints with different values, so we will NOT
    tie them"; tests/test_lora_experiments.py checks this on a synthetic checkpoint). So when the serialized
    config.json says tie_word_embeddings: false, the lm_head gets a Parameter of its own here too."""
    import torch
    from transformers import CONFIG_MAPPING

    d = dict(config_json)
    mt = d.get("model_type")
    if mt not in CONFIG_MAPPING:  # remote code: its config class lives in the hub repository
        raise ValueError(f"model_type {mt!r} is not a native transformers architecture")
    model = _build_on_meta(CONFIG_MAPPING[mt].from_dict(d), trust_remote_code)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if (d.get("tie_word_embeddings") is False and out_emb is not None and in_emb is not None
            and out_emb.weight is in_emb.weight):
        out_emb.weight = torch.nn.Parameter(torch.empty_like(out_emb.weight, device="meta"))
    return model


def count_parameters(model) -> dict[str, float]:
    """Total / trainable parameters; a parameter ZeRO-3 has partitioned counts its full size (ds_numel)."""
    total = trainable = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return {"params_total": total, "params_trainable": trainable,
            "params_trainable_pct": round(100.0 * trainable / max(total, 1), 4)}


def dir_size_bytes(path: str | Path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


# ---------------------------------------------------------------- CLI
