"""The lora_sft and lora_compare stages on the tiny world: data preparation (labels, truncation, dynamic
padding), one-line errors before any work, a QLoRA run killed after its first checkpoint and resumed, the
linear / cosine adapters and their comparison built through Snakemake, and a seq2seq + Alpaca run of the same
stage."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, snakemake
from quantune.lib.tb import read_scalars

STEPS100 = ROOT / "recipes" / "qlora_chatglm_steps100.yaml"
# as the tiny_world fixture: a reused tiny world is not rebuilt because some rule's code changed
TRIGGERS = ("--rerun-triggers", "mtime", "params", "input")


def tiny_cfg(results_root: Path) -> dict:
    from quantune.lib.config import load_config

    return load_config(overrides={"results": {"tiny": str(results_root), "full": str(results_root / "full")}})


def run_step(*args, results_root: Path, **kw):
    cfg = json.dumps(tiny_cfg(results_root))
    cmd = [sys.executable, "-m", "quantune.lora_sft", *args, "--config-json", cfg]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# ---------------------------------------------------------------- data preparation

@pytest.fixture(scope="module")
def glm_tok(tiny_world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_world / "models" / "glm")


def test_prompt_and_answer_are_tokenized_and_truncated_separately(glm_tok):
    from quantune.lib.prompts import IGNORE_INDEX, tokenize_example

    prompt, answer = "类型#裙*颜色#黑色*风格#简约", "这款黑色连衣裙，经典的黑色显得沉稳大气，简约的设计大方利落。"
    p_ids = glm_tok(prompt)["input_ids"]
    a_ids = glm_tok(answer, add_special_tokens=False)["input_ids"]
    ex = tokenize_example(glm_tok, prompt, answer, 64, 128, seq2seq=False)
    n = len(p_ids)
    assert ex["input_ids"] == p_ids + a_ids + [glm_tok.eos_token_id]
    assert ex["labels"][:n] == [IGNORE_INDEX] * n, "prompt positions must not be trained on"
    assert ex["labels"][n:] == a_ids + [glm_tok.eos_token_id]
    short = tokenize_example(glm_tok, prompt, answer, 6, 5, seq2seq=False)
    assert short["labels"].count(IGNORE_INDEX) == 6, short  # prompt cut to max_input_length
    assert len(short["input_ids"]) == 6 + 5 and short["input_ids"][-1] == glm_tok.eos_token_id, short
    s2s = tokenize_example(glm_tok, prompt, answer, 8, 5, seq2seq=True)
    assert len(s2s["input_ids"]) == 8 and s2s["input_ids"][-1] == glm_tok.eos_token_id
    assert s2s["labels"] == a_ids[:4] + [glm_tok.eos_token_id] and IGNORE_INDEX not in s2s["labels"]


def test_a_split_tokenized_in_lists_holds_each_row_as_tokenized_alone(glm_tok):
    from quantune.lib.prompts import build_split, tokenize_example

    rows = [{"content": f"类型#裙*颜色#{c}" * k, "summary": f"这款{c}连衣裙，简约大方。" * k}
            for k in (1, 3, 9) for c in ("黑色", "白色", "红色")]
    ds = build_split(glm_tok, rows, "advertisegen", "{content}", {"max_input_length": 12, "max_output_length": 16},
                     seq2seq=False, chunk=4)  # lists of 4: three calls, the last one short
    alone = [tokenize_example(glm_tok, r["content"], r["summary"], 12, 16, seq2seq=False) for r in rows]
    assert [{"input_ids": x, "labels": y} for x, y in zip(ds["input_ids"], ds["labels"])] == alone
    assert len({len(x) for x in ds["input_ids"]}) > 1  # rows of several lengths, the longest cut


def test_batches_are_padded_to_their_longest_row_not_to_the_maximum():
    from quantune.lib.prompts import IGNORE_INDEX, SFTCollator

    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    b = SFTCollator(pad_id=0)(rows)
    assert tuple(b["input_ids"].shape) == (2, 5), b["input_ids"].shape
    assert b["input_ids"][1].tolist() == [5, 6, 7, 0, 0]
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert b["labels"][1].tolist() == [-100, 6, 7, IGNORE_INDEX, IGNORE_INDEX]
    fixed = SFTCollator(pad_id=0, padding="max_length", max_length=12)(rows)
    assert tuple(fixed["input_ids"].shape) == (2, 12) and int(fixed["attention_mask"].sum()) == 8


def test_packed_rows_give_the_padded_loss_and_lora_gradients_and_never_see_each_other():
    """padding: packed as the stage runs it (lib.varlen: a batch's rows end to end in one row, each row attending
    to itself only through the row boundaries the collator returns). Against the same rows padded to the longest
    (SFTCollator), in fp32 on the tiny GLM's architecture with LoRA: the same loss and LoRA gradients (<= 1e-5).
    With one boundary for the whole row the rows attend to each other and the loss moves: the check can fail."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantune.lib import varlen
    from quantune.lib.config import load_config
    from quantune.lib.prompts import IGNORE_INDEX, SFTCollator

    spec = dict(load_config()["tiny_world"]["families"]["glm"])
    conf = AutoConfig.for_model(spec.pop("model_type"), vocab_size=512, pad_token_id=0, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").float()
    model.config.use_cache = False  # as lora_sft.train sets it for packed rows
    varlen.use(model)  # as lora_sft.train does for padding: packed, before LoRA wraps the model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero in PEFT: give it values so that A's gradients are not zero too
            torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    rows = []
    for plen, alen in [(5, 7), (9, 3), (3, 11), (6, 6)]:
        ids = torch.randint(4, 512, (plen + alen,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * plen + ids[plen:]})

    def loss_and_grads(batch):
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_pad, grads_pad = loss_and_grads(SFTCollator(pad_id=0)(rows))
    packed = varlen.packed_collator()(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    assert tuple(packed["input_ids"].shape) == (1, total) and packed["cu_seq_lens_q"].tolist() == [0, 12, 24, 38, 50]
    assert "attention_mask" not in packed and packed["position_ids"][0, 12].item() == 0  # row 2 starts again at 0
    loss_pack, grads_pack = loss_and_grads(packed)
    assert abs(loss_pack - loss_pad) <= 1e-5, (loss_pack, loss_pad)
    assert len(grads_pad) == 4 * 2 * conf.num_hidden_layers
    for n, gp in grads_pad.items():
        assert (grads_pack[n] - gp).abs().max().item() <= 1e-5, n
    whole = torch.tensor([0, total], dtype=torch.int32)
    loss_across, _ = loss_and_grads(dict(packed, cu_seq_lens_q=whole, cu_seq_lens_k=whole, max_length_q=total,
                                         max_length_k=total))
    assert abs(loss_across - loss_pad) > 1e-3, "rows attending to each other must change the loss"
    # the row boundaries hold with a KV cache too (transformers' own packed-row mask is built only without one)
    model.config.use_cache = True
    loss_cached, _ = loss_and_grads(packed)
    assert abs(loss_cached - loss_pad) <= 1e-5


@pytest.mark.parametrize("recipe,scale,line", [
    ("qlora_chatglm_linear", "full", "key padding: model 'chatglm3-6b' runs remote code here, which would attend "
                                     "across packed rows; fix: use padding: longest at this scale"),
    ("lora_mt0_large", "tiny", "key padding: packed rows need a decoder-only model; this one is an encoder-decoder"),
])
def test_packing_is_refused_where_rows_would_see_each_other(tmp_path, recipe, scale, line):
    from quantune.lib.common import QuantuneError
    from quantune.lib.config import load_config, load_recipe

    r = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())
    r["padding"] = "packed"
    p = tmp_path / f"{recipe}.yaml"
    p.write_text(yaml.safe_dump(r, allow_unicode=True))
    with pytest.raises(QuantuneError) as e:
        load_recipe(p, load_config(overrides={"scale": scale}))
    assert str(p) in str(e.value) and line in str(e.value), str(e.value)


# ---------------------------------------------------------------- errors before any work

def write_recipe(tmp_path: Path, name: str, **changes) -> Path:
    r = yaml.safe_load(STEPS100.read_text())
    for k, v in changes.items():
        if v is None:
            r.pop(k, None)
            r.get("tiny", {}).pop(k, None)
        else:
            r[k] = v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r, allow_unicode=True))
    return p


