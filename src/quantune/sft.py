"""Supervised fine-tuning under DeepSpeed (seed 003): full-parameter, or LoRA only, on prompt/chosen pairs.

    python -m quantune.sft --recipe recipes/qwen3_deepspeed_sft.yaml --out results/qwen3_deepspeed_sft [--num-gpus N]

The command launches itself. It first checks the config, the recipe, its ZeRO file, the model and the data set
(one-line errors, before any process starts), then replaces itself (exec) with the DeepSpeed launcher
(`python -m deepspeed.launcher.runner`, what the `deepspeed` command runs; it passes a SIGTERM on to the ranks)
with one rank per GPU, each rank being `python -m quantune.sft --worker ...`. With `--num-gpus 0` (scale tiny)
it runs one rank on the CPU (`DS_ACCELERATOR=cpu`, gloo, one thread). Why the step and not the rule calls the
launcher: one checked command for the rule, the tests and a user; a free rendezvous port per job (two jobs on one
node never share 29500); and the GPUs a scheduler assigned (CUDA_VISIBLE_DEVICES, as `srun --gpus=N` or GPU_RUN
set it) are the ones the ranks use, where `deepspeed --num_gpus N` would ignore them and take devices 0..N-1.

Each rank runs the Hugging Face Trainer with the recipe's ZeRO config (`deepspeed=`). Text is
`<template with the prompt><chosen><eos>` ("Human: <prompt> \\n Assistant: <chosen>", as in the seed), labels are
the input ids with padding (always) and, by the recipe's `mask_prompt`, the prompt set to -100; dynamic padding by
`DataCollatorForSeq2Seq`. The recipe's split is cut 90/10 (`datasets` `train_test_split(test_size, seed)`).
Evaluation every epoch (and before the first: the seed's "epoch 0"), eval loss and perplexity to TensorBoard and
metrics.json, the best epoch's model kept (`load_best_model_at_end`), early stopping, resume from the last complete
checkpoint in `results/.checkpoints/<target>/`. The output `<out>/model/` is a Hugging Face model directory (ZeRO-3 shards
gathered on save, or consolidated with DeepSpeed's zero_to_fp32; LoRA adapters merged), re-evaluated after
loading with `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from .lib.common import ROOT, atomic_dir, checkpoint_dir, fail, free_port, run_cli, write_metrics

IGNORE = -100

# ================================================================ checks (before any process starts)

def ds_config_path(recipe: dict) -> Path:
    p = Path(recipe["deepspeed_config"])
    return p if p.is_absolute() else ROOT / p


def check_deepspeed_config(recipe: dict, where: str) -> dict:
    """Read the recipe's ZeRO file; keys the Trainer fills from the recipe must be "auto" or agree with it."""
    path = ds_config_path(recipe)
    key = f"{where}: key deepspeed_config"
    if not path.is_file():
        raise fail(key, f"{path} not found", "name a file under recipes/deepspeed/ (zero2.json, zero3.json, ...)")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise fail(f"{path}:{e.lineno}", f"invalid JSON ({e.msg})", "fix the DeepSpeed config") from None
    if not isinstance(ds, dict):
        raise fail(str(path), "a DeepSpeed config must be a JSON object", "see recipes/deepspeed/zero2.json")
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise fail(f"{path}: key zero_optimization.stage", f"value {stage!r} is not a ZeRO stage", "use 0, 1, 2 or 3")
    lora = recipe["only_optimize_lora"]
    agree = {
        "train_micro_batch_size_per_gpu": recipe["per_device_train_batch_size"],
        "gradient_accumulation_steps": recipe["gradient_accumulation_steps"],
        "gradient_clipping": recipe["max_grad_norm"],
        "bf16.enabled": recipe["bf16"],
    }
    for dotted, want in agree.items():
        node = ds
        for part in dotted.split("."):
            node = node.get(part, "auto") if isinstance(node, dict) else "auto"
        if node != "auto" and node != want:
            raise fail(f"{path}: key {dotted}", f"{node!r} disagrees with the recipe's {want!r}",
                       'set it to "auto" (the recipe decides)')
    gather = (ds.get("zero_optimization") or {}).get("stage3_gather_16bit_weights_on_model_save", False)
    if lora and stage == 3 and gather is not True:
        raise fail(f"{path}: key zero_optimization.stage3_gather_16bit_weights_on_model_save",
                   "LoRA under ZeRO-3 needs the adapter gathered on save",
                   "set it to true (recipes/deepspeed/zero3.json does)")
    if (ds.get("fp16") or {}).get("enabled") is True:
        raise fail(f"{path}: key fp16.enabled", "fp16 is not supported by this stage", "use the recipe's bf16 key")
    return ds


