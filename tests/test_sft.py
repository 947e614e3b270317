"""The sft stage (seed 003): DeepSpeed SFT of the tiny Qwen3. Labels and padding (padding never reaches
the loss), the 90/10 split, one-line errors before any process starts, the target built for real through
Snakemake (eval perplexity falls every epoch, the output reloads with transformers), resume after a kill under
ZeRO-3 (shards consolidated), and the LoRA switch."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, loss_and_grads, snakemake

RECIPE = ROOT / "recipes" / "qwen3_deepspeed_sft.yaml"


def cfg_for(results_root: Path) -> dict:
    from quantune.lib.config import load_config

    return load_config(overrides={"results": {"tiny": str(results_root), "full": str(results_root / "full")}})


def recipe_copy(tmp_path: Path, tiny: dict | None = None, top: dict | None = None) -> Path:
    """The real recipe with some keys changed, saved under the target's name (a recipe's name is its file)."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw.update(top or {})
    raw["tiny"] = {**raw.get("tiny", {}), **(tiny or {})}
    d = tmp_path / "recipes"
    d.mkdir(parents=True, exist_ok=True)
    p = d / RECIPE.name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def sft_cmd(recipe: Path, out: Path, results_root: Path) -> list[str]:
    return [sys.executable, "-m", "quantune.sft", "--recipe", str(recipe), "--out", str(out),
            "--set", f"results.tiny={results_root}"]


def sft_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture(scope="module")
def tiny_qwen3(tiny_world, results_root):
    from quantune.lib.config import load_recipe
    from quantune.lib.data import load_split
    from quantune.lib.models import load_model

    cfg = cfg_for(results_root)
    recipe = load_recipe(RECIPE, cfg)
    model, tok = load_model(str(tiny_world / "models" / "qwen3"))
    tok.padding_side = "right"
    rows = load_split({"format": "pref", "source": str(tiny_world / "data" / "summary_pref"), "local": True}, "train")
    return cfg, recipe, model, tok, rows


# ---------------------------------------------------------------- labels, padding, split (in process, seconds)

def test_padding_never_reaches_the_loss(tiny_qwen3):
    import torch

    from quantune.lib.sft_data import IGNORE, collator, encode_pair

    _, recipe, model, tok, rows = tiny_qwen3
    feats = [encode_pair(tok, r["prompt"], r["chosen"], recipe["prompt_template"], 96, False) for r in rows[:6]]
    feats = [{k: v for k, v in f.items() if k != "truncated"} for f in feats]
    # different lengths, so the dynamic padding already pads some rows
    lengths = sorted({len(f["input_ids"]) for f in feats})
    longest = lengths[-1]
    tight = collator(tok)(feats)
    wide = collator(tok, pad_to_multiple_of=longest + 37)(feats)  # 37 extra pad columns on every row
    assert tight["input_ids"].shape[1] == longest and wide["input_ids"].shape[1] == longest + 37
    for b in (tight, wide):
        pad = b["attention_mask"] == 0
        assert (b["labels"][pad] == IGNORE).all(), "a padded position has a label"
        assert (b["input_ids"][pad] == tok.pad_token_id).all()
        assert (b["labels"][~pad] != IGNORE).all(), "mask_prompt off: every real token is a target"
    assert int((wide["attention_mask"] == 0).sum()) >= 6 * 37
    model.eval()
    with torch.no_grad():
        loss_tight = model(**tight).loss.item()
        loss_wide = model(**wide).loss.item()
        # the seed's bug (pads left in the labels) would change the loss with the padding
        leaky = dict(wide, labels=wide["input_ids"].clone())
        loss_leaky = model(**leaky).loss.item()
    assert abs(loss_tight - loss_wide) < 1e-5, f"per-token loss moved with padding: {loss_tight:.6f} -> {loss_wide:.6f}"
    assert abs(loss_leaky - loss_wide) > 1e-2, f"control: unmasked padding should move the loss ({loss_leaky:.4f})"


@contextlib.contextmanager
def packed_model(model):
    """The fixture's shared model as sft._build_model sets it for packed rows (lib.varlen's attention, no cache), in
    eval mode (no dropout: two layouts of the same rows compute the same function); its settings put back after."""
    from quantune.lib import varlen

    model.eval()
    use_cache, model.config.use_cache = model.config.use_cache, False
    attn = model.config._attn_implementation
    varlen.use(model)
    try:
        yield model
    finally:
        model.config.use_cache = use_cache
        model.set_attn_implementation(attn)