@pytest.mark.parametrize("changes,line", [
    ({"lora_rank": 4}, "key lora_rank: unknown key 'lora_rank'; fix: remove it or use one of:"),
    ({"prompt_template": "{instruction}: {content}"},
     "key prompt_template: placeholder(s) ['instruction'] do not fit format advertisegen; fix: use {content}"),
    ({"max_steps": None}, "neither max_steps nor num_train_epochs is set; fix: set one of them"),
    ({"task_type": "SEQ_2_SEQ_LM"}, "key task_type: SEQ_2_SEQ_LM does not fit model 'chatglm3-6b'"),
    ({"tiny": {"target_modules": ["query_key_value"]}},
     "key target_modules: ['query_key_value'] not in"),
    ({"liger_kernel": True}, "key liger_kernel: liger-kernel's Triton kernels need a CUDA GPU and this run has none; "
                             "fix: set liger_kernel: false on this machine"),
])
def test_bad_recipe_stops_with_one_line_before_training(tmp_path, tiny_world, results_root, changes, line):
    p = write_recipe(tmp_path, "bad_recipe", **changes)
    t0 = time.time()
    proc = run_step("--recipe", str(p), "--out", str(tmp_path / "bad_recipe"), results_root=results_root)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:]
    err = [l for l in out.splitlines() if l.startswith("quantune: error:")]
    assert len(err) == 1 and line in err[0], out[-2000:]
    assert str(p) in err[0] and "Traceback" not in out
    assert not (tmp_path / "bad_recipe").exists() and "trainable params" not in out, "work started"
    if "target_modules" in line:  # the fix lists the tiny GLM's real module names
        assert "q_proj" in err[0] and "gate_up_proj" in err[0], err[0]
    assert time.time() - t0 < 120


def stub_liger(monkeypatch, tmp_path, patched: set | None, model_type: str = "glm") -> dict:
    """A stand-in liger-kernel package whose MODEL_TYPE_TO_APPLY_LIGER_FN (read as liger's own) patches the model
    types `patched` (None: the package is not installed), and a resolved model of `model_type` in tmp_path."""
    import types

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name) if patched is not None else None)
    if patched is not None:
        sys.modules["liger_kernel.transformers.monkey_patch"].MODEL_TYPE_TO_APPLY_LIGER_FN = dict.fromkeys(patched)
    return {"source": str(tmp_path), "local": True, "hub_config": None}


@pytest.mark.parametrize("want,speed,device,patched,model_type,on,note", [
    ("auto", "seed", "cuda", {"qwen3"}, "qwen3", False, ""),  # the seed configuration as written
    ("auto", "fast", "cuda", {"qwen3"}, "qwen3", True, ""),
    ("auto", "lean", "cuda", {"qwen3"}, "qwen3", True, ""),
    ("auto", "fast", "cuda", {"qwen3"}, "glm", True, ""),  # transformers' glm: the project's own entry
    ("auto", "fast", "cpu", {"qwen3"}, "qwen3", False, "Triton kernels need a CUDA GPU"),
    ("auto", "fast", "cuda", {"qwen3"}, "opt", False, "no kernels for model type 'opt'"),
    ("auto", "fast", "cuda", None, "glm", False, "liger-kernel is not installed"),
    (False, "fast", "cuda", {"qwen3"}, "qwen3", False, ""),
    (True, "seed", "cuda", {"qwen3"}, "qwen3", True, ""),
])
def test_liger_kernel_auto_turns_on_in_the_fast_modes_where_it_can_run(monkeypatch, tmp_path, want, speed, device,
                                                                         patched, model_type, on, note):
    """liger_kernel: auto is on in fast and lean wherever liger can run (a CUDA GPU, the package, a model type it
    patches: a stand-in package here, its MODEL_TYPE_TO_APPLY_LIGER_FN read as liger's own, with the project's
    `glm` entry added), off in the seed mode, and where it cannot run it says why in speed_note instead of failing;
    true demands it."""
    from quantune.lib.trainer import liger_setting

    m = stub_liger(monkeypatch, tmp_path, patched, model_type)
    got, why = liger_setting({"liger_kernel": want, "speed": speed}, m, device, "r.yaml")
    assert got is on and (note in why if note else why == ""), (got, why)
    assert why == "" or why.startswith("liger-kernel stays off: ")


@pytest.mark.parametrize("want,speed,device,compiled", [
    ("auto", "fast", "cuda", True),  # where it was measured to pay
    ("auto", "lean", "cuda", False), ("auto", "seed", "cuda", False),  # lean unmeasured; seed as written
    ("auto", "fast", "cpu", False),
    (True, "seed", "cpu", True), (False, "fast", "cuda", False),  # a written value stands
])
def test_torch_compile_auto_compiles_the_fast_mode_on_a_gpu_only(monkeypatch, tmp_path, want, speed, device, compiled):
    """torch_compile: auto compiles the decoder blocks in the fast mode on a CUDA GPU and nowhere else, records what
    it turned on in the mode's changes, and then keeps liger-kernel to its fused linear cross-entropy (a stand-in
    liger package that patches 'glm')."""
    from quantune.lib.trainer import LIGER_WITH_COMPILE, liger_kernel_config, with_auto_switches

    m = stub_liger(monkeypatch, tmp_path, {"glm"})
    r, changes, note = with_auto_switches({"torch_compile": want, "liger_kernel": "auto", "speed": speed,
                                           "dataloader_num_workers": "auto"}, m, device, "r.yaml", {"padding": "packed"},
                                          "")
    assert r["torch_compile"] is compiled
    workers = 2 if speed != "seed" and device == "cuda" else 0  # collation beside the step in fast and lean on a GPU
    assert r["dataloader_num_workers"] == workers and changes.get("dataloader_num_workers") == (workers or None)
    assert changes.get("torch_compile") is (True if compiled and want == "auto" else None), changes
    assert changes["padding"] == "packed"  # the mode's own changes stay
    liger = r["liger_kernel"]
    assert liger_kernel_config(r) == (LIGER_WITH_COMPILE if compiled and liger else None)
    assert ("fused linear cross-entropy only" in note) is (compiled and liger), note
    assert changes.get("liger_flce_chunk_mem_const") == (8 if liger else None), changes


@pytest.mark.parametrize("written,speed,device,workers", [
    ("auto", "fast", "cuda", 2), ("auto", "lean", "cuda", 2), ("auto", "seed", "cuda", 0), ("auto", "fast", "cpu", 0),
    (4, "seed", "cpu", 4), (0, "fast", "cuda", 0),  # a written count stands
])
def test_loader_workers_collate_beside_the_step_in_the_faster_modes_on_a_gpu(written, speed, device, workers):
    """dataloader_num_workers: auto gives the fast and lean modes on a CUDA GPU worker processes for collation and
    keeps the seed configuration and CPU runs on the training process; a written count is used as it stands."""
    from quantune.lib.trainer import loader_workers

    assert loader_workers({"dataloader_num_workers": written, "speed": speed}, device) == workers


@pytest.mark.parametrize("want,device,called,used", [
    ("auto", "cuda", None, "cublas"), ("cublaslt", "cuda", "cublaslt", "cublaslt"), ("cublaslt", "cpu", None, None)])
