"""lib.varlen: packed rows through transformers' AttentionInterface, each row attending to itself only. Against the
same rows padded (fp32, CPU): the same loss and gradients, by the per-row SDPA path and by the flash path's adapter
(torch's varlen_attn replaced by a reference of each signature torch has shipped, since the kernel itself needs a
CUDA GPU: bench/sft_speed.py and bench/qlora_speed.py run it there)."""
from __future__ import annotations

import functools

import pytest

from conftest import loss_and_grads

FAMILIES = ["qwen3", "glm"]  # GQA in both: 4 query heads over 2 key/value heads (glm: its multi-query groups)


def _model(family: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantune.lib.config import load_config

    spec = dict(load_config()["tiny_world"]["families"][family])
    conf = AutoConfig.for_model(spec.pop("model_type"), vocab_size=512, pad_token_id=0, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").float()
    model.config.use_cache = False
    return model


def _rows():
    import torch

    g = torch.Generator().manual_seed(1)
    rows = []
    for plen, alen in [(5, 7), (9, 3), (3, 11), (6, 6), (1, 2)]:
        ids = torch.randint(4, 512, (plen + alen,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * plen + ids[plen:]})
    return rows


def _reference_varlen(new_signature: bool):
    """torch's varlen_attn as a plain function: 2.12+ (window_size, scale, enable_gqa) or 2.10 (is_causal)."""
    import torch.nn.functional as F

    calls = []

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
        assert q.dim() == 3 and cu_q.dtype.is_floating_point is False and cu_q.tolist() == cu_k.tolist()
        assert max_q == max(b - a for a, b in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:]))
        assert gqa or k.shape[1] == q.shape[1], "heads differ without enable_gqa"
        out = q.new_empty(q.shape)
        b = cu_q.tolist()
        for s, e in zip(b[:-1], b[1:]):
            qi, ki, vi = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
            out[s:e] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale,
                                                      enable_gqa=gqa)[0].transpose(0, 1)
        calls.append(len(b) - 1)
        return out

    if new_signature:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, tuple(window_size) == (-1, 0),
                          scale, enable_gqa)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, False)
    return varlen_attn, calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["per_row", "flash_2.12", "flash_2.10"])
