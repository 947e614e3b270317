"""Seed 004's export chain on the tiny world: LoRA adapter -> merge -> GGUF f16 (llama.cpp's own
converter) -> Q4_0 / Q8_0 / Q4_K_M (llama_model_quantize) -> llama-cpp-python perplexity, speed and greedy
generations beside the transformers model.

The chain runs once per module through the step commands (`python -m quantune.merge`, `gguf_convert`, `gguf_quantize`,
`gguf_evaluate`) with the real recipes' tiny profiles, on a LoRA adapter made here with PEFT
(random B matrices, so that the merge changes the logits); the Snakemake wiring is checked by dry runs.
Needs scripts/install_llamacpp.sh (llama-cpp-python, gguf, the converter)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, snakemake

RECIPES = ROOT / "recipes"
Q4_0_BLOCK_BYTES, Q4_0_BLOCK = 18, 32  # ggml block_q4_0: one f16 scale + 32 4-bit weights
Q8_0_BLOCK_BYTES, Q8_0_BLOCK = 34, 32  # block_q8_0: one f16 scale + 32 int8 weights
# The stated bounds (tiny scale; measured values are in the README / the lead's report):
PPL_F16_VS_TRANSFORMERS = 0.005  # f16 GGUF vs the float32 transformers model: same token ids, same windows
PPL_Q8_0_VS_F16 = 0.01
PPL_Q4_0_VS_F16 = 0.05  # Q4_0 (all-Q4_0 file) within 5% of f16
GREEDY_AGREE_TOKENS = 16  # f16 GGUF and the merged transformers model: same first tokens, every prompt
TIE_NATS = 0.05  # ... unless the transformers model's top two logits there are closer than this


def step(*args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args[:2])} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("quantune: error:")]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    return lines[0]


def tensors(target_dir: Path) -> dict[str, dict]:
    return {t["name"]: t for t in json.loads((target_dir / "tensor_types.json").read_text())["tensors"]}


def make_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter (r 8 on q/k/v) for the tiny llama whose B matrices are random: the merge must matter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=["q_proj", "k_proj", "v_proj"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        raise AssertionError(f"{e}; run scripts/install_llamacpp.sh first") from None
    return llama_cpp


@pytest.fixture(scope="module")
def chain(tiny_world, results_root, llama_cpp, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf_chain")
    cfg = ["--set", f"results.tiny={results_root}"]
    (d / "recipes").mkdir()
    default_q4 = d / "recipes" / "gguf_q4_0_default.yaml"  # Q4_0 with llama.cpp's own output/embedding types
    default_q4.write_text("stage: gguf_quantize\ngguf: gguf_f16_qwen\nftype: Q4_0\n")
    adapter = make_adapter(tiny_world / "models" / "llama", d / "adapter")
    out = {n: d / n for n in ["merge_lora_qwen", "gguf_f16_qwen", "gguf_q4_0", "gguf_q8_0", "gguf_q4_k_m",
                              "gguf_q4_0_default", "gguf_eval"]}
    step("quantune.merge", "--recipe", str(RECIPES / "merge_lora_qwen.yaml"),
         "--out", str(out["merge_lora_qwen"]), "--adapter", str(adapter), *cfg)
    step("quantune.gguf_convert", "--recipe", str(RECIPES / "gguf_f16_qwen.yaml"),
         "--out", str(out["gguf_f16_qwen"]), "--merged", str(out["merge_lora_qwen"] / "model"), *cfg)
    f16 = out["gguf_f16_qwen"] / "model-f16.gguf"
    for name in ["gguf_q4_0", "gguf_q8_0", "gguf_q4_k_m", "gguf_q4_0_default"]:
        recipe = default_q4 if name == "gguf_q4_0_default" else RECIPES / f"{name}.yaml"
        step("quantune.gguf_quantize", "--recipe", str(recipe), "--out", str(out[name]), "--gguf", str(f16), *cfg)
    files = {n: next(out[n].glob("model-*.gguf")) for n in ["gguf_f16_qwen", "gguf_q8_0", "gguf_q4_k_m", "gguf_q4_0"]}
    # the stage's main, then which of torch and llama_cpp its own process imported (the llama.cpp side runs in a
    # worker process of its own)
    args = ["--recipe", str(RECIPES / "gguf_eval.yaml"), "--out", str(out["gguf_eval"]), "--reference",
            str(out["merge_lora_qwen"] / "model"), *[f"--gguf={n}={p}" for n, p in files.items()], *cfg]
    code = ("import json, sys; from quantune.gguf_evaluate import main; rc = main(sys.argv[1:]); "
            f"open({str(d / 'modules.json')!r}, 'w').write(json.dumps(sorted(m for m in sys.modules "
            "if m in ('torch', 'llama_cpp')))); sys.exit(rc)")
    step("-c", code, *args)
    out["gguf_eval_modules"] = d / "modules.json"
    out["adapter"] = adapter
    return out


def metrics(chain, name) -> dict:
    return json.loads((chain[name] / "metrics.json").read_text())


# ---------------------------------------------------------------- merge

def test_merged_logits_equal_base_plus_adapter(chain, tiny_world):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_world / "models" / "llama"
    tok = AutoTokenizer.from_pretrained(base_dir)
    text = "\n\n".join(json.loads(l)["text"] for l in (tiny_world / "data/tiny_text/test.jsonl").read_text().splitlines()[:20])
    ids = tok(text, return_tensors="pt")["input_ids"][:, :256]
    merged = AutoModelForCausalLM.from_pretrained(chain["merge_lora_qwen"] / "model").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters()), "the merged model still has LoRA layers"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), chain["adapter"]).eval()
    with torch.no_grad():
        want = peft_model(ids).logits
        got = merged(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
    diff, moved = (got - want).abs().max().item(), (want - base).abs().max().item()
    assert diff < 1e-4, f"merged logits differ from base+adapter by {diff:.3g}"
    assert moved > 0.1, f"the adapter moves the logits by only {moved:.3g}: the check would not see a failed merge"
    m = metrics(chain, "merge_lora_qwen")
    assert m["merge_max_abs_logit_diff"] < 1e-4 and m["adapter_max_abs_logit_delta"] > 0.1, m
    # the converter reads the SentencePiece model: it is the one the tiny llama's tokenizer.json came from
    spm = tiny_world / "tokenizers" / "spm" / "tokenizer.model"
    assert (chain["merge_lora_qwen"] / "model" / "tokenizer.model").read_bytes() == spm.read_bytes()


# ---------------------------------------------------------------- convert: the tokenizer survives

def test_llamacpp_tokenizes_like_transformers(chain, llama_cpp):
    from transformers import AutoTokenizer

    m = metrics(chain, "gguf_f16_qwen")
    assert m["gguf_architecture"] == "llama" and m["gguf_tokenizer_model"] == "llama"
    assert m["tokenizer_check_agree"] == m["tokenizer_check_texts"] == 32, m["tokenizer_check_first_diff"]
    # the tiny llama's transformers tokenizer adds no BOS; llama.cpp's SentencePiece default would add one
    assert (m["hf_adds_bos"], m["hf_adds_eos"]) == (m["llamacpp_adds_bos"], m["llamacpp_adds_eos"]) == (0, 0), m
    hf = AutoTokenizer.from_pretrained(chain["merge_lora_qwen"] / "model")
    llm = llama_cpp.Llama(str(chain["gguf_f16_qwen"] / "model-f16.gguf"), vocab_only=True, verbose=False)
    for text in ["Hello world\n\n  two  spaces\tand a tab", "床前明月光，疑是地上霜。", "x = 12345 + 678",
                 "def f(x):\n    return x ** 2", "émigré naïve Ωμέγα ☃"]:
        a = hf(text, add_special_tokens=False)["input_ids"]
        b = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert a == b, f"{text!r}: transformers {a} vs llama.cpp {b}"
        # what each runtime feeds the model, special tokens included
        assert hf(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=True, special=False)
        # the ids map back to the text; llama.cpp's plain detokenize keeps SentencePiece's dummy-prefix space
        assert llm.detokenize(b).decode() == " " + text and hf.decode(a) == text
    llm.close()


def test_without_the_sentencepiece_model_the_check_refuses(chain, results_root, tmp_path):
    """Without tokenizer.model the converter silently falls back to tokenizer.json with every score -1000
    (gguf-py LlamaHfVocab): llama.cpp then merges differently. The step must refuse, leaving no GGUF."""
    model = tmp_path / "model"
    shutil.copytree(chain["merge_lora_qwen"] / "model", model)
    (model / "tokenizer.model").unlink()
    r = step("quantune.gguf_convert", "--recipe", str(RECIPES / "gguf_f16_qwen.yaml"), "--out",
             str(tmp_path / "out"), "--merged", str(model), "--set", f"results.tiny={results_root}", check=False)
    line = one_error_line(r)
    assert re.search(r"key require_same_tokens: llama.cpp tokenizes \d+ of 32 held-out texts differently", line), line
    assert not list((tmp_path / "out").glob("*.gguf")) and not list((tmp_path / "out").glob(".*tmp"))


def test_a_qwen2_bpe_the_converter_does_not_know_converts_with_qwen2_pre_tokenizer(tiny_world, results_root, tmp_path):
    """A Qwen2 model with a vocabulary trained here (scale shape): transformers tokenizes it with Qwen2Tokenizer
    (Qwen's regex, whatever the vocabulary), the converter refuses the unknown BPE hash, gguf_convert names the
    pre-tokenizer llama.cpp implements for that class, and both runtimes then give the same ids."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantune.lib.gguf import converter_dir

    tok = AutoTokenizer.from_pretrained(tiny_world / "tokenizers" / "bpe")
    cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = tmp_path / "qwen2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    tok.save_pretrained(model)
    assert type(AutoTokenizer.from_pretrained(model)).__name__ == "Qwen2Tokenizer"
    plain = subprocess.run([sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"), str(model), "--outfile",
                            str(tmp_path / "plain.gguf"), "--outtype", "f16"], capture_output=True, text=True)
    assert plain.returncode != 0 and "BPE pre-tokenizer was not recognized" in plain.stderr + plain.stdout
    step("quantune.gguf_convert", "--recipe", str(RECIPES / "gguf_f16_qwen.yaml"), "--out", str(tmp_path / "out"),
         "--merged", str(model), "--set", f"results.tiny={results_root}")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["pre_tokenizer_fallback"] == "qwen2" and m["gguf_architecture"] == "qwen2", m
    assert m["gguf_tokenizer_model"] == "gpt2" and m["tokenizer_check_agree"] == m["tokenizer_check_texts"] == 32, m
    pre = gguf.GGUFReader(tmp_path / "out" / "model-f16.gguf").get_field("tokenizer.ggml.pre")
    assert bytes(pre.parts[pre.data[0]]).decode() == "qwen2"


# ---------------------------------------------------------------- quantize: sizes and tensor types

def test_q4_0_is_smaller_than_f16_by_the_block_ratio(chain):
    f16, q4 = tensors(chain["gguf_f16_qwen"]), tensors(chain["gguf_q4_0"])
    assert f16.keys() == q4.keys()
    for name, t in q4.items():
        if len(t["shape"]) == 1:  # norms stay F32
            assert t["type"] == f16[name]["type"] == "F32" and t["n_bytes"] == f16[name]["n_bytes"], name
        else:
            assert f16[name]["type"] == "F16" and f16[name]["n_bytes"] == 2 * t["n_elements"], name
            assert t["type"] == "Q4_0" and t["n_bytes"] == t["n_elements"] // Q4_0_BLOCK * Q4_0_BLOCK_BYTES, name
    quantized = [n for n, t in q4.items() if t["type"] == "Q4_0"]
    ratio = sum(q4[n]["n_bytes"] for n in quantized) / sum(f16[n]["n_bytes"] for n in quantized)
    assert ratio == pytest.approx(4.5 / 16, abs=1e-12), ratio
    # the files: f16 file - f16 tensor bytes + Q4_0 tensor bytes, up to 32-byte alignment per tensor and the
    # few metadata values the quantizer changes
    mf, mq = metrics(chain, "gguf_f16_qwen"), metrics(chain, "gguf_q4_0")
    expected = mf["gguf_file_bytes"] - mf["gguf_tensor_bytes"] + mq["gguf_tensor_bytes"]
    assert abs(mq["gguf_file_bytes"] - expected) <= 32 * len(q4) + 256, (mq["gguf_file_bytes"], expected)
    assert mq["size_ratio_vs_input"] == pytest.approx(mq["gguf_file_bytes"] / mf["gguf_file_bytes"])
    assert mq["size_ratio_vs_input"] < 0.35, mq["size_ratio_vs_input"]
    assert 4.5 <= mq["gguf_bits_per_weight"] < 4.6, mq["gguf_bits_per_weight"]


def test_output_tensor_type_follows_the_recipe_tied(chain):
    """The tiny llama ties its embeddings (like Qwen2.5-1.5B): there is no output.weight and token_embd.weight
    computes the logits. Recipe gguf_q4_0 (output_tensor_type + token_embedding_type Q4_0) -> Q4_0.
    Without them llama.cpp picks Q6_K for that tensor, and since a 128-wide row is no multiple of Q6_K's
    256-block, its fallback turns it into Q8_0 (llama-quant.cpp tensor_type_fallback)."""
    for name in ["gguf_q4_0", "gguf_q4_0_default"]:
        m, t = metrics(chain, name), tensors(chain[name])
        assert "output.weight" not in t and m["output_tied"] == 1 and m["output_tensor"] == "token_embd.weight"
        assert m["types_layer_matrices"] == "Q4_0", m["types_layer_matrices"]
    assert metrics(chain, "gguf_q4_0")["type_output"] == tensors(chain["gguf_q4_0"])["token_embd.weight"]["type"] == "Q4_0"
    assert metrics(chain, "gguf_q4_0_default")["type_output"] == "Q8_0"
    assert metrics(chain, "gguf_q4_0_default")["requested_output_tensor_type"] == "default"


def test_q8_0_and_q4_k_m_types_are_what_llamacpp_writes(chain):
    q8 = tensors(chain["gguf_q8_0"])
    for name, t in q8.items():
        want = "F32" if len(t["shape"]) == 1 else "Q8_0"
        assert t["type"] == want, (name, t["type"])
        if want == "Q8_0":
            assert t["n_bytes"] == t["n_elements"] // Q8_0_BLOCK * Q8_0_BLOCK_BYTES
    # Q4_K_M's mixture: Q4_K, with Q6_K for attn_v and ffn_down of the "more bits" layers (of 3 layers: the
    # last) and Q6_K for the output (tied: token_embd). Every row here is 128 or 384 wide, no multiple of the
    # k-quants' 256: Q4_K falls back to Q5_0 and Q6_K to Q8_0. Nothing is left in a k-quant.
    q4km = tensors(chain["gguf_q4_k_m"])
    for name, t in q4km.items():
        if len(t["shape"]) == 1:
            want = "F32"
        elif name == "token_embd.weight" or name in ("blk.2.attn_v.weight", "blk.2.ffn_down.weight"):
            want = "Q8_0"
        else:
            want = "Q5_0"
        assert t["type"] == want, (name, t["type"], want)
    m = metrics(chain, "gguf_q4_k_m")
    assert m["ftype"] == "Q4_K_M" and m["types_layer_matrices"] == "Q5_0,Q8_0"


def test_untied_output_weight_is_q6_k_by_default_and_q4_0_by_recipe(chain, results_root, tmp_path):
    """An untied model with 256-wide rows (where Q6_K fits) has its own output.weight: llama.cpp's default for
    a Q4_0 file is Q6_K there (what seed 004 patched llama.cpp to avoid); the recipe's output_tensor_type
    makes it Q4_0. token_embd.weight, untied, follows the file type either way."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = chain["merge_lora_qwen"] / "model"
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "untied"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    shutil.copyfile(src / "tokenizer.model", model_dir / "tokenizer.model")
    cfg_args = ["--set", f"results.tiny={results_root}"]
    step("quantune.gguf_convert", "--recipe", str(RECIPES / "gguf_f16_qwen.yaml"), "--out",
         str(tmp_path / "f16"), "--merged", str(model_dir), *cfg_args)
    f16 = tmp_path / "f16" / "model-f16.gguf"
    default = tmp_path / "recipes" / "gguf_q4_0_default.yaml"
    default.parent.mkdir()
    default.write_text("stage: gguf_quantize\ngguf: gguf_f16_qwen\nftype: Q4_0\n")
    for recipe, out in [(RECIPES / "gguf_q4_0.yaml", "q4"), (default, "q4_default")]:
        step("quantune.gguf_quantize", "--recipe", str(recipe), "--out", str(tmp_path / out), "--gguf", str(f16),
             *cfg_args)
    by_recipe, by_default = tensors(tmp_path / "q4"), tensors(tmp_path / "q4_default")
    assert by_recipe["output.weight"]["type"] == "Q4_0", by_recipe["output.weight"]
    assert by_default["output.weight"]["type"] == "Q6_K", by_default["output.weight"]
    assert by_recipe["token_embd.weight"]["type"] == by_default["token_embd.weight"]["type"] == "Q4_0"
    m = json.loads((tmp_path / "q4_default" / "metrics.json").read_text())
    assert m["output_tied"] == 0 and m["type_output"] == "Q6_K"


# ---------------------------------------------------------------- llama-cpp-python evaluation

def test_perplexity_of_the_ggufs_within_the_stated_bounds(chain):
    m = metrics(chain, "gguf_eval")
    hf, f16, q8, q4 = (m[k] for k in ["hf_ppl", "gguf_f16_qwen_ppl", "gguf_q8_0_ppl", "gguf_q4_0_ppl"])
    report = f"transformers {hf:.4f}, f16 {f16:.4f}, Q8_0 {q8:.4f}, Q4_K_M {m['gguf_q4_k_m_ppl']:.4f}, Q4_0 {q4:.4f}"
    assert m["context"] == m["stride"] == 128 and m["tokens_scored"] > 4000, m["tokens_scored"]
    assert m["eval_tokens_same_as_transformers"] == 1
    assert abs(f16 / hf - 1) < PPL_F16_VS_TRANSFORMERS, report
    assert abs(q8 / f16 - 1) < PPL_Q8_0_VS_F16, report
    assert abs(q4 / f16 - 1) < PPL_Q4_0_VS_F16, report
    assert q4 != f16, f"Q4_0 and f16 give the same perplexity: was anything quantized? {report}"
    assert m["gguf_q4_0_ppl_ratio_vs_gguf_f16_qwen"] == pytest.approx(q4 / f16)


def test_token_nll_is_the_float64_log_softmax():
    """gguf_evaluate scores llama.cpp's float32 logits in blocks: the same per-token NLL as a float64
    log-softmax (1e-7 a token), whatever the block size against the row count (a partial last block)."""
    import numpy as np

    from quantune.gguf_evaluate import token_nll

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((300, 5000)) * 8 + 40).astype(np.float32)  # large offsets: max-subtraction matters
    targets = rng.integers(0, 5000, 300)
    x = logits.astype(np.float64)
    ref = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1) - x[np.arange(300), targets]
    for block in (1, 64, 256, 1000):
        assert np.abs(token_nll(logits, targets, block=block) - ref).max() < 1e-7, block
    wrong = targets.copy()
    wrong[7] = (wrong[7] + 1) % 5000
    assert np.abs(token_nll(logits, wrong) - ref).max() > 1e-3  # it reads each row's own target


def test_greedy_generations_agree_with_the_transformers_model(chain):
    """The f16 GGUF continues every prompt as the merged transformers model does for GREEDY_AGREE_TOKENS tokens,
    except where the transformers model itself sees a tie: at a divergence, its logits for its own pick and for
    llama.cpp's differ by less than TIE_NATS (f16 weights move logits by about that much)."""
    import torch

    from quantune.lib.models import load_model

    rows = [json.loads(l) for l in (chain["gguf_eval"] / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    model, tok = load_model(str(chain["merge_lora_qwen"] / "model"), dtype="float32")
    for row in rows:
        hf, f16 = row["transformers_ids"], row["gguf_f16_qwen_ids"]
        assert len(hf) == len(f16) == 32
        assert row["gguf_q4_0"] and row["transformers"]
        k = next((i for i in range(GREEDY_AGREE_TOKENS) if hf[i] != f16[i]), None)
        if k is None:
            continue
        ids = tok(row["prompt"])["input_ids"]
        assert len(ids) == row["prompt_tokens"]
        with torch.no_grad():
            logits = model(torch.tensor([ids + hf[:k]])).logits[0, -1]
        margin = float(logits[hf[k]] - logits[f16[k]])
        assert 0 <= margin < TIE_NATS, (row["prompt"][-40:], k, hf[k], f16[k], margin)


def test_llamacpp_runs_in_a_process_of_its_own_without_torch(chain):
    """torch's CUDA libraries and a CUDA build of llama.cpp in one process aborted on the GPU machine: the stage's
    process holds the transformers model and never imports llama_cpp; its llama.cpp worker never imports torch."""
    from quantune.gguf_evaluate import LlamaProcess, llama_vocab

    assert json.loads(chain["gguf_eval_modules"].read_text()) == ["torch"]
    probe = "sorted(m for m in __import__('sys').modules if m in ('torch', 'llama_cpp'))"
    with LlamaProcess() as llama:
        ids = llama.call(llama_vocab, str(chain["gguf_f16_qwen"] / "model-f16.gguf"), "Hello world")
        loaded = llama.call(eval, probe)
    assert len(ids) > 1 and loaded == ["llama_cpp"]
    line = None
    try:
        with LlamaProcess() as llama:
            llama.call(os.abort)
    except Exception as e:  # a worker that dies is one line, not a BrokenProcessPool traceback
        line = str(e)
    assert line == ("llama.cpp: its process ended abnormally during abort (see the log above); fix: check the "
                    "llama-cpp-python build (scripts/install_llamacpp.sh) and the GGUF files"), line


def test_eval_reports_speed_sizes_and_tensorboard(chain):
    from quantune.lib.tb import read_scalars

    m = metrics(chain, "gguf_eval")
    for t in ["gguf_f16_qwen", "gguf_q8_0", "gguf_q4_k_m", "gguf_q4_0"]:
        assert m[f"{t}_pp_tokens_per_s"] > 0 and m[f"{t}_tg_tokens_per_s"] > 0, t
        assert m[f"{t}_pp_tokens"] == 128 and m[f"{t}_tg_tokens"] == 32
        assert m[f"{t}_file_bytes"] == next(chain[t].glob("model-*.gguf")).stat().st_size
        tags = read_scalars(chain["gguf_eval"] / "tb" / t)
        assert {"eval/ppl", "system/tokens_per_s", "system/prompt_tokens_per_s", "quant/file_mb"} <= set(tags), t
    assert m["gguf_q4_0_size_ratio_vs_gguf_f16_qwen"] < 0.35
    assert m["version_llama_cpp_python"] == "0.3.36" and m["version_gguf"] == "0.19.0"


# ---------------------------------------------------------------- bad input, wiring

def test_bad_inputs_fail_with_one_line_before_work(chain, results_root, tmp_path):
    cfg = ["--set", f"results.tiny={results_root}"]
    (tmp_path / "empty").mkdir()
    line = one_error_line(step("quantune.merge", "--recipe", str(RECIPES / "merge_lora_qwen.yaml"),
                               "--out", str(tmp_path / "m"), "--adapter", str(tmp_path / "empty"), *cfg, check=False))
    assert "no PEFT adapter here (adapter_config.json missing); fix:" in line, line
    line = one_error_line(step("quantune.gguf_quantize", "--recipe", str(RECIPES / "gguf_q4_0.yaml"),
                               "--out", str(tmp_path / "q"), "--gguf", str(tmp_path / "none.gguf"), *cfg, check=False))
    assert f"{tmp_path / 'none.gguf'}: GGUF file not found; fix:" in line, line
    # full scale offloads to a GPU: a CPU-only llama-cpp-python is refused at once, with the fix
    line = one_error_line(step("quantune.gguf_evaluate", "--recipe", str(RECIPES / "gguf_eval.yaml"),
                               "--out", str(tmp_path / "e"), "--set", "scale=full", check=False))
    assert "key n_gpu_layers: -1 asks for GPU offload" in line and "GGML_CUDA=on" in line, line
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists() and not (tmp_path / "e").exists()


def test_a_recipe_naming_a_missing_target_stops_snakemake(tmp_path):
    bad = tmp_path / "gguf_q4_bad.yaml"
    bad.write_text("stage: gguf_quantize\ngguf: gguf_f16_nope\nftype: Q4_0\n")
    r = snakemake("-n", "all", "--config", f"recipes_dir={tmp_path}", check=False)
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("quantune: error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-2000:]
    assert f"{bad}: key gguf: 'gguf_f16_nope' is no recipe; fix: name a recipe of stage gguf_convert" in lines[0]


def dry_run_jobs(out: str) -> dict[str, tuple[str, int]]:
    """target -> (rule, gpus) of every job with a wildcard `name` in a dry run's output."""
    jobs = {}
    for block in re.split(r"\n(?=\[[^\n]*\]\n(?:local)?rule )", out):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        name = re.search(r"wildcards: name=(\w+)", block)
        gpu = re.search(r"resources: [^\n]*\bgpu=(\d+)", block)
        if rule and name:
            jobs[name.group(1)] = (rule.group(1), int(gpu.group(1)) if gpu else 0)
    return jobs


@pytest.mark.parametrize("scale", ["tiny", "full"])
def test_the_chain_resolves_in_a_dry_run(scale, tmp_path):
    # one --config (a second one would replace the first): the scale and a results dir of our own
    results = json.dumps({"tiny": str(tmp_path), "full": str(tmp_path / "full")})
    r = snakemake("-n", "gguf_eval", "--config", f"scale={scale}", f"results={results}")
    out = r.stdout + r.stderr
    jobs = dry_run_jobs(out)
    full = scale == "full"
    want = {"merge_lora_qwen": ("merge", int(full)), "gguf_f16_qwen": ("gguf_convert", 0),
            "gguf_q4_0": ("gguf_quantize", 0), "gguf_q8_0": ("gguf_quantize", 0), "gguf_q4_k_m": ("gguf_quantize", 0),
            "gguf_eval": ("gguf_evaluate", int(full))}
    for name, (rule, gpus) in want.items():
        assert jobs.get(name) == (rule, gpus), (name, jobs.get(name), out[-3000:])
    assert "lora_sft_qwen" in jobs, "the chain does not start from the LoRA SFT target"
    if full:
        assert "tiny_pretrain" not in out, "full scale must not build the tiny world"


@pytest.mark.slow
def test_the_chain_builds_through_snakemake(tiny_world, results_root):
    """The chain as `snakemake gguf_eval` runs it: the rules' commands, inputs and outputs, not only the steps."""
    snakemake("gguf_eval", "--rerun-triggers", "mtime", "params", "input", results=results_root)
    chain = ["lora_sft_qwen", "merge_lora_qwen", "gguf_f16_qwen", "gguf_q8_0", "gguf_q4_k_m", "gguf_q4_0", "gguf_eval"]
    m = {n: json.loads((results_root / n / "metrics.json").read_text()) for n in chain}
    assert m["gguf_f16_qwen"]["tokenizer_check_agree"] == m["gguf_f16_qwen"]["tokenizer_check_texts"] > 0
    for n in ("gguf_q8_0", "gguf_q4_k_m", "gguf_q4_0"):
        assert Path(m[n]["gguf_path"]).is_file() and m[n]["gguf_in_file_bytes"] == m["gguf_f16_qwen"]["gguf_file_bytes"]
    assert {k for k in m["gguf_eval"] if k.endswith("_file_bytes")} >= {f"{n}_file_bytes" for n in chain[2:6]}