def test_blas_library_sets_torch_s_matmul_library_on_a_gpu_only(monkeypatch, want, device, called, used):
    """blas_library: a named library becomes torch's preferred one for the process's CUDA matmuls and metrics get the
    one in force; auto leaves torch's choice; a CPU run touches nothing (a stand-in for torch's setter: this torch
    has no cuBLASLt)."""
    import torch

    from quantune.lib.trainer import use_blas_library

    calls, now = [], {"lib": "Cublas"}

    def preferred(backend=None):
        if backend is not None:
            calls.append(backend)
            now["lib"] = {"cublas": "Cublas", "cublaslt": "Cublaslt"}[backend]
        return getattr(torch._C._BlasBackend, now["lib"])

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", preferred)
    assert use_blas_library(want, device) == used
    assert calls == ([called] if called else [])


def test_liger_patches_glm_with_its_glm4_forward_on_the_instance(monkeypatch, tmp_path):
    """liger 0.8.5 lists no `glm` type: liger_patches adds the project's entry beside liger's own, which puts
    liger's GLM-4 fused-loss forward on the model instance the Trainer hands it (other instances and the class keep
    transformers' forward) and does nothing with fused_linear_cross_entropy off (a stand-in liger package: its
    Triton kernels need a GPU)."""
    import types

    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from quantune.lib.trainer import apply_liger_kernel_to_glm, liger_patches

    stub_liger(monkeypatch, tmp_path, {"qwen3"})
    g4 = types.ModuleType("liger_kernel.transformers.model.glm4")
    g4.lce_forward = lambda self, **kw: ("liger", self)
    pkg = "liger_kernel.transformers.model"
    monkeypatch.setitem(sys.modules, pkg, types.ModuleType(pkg))
    monkeypatch.setitem(sys.modules, g4.__name__, g4)
    table = liger_patches()
    assert table["glm"] is apply_liger_kernel_to_glm and "qwen3" in table
    cfg = GlmConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=16, intermediate_size=64, pad_token_id=0)
    patched, other = GlmForCausalLM(cfg), GlmForCausalLM(cfg)
    table["glm"](fused_linear_cross_entropy=False, model=patched)
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert patched(input_ids=ids).logits.shape == (1, 3, 64)
    table["glm"](model=patched)
    assert patched(input_ids=ids) == ("liger", patched)
    assert other(input_ids=ids).logits.shape == (1, 3, 64)


def test_liger_flce_chunks_sets_the_chunk_constant_liger_forwards_do_not_pass(monkeypatch):
    """While the training runs, liger's fused linear cross-entropy (called by its model forwards through its
    functional module) gets chunk_mem_const 8 where its caller gives none, keeps a caller's own, keeps the
    signature liger's LigerForCausalLMLoss filters keywords by, and is liger's own again afterwards (a stand-in
    functional module: liger's Triton kernels need a GPU)."""
    import inspect
    import types

    from quantune.lib.trainer import FLCE_CHUNK_MEM_CONST, liger_flce_chunks

    calls = []

    def flce(input, weight, target, bias=None, reduction="mean", chunk_mem_const: int = 1):
        calls.append(chunk_mem_const)

    fn = types.ModuleType("liger_kernel.transformers.functional")
    fn.liger_fused_linear_cross_entropy = flce
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fn.__name__, fn)
    sys.modules["liger_kernel.transformers"].functional = fn
    with liger_flce_chunks(True):
        assert inspect.signature(fn.liger_fused_linear_cross_entropy) == inspect.signature(flce)
        fn.liger_fused_linear_cross_entropy(1, 2, 3)
        fn.liger_fused_linear_cross_entropy(1, 2, 3, chunk_mem_const=2)
    with liger_flce_chunks(False):
        fn.liger_fused_linear_cross_entropy(1, 2, 3)
    assert fn.liger_fused_linear_cross_entropy is flce
    assert calls == [FLCE_CHUNK_MEM_CONST, 2, 1] and FLCE_CHUNK_MEM_CONST == 8

    # both training stages' Trainer (lib.trainer.counting_trainer) trains inside it where use_liger_kernel is on
    import transformers

    from quantune.lib.trainer import TokenCount, counting_trainer

    calls.clear()
    monkeypatch.setattr(transformers.Trainer, "train", lambda self, *a, **k: fn.liger_fused_linear_cross_entropy(1, 2, 3))
    trainer = object.__new__(counting_trainer(TokenCount()))
    for on in (True, False):
        trainer.args = types.SimpleNamespace(use_liger_kernel=on)
        trainer.train()
    assert calls == [FLCE_CHUNK_MEM_CONST, 1] and fn.liger_fused_linear_cross_entropy is flce


def test_fast_step_plan_keeps_one_micro_batch_only_where_its_largest_fits():
    """The fast mode's split of a step's rows: a micro-batch's positions are its rows end to end (packed) or each
    padded to its longest, the largest over seeded shuffled epochs times the measured bytes per position and the
    margin must fit, and the fewest micro-batches that fit win; none fits where not even one row does."""
    from quantune.lib.trainer import FAST_MEMORY_MARGIN, largest_micro_batch, plan_fast_step

    lengths = [100] * 60 + [300] * 4
    assert largest_micro_batch(lengths, 64, True, 10) == 4 * 300 + 60 * 100  # one micro-batch: every row
    assert largest_micro_batch(lengths, 64, False, 10) == 64 * 300
    assert largest_micro_batch(lengths, 1, True, 10) == 300
    many = [100] * 600 + [300] * 40  # 10 micro-batches of 64 an epoch: the largest lies between mean and extreme
    top = largest_micro_batch(many, 64, True, 1000)
    assert 64 * 112.5 < top < 24 * 100 + 40 * 300 and top == largest_micro_batch(many, 64, True, 1000)
    assert top <= largest_micro_batch(many, 64, True, 100_000)  # more draws, a tail at least as far out
    whole = 7200 * 1e6 * FAST_MEMORY_MARGIN
    assert plan_fast_step(lengths, 64, True, 10, 0.0, 1e6, whole) == (64, 1)
    assert 32 * 100 < largest_micro_batch(lengths, 32, True, 20) <= 4 * 300 + 28 * 100
    assert plan_fast_step(lengths, 64, True, 10, 0.0, 1e6, whole - 1) == (32, 2)
    assert plan_fast_step(lengths, 64, True, 10, 1e9, 1e6, whole) == (32, 2)  # the fixed part counts too
    assert plan_fast_step(lengths, 64, False, 10, 0.0, 1e6, whole) == (16, 4)  # padded: 16 x 300 fit, 32 x 300 not
    assert plan_fast_step(lengths, 64, True, 10, 0.0, 1e6, 299 * 1e6) is None


