"""The quantize stage: bad recipes stop before any work with one line; at tiny scale every quant target
builds for real through Snakemake, GPTQ and AWQ beat round-to-nearest on held-out perplexity at 4 and 3 bits,
the saved models reload with transformers, and quant_compare tabulates and plots them."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, snakemake
from quantune.lib.common import QuantuneError
from quantune.lib.config import load_config, load_recipe

QUANT = ["rtn_opt67b", "gptq_opt67b", "awq_opt67b", "rtn_opt67b_w3", "gptq_opt67b_w3", "awq_opt67b_w3",
         "bnb_int8_opt27b", "bnb_nf4_opt27b"]


def recipe(name, **changes):
    raw = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    return raw


def write_recipe(tmp_path, name, raw) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def tiny_opt_meta():
    """The tiny OPT's architecture (config.yaml's family) on the meta device: what the checks read."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    spec = {k: v for k, v in load_config()["tiny_world"]["families"]["opt"].items() if k != "model_type"}
    with torch.device("meta"):
        return OPTForCausalLM(OPTConfig(vocab_size=4096, **spec))


# ---------------------------------------------------------------- checks that need no model

@pytest.mark.parametrize("name,changes,line", [
    ("gptq_opt67b", {"bits": 16}, "key bits: 16 bits is outside what backend llmcompressor supports for gptq; "
                                  "fix: use one of: 2, 3, 4, 5, 6, 7, 8"),
    ("gptq_opt67b", {"backend": "gptqmodel", "bits": 5, "speed": None},
     "key bits: 5 bits is outside what backend gptqmodel supports for gptq; fix: use one of: 2, 3, 4, 8"),
    ("bnb_nf4_opt27b", {"bits": 8}, "key bits: 8 bits is outside what backend bitsandbytes supports for bnb_nf4; "
                                    "fix: use one of: 4"),
    ("awq_opt67b", {"backend": "gptqmodel"}, "key backend: method awq has no backend 'gptqmodel'"),
    ("bnb_int8_opt27b", {"group_size": 128}, "key group_size: method bnb_int8 does not use it; fix: remove the key"),
    ("bnb_nf4_opt27b", {"sign_split": True}, "key sign_split: method bnb_nf4 does not use it; fix: remove the key"),
    ("gptq_opt67b", {"backend": "gptqmodel", "act_order": "group", "sign_split": False, "speed": None},
     "key sign_split: it is measured on llm-compressor's in-memory model only; fix: remove the key or set "
     "backend: llmcompressor"),
    ("gptq_opt67b", {"calibration_dataset": None}, "key calibration_dataset: method gptq calibrates on data"),
    ("rtn_opt67b", {"awq_mappings": [{"smooth": "x", "balance": ["y"]}]}, "key awq_mappings: method rtn does not use it"),
    ("rtn_opt67b", {"speed": "fast"}, "key speed: method rtn does not use it; fix: remove the key"),
    ("gptq_opt67b", {"backend": "gptqmodel", "sign_split": None, "speed": "fast"},
     "key speed: the speed modes are llm-compressor's (GPTQModel has its own options); fix: remove the key or set "
     "backend: llmcompressor"),
])
def test_recipe_checks_give_one_line_naming_file_and_key(tmp_path, name, changes, line):
    p = write_recipe(tmp_path, name, recipe(name, **changes))
    with pytest.raises(QuantuneError) as e:  # the loader runs the stage's check (as the Snakefile does, once)
        load_recipe(p, load_config())
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and line in msg and "\n" not in msg, msg


@pytest.mark.parametrize("changes,line", [
    ({"group_size": 96}, "key group_size: group size 96 does not divide the input dimension of 24 layer(s) of "
                         "OPTForCausalLM, e.g. model.decoder.layers.0.self_attn.k_proj (256 inputs); fix: use a "
                         "group size that divides every layer (32, 64, 128, 256)"),
    ({"awq_mappings": None}, "key awq_mappings: model family OPTForCausalLM has no AWQ mappings in llm-compressor"),
    ({"awq_mappings": [{"smooth": "re:.*final_layer_norm$", "balance": ["re:.*fc1$"]}]},
     "matches 5 modules of OPTForCausalLM, not one per decoder block (4)"),
    ({"awq_mappings": [{"smooth": "re:.*input_layernorm$", "balance": ["re:.*q_proj$"]}]},
     "key awq_mappings[0].smooth: 're:.*input_layernorm$' matches no module of OPTForCausalLM"),
])
def test_architecture_checks(tmp_path, changes, line):
    """Group sizes that do not divide a layer and AWQ mappings that do not fit the family are refused from the
    architecture alone (a meta-device model: no weights)."""
    from quantune.quantize import check_against_model

    p = write_recipe(tmp_path, "awq_opt67b", recipe("awq_opt67b", **changes))
    r = load_recipe(p, load_config())
    with pytest.raises(QuantuneError) as e:
        check_against_model(r, tiny_opt_meta(), str(p))
    assert line in str(e.value), str(e.value)


def test_opt_mappings_of_the_recipe_resolve_one_per_block():
    from quantune.quantize import check_against_model

    r = load_recipe(ROOT / "recipes" / "awq_opt67b.yaml", load_config())
    info = check_against_model(r, tiny_opt_meta(), "awq_opt67b")
    assert info["quantized_layers"] == 24 and len(info["awq_mappings"]) == 4


