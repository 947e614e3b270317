"""Attention for packed rows that computes each row on its own: torch's variable-length flash attention
(torch.nn.attention.varlen.varlen_attn) behind transformers' AttentionInterface, reading the row boundaries that
DataCollatorWithFlattening returns with return_flash_attn_kwargs=True (cu_seq_lens_q / _k, max_length_q / _k).

transformers' sdpa path keeps packed rows apart with a block-diagonal mask over the whole packed row, which SDPA
computes densely: measured on one H200 at shape scale (bench/results/sft_speed.md), packing a step's 32 rows of
300-470 tokens that way ran at 0.78x the padded seed configuration. Here no position is spent on another row.

Under autocast (the Trainer's bf16 / fp16) fp32 queries, keys and values are cast to the autocast dtype first, as
SDPA itself is cast: a QLoRA model keeps its norms in fp32 (PEFT's k-bit preparation), so its attention inputs
arrive in fp32, and on one H200 they took the per-row path: 0.63x the seed configuration, where the same rows
padded in one micro-batch without checkpointing ran 1.64x (`git show 2ee8554:bench/results/qlora_speed.md`).
Where the kernel does not run (a CPU, fp32 without autocast, a sliding window, a torch without varlen_attn) each
row goes through SDPA on its own, the same function; attention dropout in training is refused. Batches without
row boundaries (padded eval or generation) take transformers' sdpa path unchanged. `describe` names the paths that
packed rows took in this process.
"""
from __future__ import annotations

import inspect

NAME = "quantune_varlen"
PATHS = {"flash": "torch varlen_attn (flash), each packed row on its own",
         "per_row": "SDPA row by row, each packed row on its own"}
_ran: set[str] = set()  # the PATHS keys packed rows took in this process
_UNSET = object()
_PARAMS = _UNSET  # varlen_attn's parameter names (None: no varlen_attn), read once by _params()


def _varlen_params() -> frozenset | None:
    """varlen_attn's parameter names (read once a process), or None where this torch has no varlen_attn."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _params() -> frozenset | None:
    """varlen_attn's parameter names, read on first use (register() does, so that inside a compiled decoder block
    this is a global read, not an inspect call that would break the graph)."""
    global _PARAMS
    if _PARAMS is _UNSET:
        _PARAMS = _varlen_params()
    return _PARAMS


def refresh() -> None:
    """Read varlen_attn's signature again at the next use (after the kernel was replaced, as tests do)."""
    global _PARAMS
    _PARAMS = _UNSET


def _flash(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """torch's varlen_attn, causal, on [T, H, D] tensors; its signature moved between torch releases (2.10:
    is_causal and no scale or GQA; 2.12: window_size, scale, enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _params()
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kw["scale"] = scale
    else:  # the kernel's own scale is 1/sqrt(D)
        q = q * (scale * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def _per_row(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """The same function row by row with SDPA (causal within each row): the path without the flash kernel."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for s, e, ks, ke in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        if e == s:
            continue
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[s:e], k[ks:ke], v[ks:ke]))  # [1, H, L, D]
        out[s:e] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                                  enable_gqa=ki.shape[1] != qi.shape[1])[0].transpose(0, 1)
    return out


def flash_runs(is_cuda: bool, dtype) -> bool:
    """Whether torch's varlen flash kernel takes packed rows of this device and dtype."""
    import torch

    return is_cuda and dtype in (torch.float16, torch.bfloat16) and _params() is not None


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              is_causal=None, **kwargs):
    """transformers' attention function signature: query / key / value [B, H, T, D]; returns ([B, T, H, D], None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None or query.shape[0] != 1:  # not a packed row (a padded batch, generation)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    cu_k = kwargs.get("cu_seq_lens_k", cu_q)
    max_q = int(kwargs.get("max_length_q") or (cu_q[1:] - cu_q[:-1]).max())
    max_k = int(kwargs.get("max_length_k") or max_q)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    drop = dropout if module.training else 0.0
    if drop > 0:
        raise ValueError(f"{NAME}: attention dropout {drop} is not supported on packed rows; set the model's "
                         "attention_dropout to 0 or use padding: longest")
    dev = q.device.type
    low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if q.dtype == torch.float32 and low in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(low) for t in (q, k, v))  # what autocast does to SDPA
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    path = "flash" if flash_runs(q.is_cuda, q.dtype) and not window else "per_row"
    if not torch.compiler.is_compiling():  # in a compiled block the set would be a guard: one more graph when it grows
        _ran.add(path)
    out = (_flash if path == "flash" else _per_row)(q, k.contiguous(), v.contiguous(), cu_q.to(q.device, torch.int32),
                                                     cu_k.to(q.device, torch.int32), max_q, max_k, scale)
    return out[None], None


def register() -> str:
    """Register NAME with transformers (attention and mask functions; the mask is sdpa's, for the batches that
    take the sdpa path). Idempotent; returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _params()
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use(model) -> str:
    """Switch a loaded transformers model (before PEFT wraps it) to NAME; returns NAME."""
    register()
    model.set_attn_implementation(NAME)
    return NAME


def describe(device: str, dtype) -> str:
    """A packed run's attention, for metrics.json: the paths its packed rows took in this process outside compiled
    blocks, or where none did (a run resumed at its end, compiled blocks), the path a `dtype` batch on `device`
    would take."""
    if _ran:
        return " and ".join(PATHS[p] for p in sorted(_ran))
    return PATHS["flash" if flash_runs(device == "cuda", dtype) else "per_row"]


FILLER = "filler_tokens"  # a rounded packed batch's key: its filler row's length (never reaches the model)


def packed_collator(multiple_of: int = 0, pad_id: int = 0):
    """transformers' DataCollatorWithFlattening as packed training uses it: a batch's rows end to end in one row,
    position ids restarting at each, each row's first label -100 (never predicted from the row before), and the
    row boundaries that `attention` reads. With `multiple_of`, one filler row (`pad_id` tokens, labels -100, its
    own segment, so it attends only to itself and no row attends to it) rounds the packed length up to a multiple
    of it, so that the same matmul shapes recur from step to step; the batch's FILLER key holds its length, which
    the Trainer counts as padding and takes out before the model (lib.trainer.counting_trainer)."""
    from transformers import DataCollatorWithFlattening

    kw = dict(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=True)
    if not multiple_of:
        return DataCollatorWithFlattening(**kw)

    class _Rounded(DataCollatorWithFlattening):
        def __call__(self, features, return_tensors=None, separator_id=None):
            fill = -sum(len(f["input_ids"]) for f in features) % multiple_of
            if fill:
                features = [*features, {"input_ids": [pad_id] * fill, "labels": [-100] * fill}]
            batch = super().__call__(features, return_tensors, separator_id)
            batch[FILLER] = fill
            return batch

    return _Rounded(**kw)