def check_recipe(recipe: dict, cfg: dict, where: str) -> dict:
    """sft's cross-key checks (config.load_recipe calls them): prompt template, ZeRO file, data format."""
    from .lib.config import resolve_dataset

    recipe = {"max_rows": None, "early_stopping_patience": None, **recipe}
    if "{prompt}" not in recipe["prompt_template"]:
        raise fail(f"{where}: key prompt_template", "has no {prompt} placeholder",
                   "write e.g. 'Human: {prompt} \\n Assistant: '")
    check_deepspeed_config(recipe, where)
    ds = resolve_dataset(cfg, recipe["dataset"], where=where)
    if ds["format"] != "pref":
        raise fail(f"{where}: key dataset", f"{recipe['dataset']!r} has format {ds['format']!r}",
                   "use a data set of format pref (prompt/chosen/rejected), e.g. summary_pref")
    return recipe


def check_inputs(recipe_path: str, cfg: dict) -> dict:
    """The checked recipe, its model and, for local data, enough rows for the split and the batch."""
    from .lib.config import load_recipe, resolve_dataset, resolve_model
    from .lib.data import load_split

    recipe = load_recipe(recipe_path, cfg)
    where = str(recipe_path)
    if recipe["stage"] != "sft":
        raise fail(f"{where}: key stage", f"{recipe['stage']!r} is not sft", "run this recipe with its own stage")
    resolve_model(cfg, recipe["model"], where=where, must_exist=True)
    ds = resolve_dataset(cfg, recipe["dataset"], where=where)
    if ds["local"]:
        rows = load_split(ds, recipe["split"], recipe["max_rows"])  # field checks: one line per bad row
        rows = dedupe_pairs(rows) if recipe["dedupe"] else rows
        n_eval = math.ceil(len(rows) * recipe["eval_fraction"])
        if len(rows) - n_eval < recipe["per_device_train_batch_size"] or n_eval < 1:
            raise fail(f"{ds['source']} ({recipe['split']})", f"{len(rows)} rows are too few for a "
                       f"{1 - recipe['eval_fraction']:.0%}/{recipe['eval_fraction']:.0%} split and batch "
                       f"{recipe['per_device_train_batch_size']}", "give more rows or lower the batch size")
    return recipe


# ================================================================ data