def test_packed_rows_give_the_padded_loss_and_gradients(family, path, monkeypatch, request):
    import torch
    import torch.nn.attention.varlen as tv

    from quantune.lib import varlen
    from quantune.lib.prompts import SFTCollator

    model = _model(family)
    rows = _rows()
    loss_pad, grads_pad = loss_and_grads(model, SFTCollator(pad_id=0)(rows))
    calls = []
    if path != "per_row":  # the flash path's adapter, the kernel replaced by a reference of that signature
        ref, calls = _reference_varlen(new_signature=path == "flash_2.12")
        monkeypatch.setattr(tv, "varlen_attn", ref)
        monkeypatch.setattr(varlen, "flash_runs", lambda is_cuda, dtype: True)
        varlen.refresh()  # the signature is read once a process; here once a stub
        request.addfinalizer(varlen.refresh)
    assert varlen.use(model) == varlen.NAME and model.config._attn_implementation == varlen.NAME
    packed = varlen.packed_collator()(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    assert tuple(packed["input_ids"].shape) == (1, total) and "attention_mask" not in packed
    assert packed["cu_seq_lens_q"].tolist() == [0, 12, 24, 38, 50, 53] and packed["max_length_q"] == 14
    assert all(packed["labels"][0, s].item() == -100 for s in packed["cu_seq_lens_q"].tolist()[:-1])
    loss_pack, grads_pack = loss_and_grads(model, packed)
    assert abs(loss_pack - loss_pad) <= 1e-5, (loss_pack, loss_pad)
    assert grads_pack.keys() == grads_pad.keys() and len(grads_pad) > 10
    worst = max((grads_pack[n] - g).abs().max().item() for n, g in grads_pad.items())
    assert worst <= 1e-5, worst
    layers = model.config.num_hidden_layers
    assert calls == ([] if path == "per_row" else [len(rows)] * layers), calls  # one call a layer, every row in it
    # the control: the same packed row with one boundary (rows attending to each other) moves the loss
    one = dict(packed, cu_seq_lens_q=torch.tensor([0, total], dtype=torch.int32),
               cu_seq_lens_k=torch.tensor([0, total], dtype=torch.int32), max_length_q=total, max_length_k=total)
    with torch.no_grad():
        leaky = model(**one).loss.item()
    assert abs(leaky - loss_pack) > 1e-3, f"rows that see each other should move the loss ({leaky:.5f})"


def test_batches_without_row_boundaries_take_the_sdpa_path_unchanged():
    """A padded batch (eval, generation) through a model switched to lib.varlen: exactly transformers' sdpa."""
    import torch

    from quantune.lib import varlen
    from quantune.lib.prompts import SFTCollator

    model = _model("qwen3").eval()
    batch = SFTCollator(pad_id=0)(_rows())
    with torch.no_grad():
        want = model(**batch).logits
        varlen.use(model)
        got = model(**batch).logits
        greedy = model.generate(batch["input_ids"][:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(want, got)
    assert greedy.shape == (1, 9)


def test_describe_names_the_path_packed_rows_took(monkeypatch):
    """Before a packed batch has run: the path a batch of that device and dtype would take; after: the path taken
    (here the CPU's, whatever the recipe's compute dtype)."""
    import torch

    from quantune.lib import varlen

    monkeypatch.setattr(varlen, "_ran", set())
    assert varlen.describe("cpu", torch.float32).startswith("SDPA row by row")
    assert varlen.describe("cuda", torch.float32).startswith("SDPA row by row")  # the flash kernel takes half types
    model = _model("qwen3")
    varlen.use(model)
    with torch.no_grad():
        model(**varlen.packed_collator()(_rows()))
    assert varlen._ran == {"per_row"} and varlen.describe("cuda", torch.bfloat16) == varlen.PATHS["per_row"]


def test_a_compiled_block_records_no_path_it_would_guard_on(monkeypatch):
    """Inside a compiled decoder block the record of paths taken stays untouched: recorded there, dynamo would guard
    on the set and compile the block again once it grows (here new graphs for the same call, a second time)."""
    import torch
    from torch._dynamo.utils import counters

    from quantune.lib import varlen

    monkeypatch.setattr(varlen, "_ran", set())
    model = _model("glm")
    varlen.use(model)
    block = torch.compile(model.model.layers[0], backend="aot_eager", dynamic=True)
    batch = varlen.packed_collator()(_rows())
    hidden = model.model.embed_tokens(batch["input_ids"]).detach()
    kw = {k: batch[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    kw["position_embeddings"] = model.model.rotary_emb(hidden, batch["position_ids"])
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    with torch.no_grad():
        for _ in range(2):
            block(hidden, attention_mask=None, **kw)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0] and not varlen._ran, (graphs, varlen._ran)


def test_fp32_inputs_under_autocast_take_the_flash_path_in_the_autocast_dtype(monkeypatch, request):
    """A QLoRA model's attention inputs are fp32 (its norms stay fp32) while the Trainer runs under bf16 autocast:
    they are cast to bf16 as SDPA itself is under autocast, so the flash kernel takes them (here a reference of its
    signature, and a flash_runs that accepts a CPU tensor); the loss matches the padded sdpa path under the same
    autocast to bf16's precision."""
    import torch
    import torch.nn.attention.varlen as tv

    from quantune.lib import varlen
    from quantune.lib.prompts import SFTCollator

    model = _model("glm")
    rows = _rows()
    ref, calls = _reference_varlen(new_signature=True)
    seen = []

    @functools.wraps(ref)  # the adapter reads the kernel's signature
    def kernel(q, *a, **kw):
        seen.append(q.dtype)
        return ref(q, *a, **kw)

    monkeypatch.setattr(tv, "varlen_attn", kernel)
    monkeypatch.setattr(varlen, "flash_runs", lambda is_cuda, dtype: dtype in (torch.float16, torch.bfloat16))
    monkeypatch.setattr(varlen, "_ran", set())
    varlen.refresh()
    request.addfinalizer(varlen.refresh)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**SFTCollator(pad_id=0)(rows)).loss.item()
        varlen.use(model)
        got = model(**varlen.packed_collator()(rows)).loss.item()
    assert seen == [torch.bfloat16] * model.config.num_hidden_layers and varlen._ran == {"flash"}
    assert abs(got - want) <= 2e-2 * abs(want), (got, want)
    with torch.no_grad():  # without autocast fp32 stays fp32: the per-row path
        model(**varlen.packed_collator()(rows))
    assert varlen._ran == {"flash", "per_row"} and len(seen) == model.config.num_hidden_layers


@pytest.mark.parametrize("signature", ["2.12", "2.10"])
def test_flash_adapter_keeps_a_scale_other_than_the_kernels_own(signature, monkeypatch):
    """A model whose attention scale is not 1/sqrt(head_dim): the adapter passes it (2.12+) or folds it into the
    queries (2.10, whose kernel has no scale), with GQA, against SDPA row by row at that scale."""
    import torch
    import torch.nn.attention.varlen as tv

    from quantune.lib import varlen

    ref, calls = _reference_varlen(new_signature=signature == "2.12")
    monkeypatch.setattr(tv, "varlen_attn", ref)
    varlen.refresh()
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(20, h, 8, generator=g) for h in (4, 2, 2))
        cu = torch.tensor([0, 7, 12, 20], dtype=torch.int32)
        want = varlen._per_row(q, k, v, cu, cu, 8, 8, 0.3)
        got = varlen._flash(q, k, v, cu, cu, 8, 8, 0.3)
    finally:
        varlen.refresh()
    assert calls == [3] and (got - want).abs().max().item() <= 1e-6
    assert (varlen._per_row(q, k, v, cu, cu, 8, 8, 8 ** -0.5) - want).abs().max().item() > 1e-3  # the scale matters