@pytest.mark.parametrize("case", ["fits", "split", "trial_out_of_memory"])
def test_fast_mode_fits_its_step_to_the_gpu_it_runs_on(monkeypatch, case):
    """lora_sft.fit_fast_step with the GPU's free memory and the trials' measurements stood in: the fast mode's one
    micro-batch stays where it fits; else the same rows per step in the fewest micro-batches that fit; else (here:
    the trial itself out of memory) the recipe's own micro-batch with checkpointing on, and speed_changes then holds
    only what still differs from the recipe as written."""
    import datasets
    import torch

    from quantune import lora_sft
    from quantune.lib import trainer

    class Model:
        checkpointing = False

        def parameters(self):
            return [torch.zeros(1000, requires_grad=True), torch.zeros(5)]

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.checkpointing = True

    seen = []

    def trial(model, batch, dtype):  # 0.25 GiB fixed + 1 MB a position
        seen.append(batch["input_ids"].numel())
        if case == "trial_out_of_memory":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 2**28 + 1e6 * batch["input_ids"].numel()

    gib = 2**30
    free = {"fits": 80 * gib, "split": 9 * gib, "trial_out_of_memory": 80 * gib}[case]  # less 5% of 80 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, 80 * gib))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 3 * gib)
    monkeypatch.setattr(trainer, "activation_bytes", trial)
    fast = {"padding": "packed", "per_device_train_batch_size": 64, "gradient_accumulation_steps": 1,
            "gradient_checkpointing": False}
    job = lora_sft.Job(r={"name": "t", **fast}, m={}, where="r.yaml", fmt="advertisegen", template=None,
                       seq2seq=False, device="cuda", train_rows=[], eval_rows=[], speed_changes=dict(fast),
                       written={"padding": "longest", "per_device_train_batch_size": 16,
                                "gradient_accumulation_steps": 4, "gradient_checkpointing": True})
    ds = datasets.Dataset.from_list([{"input_ids": [1] * n} for n in [100] * 60 + [300] * 4])
    model = Model()
    plan = lora_sft.fit_fast_step(job, model, ds, lambda rows: {"input_ids": torch.ones(1, sum(len(x["input_ids"])
                                                                                            for x in rows))},
                                  torch.bfloat16, steps=10)
    split = {"fits": (64, 1, False), "split": (32, 2, False), "trial_out_of_memory": (16, 4, True)}[case]
    r = job.r
    assert (r["per_device_train_batch_size"], r["gradient_accumulation_steps"], r["gradient_checkpointing"]) == split
    assert model.checkpointing is split[2]
    assert plan["chosen"] == f"{split[0]} x {split[1]}, " + ("checkpointing on" if split[2] else "no checkpointing")
    want = {"fits": fast, "split": {**fast, "per_device_train_batch_size": 32, "gradient_accumulation_steps": 2},
            "trial_out_of_memory": {"padding": "packed"}}[case]
    assert job.speed_changes == want, job.speed_changes
    assert (plan["activation_mib_per_position"] is None) is (case == "trial_out_of_memory")
    assert seen == ([600] if case == "trial_out_of_memory" else [600, 4 * 300])  # the 2 longest rows, then 4
    if case != "trial_out_of_memory":  # the two trials' line: 1 MB a position
        assert plan["activation_mib_per_position"] == round(1e6 / 2**20, 4)
    import jsonschema  # what metrics.json will hold, as its schema declares it
    schemas = ROOT / "config" / "schemas" / "metrics"
    assert yaml.safe_load((schemas / "lora_sft.schema.yaml").read_text())["properties"]["fast_memory_plan"] == \
        {"$ref": "common.schema.yaml#/$defs/fast_memory_plan"}
    jsonschema.validate(plan, yaml.safe_load((schemas / "common.schema.yaml").read_text())["$defs"]["fast_memory_plan"])


@pytest.mark.parametrize("liger", [True, False])
def test_fast_mode_trials_measure_the_loss_the_run_computes(monkeypatch, liger):
    """Where liger-kernel runs, the fast mode's memory trials run with its kernels patched in as the Trainer will
    (liger_kernel_config: the fused loss only beside compiled blocks) and its fused loss at the run's chunk size, so
    that a micro-batch's whole logits, which the run never holds, do not count; without it, the model as loaded."""
    import contextlib

    import datasets
    import torch

    from quantune import lora_sft
    from quantune.lib import trainer

    class Model:
        patched = None

        def parameters(self):
            return [torch.zeros(10, requires_grad=True)]

    state = {"chunks": False}

    @contextlib.contextmanager
    def chunks(on):
        state["chunks"] = on
        yield
        state["chunks"] = False

    seen = []

    def trial(model, batch, dtype):
        seen.append((model.patched, state["chunks"]))
        return 2**20 * batch["input_ids"].numel()

    monkeypatch.setattr(trainer, "compiled_view", lambda m, on: m)  # the real one: the next test
    monkeypatch.setattr(trainer, "patch_liger", lambda m, r: setattr(m, "patched", trainer.liger_kernel_config(r)))
    monkeypatch.setattr(trainer, "liger_flce_chunks", chunks)
    monkeypatch.setattr(trainer, "activation_bytes", trial)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    fast = {"padding": "packed", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
            "gradient_checkpointing": False, "liger_kernel": liger, "torch_compile": True}
    job = lora_sft.Job(r={"name": "t", **fast}, m={}, where="r.yaml", fmt="advertisegen", template=None,
                       seq2seq=False, device="cuda", train_rows=[], eval_rows=[], speed_changes={}, written={})
    ds = datasets.Dataset.from_list([{"input_ids": [1] * n} for n in range(10, 26)])
    lora_sft.fit_fast_step(job, Model(), ds, lambda rows: {"input_ids": torch.ones(1, sum(len(x["input_ids"])
                                                                                          for x in rows))},
                           torch.bfloat16, steps=2)
    assert seen == ([(trainer.LIGER_WITH_COMPILE, True)] * 3 if liger else [(None, False)] * 3), seen  # + warm-up