def dedupe_pairs(rows: list[dict]) -> list[dict]:
    """SFT trains on (prompt, chosen) only: preference data often repeats a pair with several rejected answers
    (the tiny set: 300 rows, 169 pairs). Keep each pair once, so no eval example is also a train example."""
    seen, out = set(), []
    for r in rows:
        k = (r["prompt"], r["chosen"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def split_rows(rows: list[dict], eval_fraction: float, seed: int):
    """The seed's 90/10 split: `datasets` train_test_split with the recipe's seed."""
    import datasets

    parts = datasets.Dataset.from_list(rows).train_test_split(test_size=eval_fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def encode_pair(tok, prompt: str, response: str, template: str, max_len: int, mask_prompt: bool) -> dict:
    """Token ids and labels of one example: `<template head><prompt><template tail><response><eos>`.

    The pieces are tokenized separately, so the prompt ends exactly where an inference prompt ends
    ("... Assistant: ") and the prompt/response boundary is exact. Too long: the prompt is cut at its end
    (its head, with the instruction, stays; the template's tail always stays), the response keeps at least
    half of the tokens left beside the template's tail; a cut response gets no eos. Labels: the ids, with the
    prompt set to -100 when mask_prompt (padding is the collator's)."""
    head, tail = template.split("{prompt}", 1)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    a, b, c = enc(head + prompt), enc(tail), enc(response)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
    budget = max_len - len(bos) - len(b)
    if budget < 4:
        raise fail("recipe: key max_seq_len", f"{max_len} leaves no room after the prompt template",
                   "raise max_seq_len or shorten prompt_template")
    truncated = len(a) + len(c) + 1 > budget
    if truncated:
        need_c = len(c) + 1
        r = min(need_c, max(budget - len(a), budget // 2))
        cut_response = r < need_c
        c = c[:r] if cut_response else c
        a = a[:budget - len(c) - (0 if cut_response else 1)]
    else:
        cut_response = False
    resp = c + ([] if cut_response else [tok.eos_token_id])
    prompt_ids = bos + a + b
    ids = prompt_ids + resp
    labels = ([IGNORE] * len(prompt_ids) if mask_prompt else list(prompt_ids)) + list(resp)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "truncated": int(truncated)}


def tokenize(ds, tok, recipe: dict):
    cols = ds.column_names

    def fn(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": [], "truncated": []}
        for p, c in zip(batch["prompt"], batch["chosen"]):
            e = encode_pair(tok, p, c, recipe["prompt_template"], recipe["max_seq_len"], recipe["mask_prompt"])
            for k in out:
                out[k].append(e[k])
        return out

    return ds.map(fn, batched=True, remove_columns=cols, desc="tokenize")


def collator(tok, pad_to_multiple_of: int | None = None):
    """Dynamic padding (to the longest in the batch): ids with pad, attention 0, labels -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE,
                                  pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


def prepare_data(cfg: dict, recipe: dict, tok):
    from .lib.config import resolve_dataset
    from .lib.data import load_split

    loaded = load_split(resolve_dataset(cfg, recipe["dataset"]), recipe["split"], recipe["max_rows"])
    rows = dedupe_pairs(loaded) if recipe["dedupe"] else loaded
    train, evl = split_rows(rows, recipe["eval_fraction"], recipe["seed"])
    train, evl = tokenize(train, tok, recipe), tokenize(evl, tok, recipe)
    stats = {"rows_split": len(loaded), "rows_duplicate_pairs_dropped": len(loaded) - len(rows),
             "rows_train": len(train), "rows_eval": len(evl),
             "rows_truncated_train": int(sum(train["truncated"])),
             "tokens_mean_train": sum(map(len, train["input_ids"])) / max(len(train), 1),
             "label_tokens_train": sum(sum(1 for x in lab if x != IGNORE) for lab in train["labels"])}
    return train.remove_columns("truncated"), evl.remove_columns("truncated"), stats


def dataset_loss(model, ds, coll, batch_size: int) -> float:
    """Eval loss as the Trainer computes it: each batch's mean token loss, averaged over examples."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            feats = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
            batch = {k: v.to(device) for k, v in coll(feats).items()}
            loss = model(**batch).loss.float().item()
            total += loss * len(feats)
            n += len(feats)
    return total / max(n, 1)


# ================================================================ checkpoints

def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N directories the Trainer finished writing (trainer_state.json is written last)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / "trainer_state.json").is_file()), key=lambda p: int(p.name.split("-")[-1]))


def drop_incomplete_checkpoints(ckpt_dir: Path) -> list[str]:
    dropped = []
    if ckpt_dir.is_dir():
        complete = set(complete_checkpoints(ckpt_dir))
        for p in ckpt_dir.glob("checkpoint-*"):
            if p.is_dir() and p not in complete:
                shutil.rmtree(p, ignore_errors=True)
                dropped.append(p.name)
    return dropped


# ================================================================ the worker (one rank)

def _safe_exp(x: float) -> float:
    return math.exp(min(x, 50.0))


def epoch_evals(log_history: list[dict]) -> dict[int, float]:
    """Eval loss per epoch from the Trainer's log history (epoch 0: before training); the last wins."""
    out = {}
    for e in log_history:
        if "eval_loss" in e and "epoch" in e:
            out[int(round(e["epoch"]))] = float(e["eval_loss"])
    return dict(sorted(out.items()))


def count_params(model) -> dict:
    """Total / trainable parameters; a ZeRO-3 partitioned parameter counts its full size (ds_numel)."""
    total = trainable = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return {"params_total": total, "params_trainable": trainable,
            "params_trainable_pct": round(100.0 * trainable / max(total, 1), 4)}


def _build_model(source: str, recipe: dict, trust_remote_code: bool):
    from .lib.models import load_model

    model, tok = load_model(source, trust_remote_code=trust_remote_code, dtype="float32")
    tok.padding_side = "right"
    model.config.use_cache = False  # gradient checkpointing and training do not use the KV cache
    if recipe["only_optimize_lora"]:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=recipe["lora_dim"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                          target_modules=list(recipe["lora_target_modules"]), task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    return model, tok


def _finalize_model(trainer, tok, out: Path, recipe: dict, model_source: str, trust_remote_code: bool,
                    is_main: bool) -> Path:
    """Write <out>/model: a Hugging Face model directory (consolidated; LoRA merged). Collective: all ranks."""
    staging = out / ".model.partial"
    if is_main and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    base_cfg = getattr(unwrapped, "config", None)
    if base_cfg is not None:
        base_cfg.use_cache = True
    trainer.save_model(str(staging))  # ZeRO-3: gathers 16-bit weights when the config asks for it
    trainer.accelerator.wait_for_everyone()
    # from here on models load whole: a ZeRO-3 config left active would make from_pretrained partition them
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    final = out / "model"
    if not is_main:
        return final
    weights = list(staging.glob("*.safetensors")) + list(staging.glob("pytorch_model*.bin"))
    sharded = not weights and any(staging.glob("global_step*"))
    with atomic_dir(final) as tmp:
        if recipe["only_optimize_lora"]:
            from peft import PeftModel

            from .lib.models import load_model

            base, _ = load_model(model_source, trust_remote_code=trust_remote_code, dtype="float32")
            merged = PeftModel.from_pretrained(base, str(staging)).merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(tmp, safe_serialization=True)
        elif sharded:
            # stage3_gather_16bit_weights_on_model_save=false: the Trainer saved ZeRO shards; consolidate them
            # to fp32 with DeepSpeed's zero_to_fp32 into the model class (save_pretrained handles tied weights)
            import torch
            from deepspeed.utils.zero_to_fp32 import load_state_dict_from_zero_checkpoint
            from transformers import AutoConfig, AutoModelForCausalLM

            mcfg = AutoConfig.from_pretrained(str(staging), trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32, trust_remote_code=trust_remote_code)
            model = load_state_dict_from_zero_checkpoint(model, str(staging))
            model.save_pretrained(tmp, safe_serialization=True)
            for p in staging.iterdir():
                if p.is_file() and p.suffix == ".json" and not (tmp / p.name).exists():
                    shutil.move(str(p), tmp / p.name)
        else:
            for p in staging.iterdir():
                if p.name != "training_args.bin":
                    shutil.move(str(p), tmp / p.name)
        tok.save_pretrained(tmp)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def training_args(recipe: dict, output_dir: str, use_cpu: bool, **overrides):
    """The Trainer's arguments from the recipe (also what bench/deepspeed_gpu.py measures)."""
    from transformers import TrainingArguments

    kw = dict(
        output_dir=output_dir,
        deepspeed=str(ds_config_path(recipe)),
        per_device_train_batch_size=recipe["per_device_train_batch_size"],
        per_device_eval_batch_size=recipe["per_device_eval_batch_size"],
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        num_train_epochs=recipe["num_train_epochs"],
        learning_rate=recipe["learning_rate"],
        lr_scheduler_type=recipe["lr_scheduler_type"],
        warmup_steps=recipe["warmup_steps"],
        weight_decay=recipe["weight_decay"],
        max_grad_norm=recipe["max_grad_norm"],
        seed=recipe["seed"],
        data_seed=recipe["seed"],
        bf16=recipe["bf16"],
        gradient_checkpointing=recipe["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if recipe["gradient_checkpointing"] else None,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_total_limit=recipe["save_total_limit"],
        logging_strategy="steps",
        logging_steps=recipe["logging_steps"],
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=not use_cpu,
        remove_unused_columns=False,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _skip_cpu_shm_op() -> None:
    """One CPU rank (scale tiny): DeepSpeed's CPU accelerator JIT-compiles its shared-memory all-reduce op
    (used by inference_all_reduce between ranks of one host; 1-2 minutes of C++ on 2 cores) when its comm
    backend starts. Training never calls it: mark it unavailable (deepspeed.ops.__compatible_ops__, the
    module's cached probe result) and gloo alone serves the rank."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def callbacks_for(recipe: dict, writer) -> list:
    """Early stopping on the eval loss (when the recipe asks), TensorBoard and eval perplexity on rank 0."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    from .lib.tb import trainer_callback

    callbacks: list = []
    if recipe["early_stopping_patience"]:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe["early_stopping_patience"],
                                               early_stopping_threshold=recipe["early_stopping_threshold"]))
    if writer is not None:
        class EvalPerplexity(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kw):
                loss = (metrics or {}).get("eval_loss")
                if loss is not None:
                    writer.scalars({"eval/ppl": _safe_exp(loss)}, state.global_step)
                    print(f"epoch {state.epoch or 0:.2f} step {state.global_step}: eval loss {loss:.4f} "
                          f"ppl {_safe_exp(loss):.3f}", flush=True)

        callbacks += [trainer_callback(writer), EvalPerplexity()]
    return callbacks


def sft_metrics(recipe: dict, m: dict, zero: dict, world: int, device: str, lr: float, data_stats: dict,
                params: dict, evals: dict) -> dict:
    """The run's settings as it ran: recipe, ZeRO stage and offload, world size, data and parameter counts."""
    lora = recipe["only_optimize_lora"]
    return {
        "target": recipe["name"], "stage": "sft", "scale": recipe["scale"], "model": recipe["model"],
        "model_source": m["source"], "dataset": recipe["dataset"], "split": recipe["split"],
        "deepspeed_config": recipe["deepspeed_config"], "zero_stage": int(zero.get("stage", 0)),
        "zero_offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none"),
        "zero_offload_param": (zero.get("offload_param") or {}).get("device", "none"),
        "launcher": "deepspeed", "world_size": world, "device": device, "bf16": recipe["bf16"],
        "gradient_checkpointing": recipe["gradient_checkpointing"], "mask_prompt": recipe["mask_prompt"],
        "only_optimize_lora": lora, "lora_dim": recipe["lora_dim"] if lora else None, "learning_rate": lr,
        "per_device_train_batch_size": recipe["per_device_train_batch_size"],
        "per_device_eval_batch_size": recipe["per_device_eval_batch_size"],
        "gradient_accumulation_steps": recipe["gradient_accumulation_steps"],
        "global_batch_size": recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * world,
        "max_seq_len": recipe["max_seq_len"], "seed": recipe["seed"], "eval_fraction": recipe["eval_fraction"],
        **data_stats,
        "epochs_planned": recipe["num_train_epochs"], "epochs_run": max(evals) if evals else 0,
        "early_stopped": int(max(evals, default=0) < recipe["num_train_epochs"]),
        **params,
    }


def train(recipe_path: str, out: str, cfg: dict, num_gpus: int) -> dict | None:
    import torch
    from transformers import Trainer

    from .lib.common import seed_everything
    from .lib.config import resolve_model
    from .lib.tb import TBWriter, peak_memory_mb

    recipe = check_inputs(recipe_path, cfg)
    outp = Path(out)
    ckpt_dir = checkpoint_dir(outp)
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    if is_main:
        dropped = drop_incomplete_checkpoints(ckpt_dir)
        if dropped:
            print(f"dropped incomplete checkpoints: {', '.join(dropped)}", flush=True)
    lora = recipe["only_optimize_lora"]
    lr = recipe["lora_lr"] if lora else recipe["learning_rate"]
    use_cpu = num_gpus == 0
    if use_cpu and os.environ.get("WORLD_SIZE", "1") == "1":
        _skip_cpu_shm_op()
    # TrainingArguments first: with a ZeRO-3 config, from_pretrained then loads the model partitioned
    args = training_args(recipe, str(ckpt_dir), use_cpu, learning_rate=lr)
    seed_everything(recipe["seed"])
    m = resolve_model(cfg, recipe["model"], must_exist=True)
    model, tok = _build_model(m["source"], recipe, m["trust_remote_code"])
    params = count_params(model)
    train_ds, eval_ds, data_stats = prepare_data(cfg, recipe, tok)
    coll = collator(tok)

    resume = complete_checkpoints(ckpt_dir)
    resume_from = str(resume[-1]) if resume else None
    args.eval_on_start = resume_from is None  # the seed's "epoch 0" eval; a resumed run already has it
    if is_main and resume_from is None:  # a fresh run: no events of an earlier run of this target in its tb/
        shutil.rmtree(outp / "tb", ignore_errors=True)
    writer = TBWriter(outp / "tb") if is_main else None
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=coll,
                      processing_class=tok, callbacks=callbacks_for(recipe, writer))
    resumed = json.loads((Path(resume_from) / "trainer_state.json").read_text()) if resume_from else {}
    start_step, tokens_before = int(resumed.get("global_step", 0)), int(resumed.get("num_input_tokens_seen") or 0)
    if is_main:
        print(f"world size {args.world_size}, device {args.device}, ZeRO config {recipe['deepspeed_config']}, "
              f"train {len(train_ds)} / eval {len(eval_ds)} rows"
              + (f", resuming from {resume_from}" if resume_from else ""), flush=True)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_s = time.time() - t0
    state = trainer.state
    zero = json.loads(ds_config_path(recipe).read_text()).get("zero_optimization", {})
    final = _finalize_model(trainer, tok, outp, recipe, m["source"], m["trust_remote_code"], is_main)
    if not is_main:
        return None

    evals = epoch_evals(state.log_history)
    best_step = state.best_global_step
    best_epoch = min((e for e in evals if e > 0), key=lambda e: evals[e], default=0)
    tokens = int(state.num_input_tokens_seen or 0)
    peak = peak_memory_mb()
    world = args.world_size
    device = "cpu" if use_cpu else "cuda"
    del trainer, model
    # reload the output the way a user would and evaluate it on the same eval split
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.bfloat16 if recipe["bf16"] else torch.float32)
    saved.to("cpu" if use_cpu else "cuda")
    saved_loss = dataset_loss(saved, eval_ds, coll, recipe["per_device_eval_batch_size"])
    metrics = {**sft_metrics(recipe, m, zero, world, device, lr, data_stats, params, evals),
               "global_step": state.global_step, "resumed_from_step": start_step,
               "best_epoch": best_epoch, "best_checkpoint_step": best_step,
               "best_eval_loss": evals.get(best_epoch), "best_eval_ppl": _safe_exp(evals[best_epoch]) if evals else None,
               "saved_model_eval_loss": saved_loss, "saved_model_eval_ppl": _safe_exp(saved_loss),
               "model_dir": str(final), "train_loss": result.training_loss, "train_seconds": train_s,
               # non-padding tokens over the wall time of trainer.train() (per-epoch eval and checkpoints included)
               "train_tokens": tokens, "train_tokens_per_s": (tokens - tokens_before) / max(train_s, 1e-9),
               "peak_mem_mb": peak}
    for e, loss in evals.items():
        metrics[f"eval_loss_epoch{e}"] = loss
        metrics[f"eval_ppl_epoch{e}"] = _safe_exp(loss)
    writer.final({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, state.global_step)
    writer.close()
    if not recipe["keep_checkpoints"]:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    written = write_metrics(outp / "metrics.json", metrics)
    print(f"{recipe['name']}: best eval loss {metrics['best_eval_loss']:.4f} (ppl {metrics['best_eval_ppl']:.3f}) "
          f"at epoch {best_epoch}; {final} reloads to eval loss {saved_loss:.4f}", flush=True)
    return written


# ================================================================ the launcher side

def launch_command(recipe: dict, recipe_path: str, out: str, cfg: dict, num_gpus: int, env: dict) -> list[str]:
    """The DeepSpeed launcher command (and env changes) for num_gpus ranks; 0 means one CPU rank."""
    from .lib.config import job_config

    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--no_local_rank",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
        # a model this small runs fastest on one thread; two OpenMP threads on a shared 2-core machine
        # cost 6x the CPU time here (Snakemake sets OMP_NUM_THREADS to the rule's threads: 1 at tiny)
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd += ["--num_gpus", "1"]
    else:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible:
            # a scheduler's assignment (srun --gpus=N): the runner maps ranks onto exactly these devices
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:num_gpus])
        else:
            cmd += ["--num_gpus", str(num_gpus)]
    cmd += ["--module", "quantune.sft", "--worker", "--recipe", str(recipe_path), "--out", str(out),
            "--num-gpus", str(num_gpus), "--job-json", json.dumps(job_config(cfg, recipe), sort_keys=True)]
    return cmd