def test_packed_rows_give_the_padded_loss_and_gradients_and_never_see_each_other(tiny_qwen3):
    """speed: fast packs a batch's rows into one padding-free row, each attending to itself only (lib.varlen, as
    sft._build_model switches the model): the same loss and gradients as the padded batch (fp32, 1e-5), each row's
    first label -100 (never predicted from the row before); with one boundary for the whole row the rows attend to
    each other and the loss moves (the control)."""
    import torch

    from quantune.lib.sft_data import IGNORE, collator, encode_pair

    _, recipe, model, tok, rows = tiny_qwen3
    feats = [{k: v for k, v in encode_pair(tok, r["prompt"], r["chosen"], recipe["prompt_template"], 512, False).items()
              if k != "truncated"} for r in rows[:5]]
    padded, packed = collator(tok)(feats), collator(tok, packed=True)(feats)
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(set(lengths)) > 1 and (padded["attention_mask"] == 0).any()  # the padded batch does pad
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(packed["labels"][0, s].item() == IGNORE for s in starts)
    assert all(packed["position_ids"][0, s].item() == 0 for s in starts)
    whole = torch.tensor([0, sum(lengths)], dtype=torch.int32)
    with packed_model(model):
        lp, gp = loss_and_grads(model, padded)
        lk, gk = loss_and_grads(model, packed)
        with torch.no_grad():
            leaky = model(**dict(packed, cu_seq_lens_q=whole, cu_seq_lens_k=whole, max_length_q=sum(lengths),
                                 max_length_k=sum(lengths))).loss.item()
    assert abs(lp - lk) <= 1e-5, (lp, lk)
    assert gp.keys() == gk.keys() and max((gp[n] - gk[n]).abs().max().item() for n in gp) <= 1e-5
    assert abs(leaky - lk) > 1e-3, f"control: rows that see each other should move the loss ({leaky:.5f})"


def test_a_rounded_packed_batch_gives_the_exact_ones_loss_and_gradients_and_counts_its_filler_as_padding(tiny_qwen3):
    """packed_multiple_of: one filler row rounds the packed length up to a multiple (its own segment, labels -100):
    the same loss and gradients as the exact packed batch (fp32, 1e-5); the Trainer counts the filler as padding
    (TokenCount) and takes its key out before the model (without_filler). Control: the filler's tokens as its labels
    move the loss."""
    import torch

    from quantune.lib import varlen
    from quantune.lib.sft_data import IGNORE, collator, encode_pair
    from quantune.lib.trainer import TokenCount, without_filler

    _, recipe, model, tok, rows = tiny_qwen3
    feats = [{k: v for k, v in encode_pair(tok, r["prompt"], r["chosen"], recipe["prompt_template"], 512, False).items()
              if k != "truncated"} for r in rows[:5]]
    total = sum(len(f["input_ids"]) for f in feats)
    exact, rounded = collator(tok, packed=True)(feats), collator(tok, packed=True, packed_multiple_of=64)(feats)
    fill = -total % 64
    assert fill and rounded[varlen.FILLER] == fill and rounded["input_ids"].shape == (1, total + fill)
    assert rounded["cu_seq_lens_q"].tolist() == [*exact["cu_seq_lens_q"].tolist(), total + fill]
    assert (rounded["labels"][0, total:] == IGNORE).all()
    count = TokenCount()
    count.add(rounded)
    assert (count.computed, count.real) == (total + fill, total)
    assert varlen.FILLER not in without_filler(rounded) and set(without_filler(exact)) == set(exact)
    learned = dict(without_filler(rounded), labels=rounded["input_ids"].clone())  # the filler's tokens as labels
    learned["labels"][0, :total] = rounded["labels"][0, :total]
    with packed_model(model):
        le, ge = loss_and_grads(model, without_filler(exact))
        lr, gr = loss_and_grads(model, without_filler(rounded))
        with torch.no_grad():
            leaky = model(**learned).loss.item()
    assert abs(le - lr) <= 1e-5, (le, lr)
    assert ge.keys() == gr.keys() and max((ge[n] - gr[n]).abs().max().item() for n in ge) <= 1e-5
    assert abs(leaky - le) > 1e-3, f"control: a filler with labels should move the loss ({leaky:.5f})"