def test_awq_grid_loss_of_fp16_outputs_is_finite_where_their_fp16_sum_overflows():
    """AWQ's grid search in fp16: one batch's summed squared error past 65,504 must not become inf (the whole
    search then fails); the loss is the float32 mean over every batch, as if computed in float64."""
    import torch
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from quantune.lib.quant_backends import fp32_awq_loss

    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(4, 256, 4096, generator=g).half() for _ in range(2)]
    quant = [(x.float() + 0.2 * torch.randn(x.shape, generator=g)).half() for x in ref]
    assert torch.nn.functional.mse_loss(ref[0], quant[0], reduction="sum").isinf()  # the fp16 sum overflows
    want = sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(ref, quant)).item() / sum(x.numel() for x in ref)
    with fp32_awq_loss():
        got = AWQModifier(mappings=[])._compute_loss(ref, quant)
    assert got == pytest.approx(want, rel=1e-5)


def test_offloaded_weight_updates_are_cast_before_the_copy_to_the_same_bits(monkeypatch):
    """AWQ's smoothing writes fp32 products (fp16 weight x fp32 scales) into an offloaded fp16 parameter; on a GPU a
    blocking copy into a CPU tensor of another dtype casts on the CPU through a pageable buffer (38 s of OPT-6.7B's
    AWQ). offload_updates_in_dtype casts on the value's own device first: compressed-tensors' update_offload must
    receive the offloaded dtype, and the stored weight must be the bits the uncast copy gives."""
    import torch
    from compressed_tensors.offload import offload_module, update_offload_parameter
    from compressed_tensors.offload.cache.cpu import CPUCache

    from quantune.lib.quant_backends import offload_updates_in_dtype

    seen = []
    orig = CPUCache.update_offload

    def spy(self, offloaded, data):
        seen.append(data.dtype)
        return orig(self, offloaded, data)

    monkeypatch.setattr(CPUCache, "update_offload", spy)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g).half()
    value = w.float() * (torch.rand(48, generator=g) * 3 + 0.1)  # fp32, not representable in fp16 as is
    stored = {}
    for cast in (False, True):
        layer = torch.nn.Linear(48, 64, bias=False).half()
        layer.weight.data.copy_(w)
        offload_module(layer, "cpu", "cpu")
        with offload_updates_in_dtype() if cast else contextlib.nullcontext():
            update_offload_parameter(layer, "weight", value)
        stored[cast] = layer._parameters.offloaded_values["weight"].clone()
    assert seen == [torch.float32, torch.float16]
    assert stored[True].dtype == torch.float16 and torch.equal(stored[True], stored[False])
    assert not torch.equal(stored[True], w)  # the update happened
    assert CPUCache.update_offload is spy  # put back


def test_bad_recipe_stops_snakemake_before_any_job(tmp_path):
    rdir = tmp_path / "recipes"
    rdir.mkdir()
    write_recipe(rdir, "gptq_opt67b", recipe("gptq_opt67b", bits=1))
    r = snakemake("-n", "gptq_opt67b", "--config", f"recipes_dir={rdir}", results=tmp_path / "res", check=False)
    err = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("quantune: error:")]
    assert r.returncode != 0 and len(err) == 1, r.stdout + r.stderr
    assert "key bits: 1 bits is outside what backend llmcompressor supports for gptq" in err[0], err
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- on the tiny world: errors before work

@pytest.mark.slow
def test_missing_calibration_data_fails_before_any_model_is_loaded(tiny_world, tmp_path, monkeypatch):
    import quantune.quantize
    from quantune.quantize import run

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the calibration data was checked")

    monkeypatch.setattr(quantune.quantize, "load_model", no_load)
    empty = tmp_path / "c4_copy"
    empty.mkdir()
    results = {"tiny": str(tiny_world.parent), "full": str(tiny_world.parent / "full")}
    cfg = load_config(overrides={"datasets.c4.path": str(empty), "results": results})
    with pytest.raises(QuantuneError) as e:
        run(str(ROOT / "recipes" / "gptq_opt67b.yaml"), str(tmp_path / "out"), cfg)
    assert str(e.value) == (f"{empty}: no train.jsonl or train.json in the directory; "
                            "fix: build the data set first, or point the config at a file"), str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(QuantuneError, match=r"key datasets.c4.path: /nonexistent/c4 does not exist"):
        load_config(overrides={"datasets.c4.path": "/nonexistent/c4"})