def trial_model(monkeypatch):
    """What the fast plan's trial tests run: a LoRA model of the tiny GLM's architecture (packed attention, LoRA
    dropout drawing random numbers), 8 rows of random tokens, and the CUDA allocator's counters stood in (a peak of
    0.25 GiB + 1 MB a position of the batch the model was called with). Returns (model, rows, positions: the input
    sizes the model has been called with)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantune.lib import varlen
    from quantune.lib.config import load_config

    spec = dict(load_config()["tiny_world"]["families"]["glm"])
    conf = AutoConfig.for_model(spec.pop("model_type"), vocab_size=512, pad_token_id=0, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").float()  # config.use_cache on
    varlen.use(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    ds = datasets.Dataset.from_list([{"input_ids": (ids := torch.randint(4, 512, (n,), generator=g).tolist()),
                                      "labels": ids} for n in (9, 30, 14, 25, 7, 21, 12, 18)])
    positions = []
    model.base_model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: positions.append(kwargs["input_ids"].numel()), with_kwargs=True)
    allocated = 2**30
    for name, fn in {"synchronize": lambda *a: None, "reset_peak_memory_stats": lambda *a: None,
                     "empty_cache": lambda: None, "get_rng_state_all": lambda: [],
                     "set_rng_state_all": lambda states: None, "memory_allocated": lambda *a: allocated,
                     "memory_reserved": lambda *a: allocated, "mem_get_info": lambda *a: (70 * 2**30, 80 * 2**30),
                     "max_memory_allocated": lambda *a: allocated + 2**28 + 1e6 * positions[-1]}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    return model, ds, positions


def fast_job(compiled: bool, **recipe):
    """A lora_sft Job of the fast mode's shape on a GPU: the written 4 x 2 as 8 packed rows in one micro-batch,
    without checkpointing (`recipe`: further keys)."""
    from quantune import lora_sft

    fast = {"padding": "packed", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
            "gradient_checkpointing": False, "torch_compile": compiled}
    return lora_sft.Job(r={"name": "t", **fast, **recipe}, m={}, where="r.yaml", fmt="advertisegen", template=None,
                        seq2seq=False, device="cuda", train_rows=[], eval_rows=[], speed_changes=dict(fast),
                        written={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2})


def compiled_micro_batch(model, ds, rows) -> None:
    """One micro-batch of `rows` as the Trainer's compiled run computes it: its compiled view of the model, the
    packed collator, bf16 autocast."""
    import torch

    from quantune.lib import trainer, varlen

    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer.compiled_view(model, True)(**varlen.packed_collator()([ds[i] for i in rows])).loss.backward()


@pytest.mark.parametrize("compiled", [False, True])
def test_fast_mode_trials_run_the_real_model_and_leave_no_trace(monkeypatch, compiled):
    """fit_fast_step's two trial passes through a real LoRA model (the tiny GLM's architecture, packed rows through
    the run's collator, LoRA dropout drawing random numbers) with only the CUDA allocator's counters stood in (a
    peak of 0.25 GiB + 1 MB a position of the batch the model was called with): the bytes per position come out
    of the two passes exactly, and the trials leave no gradient, no changed weight and no advanced random state.
    Where the run compiles (torch_compile), the trials go through its decoder blocks compiled as the run compiles
    them (dynamo's AOT-eager backend here in place of inductor's code generation), after one warm-up pass that
    compiles them, and the model itself stays uncompiled; they compile no graph that the run's own steps would not:
    none for a one-row micro-batch (transformers gives it no mask, the run's packed micro-batches a block-diagonal
    one), so that dynamo's limit of graphs a block is not spent before the run."""
    import torch
    from torch._dynamo.utils import counters

    from quantune import lora_sft
    from quantune.lib import trainer, varlen

    model, ds, positions = trial_model(monkeypatch)
    job = fast_job(compiled)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    monkeypatch.setattr(trainer, "DYNAMO", {**trainer.DYNAMO, "backend": "aot_eager"})
    torch._dynamo.reset()
    counters.clear()
    plan = lora_sft.fit_fast_step(job, model, ds, varlen.packed_collator(), torch.bfloat16, steps=3)
    # the 2 longest rows (first a warm-up pass where the blocks compile), then the 4 longest, end to end
    assert positions == [30 + 25] * compiled + [30 + 25, 30 + 25 + 21 + 18]
    assert plan["activation_mib_per_position"] == round(1e6 / 2**20, 4) and plan["chosen"] == "8 x 1, no checkpointing"
    assert plan["trials"] == ("compiled" if compiled else "eager")
    assert (counters["stats"]["unique_graphs"] > 0) is compiled, dict(counters["stats"])  # the blocks' graphs
    assert trainer.compiled_modules(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's draws undone: the run starts where it would have
    if compiled:  # the run's step (the Trainer's own compiled view, no KV cache, a new length) reuses their graphs
        graphs = counters["stats"]["unique_graphs"]
        model.config.use_cache = False
        compiled_micro_batch(model, ds, (1, 2, 3))
        assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
        torch._dynamo.reset()  # the run's steps alone compile as many graphs as the trials did
        counters.clear()  # 2 rows, then 5 (3 rows give 4 row boundaries, as many as the tiny GLM's heads: dynamo
        # would then specialise that size, one more graph)
        for rows in ((1, 2), (0, 4, 5, 6, 7)):
            compiled_micro_batch(model, ds, rows)
        assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


def test_the_runs_arguments_come_before_the_fast_plans_trials(monkeypatch, tmp_path, request):
    """transformers turns TF32 on for the whole process as it builds a compiling run's TrainingArguments (a GPU with
    TF32 and bf16 stood in here), and dynamo guards every compiled graph on that state: lora_sft builds the run's
    arguments before the fast plan's trials (arguments_and_fast_step), so the run's step reuses the graphs the
    trials compiled instead of compiling every decoder block again; then builds them again for the fitted step.
    transformers' enable_tf32 sets torch's fp32_precision; here it sets the legacy flag instead (the same guarded
    state), which the test puts back: once a process has used both, torch refuses to read the legacy flag, which
    lib.quant_backends.tf32_matmul reads in later tests."""
    import torch
    import transformers.training_args as ta
    from torch._dynamo.utils import counters

    from quantune import lora_sft
    from quantune.lib import trainer, varlen

    model, ds, positions = trial_model(monkeypatch)
    monkeypatch.setattr(ta, "is_torch_tf32_available", lambda: True)
    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: True)
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    request.addfinalizer(lambda: setattr(matmul, "allow_tf32", before))  # not monkeypatch: a module-level property
    monkeypatch.setattr(ta, "enable_tf32", lambda enable: setattr(matmul, "allow_tf32", enable))
    monkeypatch.setattr(trainer, "DYNAMO", {**trainer.DYNAMO, "backend": "aot_eager"})
    job = fast_job(True, speed="fast", liger_kernel=False, learning_rate=1e-3, lr_scheduler_type="linear",
                   weight_decay=0.0, optim="adamw_torch", logging_steps=1, save_steps=10, save_total_limit=1, seed=8,
                   dataloader_num_workers=0, max_steps=3)
    model.config.use_cache = False  # as lora_sft.train turns it off before
    torch._dynamo.reset()
    counters.clear()
    args, plan = lora_sft.arguments_and_fast_step(job, model, ds, varlen.packed_collator(), torch.bfloat16, 3,
                                                  tmp_path, 0)
    assert matmul.allow_tf32 and not before and args.bf16 and args.torch_compile
    assert plan["trials"] == "compiled" and positions == [30 + 25, 30 + 25, 30 + 25 + 21 + 18]
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 1)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    compiled_micro_batch(model, ds, (1, 2, 3))
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