def _check_gpus(num_gpus: int, where: str) -> None:
    if num_gpus == 0:
        return
    import torch

    have = torch.cuda.device_count()
    if have < num_gpus:
        raise fail(where, f"{num_gpus} GPUs asked for, {have} visible",
                   "run on a node with that many GPUs, or lower the recipe's gpus (scale tiny runs on the CPU)")


def _cmd(a) -> None:
    from .lib.config import config_from_args

    cfg = config_from_args(a)
    num_gpus = a.num_gpus
    if a.worker:
        train(a.recipe, a.out, cfg, 0 if num_gpus is None else num_gpus)
        return
    recipe = check_inputs(a.recipe, cfg)
    if num_gpus is None:
        num_gpus = 0 if cfg["scale"] == "tiny" else int(recipe["gpus"])
    _check_gpus(num_gpus, f"{a.recipe}: key gpus (--num-gpus {num_gpus})")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = launch_command(recipe, a.recipe, a.out, cfg, num_gpus, env)
    print("launch: " + " ".join(cmd[:cmd.index("--job-json")]) + " --job-json ...", flush=True)
    sys.stderr.flush()
    # the launcher replaces this process: a scheduler's SIGTERM reaches it, and it passes it on to the ranks;
    # its exit code is the step's (a rank's QuantuneError has printed its one line)
    os.execve(cmd[0], cmd, env)


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    p = stage_parser("quantune.sft", __doc__, _cmd)
    p.add_argument("--num-gpus", type=int, default=None,
                   help="ranks (one per GPU); 0 = one CPU rank; default: 0 at scale tiny, the recipe's gpus at full")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