def test_a_tiny_model_that_was_never_built_is_one_line_naming_the_path_and_the_fix(tmp_path):
    from quantune.quantize import run

    cfg = load_config(overrides={"results": {"tiny": str(tmp_path), "full": str(tmp_path / "full")}})
    with pytest.raises(QuantuneError) as e:
        run(str(ROOT / "recipes" / "gptq_opt67b.yaml"), str(tmp_path / "out"), cfg)
    assert str(e.value) == (f"{ROOT / 'recipes' / 'gptq_opt67b.yaml'}: key model: the tiny-world model 'opt-6.7b' is "
                            f"not built ({tmp_path}/tiny_world/models/opt/config.json is missing); "
                            "fix: build it first: snakemake --cores 2 tiny_world"), str(e.value)
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "no_model"
    empty.mkdir()
    cfg = load_config(overrides={"models.opt-6.7b.path": str(empty)})
    with pytest.raises(QuantuneError) as e:
        run(str(ROOT / "recipes" / "gptq_opt67b.yaml"), str(tmp_path / "out"), cfg)
    assert str(e.value) == (f"{ROOT / 'recipes' / 'gptq_opt67b.yaml'}: key model: {empty} (models.opt-6.7b.path) has no "
                            "config.json; fix: point models.opt-6.7b.path in config/config.yaml at a model directory")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_bad_group_size_is_one_line_exit_2_and_no_output(tiny_world, tmp_path):
    p = write_recipe(tmp_path, "gptq_opt67b", recipe("gptq_opt67b", tiny={**recipe("gptq_opt67b")["tiny"],
                                                                          "group_size": 48}))
    out = tmp_path / "out"
    cfg = load_config(overrides={"results": {"tiny": str(tiny_world.parent), "full": str(tiny_world.parent / "full")}})
    r = subprocess.run([sys.executable, "-m", "quantune.quantize", "--recipe", str(p), "--out", str(out),
                        "--config-json", json.dumps(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    lines = [line for line in r.stderr.splitlines() if line.startswith("quantune: error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{p}: key group_size: group size 48 does not divide" in lines[0], lines
    assert not out.exists()


# ---------------------------------------------------------------- the targets, built for real

@pytest.fixture(scope="module")
def built(tiny_world, results_root):
    # the tiny_world fixture's triggers: a rule edit elsewhere must not rebuild the reused tiny world here
    snakemake(*QUANT, "quant_compare", "--rerun-triggers", "mtime", "params", "input", results=results_root)
    return {n: json.loads((results_root / n / "metrics.json").read_text()) for n in QUANT}


@pytest.mark.slow
def test_gptq_and_awq_against_round_to_nearest_at_4_and_3_bits(built):
    """The algorithms' reason to exist, on the tiny OPT's held-out text (numbers in every message): perplexity,
    KL(unquantized || quantized) per token, and the even part of the change in log-perplexity (sign_split:
    the quantized model W+dW and its mirror W-dW; the odd part is the first-order term g.dW, whose sign is luck).
    The tiny OPT is pretrained 2400 steps for this (config tiny_world.pretrain.steps_by_family): after 300 steps
    (ppl 245) the odd term was larger than any difference between methods. The tiny model has no outlier channels
    (max/median channel |x| 2-4 into q/k/v and fc1, against ~100 in OPT-6.7B), so AWQ only has to match RTN here."""
    lines, rows = [], []
    for suffix, bits in (("", 4), ("_w3", 3)):
        rtn = built[f"rtn_opt67b{suffix}"]
        for m in ("gptq", "awq"):
            q = built[f"{m}_opt67b{suffix}"]
            assert q["bits"] == rtn["bits"] == bits and q["group_size"] == rtn["group_size"]
            assert q["zero_point"] == rtn["zero_point"], "RTN must use the same scheme"
            rows.append((m, bits, q, rtn))
            lines.append(f"{bits}-bit g{q['group_size']}: {m} ppl {q['ppl_quant']:.4f} even {q['ppl_even']:.4f} "
                         f"(odd {q['nll_odd']:+.5f}) KL {q['kl_vs_base']:.2e} | rtn ppl {rtn['ppl_quant']:.4f} "
                         f"even {rtn['ppl_even']:.4f} (odd {rtn['nll_odd']:+.5f}) KL {rtn['kl_vs_base']:.2e} | "
                         f"unquantized ppl {rtn['ppl_base']:.4f}")
    msg = "\n".join(lines)
    for m, bits, q, rtn in rows:  # none is broken: within 2% of the unquantized perplexity
        assert q["ppl_quant"] < 1.02 * q["ppl_base"], msg
    for m, bits, q, rtn in rows:
        if m == "gptq":  # moves the predictions less than RTN (at most half its KL), less curvature damage
            assert q["kl_vs_base"] < 0.5 * rtn["kl_vs_base"], msg
            assert q["ppl_even"] < rtn["ppl_even"], msg
        else:  # AWQ without salient channels is RTN with near-unit scales: no worse than RTN, within 10% (its KL
            # and even-part damage nll_even were 0.88-1.05x RTN's on two machines); its gain is tested where its
            # mechanism applies: test_awq_protects_salient_channels_that_round_to_nearest_crushes
            assert q["kl_vs_base"] < 1.1 * rtn["kl_vs_base"], msg
            assert q["nll_even"] < 1.1 * rtn["nll_even"], msg
    losers = [(m, bits, q, rtn) for m, bits, q, rtn in rows if m == "gptq" and not q["ppl_quant"] < rtn["ppl_quant"]]
    for m, bits, q, rtn in losers:  # a loss in perplexity is allowed only where the odd term (luck) explains it
        gap = q["nll_even"] - rtn["nll_even"] + q["nll_odd"] - rtn["nll_odd"]
        assert q["nll_odd"] - rtn["nll_odd"] > 0 >= q["nll_even"] - rtn["nll_even"] and gap >= 0, msg
    if losers:
        pytest.xfail(
            f"perplexity not lower than RTN's for {', '.join(f'{m} {b}-bit' for m, b, _, _ in losers)} on the tiny "
            "OPT, though the even part (curvature damage) and the KL are: the odd, first-order term g.dW (sign "
            "luck) of GPTQ's rounding is larger than RTN's by more than its even part is smaller. Which width loses "
            "depends on the CPU's kernels (the sign of g.dW is luck); the even part and KL do not. Measured:\n" + msg)


def test_sign_split_measures_the_quantized_model_and_its_mirror_and_puts_the_model_back(tiny_world):
    """sign_split on a round-to-nearest model in memory: W + dW is the quantized model (same NLL), W is the
    unquantized one, the mirror differs, and afterwards the model computes exactly what it computed before."""
    import torch

    from quantune.lib.data import join_text, load_split
    from quantune.lib.measure import perplexity, token_stream
    from quantune.lib.models import load_model
    from quantune.lib.measure import sign_split
    from quantune.lib.quant_backends import quantize_llmcompressor

    model, tok = load_model(str(tiny_world / "models" / "opt"), dtype="float32")
    rows = load_split({"format": "text", "source": str(tiny_world / "data" / "tiny_text")}, "validation")
    ids = token_stream(tok, join_text(rows), 2048)
    base = perplexity(model, ids, 128, 128)["nll"]
    quantize_llmcompressor(model, tok, {"method": "rtn", "bits": 3, "group_size": 128, "zero_point": True,
                                        "ignore": ["lm_head"]}, None, None)
    with torch.no_grad():
        before = model(ids[:128][None]).logits
    quant = perplexity(model, ids, 128, 128)["nll"]
    s = sign_split(model, ids, 128, 128)
    with torch.no_grad():
        after = model(ids[:128][None]).logits
    assert torch.equal(before, after), "sign_split must leave the quantized model as it found it"
    assert s["sign_split_layers"] == 24
    assert abs(s["nll_fp"] - base) < 1e-6, (s, base)  # RTN rounds the original weights
    assert abs(s["nll_fp"] + s["nll_odd"] + s["nll_even"] - quant) < 1e-6, (s, quant)  # W + dW = the quantized model
    assert abs(s["nll_mirror"] - quant) > 1e-5 and s["nll_even"] > 0, (s, quant)


def test_fast_hessian_update_is_llmcompressors_on_half_precision_inputs():
    """add_input_products (the fast mode's Hessian update: per chunk of rows, the centred rows' products plus the
    mean's outer product) against llm-compressor's accumulate_hessian and a float64 reference on the same fp16
    batches, non-negative as a post-ReLU input is (the case that broke the uncentred TF32 product on the H200), and
    longer than one chunk: the same 2 X^T X within fp32 rounding. (On a GPU the centred products run in TF32;
    the flag does nothing here.)"""
    import torch
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian

    from quantune.lib import quant_backends
    from quantune.lib.quant_backends import add_input_products

    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 8)
    h_ref, n_ref = torch.zeros(24, 24), torch.zeros(())
    h = torch.zeros(24, 24)
    exact = torch.zeros(24, 24, dtype=torch.float64)
    for shape in ((3, 40, 24), (2, 40, 24), (40, 24), (5000, 24)):  # 3-D and 2-D; the last is 3 chunks
        x = (torch.randn(shape) + 0.5).relu().half()
        h_ref, n_ref = accumulate_hessian(x, layer, h_ref, n_ref)
        add_input_products(h, x)
        x64 = x.double().reshape(-1, 24)
        exact += 2 * x64.t() @ x64
    assert quant_backends.HESSIAN_CHUNK_TOKENS < 5000
    x32 = torch.randn(5000, 24)  # an fp32 input is centred on a copy, never in place
    before = x32.clone()
    add_input_products(torch.zeros(24, 24), x32)
    assert torch.equal(x32, before)
    tol = 1e-6 * exact.abs().max().item()  # fp32 sums of 5,200 products
    assert (h_ref.double() - exact).abs().max().item() < tol
    assert (h.double() - exact).abs().max().item() < tol, (h.double() - exact).abs().max()
    assert not torch.backends.cuda.matmul.allow_tf32  # the TF32 switch is put back


def test_fast_hessians_count_samples_as_the_recipes_batching_does():
    """GptqHessians.samples: llm-compressor counts a 3-D input's rows and a 2-D input (OPT's fc1/fc2 read the
    batch's tokens flattened) once per call; the fast mode's larger batches must count the calls the recipe's batching
    (here 1 row of 2,048 tokens a call) would have made."""
    import torch

    from quantune.lib.quant_backends import GptqHessians

    h = GptqHessians(2048)
    assert h.samples(torch.zeros(8, 2048, 16)) == 8  # 3-D: rows, as llm-compressor counts
    assert h.samples(torch.zeros(8 * 2048, 16)) == 8  # 2-D: 8 of the recipe's calls
    assert h.samples(torch.zeros(2048, 16)) == 1  # the recipe's own batch: llm-compressor's count
    assert GptqHessians(4 * 128).samples(torch.zeros(64 * 128, 16)) == 16


def test_fast_mode_keeps_activations_on_the_gpu_only_where_they_fit():
    """OPT-6.7B's GPTQ calibration (128 x 2,048 tokens, hidden 4,096, fp16: a layer's inputs and outputs 4 GiB)
    stays on the GPU; twice the tokens stay where llm-compressor puts them (the CPU), as do fp32 activations."""
    import torch
    from transformers import AutoConfig

    from quantune.lib.quant_backends import activations_placement

    class Model:  # what activations_placement reads of a model
        def __init__(self, dtype):
            self.config = AutoConfig.for_model("opt", hidden_size=4096)
            self.dtype = dtype

    fp16, fp32 = Model(torch.float16), Model(torch.float32)
    assert activations_placement(fp16, 128 * 2048, "cuda:0") == {"sequential_offload_device": "cuda:0"}
    assert activations_placement(fp16, 256 * 2048, "cuda:0") == {}
    assert activations_placement(fp32, 128 * 2048, "cuda:0") == {}


def seed_and_fast(tiny_world, tmp_path, name: str, batch_size: int | None = None) -> dict:
    """The quantize stage's runs of recipe `name` at speed seed and at speed fast from the tiny world (the tiny
    block's calibration batch set to batch_size where given): {speed: (metrics, the saved model's tensors)}."""
    from safetensors.torch import load_file

    from quantune.quantize import run

    cfg = load_config(overrides={"results": {"tiny": str(tiny_world.parent), "full": str(tmp_path / "full")}})
    got = {}
    for speed in ("seed", "fast"):
        (tmp_path / speed).mkdir()
        raw = recipe(name, speed=speed)
        if batch_size:
            raw["tiny"]["calibration_batch_size"] = batch_size
        m = run(str(write_recipe(tmp_path / speed, name, raw)), str(tmp_path / speed / "out"), cfg)
        tensors = {}
        for f in sorted((tmp_path / speed / "out" / "model").glob("*.safetensors")):
            tensors.update(load_file(f))
        got[speed] = (m, tensors)
    return got


@pytest.mark.slow
def test_fast_mode_quantizes_to_llmcompressors_weights_with_one_hessian_per_input(tiny_world, tmp_path):
    """speed: fast against llm-compressor's own path (speed: seed) on the tiny OPT: on a CPU the fast mode's
    Hessian products are llm-compressor's own, so the saved quantized tensors must be equal bit for bit, which holds
    only if each shared Hessian is the one its layers' common input gives (q/k/v read one LayerNorm output:
    2 of every block's 3 share; out_proj and fc1, of the same width, must not)."""
    import torch

    from quantune.lib.metrics import check_metrics

    got = seed_and_fast(tiny_world, tmp_path, "gptq_opt67b")
    (seed, ts), (fast, tf) = got["seed"], got["fast"]
    layers = seed["quantized_layers"] // 6  # q, k, v, out_proj, fc1, fc2 per block
    assert seed["speed"] == "seed" and seed["speed_changes"] == {} and seed["hessians_shared"] == 0
    assert fast["speed"] == "fast" and fast["hessians_shared"] == 2 * layers, fast
    assert fast["hessian_products"] == "fp32 matmul (llm-compressor's)"  # no CUDA here
    assert ts.keys() == tf.keys() and any(k.endswith("weight_packed") for k in ts)
    differ = [k for k in ts if not torch.equal(ts[k], tf[k])]
    assert not differ, differ
    assert fast["gptq_loss_mean"] == seed["gptq_loss_mean"] and fast["ppl_quant"] == seed["ppl_quant"]
    assert fast["gptq_rtn_fallback_layers"] == seed["gptq_rtn_fallback_layers"] == 0  # every Hessian inverted
    for speed in got:  # every key the stage wrote is declared in its metrics schema
        check_metrics(tmp_path / speed / "out" / "metrics.json")


@pytest.mark.slow
def test_fast_mode_batches_calibration_without_rescaling_hessians(tiny_world, tmp_path):
    """The fast mode's calibration batches are larger than the recipe's (here 64 rows against 4). llm-compressor
    counts a Hessian's samples by its input's leading dimension, 1 for the 2-D inputs of OPT's fc1 and fc2 (16x
    fewer calls here), which would scale those Hessians and their GPTQ losses by 16: the fast mode must count the
    recipe's way, so GPTQ's layer losses and perplexity stay the seed path's (up to the batches' fp32 rounding)."""
    got = seed_and_fast(tiny_world, tmp_path, "gptq_opt67b", batch_size=4)
    (seed, _), (fast, _) = got["seed"], got["fast"]
    assert (seed["calibration_batch_size"], fast["calibration_batch_size"]) == (4, 64)
    # measured: layer losses' mean 1.0023x and max 1.011x (other batch shapes round fp32 sums otherwise, and GPTQ's
    # rounding decisions follow), perplexity 1.00006x; without the recipe's count, 15.0x and 16.2x
    for key, tol in (("gptq_loss_mean", 0.03), ("gptq_loss_max", 0.03), ("ppl_quant", 1e-3)):
        assert abs(fast[key] / seed[key] - 1) < tol, (key, seed[key], fast[key])


@pytest.mark.slow
def test_awq_fast_mode_gives_the_same_quantized_weights(tiny_world, tmp_path, monkeypatch):
    """AWQ's fast mode on a CPU against llm-compressor's own path (speed: seed): it batches the calibration (here 64
    rows a forward against the recipe's 8) and, for the mappings whose parent is their one balance Linear (out_proj,
    fc1, fc2), takes each grid point's loss from the inputs' Gram matrix (lib.quant_backends.AwqLinearLoss) instead
    of the parent's forwards, and runs the attention mapping's forwards under SDPA (lib.quant_backends.SdpaScaleSearch)
    where the calibration runs eager attention. Both are the same sums in another order, so:
    - at every such grid point the fast loss is llm-compressor's own (its _run_samples + _compute_loss, run beside it
      here on the same weights) to fp32 rounding (measured: <= 1.8e-7 relative);
    - the chosen scales agree to fp32 rounding and every packed integer weight and zero point is the seed path's.
      Measured: 44 of 140 saved tensors differ, all floating (scales, the smoothed norms and biases), by <= 2.5e-7 of
      their largest entry; perplexity 2e-8 and KL 4e-7 relative. Dropping the Gram loss's mean term (n |D mu|^2)
      moves a saved scale by 0.21 of its largest entry."""
    import torch
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from quantune.lib import quant_backends

    run_samples, compute_loss = AWQModifier._run_samples, AWQModifier._compute_loss  # llm-compressor's own
    gram_loss, pairs = quant_backends.AwqLinearLoss.loss, []

    def beside_llmcompressors(self, orig, modifier, fp16_outputs, int_w_outputs):
        got = gram_loss(self, orig, modifier, fp16_outputs, int_w_outputs)
        if self.active is not None:
            pairs.append((got, compute_loss(modifier, fp16_outputs, run_samples(modifier, self.active[0]))))
        return got

    monkeypatch.setattr(quant_backends.AwqLinearLoss, "loss", beside_llmcompressors)
    from transformers.modeling_utils import AttentionInterface

    sdpa, smoothing = AttentionInterface._global_mapping["sdpa"], AWQModifier._apply_smoothing
    sdpa_calls, in_smoothing = [], []

    def counted_sdpa(module, query, *args, **kwargs):
        if in_smoothing:  # not the stage's measurements, which run the model's own SDPA
            sdpa_calls.append(query.shape[0])
        return sdpa(module, query, *args, **kwargs)

    def flagged_smoothing(self, model):
        in_smoothing.append(1)
        try:
            return smoothing(self, model)
        finally:
            in_smoothing.pop()

    monkeypatch.setattr(AWQModifier, "_apply_smoothing", flagged_smoothing)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counted_sdpa)
    got = seed_and_fast(tiny_world, tmp_path, "awq_opt67b", batch_size=8)
    (seed, ts), (fast, tf) = got["seed"], got["fast"]
    assert (seed["calibration_batch_size"], fast["calibration_batch_size"]) == (8, 64)
    layers = seed["quantized_layers"] // 6
    assert fast["awq_gram_mappings"] == 3 * layers and "awq_gram_mappings" not in seed
    # the scale search's attention forwards under SDPA, one search a decoder layer; the calibration stays eager
    assert fast["awq_sdpa_searches"] == layers and "awq_sdpa_searches" not in seed
    assert fast["speed_changes"]["grid_search_attention"] == "sdpa"
    # SDPA ran in the fast search only: the attention parent's unquantized forward and n_grid grid points a layer, per
    # cached batch (the seed path's search stays eager)
    per_layer = recipe("awq_opt67b")["n_grid"] + 1
    assert sdpa_calls and len(sdpa_calls) % (layers * per_layer) == 0 and max(sdpa_calls) <= 64, len(sdpa_calls)
    assert len(pairs) == 3 * layers * recipe("awq_opt67b")["n_grid"]  # duo_scaling true: n_grid points in all
    assert max(abs(a / b - 1) for a, b in pairs) < 1e-6, pairs
    assert ts.keys() == tf.keys() and any(k.endswith("weight_packed") for k in ts)
    for k in ts:
        if ts[k].is_floating_point():
            scale = ts[k].abs().max().clamp_min(1e-12)
            assert (ts[k] - tf[k]).abs().max() / scale < 1e-5, k
        else:  # packed weights, zero points
            assert torch.equal(ts[k], tf[k]), k
    assert abs(fast["ppl_quant"] / seed["ppl_quant"] - 1) < 1e-6
    assert abs(fast["kl_vs_base"] / seed["kl_vs_base"] - 1) < 1e-4


@pytest.mark.slow
def test_gptq_counts_the_layers_llmcompressor_rounded_to_nearest(tiny_world, tmp_path, monkeypatch):
    """A Hessian that does not invert makes llm-compressor quantize that layer by rounding to nearest, which it only
    logs (and forgets at finalize): metrics.json's gptq_rtn_fallback_layers must count them. Every fc2 Hessian (the
    one layer per block that is wider in than out) is made negative definite, so exactly one layer per block falls
    back and the others keep GPTQ."""
    import llmcompressor.modifiers.gptq.base as gptq_base
    import torch

    from quantune.quantize import run

    orig = gptq_base.accumulate_hessian

    def broken_fc2(inp, module, hessian, num_samples):
        h, n = orig(inp, module, hessian, num_samples)
        if module.in_features > module.out_features:
            h.copy_(-torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
        return h, n

    monkeypatch.setattr(gptq_base, "accumulate_hessian", broken_fc2)
    cfg = load_config(overrides={"results": {"tiny": str(tiny_world.parent), "full": str(tmp_path / "full")}})
    path = write_recipe(tmp_path, "gptq_opt67b", recipe("gptq_opt67b", speed="seed"))
    m = run(str(path), str(tmp_path / "out"), cfg)
    blocks = m["quantized_layers"] // 6
    assert blocks >= 2 and m["gptq_rtn_fallback_layers"] == blocks, m
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["gptq_rtn_fallback_layers"] == blocks


def make_salient_channels(src: Path, dst: Path, scale: float, k: int) -> None:
    """The same function with salient input channels: in every decoder block, the k channels of each LayerNorm with
    the largest gain are multiplied by `scale` and the matching input columns of the layers it feeds (q/k/v_proj,
    fc1) divided by it. Activations in those channels become `scale` times larger and their weights `scale` times
    smaller, the pattern AWQ was designed for (large activations meeting weights that round-to-nearest crushes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for ln, feeds in ((layer.self_attn_layer_norm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                            layer.self_attn.v_proj]),
                              (layer.final_layer_norm, [layer.fc1])):
                c = ln.weight.abs().topk(k).indices
                ln.weight[c] *= scale
                ln.bias[c] *= scale
                for lin in feeds:
                    lin.weight[:, c] /= scale
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


@pytest.mark.slow
def test_awq_protects_salient_channels_that_round_to_nearest_crushes(tiny_world, built, tmp_path):
    """AWQ's mechanism, on the tiny OPT made to have salient channels (3 of 256 per LayerNorm, x30): the same
    function (the unquantized perplexities agree), but RTN now loses much more, and AWQ, searching per-channel
    scales on the calibration activations, must recover most of it, at 4 and at 3 bits."""
    from quantune.quantize import run

    model = tmp_path / "opt_salient"
    make_salient_channels(tiny_world / "models" / "opt", model, scale=30.0, k=3)
    cfg = load_config(overrides={"models.opt-6.7b.path": str(model),
                                 "results": {"tiny": str(tiny_world.parent), "full": str(tmp_path / "full")}})
    got = {t: run(str(ROOT / "recipes" / f"{t}.yaml"), str(tmp_path / t), cfg)
           for t in ("rtn_opt67b", "awq_opt67b", "rtn_opt67b_w3", "awq_opt67b_w3")}
    msg = "\n".join(f"{t}: ppl {m['ppl_base']:.4f} -> {m['ppl_quant']:.4f}, KL {m['kl_vs_base']:.2e}"
                     for t, m in got.items())
    print(msg)  # pytest -s -k salient shows the numbers
    plain = built["rtn_opt67b"]  # the same recipe on the unmodified tiny OPT
    for suffix in ("", "_w3"):
        rtn, awq = got[f"rtn_opt67b{suffix}"], got[f"awq_opt67b{suffix}"]
        assert abs(rtn["ppl_base"] - awq["ppl_base"]) < 1e-6 * rtn["ppl_base"], msg
        # the rescaling did not change the function, and it made RTN worse than on the unmodified model
        assert abs(rtn["ppl_base"] - plain["ppl_base"]) < 1e-3 * plain["ppl_base"], msg
        assert rtn["ppl_quant"] > built[f"rtn_opt67b{suffix}"]["ppl_quant"], msg
        rtn_loss, awq_loss = rtn["ppl_quant"] - rtn["ppl_base"], awq["ppl_quant"] - awq["ppl_base"]
        assert awq_loss < 0.5 * rtn_loss and awq["kl_vs_base"] < 0.5 * rtn["kl_vs_base"], msg


@pytest.mark.slow
def test_every_target_writes_a_loadable_model_metrics_and_tensorboard(built, results_root):
    import torch
    from transformers import AutoModelForCausalLM

    from quantune.lib.tb import read_scalars

    base = {m["ppl_base"] for m in built.values()}
    assert max(base) - min(base) < 1e-6 * max(base), f"the unquantized perplexity differs between targets: {base}"
    for name, m in built.items():
        assert m["eval_context"] == 128 and m["eval_stride"] == 128 and m["scale"] == "tiny", name
        assert m["eval_tokens_scored"] > 10000, (name, m["eval_tokens_scored"])
        # quantization costs perplexity, but a working quantizer at >= 3 bits stays near the unquantized model
        assert m["ppl_quant"] < 1.5 * m["ppl_base"], (name, m["ppl_base"], m["ppl_quant"])
        assert m["quant_seconds"] > 0 and m["quant_peak_mem_mb"] > 0 and m["gen_tokens_per_s"] > 0, name
        assert m["gen_tokens"] == 32, name
        # the reloaded model computes what the quantized model in memory computed (bitsandbytes NF4 included: it
        # is saved before its first forward pass, after which bitsandbytes 0.50.2 on CPU saves a different model)
        assert m["reload_max_abs_logit_diff"] < 1e-4, (name, m["reload_max_abs_logit_diff"])
        if m["backend"] == "llmcompressor":  # sign_split: W is the unquantized model's function (AWQ: smoothed)
            assert m["sign_split_layers"] == 24 and abs(m["nll_fp_vs_base"]) < 1e-5, (name, m["nll_fp_vs_base"])
            assert m["ppl_even"] ** 2 == pytest.approx(m["ppl_quant"] * m["ppl_mirror"], rel=1e-4), name
        else:
            assert "ppl_even" not in m, name
        model_dir = results_root / name / "model"
        assert list(model_dir.glob("*.safetensors")) and (model_dir / "config.json").is_file(), name
        tags = read_scalars(results_root / name / "tb")
        assert {"quant/ppl", "quant/ppl_base", "quant/seconds", "quant/size_mb", "eval/ppl",
                "system/gen_tokens_per_s", "final/ppl_quant"} <= set(tags), (name, sorted(tags))
    # sizes on disk follow the bits: 4-bit weights + fp32 embeddings are well under half the fp32 model
    size = {n: m["size_ratio"] for n, m in built.items()}
    assert size["gptq_opt67b_w3"] < size["gptq_opt67b"] < 0.45, size
    assert size["bnb_nf4_opt27b"] < size["bnb_int8_opt27b"] < 0.7, size
    assert built["gptq_opt67b"]["gptq_layers"] == 24
    # transformers loads a saved compressed-tensors checkpoint by itself
    m = AutoModelForCausalLM.from_pretrained(results_root / "gptq_opt67b" / "model")
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[2, 100, 200, 300]])).logits).all()


@pytest.mark.slow
def test_quant_compare_table_csv_and_plot(built, results_root):
    d = results_root / "quant_compare"
    rows = list(csv.DictReader((d / "compare.csv").open()))
    assert [r["target"] for r in rows] == QUANT
    for r in rows:
        mt = built[r["target"]]
        assert float(r["ppl_quant"]) == pytest.approx(mt["ppl_quant"]) and int(r["bits"]) == mt["bits"]
        assert float(r["ppl_delta"]) == pytest.approx(mt["ppl_quant"] - mt["ppl_base"])
    md = (d / "compare.md").read_text()
    assert all(f"| {n} |" in md for n in QUANT) and "(unquantized)" in md and "Published anchors" not in md
    png = (d / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    r = snakemake("-n", *QUANT, "quant_compare", "--rerun-triggers", "mtime", "params", "input", results=results_root)
    assert "Nothing to be done" in r.stdout + r.stderr


def test_readme_tiny_block_is_regenerated_from_the_built_metrics(built, results_root, tmp_path):
    """scripts/readme_tiny.py rewrites the README's tiny quantization block from results/: every method's
    perplexity, even part and KL as the metrics.json files hold them, and --check tells a stale block apart."""
    readme = tmp_path / "README.md"
    readme.write_text("intro\n  <!-- tiny:quant -->\n  old\n  <!-- /tiny:quant -->\nrest\n", encoding="utf-8")
    cmd = [sys.executable, str(ROOT / "scripts" / "readme_tiny.py"), "--results", str(results_root), "--readme",
           str(readme)]
    assert subprocess.run(cmd + ["--check"], capture_output=True).returncode == 1
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("rest\n") and "  old\n" not in text
    for name, m in built.items():
        if name.split("_")[0] in ("rtn", "gptq", "awq"):
            assert f"{m['ppl_quant']:.3f}" in text and f"{m['ppl_even']:.3f} / {m['kl_vs_base']:.2e}" in text, name
    assert subprocess.run(cmd + ["--check"], capture_output=True).returncode == 0


def test_full_scale_compare_shows_paper_anchors(tmp_path, monkeypatch):
    """At full scale the table puts the published numbers beside the measured ones (fake metrics here: the
    formatting, not the measurement, is under test)."""
    from quantune import quantize_compare

    cfg = load_config(overrides={"scale": "full", "results": {"tiny": str(tmp_path), "full": str(tmp_path)}})
    r = load_recipe(ROOT / "recipes" / "quant_compare.yaml", cfg)
    for i, t in enumerate(r["targets"]):
        rr = load_recipe(ROOT / "recipes" / f"{t}.yaml", cfg)
        (tmp_path / t).mkdir()
        (tmp_path / t / "metrics.json").write_text(json.dumps({
            "target": t, "model": rr["model"], "method": rr["method"], "backend": "x", "bits": rr["bits"],
            "group_size": rr.get("group_size"), "size_bytes": 2**30, "size_bytes_base": 2**32, "size_ratio": 0.25,
            "ppl_base": 10.0 + i, "ppl_quant": 11.0 + i, "ppl_delta": 1.0, "quant_seconds": 1.0,
            "quant_peak_mem_mb": 1.0, "gen_tokens_per_s": 1.0, "gen_tokens_per_s_base": 2.0, "dtype": "float16",
            "eval_context": 2048, "eval_stride": 2048, "eval_dataset": "wikitext2", "eval_split": "test"}))
    m = quantize_compare.compare(str(ROOT / "recipes" / "quant_compare.yaml"), str(tmp_path / "quant_compare"), cfg)
    md = (tmp_path / "quant_compare" / "compare.md").read_text()
    assert m["n_anchors"] == 7 and "Published anchors" in md
    row = next(line for line in md.splitlines() if line.startswith("| gptq_opt67b_w3 |"))
    assert "| 14.86 | per-channel, GPTQ paper, table 3 (per-row) |" in row, row
    assert "| opt-6.7b | fp16 | 16 | - | 10.86 | GPTQ paper, table 3 |" in md