@pytest.mark.parametrize("upcast", [True, False])
def test_kbit_upcast_false_keeps_the_unquantized_weights_in_their_loaded_dtype(upcast):
    """PEFT's prepare_model_for_kbit_training copies every unquantized weight to fp32 (so the residual stream runs
    in fp32); kbit_upcast: false undoes it exactly, and the LoRA weights stay fp32 either way."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantune.lib.config import load_config
    from quantune.lib.lora import add_lora

    spec = dict(load_config()["tiny_world"]["families"]["glm"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), vocab_size=256, pad_token_id=0,
                                                                   **spec),
                                             dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = {"quantization": "nf4", "kbit_upcast": upcast, "gradient_checkpointing": False, "lora_r": 4,
              "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    model = add_lora(model, recipe, "CAUSAL_LM")
    base = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
            for n, p in model.named_parameters() if "lora_" not in n}
    assert base.keys() == before.keys()
    assert {p.dtype for p in base.values()} == {torch.float32 if upcast else torch.bfloat16}
    assert all(torch.equal(base[n].float(), w.float()) for n, w in before.items())  # the same values
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}


def test_profiler_writes_the_profiled_steps_wall_and_top_operators(tmp_path):
    """lib.trainer.profiler (QUANTUNE_PROFILE, the benches' --profile): steps after `wait` are profiled and
    profile.txt names their wall time and the operators that ran in them, not those of the steps before."""
    import gzip

    import torch

    from quantune.lib.trainer import profiler

    assert profiler(None) is None and profiler("") is None
    cb = profiler(str(tmp_path / "p"), wait=1, active=2)
    a = torch.randn(64, 64)
    for step in range(4):
        cb.on_step_begin(None, None, None)
        (a @ a) if step else torch.tanh(a)  # only the first step, which is not profiled, runs tanh
        cb.on_step_end(None, None, None)
        assert (tmp_path / "p" / "profile.txt").exists() == (step >= 2)
    text = (tmp_path / "p" / "profile.txt").read_text()
    assert text.startswith("steps 2-3: wall ") and "aten::mm" in text and "aten::tanh" not in text, text[:2000]
    assert b'"aten::mm"' in gzip.decompress((tmp_path / "p" / "trace.json.gz").read_bytes())


def test_compare_without_trained_adapters_says_what_to_build(tmp_path, tiny_world):
    cfg = tiny_cfg(tmp_path)  # an empty results dir: no adapter has been trained there
    proc = subprocess.run([sys.executable, "-m", "quantune.lora_compare", "--recipe",
                           str(ROOT / "recipes" / "qlora_compare.yaml"), "--out", str(tmp_path / "qlora_compare"),
                           "--config-json", json.dumps(cfg)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"quantune: error: {ROOT / 'recipes' / 'qlora_compare.yaml'}: key adapters.linear: no trained adapter in "
        f"{tmp_path / 'qlora_chatglm_linear'}; fix: build it first: snakemake qlora_chatglm_linear"), proc.stderr


def test_chatglm3_jobs_get_their_pinned_env_at_full_scale_only(tmp_path):
    from quantune.lib.common import QuantuneError
    from quantune.lib.config import load_config, load_recipes, referenced_targets
    from quantune.lora_sft import _check_pinned_transformers, workflow_env

    for scale, env in (("tiny", "finetune"), ("full", "chatglm3")):
        cfg = load_config(overrides={"scale": scale})
        recipes = load_recipes(cfg)
        for n in ("qlora_chatglm_steps100", "qlora_chatglm_linear", "qlora_chatglm_cosine", "qlora_compare"):
            assert workflow_env(recipes[n], scale) == env, (n, scale)
        assert referenced_targets(recipes["qlora_compare"]) == ["qlora_chatglm_linear", "qlora_chatglm_cosine"]
    # this venv's transformers cannot run ChatGLM3's remote code: a full-scale run here stops before loading
    with pytest.raises(QuantuneError, match=r"key env: chatglm3 remote code needs transformers 4\.40\.0 "
                                            r"\(envs/chatglm3\.yaml\), this Python has 5\."):
        _check_pinned_transformers("recipes/qlora_chatglm_linear.yaml")
    # an adapter that is not a lora_sft target stops the loader, naming the file and key
    rdir = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", rdir)
    bad = rdir / "qlora_compare.yaml"
    bad.write_text(bad.read_text().replace("adapters:\n", "adapters:\n  extra: eval_opt67b\n", 1))
    with pytest.raises(QuantuneError, match=f"{bad}: key adapters.extra: 'eval_opt67b' is a recipe of stage evaluate; "
                                            "fix: name a recipe of stage lora_sft"):
        load_recipes(load_config(), rdir)


# ---------------------------------------------------------------- QLoRA, killed and resumed

@pytest.mark.slow
@pytest.mark.parametrize("speed", ["seed", "fast"])
def test_steps100_killed_after_a_checkpoint_resumes_from_it(tiny_world, results_root, tmp_path, speed):
    """Killed after a checkpoint, rerun: it resumes there (fast mode too: packed batches collated by two data-loader
    workers, as auto gives the fast mode on a GPU, the same data order)."""
    from quantune.lib.common import checkpoint_dir

    # a private output directory: the shared results/qlora_chatglm_steps100 target is left alone
    out = tmp_path / "qlora_chatglm_steps100"
    ckpts = checkpoint_dir(out)
    recipe = yaml.safe_load(STEPS100.read_text())
    save_steps, max_steps = recipe["tiny"]["save_steps"], recipe["tiny"]["max_steps"]
    path = tmp_path / "recipes" / STEPS100.name
    path.parent.mkdir()
    workers = 2 if speed == "fast" else 0
    path.write_text(yaml.safe_dump({**recipe, "speed": speed, "dataloader_num_workers": workers}, allow_unicode=True))

    first = run_step("--recipe", str(path), "--out", str(out), results_root=results_root,
                     start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        done = [p for p in ckpts.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        if done:
            break
        time.sleep(0.5)
    assert first.poll() is None, f"the run ended before its first checkpoint:\n{first.stdout.read()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*"))
    assert killed_at < max_steps and not (out / "metrics.json").exists(), "target must not exist after a kill"

    second = run_step("--recipe", str(path), "--out", str(out), results_root=results_root)
    log, _ = second.communicate(timeout=900)
    assert second.returncode == 0, log[-4000:]
    assert "resuming qlora_chatglm_steps100 from" in log, log[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_step"] >= save_steps and m["resumed_from_step"] % save_steps == 0, m["resumed_from_step"]
    assert m["global_step"] == max_steps and m["steps_this_run"] == max_steps - m["resumed_from_step"], m
    # the history before the kill came back with the checkpoint: the loss curve starts at step 1
    hist = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in hist if "loss" in h]
    assert steps[0] == 1 and steps[-1] == max_steps, steps
    assert m["train_loss_last"] < m["train_loss_first"] - 0.3, (m["train_loss_first"], m["train_loss_last"])
    assert m["quantization"] == "nf4" and m["params_trainable"] > 0 and 0 < m["params_trainable_pct"] < 100
    assert m["speed"] == speed and m["padding"] == ("packed" if speed == "fast" else "longest")
    assert m["dataloader_num_workers"] == workers
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    assert not ckpts.exists(), "checkpoints are removed once the target is complete"


# ---------------------------------------------------------------- linear vs cosine, through Snakemake

@pytest.mark.slow
def test_packed_training_follows_the_padded_run_step_for_step(tiny_world, results_root, tmp_path):
    """The stage with padding: packed against padding: longest, from the same weights and data order (the tiny
    QLoRA recipe, 6 optimizer steps of 8 rows, fp32 on CPU). Before any weight moves (step 1, and step 2 after the
    warmup's lr-0 step) the losses agree within 1e-5. After that Adam's first update, m/sqrt(v) ~ +-1 per element,
    turns summation-order differences in near-zero gradients into lr-sized steps, so the runs drift apart slowly:
    measured here at most 0.0076 against a loss drop of 0.38 over the 6 steps. Asserted: within 5% of the drop at
    every step and on the eval loss. Every step's loss is record_losses' train_loss_by_step (read once at the end);
    the Trainer's own logs (steps 1, 3 and 6) hold the mean of the steps since its last log."""
    runs = {}
    for padding in ("longest", "packed"):
        r = yaml.safe_load(STEPS100.read_text())
        r["tiny"].update(max_steps=6, logging_steps=3, save_steps=100)  # logged: steps 1, 3 and 6
        r.update(padding=padding, record_losses=True, max_eval_samples=16)
        p = tmp_path / f"steps_{padding}.yaml"
        p.write_text(yaml.safe_dump(r, allow_unicode=True))
        proc = run_step("--recipe", str(p), "--out", str(tmp_path / p.stem), results_root=results_root)
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, log[-4000:]
        runs[padding] = json.loads((tmp_path / p.stem / "metrics.json").read_text())
    pad, pack = runs["longest"], runs["packed"]
    assert pack["padding"] == "packed" and pack["global_step"] == pad["global_step"] == 6
    losses = {p: [m["train_loss_by_step"][str(i)] for i in range(1, 7)] for p, m in runs.items()}
    for m, ls in zip(runs.values(), losses.values()):  # the Trainer logs the mean since its last log
        assert [m[f"loss_step{i}"] for i in (1, 3, 6)] == pytest.approx([ls[0], sum(ls[1:3]) / 2, sum(ls[3:]) / 3],
                                                                         abs=1e-6)
    assert max(abs(a - b) for a, b in zip(losses["packed"][:2], losses["longest"][:2])) <= 1e-5, losses
    drop = losses["longest"][0] - losses["longest"][-1]
    tol = 0.05 * drop
    assert drop > 0.2 and all(abs(a - b) <= tol for a, b in zip(losses["packed"], losses["longest"])), (tol, losses)
    assert abs(pack["eval_loss"] - pad["eval_loss"]) <= tol, (pack["eval_loss"], pad["eval_loss"])
    assert pad["tokens_counted"] == pack["tokens_counted"] == "non_padding"
    assert pack["tokens_seen"] == pad["tokens_seen"]  # real tokens both: the packed batch has no pads
    # the stage's own count of the positions computed: the padded batches computed pads, the packed ones none
    assert pad["input_tokens_real"] == pack["input_tokens_real"] == pack["input_tokens_computed"] == pad["tokens_seen"], (
        pad["input_tokens_real"], pack["input_tokens_computed"], pad["tokens_seen"])
    assert pack["pad_fraction"] == 0 and 0 < pad["pad_fraction"] < 1, (pad["pad_fraction"], pack["pad_fraction"])
    assert pad["input_tokens_computed"] * (1 - pad["pad_fraction"]) == pytest.approx(pad["input_tokens_real"])


@pytest.mark.slow
def test_fast_and_lean_modes_follow_the_seed_configuration_step_for_step(tiny_world, results_root, tmp_path):
    """speed: seed / fast / lean from one recipe (the tiny QLoRA, written as micro-batch 4 x accumulation 4 with
    gradient checkpointing, 6 optimizer steps of 16 rows, fp32 on CPU): fast runs each step's 16 rows packed in one
    micro-batch without checkpointing, lean packs them in micro-batches of twice the written rows (8 x 2) with
    checkpointing, its batches collated by two data-loader workers. Same rows per optimizer step, schedule, data order and loss (the Trainer's token-level mean over the step's rows), so
    the losses agree before any weight moves (1e-5) and then drift only as the packed-vs-padded test explains:
    asserted within 5% of the loss drop at every step (the tolerance that test states and measures)."""
    runs = {}
    for mode in ("seed", "fast", "lean"):
        r = yaml.safe_load(STEPS100.read_text())
        r["tiny"].update(max_steps=6, logging_steps=1, save_steps=100, per_device_train_batch_size=4,
                         gradient_accumulation_steps=4, gradient_checkpointing=True)
        r.update(speed=mode, record_losses=True, max_eval_samples=16)
        if mode == "lean":
            r["dataloader_num_workers"] = 2  # collated by worker processes; the data order stays the trainer's
        p = tmp_path / mode / STEPS100.name
        p.parent.mkdir()
        p.write_text(yaml.safe_dump(r, allow_unicode=True))
        proc = run_step("--recipe", str(p), "--out", str(tmp_path / mode / "out"), results_root=results_root)
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, log[-4000:]
        runs[mode] = json.loads((tmp_path / mode / "out" / "metrics.json").read_text())
    seed, fast, lean = runs["seed"], runs["fast"], runs["lean"]
    assert (seed["speed"], seed["speed_changes"]) == ("seed", {})
    assert fast["speed_changes"] == {"padding": "packed", "per_device_train_batch_size": 16,
                                     "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                                     "kbit_upcast": False}
    assert lean["speed_changes"] == {"padding": "packed", "per_device_train_batch_size": 8,  # checkpointing was on
                                     "gradient_accumulation_steps": 2, "kbit_upcast": False}
    assert (seed["kbit_upcast"], fast["kbit_upcast"], lean["kbit_upcast"]) == (1, 0, 0)
    assert (seed["dataloader_num_workers"], fast["dataloader_num_workers"], lean["dataloader_num_workers"]) == (0, 0, 2)
    # liger_kernel: auto would join fast and lean on a GPU; here the modes say why it stayed off
    assert fast["liger_kernel"] == lean["liger_kernel"] == seed["liger_kernel"] == 0 and "speed_note" not in seed
    assert "liger-kernel stays off: liger-kernel's Triton kernels need a CUDA GPU" in fast["speed_note"]
    # packed rows each attend to themselves only: on a CPU row by row (lib.varlen; torch's flash kernel on a GPU)
    assert fast["packed_attention"] == lean["packed_attention"] == "SDPA row by row, each packed row on its own"
    assert (fast["batch_size"], fast["gradient_accumulation_steps"], fast["padding"]) == (16, 1, "packed")
    assert (lean["batch_size"], lean["gradient_accumulation_steps"], lean["padding"]) == (8, 2, "packed")
    assert seed["global_step"] == fast["global_step"] == lean["global_step"] == 6
    assert seed["input_tokens_real"] == fast["input_tokens_real"] == lean["input_tokens_real"]  # the same rows
    assert fast["pad_fraction"] == lean["pad_fraction"] == 0 < seed["pad_fraction"]
    losses = {m: [r[f"loss_step{i}"] for i in range(1, 7)] for m, r in runs.items()}
    drop = losses["seed"][0] - losses["seed"][-1]
    tol = 0.05 * drop
    for mode in ("fast", "lean"):
        assert max(abs(a - b) for a, b in zip(losses[mode][:2], losses["seed"][:2])) <= 1e-5, losses
        assert drop > 0.2 and all(abs(a - b) <= tol for a, b in zip(losses[mode], losses["seed"])), (tol, losses)
        assert abs(runs[mode]["eval_loss"] - seed["eval_loss"]) <= tol, (mode, runs[mode]["eval_loss"], seed["eval_loss"])
    print("\nlosses per step:", json.dumps(losses), f"tolerance {tol:.4f}")


def test_adapters_train_and_beat_the_untuned_base(tiny_world, results_root):
    snakemake("qlora_compare", *TRIGGERS, results=results_root, timeout=3000)
    for name, sched in [("qlora_chatglm_linear", "linear"), ("qlora_chatglm_cosine", "cosine")]:
        m = json.loads((results_root / name / "metrics.json").read_text())
        assert m["lr_scheduler_type"] == sched and m["scale"] == "tiny" and m["epochs"] == pytest.approx(1.0)
        assert m["train_loss_last"] < m["train_loss_first"] - 0.5, (name, m["train_loss_first"], m["train_loss_last"])
        assert m["eval_loss"] < m["train_loss_first"], (name, m["eval_loss"])
        for k in ("train_runtime", "total_flos", "tokens_per_s", "peak_mem_mb", "params_trainable_pct"):
            assert m[k] > 0, (name, k, m.get(k))
        assert m["tokens_counted"] == "non_padding"
        tags = read_scalars(results_root / name / "tb")
        assert {"train/loss", "train/lr", "train/grad_norm", "system/tokens_per_s", "system/peak_mem_mb",
                "eval/loss", "final/total_flos"} <= set(tags), (name, sorted(tags))
        lrs = [v for _, v in sorted(tags["train/lr"])]
        assert max(lrs) <= m["learning_rate"] * 1.0001 and lrs[-1] < 0.2 * m["learning_rate"], (name, lrs)
    c = json.loads((results_root / "qlora_compare" / "metrics.json").read_text())
    # x100 scores; the untuned base writes no ad copy at all. Character 4-grams of the tiny GLM's copy rarely match
    # (BLEU-4 0.27-0.53 greedy on one machine, above 0.5 on another): BLEU-4 must rise; ROUGE-L carries the margin
    for lab in ("linear", "cosine"):
        for metric, margin in (("bleu4", 0.0), ("rougeL", 5.0)):
            tuned, base = c["scores"][lab]["greedy"][metric], c["scores"]["base"]["greedy"][metric]
            assert tuned > base + margin and tuned > 3 * base, (lab, metric, tuned, base)
    assert c["num_prompts"] == 32 and c["split"] == "test"
    assert c["adapters"] == {"linear": "qlora_chatglm_linear", "cosine": "qlora_chatglm_cosine"}
    md = (results_root / "qlora_compare" / "comparison.md").read_text()
    assert "| base | greedy |" in md and "| cosine | sampled |" in md and "## Side by side (greedy)" in md
    table = json.loads((results_root / "qlora_compare" / "comparison.json").read_text())
    assert len(table["rows"]) == 32 and set(table["rows"][0]["generations"]) == {"base", "linear", "cosine"}
    assert (results_root / "qlora_compare" / "loss_curves.png").stat().st_size > 10_000
    r = snakemake("-n", "qlora_compare", *TRIGGERS, results=results_root)
    assert "Nothing to be done" in r.stdout + r.stderr


# ---------------------------------------------------------------- the same stage: seq2seq, Alpaca, plain LoRA

@pytest.mark.slow
def test_seq2seq_alpaca_plain_lora(tmp_path, tiny_world, results_root):
    r = {"stage": "lora_sft", "model": "mt0-large", "dataset": "alpaca", "prompt_template": "alpaca",
         "quantization": "none", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q", "v"],
         "max_steps": 8, "learning_rate": 0.003, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0,
         "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
         "max_input_length": 96, "max_output_length": 32, "max_eval_samples": 16, "logging_steps": 1,
         "save_steps": 3, "seed": 0}
    p = tmp_path / "lora_mt0_alpaca.yaml"
    p.write_text(yaml.safe_dump(r))
    proc = run_step("--recipe", str(p), "--out", str(tmp_path / "lora_mt0_alpaca"), results_root=results_root)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-4000:]
    m = json.loads((tmp_path / "lora_mt0_alpaca" / "metrics.json").read_text())
    assert m["task_type"] == "SEQ_2_SEQ_LM" and m["quantization"] == "none" and m["data_format"] == "alpaca"
    assert m["global_step"] == 8 and 0 < m["eval_loss"] < 20 and m["train_rows"] > 0, m
    adapter = tmp_path / "lora_mt0_alpaca" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and sorted(cfg["target_modules"]) == ["q", "v"]
    from safetensors.torch import load_file

    # LoRA's B matrices start at zero: 8 steps of training moved them, in the encoder and the decoder
    w = load_file(str(adapter / "adapter_model.safetensors"))
    moved = {k.split(".")[2] for k, v in w.items() if "lora_B" in k and float(v.abs().max()) > 0}
    assert moved == {"encoder", "decoder"}, sorted(w)[:6]


def test_gpu_idle_by_host_op_charges_each_gap_to_the_operators_running_meanwhile():
    """lib.measure.gpu_idle_by_host_op on a hand-built timeline: kernels at 0-10, 30-40 and 41-50 us (gaps of 20 us
    and 1 us, the second below min_gap_us); the host runs `step` over 0-60 with `loss` inside it over 5-25 and
    `mm` inside `loss` over 12-18. The 20 us gap (10-30) is charged outermost to `step` in full and innermost to
    `loss` (10-12, 18-25), `mm` (12-18) and `step` (25-30)."""
    from types import SimpleNamespace

    import torch

    from quantune.lib.measure import gpu_idle_by_host_op

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name, a, b, dev=cpu, parent=None):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=a, end=b), device_type=dev,
                               cpu_parent=parent)

    step = ev("step", 0, 60)
    loss = ev("loss", 5, 25, parent=step)
    events = [step, loss, ev("mm", 12, 18, parent=loss), ev("cudaLaunchKernel", 28, 29, parent=step),
              *(ev(f"k{i}", a, b, dev=cuda) for i, (a, b) in enumerate([(0, 10), (30, 40), (41, 50)]))]
    text = gpu_idle_by_host_op(events, min_gap_us=5)
    assert "0.0 ms of 0.1 ms (1 stretches" in text
    outer, inner = text.split("| innermost operator |")
    assert "| step | 0.02 |" in outer and "loss" not in outer
    assert "| loss | 0.01 |" in inner and "| mm | 0.01 |" in inner and "| step | 0.01 |" in inner
    assert gpu_idle_by_host_op([step, loss]) == ""