@pytest.mark.slow
def test_fast_mode_follows_the_seed_configuration_epoch_by_epoch(tiny_world, results_root, tmp_path):
    """speed: seed and fast from one recipe through the stage and its DeepSpeed launcher (the tiny Qwen3, written
    as micro-batch 4 x accumulation 2 with gradient checkpointing, 2 epochs, fp32 on one CPU rank, dropout 0 as
    Qwen3's config has it). fast runs each optimizer step's 8 rows packed in one micro-batch without checkpointing:
    the same rows per step, schedule and data order, so the eval loss per epoch agrees up to summation order
    (asserted within 1e-3; measured: equal to the printed 7 digits at every epoch). fast with torch_compile
    (each decoder block compiled through accelerate and the DeepSpeed engine, inductor on the CPU) computes the
    same losses as fast (within 1e-5) with every decoder block compiled, its batches collated by two data-loader
    worker processes (the data order stays the training process's)."""
    runs = {}
    for mode in ("seed", "fast", "compiled"):
        recipe = recipe_copy(tmp_path / mode, tiny={"num_train_epochs": 2, "max_rows": 120, "max_seq_len": 64,
                                                    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                                                    "gradient_checkpointing": True, "logging_steps": 1},
                             top={"speed": "fast", "torch_compile": True, "dataloader_num_workers": 2} if mode == "compiled"
                             else {"speed": mode})
        r = subprocess.run(sft_cmd(recipe, tmp_path / mode / "out", results_root), cwd=ROOT, env=sft_env(),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[mode] = json.loads((tmp_path / mode / "out" / "metrics.json").read_text())
    seed, fast = runs["seed"], runs["fast"]
    assert (seed["speed"], seed["speed_changes"], seed["padding"]) == ("seed", {}, "max_length")
    assert fast["speed_changes"] == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                     "gradient_checkpointing": False, "padding": "packed"}
    assert fast["packed_attention"] == "SDPA row by row, each packed row on its own" and "packed_attention" not in seed
    assert fast["speed_note"].startswith("liger-kernel stays off: liger-kernel's Triton kernels need a CUDA GPU")
    assert fast["liger_kernel"] == seed["liger_kernel"] == 0 and "speed_note" not in seed
    assert fast["global_step"] == seed["global_step"] and fast["train_tokens"] == seed["train_tokens"]
    # the same real tokens went through the steps; the speed figures follow from the counts
    assert fast["input_tokens_real"] == seed["input_tokens_real"] == fast["input_tokens_computed"] > 0
    for m in (seed, fast):
        # rates over the steps after the first (warm-up) one: their own tokens over their own seconds
        assert m["timed_steps"] == m["global_step"] - 1 and 0 < m["timed_tokens_real"] < m["input_tokens_real"]
        assert m["real_tokens_per_s"] == pytest.approx(m["timed_tokens_real"] / m["step_seconds"])
        assert m["mfu"] == pytest.approx(m["flops_per_token"] * m["real_tokens_per_s"] / (m["matmul_tflops"] * 1e12))
        assert 0 < m["step_seconds"] < m["train_seconds"] and m["matmul_dtype"] == "float32"
    diffs = [abs(fast[f"eval_loss_epoch{e}"] - seed[f"eval_loss_epoch{e}"]) for e in range(3)]
    print(f"\neval loss per epoch, seed {[seed[f'eval_loss_epoch{e}'] for e in range(3)]}, "
          f"fast {[fast[f'eval_loss_epoch{e}'] for e in range(3)]}")
    assert diffs[0] <= 1e-5 and max(diffs) <= 1e-3, diffs
    assert abs(fast["saved_model_eval_loss"] - fast["best_eval_loss"]) < 1e-4  # packed eval = reloaded model's
    compiled = runs["compiled"]
    layers = json.loads((tiny_world / "models" / "qwen3" / "config.json").read_text())["num_hidden_layers"]
    assert (fast["torch_compile"], fast["torch_compile_regions"]) == (0, 0)
    assert compiled["torch_compile"] == 1 and compiled["torch_compile_regions"] >= layers, compiled
    assert (fast["dataloader_num_workers"], compiled["dataloader_num_workers"]) == (0, 2)
    assert compiled["train_tokens"] == fast["train_tokens"]
    for e in range(3):
        assert abs(compiled[f"eval_loss_epoch{e}"] - fast[f"eval_loss_epoch{e}"]) <= 1e-5, (compiled, fast)


FIT_DRIVER = """
import contextlib
import json
import sys

from quantune import sft
from quantune.lib.config import load_config
from quantune.lib.trainer import fitted_step, step_shape


def chose_2_by_4(recipe, model, train_ds, coll, device):  # what the GPU's trials would choose, stood in
    changes = dict(recipe["speed_changes"])
    run = fitted_step(recipe, recipe["speed_written"], changes, (2, 4))
    return {**run, "speed_changes": changes}, {"trials": "eager", "activation_mib_per_position": 1.0,
                                                "available_gib": 1.0, "one_micro_batch_gib": 2.0,
                                                "chosen": step_shape(run)}


def recording(count):  # each micro-batch the Trainer trains on, with the DeepSpeed engine's accumulation then
    class Recording(counting_trainer(count)):
        def training_step(self, model, inputs, *a, **k):
            seen.append([int(inputs["input_ids"].numel()), self.model_wrapped.gradient_accumulation_steps()])
            return super().training_step(model, inputs, *a, **k)

    return Recording


recipe, out, results, fit = sys.argv[1:5]
seen, counting_trainer = [], sft.counting_trainer
sft.counting_trainer = recording
if fit == "fit":
    sft.fits_fast_step = lambda *a: True
    sft.fit_fast_step = chose_2_by_4
sft.train(recipe, out, load_config(overrides={"results": {"tiny": results, "full": results + "/full"}}), 0)
json.dump(seen, open(out + "/micro_batches.json", "w"))
"""