def test_trainer_reads_back_between_steps_nothing_it_only_logs():
    """counting_trainer: a packed micro-batch's num_input_tokens_seen is counted on the host (its input ids on the
    meta device here, where reading their values fails), every position but a rounded batch's filler (non_padding)
    or every position (all); a padded batch's count, which needs its mask's values, and a count to gather from
    several processes stay the Trainer's own; the gradient norm stays a tensor until the Trainer logs it, under
    DeepSpeed too, where the Trainer itself reads it at every step."""
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DistributedType

    from quantune.lib import trainer as tr
    from quantune.lib.varlen import FILLER

    t = object.__new__(tr.counting_trainer(tr.TokenCount()))
    t.model, t.processing_class = SimpleNamespace(main_input_name="input_ids"), SimpleNamespace(pad_token_id=0)
    t.accelerator = SimpleNamespace(num_processes=1, distributed_type=DistributedType.DEEPSPEED, gather=lambda x: x)
    t.state = SimpleNamespace(num_input_tokens_seen=0)

    def seen(mode, **batch):
        t.args, before = SimpleNamespace(include_num_input_tokens_seen=mode, device="cpu"), t.state.num_input_tokens_seen
        t._track_num_input_tokens(batch)
        return t.state.num_input_tokens_seen - before

    packed = {"input_ids": torch.empty(1, 80, dtype=torch.long, device="meta"), FILLER: 7}
    assert (seen("non_padding", **packed), seen("all", **packed), seen("no", **packed)) == (73, 80, 0)
    mask = torch.tensor([[1] * 30 + [0] * 10, [1] * 25 + [0] * 15])
    assert seen("non_padding", input_ids=torch.zeros(2, 40, dtype=torch.long), attention_mask=mask) == 55
    t.accelerator.num_processes = 2
    assert seen("non_padding", input_ids=torch.ones(1, 80, dtype=torch.long), **{FILLER: 7}) == 80  # the Trainer's
    norm = torch.empty((), device="meta")
    assert t._get_grad_norm(None, norm) is norm and t._get_grad_norm(None, float("inf")) == float("inf")


def test_step_losses_sum_each_steps_micro_batches_on_the_device_and_read_them_once():
    """lib.trainer.StepLosses (record_losses): a step's micro-batch losses are summed where they live (meta tensors
    here, whose values cannot be read) and closed at the step's end without a read; read() takes every closed step
    back in one transfer, through `reduce` where given (a distributed run's mean); a step with no micro-batch adds
    nothing. Through the stage: test_packed_training_follows_the_padded_run_step_for_step."""
    import torch

    from quantune.lib.trainer import StepLosses

    meta = StepLosses()
    for step in (1, 2):
        for _ in range(3):
            meta.add(torch.empty((), device="meta"))
        meta.close(step)
    assert [s for s, _ in meta._closed] == [1, 2] and meta.by_step == {}
    losses = StepLosses()
    for step, micro in ((1, [0.5, 0.25]), (2, [1.0]), (3, [])):
        for v in micro:
            losses.add(torch.tensor(v, requires_grad=True) * 1)
        losses.close(step)
    assert losses.read() == {1: 0.75, 2: 1.0}
    losses.add(torch.tensor(2.0))
    losses.close(4)
    assert losses.read(lambda t: t / 2) == {1: 0.75, 2: 1.0, 4: 1.0}


def test_step_timer_synchronises_only_where_a_stretch_of_steps_ends(monkeypatch):
    """lib.trainer.step_timer: the warm-up step apart; after it the GPU is synchronised (synced_clock) only when the
    Trainer will log, evaluate, save or stop, or at an epoch's end, so the host runs on between steps; the time
    spent between stretches (an evaluation after the epoch) is not counted; the tokens of every timed step are."""
    from types import SimpleNamespace

    from quantune.lib import trainer as tr

    clock = {"t": 0.0, "syncs": 0}

    def synced():
        clock["syncs"] += 1
        return clock["t"]

    monkeypatch.setattr(tr, "synced_clock", synced)
    count = tr.TokenCount()
    timer = tr.step_timer(count)

    def control(**flags):
        return SimpleNamespace(**{k: flags.get(k, False) for k in
                                  ("should_log", "should_evaluate", "should_save", "should_training_stop")})

    def step(seconds, tokens, **flags):
        timer.on_step_begin(None, None, control())
        count.computed += tokens
        count._real += tokens
        clock["t"] += seconds
        timer.on_step_end(None, None, control(**flags))

    step(5.0, 100)  # warm-up: closed at its end
    assert (timer.warmup_steps, timer.warmup_seconds, clock["syncs"]) == (1, 5.0, 2)
    for _ in range(3):
        step(1.0, 10)  # three steps, no log: no synchronisation between them
    assert clock["syncs"] == 3 and timer.steps == 0
    step(1.0, 10, should_log=True)  # the Trainer logs next: the stretch ends
    assert (timer.steps, timer.seconds, timer.real, clock["syncs"]) == (4, 4.0, 40, 4)
    step(1.0, 10)
    timer.on_epoch_end(None, None, control())  # before the epoch's evaluation
    clock["t"] += 30.0  # the evaluation
    step(2.0, 20, should_training_stop=True)
    timer.on_train_end(None, None, control())
    assert (timer.steps, timer.seconds, timer.real, timer.computed) == (6, 7.0, 70, 70)
    assert clock["syncs"] == 8