@pytest.mark.slow
def test_fitted_fast_step_is_the_step_the_trainer_and_deepspeed_run(tiny_world, results_root, tmp_path):
    """The sft fast mode's fit (stood in: it chose 2 x 4 for the step's 8 rows) changes the recipe after the Trainer's
    first arguments exist; the stage rebuilds them, so the run (one CPU rank under DeepSpeed) trains 4 micro-batches
    a step with DeepSpeed's engine accumulating 4, as a recipe written as that step does (packed, 2 x 4, no
    checkpointing, speed seed), to the same eval loss at every epoch (asserted 1e-6), with fast_memory_plan and
    speed_changes saying what the fit changed. Without the rebuild the Trainer ran fast's 8 x 1 (checked: one
    micro-batch a step; the losses alone cannot tell, the loss being each step's token-level mean either way)."""
    from quantune.lib.common import free_port

    tiny = {"num_train_epochs": 2, "max_rows": 120, "max_seq_len": 64, "logging_steps": 1}
    recipes = {"fit": recipe_copy(tmp_path / "fit", tiny={**tiny, "per_device_train_batch_size": 4,
                                                          "gradient_accumulation_steps": 2,
                                                          "gradient_checkpointing": True},
                                  top={"speed": "fast"}),
               "written": recipe_copy(tmp_path / "written", tiny={**tiny, "per_device_train_batch_size": 2,
                                                                  "gradient_accumulation_steps": 4,
                                                                  "gradient_checkpointing": False},
                                      top={"speed": "seed", "padding": "packed"})}
    runs = {}
    for name, recipe in recipes.items():
        env = {**sft_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu",
               "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        out = tmp_path / name / "out"
        r = subprocess.run([sys.executable, "-c", FIT_DRIVER, str(recipe), str(out), str(results_root), name],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[name] = json.loads((out / "metrics.json").read_text())
    fit, written = runs["fit"], runs["written"]
    assert (fit["per_device_train_batch_size"], fit["gradient_accumulation_steps"]) == (2, 4)
    assert fit["speed_changes"] == {"padding": "packed", "gradient_checkpointing": 0,
                                    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
    assert fit["fast_memory_plan"]["chosen"] == "2 x 4, no checkpointing" and "fast_memory_plan" not in written
    assert fit["global_step"] == written["global_step"] > 0
    for name in runs:
        seen = json.loads((tmp_path / name / "out" / "micro_batches.json").read_text())
        assert len(seen) == 4 * runs[name]["global_step"] and {acc for _, acc in seen} == {4}, (name, seen)
    for e in range(3):
        assert abs(fit[f"eval_loss_epoch{e}"] - written[f"eval_loss_epoch{e}"]) <= 1e-6, (e, fit, written)


def test_prompt_mask_switch_truncation_and_eos(tiny_qwen3):
    from quantune.lib.sft_data import IGNORE, collator, encode_pair

    _, recipe, model, tok, rows = tiny_qwen3
    tmpl = recipe["prompt_template"]
    assert tmpl == "Human: {prompt} \n Assistant: "
    row = max(rows, key=lambda r: len(r["prompt"]))  # long: the prompt must be cut, the response kept
    tail = tok(" \n Assistant: ", add_special_tokens=False)["input_ids"]
    resp = tok(row["chosen"], add_special_tokens=False)["input_ids"]
    for mask in (False, True):
        e = encode_pair(tok, row["prompt"], row["chosen"], tmpl, 64, mask)
        ids, labels = e["input_ids"], e["labels"]
        assert len(ids) == 64 and e["truncated"] == 1
        n_prompt = next(i for i in range(len(ids)) if ids[i:i + len(tail)] == tail) + len(tail)
        assert 64 - n_prompt >= (64 - len(tail)) // 2, f"the response kept only {64 - n_prompt} of 64 tokens"
        assert ids[n_prompt:] == resp[:64 - n_prompt], "the response is the chosen text's first tokens"
        if mask:
            assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        else:
            assert labels == ids
    short = min(rows, key=lambda r: len(r["prompt"]) + len(r["chosen"]))
    e = encode_pair(tok, short["prompt"], short["chosen"], tmpl, 512, True)
    assert e["truncated"] == 0 and e["input_ids"][-1] == tok.eos_token_id and e["labels"][-1] == tok.eos_token_id
    # padding is masked by position, not by id: with pad == eos (as in many chat models) the real eos stays a
    # target, where the seed's `labels[ids == pad] = -100` would drop it
    tok_pe = tok.__class__.from_pretrained(tok.name_or_path)
    tok_pe.pad_token = tok_pe.eos_token
    tok_pe.padding_side = "right"
    feats = [{k: v for k, v in encode_pair(tok_pe, r["prompt"], r["chosen"], tmpl, 512, False).items()
              if k != "truncated"} for r in (short, rows[0])]
    b = collator(tok_pe)(feats)
    n = len(feats[0]["input_ids"])
    assert b["labels"][0, n - 1].item() == tok_pe.eos_token_id and (b["labels"][0, n:] == IGNORE).all()


def test_split_is_90_10_with_the_recipe_seed(tiny_qwen3):
    from quantune.lib.sft_data import dedupe_pairs, split_rows

    _, recipe, _, _, loaded = tiny_qwen3
    assert recipe["seed"] == 42 and recipe["eval_fraction"] == 0.1 and recipe["dedupe"] is True
    rows = dedupe_pairs(loaded)  # the generated set repeats (prompt, chosen) with other rejected answers
    assert len(rows) == len({(r["prompt"], r["chosen"]) for r in loaded}) < len(loaded) == 300
    tr, ev = split_rows(rows, 0.1, 42)
    tr2, ev2 = split_rows(rows, 0.1, 42)
    _, ev_other = split_rows(rows, 0.1, 7)
    assert len(ev) == math.ceil(0.1 * len(rows)) and len(tr) + len(ev) == len(rows), (len(tr), len(ev))
    key = lambda d: sorted(json.dumps(r, sort_keys=True) for r in d)  # noqa: E731
    assert key(ev) == key(ev2), "the split must be fixed by the seed"
    assert key(ev) != key(ev_other)
    assert sorted(key(ev) + key(tr)) == key(rows), "the two parts must be the split's rows, each once"
    pairs = lambda d: {(r["prompt"], r["chosen"]) for r in d}  # noqa: E731
    assert not pairs(tr) & pairs(ev), "an eval example is also a train example"


def test_packed_rows_are_refused_for_remote_code(tmp_path):
    """As lora_sft: packed rows would attend to each other in remote code (chatglm3-6b at full scale)."""
    from quantune.lib.common import QuantuneError
    from quantune.lib.config import load_config, load_recipe

    p = recipe_copy(tmp_path, top={"model": "chatglm3-6b", "padding": "packed"})
    with pytest.raises(QuantuneError) as e:
        load_recipe(p, load_config(overrides={"scale": "full"}))
    assert str(e.value) == (f"{p}: key padding: model 'chatglm3-6b' runs remote code here, which would attend across "
                            "packed rows; fix: use padding: longest at this scale"), str(e.value)


def test_real_keys_keep_the_seed_values(tmp_path):
    from quantune.lib.config import load_config, load_recipe

    full = load_recipe(RECIPE, load_config(overrides={"scale": "full"}))
    seed = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 4, "gradient_accumulation_steps": 4,
            "num_train_epochs": 10, "learning_rate": 5e-6, "max_seq_len": 512, "seed": 42, "bf16": True,
            "gradient_checkpointing": True, "lora_dim": 8, "lora_lr": 1e-4, "only_optimize_lora": False}
    assert {k: full[k] for k in seed} == seed
    # ZeRO-1 on its one GPU (auto follows the ranks: ZeRO-2 on several) and rows padded to 512
    assert full["deepspeed_config"] == "recipes/deepspeed/zero1.json" and full["early_stopping_patience"] >= 1
    assert full["zero_choice"].startswith("auto, one rank") and full["padding"] == "max_length"
    assert full["speed"] == "fast"
    for name in ("zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"):
        ds = json.loads((ROOT / "recipes" / "deepspeed" / name).read_text())
        assert ds["bf16"]["enabled"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"
    z3 = json.loads((ROOT / "recipes" / "deepspeed" / "zero3.json").read_text())["zero_optimization"]
    assert z3["stage"] == 3 and z3["stage3_gather_16bit_weights_on_model_save"] is True


ADAMW_STEPS = r"""
import copy, json, sys
import deepspeed, deepspeed.ops, torch
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # one CPU rank: not needed, and a C++ build
ds = json.loads(open(sys.argv[1]).read())
fill = {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 8, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0}
ds.update({k: v for k, v in fill.items() if ds.get(k) == "auto"})
ds["bf16"]["enabled"] = True
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
plain = copy.deepcopy(model).bfloat16()  # the reference: bf16 weights, fp32 master copies, torch AdamW
master = [p.detach().float().requires_grad_() for p in plain.parameters()]
ref_opt = torch.optim.AdamW(master, lr=1e-2, weight_decay=0.0)
engine, _, _, _ = deepspeed.initialize(model=model, config=ds,
                                       optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0))
x, y = torch.randn(8, 16), torch.randn(8, 4)
for _ in range(3):
    loss = ((engine(x.bfloat16()).float() - y) ** 2).mean()
    engine.backward(loss)
    engine.step()
    plain.zero_grad()
    ((plain(x.bfloat16()).float() - y) ** 2).mean().backward()
    for m, p in zip(master, plain.parameters()):
        m.grad = p.grad.float()
    torch.nn.utils.clip_grad_norm_(master, 1.0)
    ref_opt.step()
    with torch.no_grad():
        for m, p in zip(master, plain.parameters()):
            p.copy_(m)
print(max((a.float() - b.float()).abs().max().item() for a, b in zip(engine.module.parameters(), plain.parameters())))
"""


@pytest.mark.parametrize("ds_file", ["auto", "recipes/deepspeed/zero0.json"])
def test_one_rank_bf16_training_steps_as_plain_adamw(ds_file, tmp_path):
    """What `deepspeed_config: auto` picks for one rank must update bf16 weights as torch's AdamW on fp32 master
    copies with clipping does (seed 003's optimizer), bit for bit after 3 steps. ZeRO-0's bf16 wrapper in DeepSpeed
    0.19 does not: it takes a zero-gradient AdamW step when it starts, so each update is bias-corrected one step
    late; that is why auto no longer picks it (the zero0.json case shows the difference)."""
    from quantune.lib.common import free_port
    from quantune.sft import AUTO_ZERO

    path = ROOT / (AUTO_ZERO[True] if ds_file == "auto" else ds_file)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", ADAMW_STEPS, str(path)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    diff = float(p.stdout.strip().splitlines()[-1])
    if ds_file == "auto":
        assert diff == 0.0, diff
    else:
        assert diff > 1e-3, diff  # measured: 8.8e-3 (the first update 0.74x AdamW's)


# ---------------------------------------------------------------- bad input: one line, before any launch

@pytest.mark.parametrize("case", ["fits", "split", "none_fits"])
def test_fast_mode_fits_its_step_to_the_gpu_beside_deepspeeds_optimizer_states(monkeypatch, case):
    """sft.fit_fast_step with the GPU's memory and the trials' measurements stood in (0.25 GiB fixed + 1 MB a
    position; 28 rows of 100 tokens and 4 of 300): what the plan may use is what the GPU has less DeepSpeed's
    optimizer states (16 bytes a trainable parameter: 1e9 here, 14.9 GiB) and 5% of the card. The step's 32 rows
    stay one micro-batch where they fit, else the fewest micro-batches that fit, else seed 003's 8 x 4 with
    checkpointing on; speed_changes keeps only what then differs from the recipe as written, and the model went to
    the rank's device and to bf16 first, as DeepSpeed's engine puts it."""
    import datasets
    import torch

    from quantune import sft
    from quantune.lib import trainer

    class Param:
        requires_grad = True

        def numel(self):
            return 10**9

    class Model:
        moves: list = []

        def parameters(self):
            return [Param()]

        def to(self, where):
            self.moves.append(where)
            return self

    def trial(model, batch, dtype):
        assert dtype == torch.bfloat16
        return 2**28 + 1e6 * batch["input_ids"].numel()

    gib = 2**30
    # what the plan may use, against a whole step (4,000 positions: (0.27e9 + 4e9) x 1.1 = 4.69e9 bytes) and half a
    # step (the 4 long rows among 16: 2,400 positions, 2.94e9): room for both, for the half only, for neither
    room = {"fits": 5e9, "split": 3.5e9, "none_fits": 0.3e9}[case]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (room + 16e9 + 0.05 * 80 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 3 * gib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(trainer, "activation_bytes", trial)
    fast = {"padding": "packed", "per_device_train_batch_size": 32, "gradient_accumulation_steps": 1,
            "gradient_checkpointing": False}
    written = {"padding": "max_length", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
               "gradient_checkpointing": True}
    recipe = {"name": "t", "speed": "fast", "bf16": True, "num_train_epochs": 2, **fast,
              "speed_changes": dict(fast), "speed_written": written}
    assert sft.fits_fast_step(recipe, 1, 1) and not sft.fits_fast_step(recipe, 1, 3)
    assert not sft.fits_fast_step(recipe, 0, 1) and not sft.fits_fast_step({**recipe, "speed": "seed"}, 1, 1)
    ds = datasets.Dataset.from_list([{"input_ids": [1] * n} for n in [100] * 28 + [300] * 4])
    model = Model()
    run, plan = sft.fit_fast_step(recipe, model, ds, lambda rows: {"input_ids": torch.ones(1, sum(
        len(x["input_ids"]) for x in rows))}, "cuda:0")
    assert model.moves == ["cuda:0", torch.bfloat16]
    step = {"fits": (32, 1, False), "split": (16, 2, False), "none_fits": (8, 4, True)}[case]
    assert (run["per_device_train_batch_size"], run["gradient_accumulation_steps"],
            run["gradient_checkpointing"]) == step
    assert plan["chosen"] == f"{step[0]} x {step[1]}, " + ("checkpointing on" if step[2] else "no checkpointing")
    assert plan["available_gib"] == round(room / gib, 2)
    want = {"fits": fast, "split": {**fast, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2},
            "none_fits": {"padding": "packed"}}[case]
    assert run["speed_changes"] == want and recipe["speed_changes"] == fast  # the caller's recipe is left as it was
    import jsonschema

    common = yaml.safe_load((ROOT / "config" / "schemas" / "metrics" / "common.schema.yaml").read_text())
    jsonschema.validate(plan, common["$defs"]["fast_memory_plan"])


@pytest.mark.parametrize("case", ["missing_zero_file", "zero_disagrees", "unknown_key", "wrong_format",
                                  "lora_zero3_not_gathered", "liger_without_gpu"])
def test_bad_input_is_one_line_before_any_launch(case, tmp_path, tiny_world, results_root):
    if case == "missing_zero_file":
        p, want = recipe_copy(tmp_path, top={"deepspeed_config": "recipes/deepspeed/zero9.json"}), \
            "key deepspeed_config: "
        fix = "fix: name a file under recipes/deepspeed/"
    elif case == "zero_disagrees":
        z = tmp_path / "z.json"
        z.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
        p, want, fix = recipe_copy(tmp_path, top={"deepspeed_config": str(z)}), \
            f"{z}: key bf16.enabled: True disagrees with the recipe's False", 'fix: set it to "auto"'
    elif case == "unknown_key":
        p, want, fix = recipe_copy(tmp_path, tiny={"lora_rank": 8}), "(tiny block): key lora_rank: unknown key", \
            "fix: remove it or use one of:"
    elif case == "wrong_format":
        p, want, fix = recipe_copy(tmp_path, top={"dataset": "wikitext2"}), \
            "key dataset: 'wikitext2' has format 'text'", "fix: use a data set of format pref"
    elif case == "liger_without_gpu":
        p, want, fix = recipe_copy(tmp_path, top={"liger_kernel": True}), \
            "key liger_kernel: liger-kernel's Triton kernels need a CUDA GPU and this run has none", \
            "fix: set liger_kernel: false on this machine"
    else:
        z = tmp_path / "z3.json"
        z.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
        p, want, fix = recipe_copy(tmp_path, top={"deepspeed_config": str(z), "only_optimize_lora": True}), \
            f"{z}: key zero_optimization.stage3_gather_16bit_weights_on_model_save", "fix: set it to true"
    r = subprocess.run(sft_cmd(p, tmp_path / "out", results_root), cwd=ROOT, env=sft_env(),
                       capture_output=True, text=True, timeout=120)
    err = [l for l in r.stderr.splitlines() if l.startswith("quantune: error:")]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(err) == 1 and want in err[0] and fix in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "launch:" not in r.stdout, "nothing may start before the checks"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- built for real (slow)

@pytest.mark.slow
def test_sft_target_builds_on_the_tiny_world(tiny_world, results_root):
    from transformers import AutoModelForCausalLM

    from quantune.lib.common import checkpoint_dir
    from quantune.lib.tb import read_scalars

    # mtime only: a reused tiny world (QUANTUNE_TEST_RESULTS) is not rebuilt because someone edited its rules
    snakemake("qwen3_deepspeed_sft", "--rerun-triggers", "mtime", results=results_root)
    out = results_root / "qwen3_deepspeed_sft"
    m = json.loads((out / "metrics.json").read_text())
    assert m["scale"] == "tiny" and m["launcher"] == "deepspeed" and m["world_size"] == 1
    assert m["zero_stage"] == 1 and m["zero_choice"].startswith("auto, one rank") and m["device"] == "cpu"
    # the recipe runs fast: seed 003's 8 x 4 rows, padded to max_seq_len with checkpointing, as one packed
    # micro-batch of 32 rows per step without it
    assert (m["speed"], m["padding"], m["gradient_checkpointing"]) == ("fast", "packed", 0)
    assert m["speed_changes"] == {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 1,
                                  "gradient_checkpointing": False, "padding": "packed"} and m["pad_fraction"] == 0
    assert m["rows_split"] == 300 and m["rows_train"] + m["rows_eval"] == 300 - m["rows_duplicate_pairs_dropped"]
    assert m["rows_eval"] == math.ceil(0.1 * (m["rows_train"] + m["rows_eval"]))
    epochs = m["epochs_planned"]
    ppl = [m[f"eval_ppl_epoch{e}"] for e in range(epochs + 1)]
    for e in range(epochs):  # epoch 0 is the model before training (the seed's first eval)
        assert ppl[e + 1] < ppl[e], f"eval ppl did not fall at epoch {e + 1}: {[round(p, 2) for p in ppl]}"
    assert ppl[-1] < 0.5 * ppl[0], f"eval ppl {ppl[0]:.1f} -> {ppl[-1]:.1f}: less than halved"
    for e in range(epochs + 1):
        assert math.isclose(m[f"eval_ppl_epoch{e}"], math.exp(m[f"eval_loss_epoch{e}"]), rel_tol=1e-9)
    assert m["best_epoch"] == min(range(1, epochs + 1), key=lambda e: m[f"eval_loss_epoch{e}"])
    # the output reloads with transformers and scores the eval split as the best epoch did
    saved, best = m["saved_model_eval_loss"], m["best_eval_loss"]
    assert abs(saved - best) < 1e-4, f"the saved model scores {saved:.6f}, the best epoch {best:.6f}"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.model_type == "qwen3" and (out / "model" / "tokenizer.json").is_file()
    assert not checkpoint_dir(out).exists(), "checkpoints are removed after success (model/ is the best)"
    tags = read_scalars(out / "tb")
    assert {"train/loss", "train/lr", "eval/loss", "eval/ppl", "system/tokens_per_s",
            "final/best_eval_ppl", "final/mfu"} <= set(tags), sorted(tags)
    assert "train/grad_norm" in tags  # ZeRO-1 keeps the norm it clips with (ZeRO-0 in fp32 did not)
    assert len(tags["eval/ppl"]) == epochs + 1
    r = snakemake("-n", "qwen3_deepspeed_sft", "--rerun-triggers", "mtime", results=results_root)
    assert "Nothing to be done" in r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("speed", ["seed", "fast"])
def test_zero3_run_resumes_after_a_kill(tiny_world, results_root, tmp_path, speed):
    """ZeRO-3 without gathering weights on save: the output is consolidated by DeepSpeed's zero_to_fp32. In both
    speed modes (fast: packed rows, one micro-batch per step, collated by two data-loader workers as auto gives the
    fast mode on a GPU)."""
    from transformers import AutoModelForCausalLM

    from quantune.lib.common import checkpoint_dir
    from quantune.lib.trainer import complete_checkpoints

    zero = json.loads((ROOT / "recipes/deepspeed/zero3.json").read_text())
    zero["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    (tmp_path / "zero3_sharded.json").write_text(json.dumps(zero))
    recipe = recipe_copy(tmp_path, tiny={"deepspeed_config": str(tmp_path / "zero3_sharded.json"),
                                         "num_train_epochs": 3, "max_rows": 120, "max_seq_len": 64,
                                         "gradient_checkpointing": False, "logging_steps": 1},
                         top={"speed": speed, "dataloader_num_workers": 2 if speed == "fast" else 0})
    out = tmp_path / "out"
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(sft_cmd(recipe, out, results_root), cwd=ROOT, env=sft_env(), stdout=log1,
                            stderr=subprocess.STDOUT, start_new_session=True)
    first = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = complete_checkpoints(checkpoint_dir(out))
            if done:
                first = done[0]
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher, its launch.py and the rank: all ours
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log1.close()
    assert first is not None, (tmp_path / "run1.log").read_text()[-3000:]
    assert not (out / "metrics.json").exists(), "killed after the first epoch, the run must not have finished"
    step1 = int(first.name.split("-")[1])
    r = subprocess.run(sft_cmd(recipe, out, results_root), cwd=ROOT, env=sft_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from" in r.stdout, r.stdout[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["zero_stage"] == 3 and m["resumed_from_step"] >= step1 > 0, (m["resumed_from_step"], step1)
    assert m["speed"] == speed and m["padding"] == ("packed" if speed == "fast" else "max_length")
    assert m["dataloader_num_workers"] == (2 if speed == "fast" else 0)
    from quantune.lib.tb import read_scalars

    assert "train/grad_norm" in read_scalars(out / "tb")  # DeepSpeed's ZeRO optimizer keeps the global norm
    assert m["epochs_run"] == 3 and m["global_step"] == 3 * step1, (m["global_step"], step1)
    # the history before the kill came back with the checkpoint: every epoch's eval is there
    ppl = [m[f"eval_ppl_epoch{e}"] for e in range(4)]
    assert ppl[3] < ppl[0], ppl
    # ZeRO-3 shards consolidated into one Hugging Face checkpoint that reloads and scores like the best epoch
    saved, best = m["saved_model_eval_loss"], m["best_eval_loss"]
    assert abs(saved - best) < 1e-4, f"the saved model scores {saved:.6f}, the best epoch {best:.6f}"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in model.parameters()) == m["params_total"] > 1_000_000


@pytest.mark.slow
def test_lora_switch_trains_adapters_and_merges_them(tiny_world, results_root, tmp_path):
    """Under ZeRO-3 (adapter gathered on save). Also early stopping: an improvement must exceed 10 nats to
    count, so with patience 1 the run stops long before its 4 epochs."""
    import torch
    from transformers import AutoModelForCausalLM

    recipe = recipe_copy(tmp_path, tiny={"only_optimize_lora": True, "num_train_epochs": 4, "max_rows": 120,
                                         "deepspeed_config": str(ROOT / "recipes/deepspeed/zero3.json"),
                                         "max_seq_len": 64, "lora_lr": 3e-3, "early_stopping_patience": 1,
                                         "early_stopping_threshold": 10.0})
    out = tmp_path / "out"
    r = subprocess.run(sft_cmd(recipe, out, results_root), cwd=ROOT, env=sft_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["only_optimize_lora"] == 1 and m["lora_dim"] == 8 and m["learning_rate"] == 3e-3 and m["zero_stage"] == 3
    assert 0 < m["params_trainable_pct"] < 10, m["params_trainable_pct"]
    assert m["eval_loss_epoch1"] < m["eval_loss_epoch0"], (m["eval_loss_epoch0"], m["eval_loss_epoch1"])
    assert m["early_stopped"] == 1 and m["epochs_run"] < 4, (m["early_stopped"], m["epochs_run"])
    assert not (out / "model" / "adapter_config.json").exists(), "the output is merged, not an adapter"
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_world / "models" / "qwen3")
    w = "model.layers.0.self_attn.q_proj.weight"
    diff = (merged.state_dict()[w] - base.state_dict()[w]).abs().max().item()
    assert diff > 1e-6, f"merged q_proj equals the base ({diff})"
    emb = "model.embed_tokens.weight"
    assert torch.equal(merged.state_dict()[emb], base.state_dict()[emb]), "LoRA must not touch the embeddings"
    saved, best = m["saved_model_eval_loss"], m["best_eval_loss"]
    assert abs(saved - best) < 1e-4, f"the saved model scores {saved:.6f}, the best epoch {best:.6f}"
