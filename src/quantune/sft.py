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
loading with `AutoModelForCausalLM.from_pretrained`. `speed: fast` (speed_settings) computes the same rows
faster: packed padding-free, one micro-batch per optimizer step (on a GPU, as many as fit: fit_fast_step), no
gradient checkpointing; every run records its real tokens/s over the optimizer steps' own seconds and its
model-FLOPs utilisation (speed_metrics).
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

from .lib import varlen
from .lib.common import ROOT, checkpoint_dir, fail, run_cli, write_metrics
from .lib.deepspeed import (check_deepspeed_config, check_gpus, ds_config_path, launch_command, save_model_dir,
                            skip_cpu_shm_op)
from .lib.models import count_parameters
from .lib.sft_data import collator, dataset_loss, dedupe_pairs, prepare_data
from .lib.measure import matmul_tflops, train_flops_per_token
from .lib.trainer import (TokenCount, check_packing, compiled_modules, complete_checkpoints, counting_trainer,
                          drop_incomplete_checkpoints, fingerprint, fit_micro_batch, fits_step, fitted_step,
                          keep_checkpoints_of, liger_kernel_config, loader_arguments, packing_refusal, profiler,
                          speed_changes, step_shape, step_timer, total_optimizer_steps, use_blas_library,
                          with_auto_switches)

# keys that change nothing a checkpoint holds: a checkpoint written under other values of them is resumed
RESUME_IGNORES = ("logging_steps", "save_total_limit", "keep_checkpoints", "description", "early_stopping_patience",
                  "early_stopping_threshold", "per_device_eval_batch_size", "dataloader_num_workers",
                  "blas_library")

# ================================================================ checks (before any process starts)

def check_recipe(recipe: dict, cfg: dict, where: str) -> dict:
    """sft's cross-key checks (config.load_recipe calls them): prompt template, ZeRO file, data format."""
    from .lib.config import resolve_dataset

    recipe = {"max_rows": None, "early_stopping_patience": None, **recipe}
    if "{prompt}" not in recipe["prompt_template"]:
        raise fail(f"{where}: key prompt_template", "has no {prompt} placeholder",
                   "write e.g. 'Human: {prompt} \\n Assistant: '")
    if recipe["padding"] == "packed":  # rows must not see each other
        check_packing(cfg, recipe["model"], False, where)
    recipe = zero_settings(recipe, 1 if cfg["scale"] == "tiny" else int(recipe["gpus"]))
    check_deepspeed_config(recipe, where)
    ds = resolve_dataset(cfg, recipe["dataset"], where=where)
    if ds["format"] != "pref":
        raise fail(f"{where}: key dataset", f"{recipe['dataset']!r} has format {ds['format']!r}",
                   "use a data set of format pref (prompt/chosen/rejected), e.g. summary_pref")
    return recipe


def speed_settings(cfg: dict, recipe: dict, where: str) -> dict:
    """The recipe as its `speed` mode runs it (lib.trainer.speed_changes; seed 003's configuration is the recipe's
    own keys; the loss is each micro-batch's token-level mean, one micro-batch per step in fast), with
    `speed_changes` (what the mode changed) and `speed_note` (a switch it could not turn on here)."""
    changes, note = speed_changes(recipe, lambda: packing_refusal(cfg, recipe["model"], False, where))
    return {**recipe, **changes, "speed_changes": changes, "speed_note": note,
            "speed_written": {k: recipe[k] for k in changes}}


def kernel_settings(recipe: dict, m: dict, device: str, where: str) -> dict:
    """The recipe with torch_compile, liger_kernel and dataloader_num_workers decided for this device
    (lib.trainer.with_auto_switches): what auto turned on joins `speed_changes`, why liger stayed off joins
    `speed_note`."""
    r, changes, note = with_auto_switches(recipe, m, device, where, recipe["speed_changes"], recipe["speed_note"])
    return {**r, "speed_changes": changes, "speed_note": note}


AUTO_ZERO = {True: "recipes/deepspeed/zero1.json", False: "recipes/deepspeed/zero2.json"}  # one rank?


def zero_settings(recipe: dict, ranks: int) -> dict:
    """`deepspeed_config: auto` follows the ranks the job runs (the recipe's gpus; one CPU rank at tiny scale):
    ZeRO-1 on one, where partitioning saves nothing but its optimizer steps as plain AdamW does, in flat fp32
    buffers (ZeRO-0's bf16 wrapper takes a zero-gradient AdamW step when it starts, so every later update is
    bias-corrected one step late, and checks, casts and copies each parameter on its own), ZeRO-2 on several; a
    named file is the recipe's pin. `zero_choice` says which and why; `zero_auto_ranks` the ranks auto chose for
    (None: pinned)."""
    if recipe["deepspeed_config"] != "auto":
        pin = recipe["deepspeed_config"]
        return {**recipe, "zero_choice": f"pinned by the recipe ({pin})", "zero_auto_ranks": None}
    path = AUTO_ZERO[ranks == 1]
    why = ("one rank: nothing to partition, ZeRO-1's optimizer steps as plain AdamW" if ranks == 1
           else f"{ranks} ranks: optimizer states and gradients partitioned")
    return {**recipe, "deepspeed_config": path, "zero_choice": f"auto, {why} ({path})", "zero_auto_ranks": ranks}


def check_inputs(recipe_path: str, cfg: dict) -> dict:
    """The checked recipe, its model and, for local data, enough rows for the split and the batch."""
    from .lib.config import load_recipe, resolve_dataset, resolve_model
    from .lib.data import load_split

    recipe = load_recipe(recipe_path, cfg)
    where = str(recipe_path)
    if recipe["stage"] != "sft":
        raise fail(f"{where}: key stage", f"{recipe['stage']!r} is not sft", "run this recipe with its own stage")
    recipe = speed_settings(cfg, recipe, where)
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


def _build_model(source: str, recipe: dict, trust_remote_code: bool):
    from .lib.models import load_model

    model, tok = load_model(source, trust_remote_code=trust_remote_code, dtype="float32")
    tok.padding_side = "right"
    model.config.use_cache = False  # gradient checkpointing and training do not use the KV cache
    if recipe["padding"] == "packed":  # each packed row attends to itself only, no position spent on the others
        varlen.use(model)
    if recipe["only_optimize_lora"]:
        from peft import get_peft_model

        from .lib.lora import lora_config

        keys = {"lora_r": recipe["lora_dim"], "lora_alpha": recipe["lora_alpha"],
                "lora_dropout": recipe["lora_dropout"], "target_modules": recipe["lora_target_modules"]}
        model = get_peft_model(model, lora_config(keys, "CAUSAL_LM"))
    return model, tok


# bytes a trainable parameter needs beside the activations under DeepSpeed's bf16 training (ZeRO-1's BF16_Optimizer on
# one rank): its fp32 master copy (4), fp32 gradient accumulator (4) and AdamW's two fp32 moments (8); ZeRO-1/2
# partition part of it over several ranks, counted whole here
DS_STATE_BYTES = 16


def fits_fast_step(recipe: dict, num_gpus: int, zero_stage: int) -> bool:
    """Whether the run fits its fast mode's step to the GPU: the fast mode's one micro-batch without checkpointing,
    on GPUs, with whole parameters on each rank (ZeRO below 3)."""
    return num_gpus > 0 and zero_stage < 3 and fits_step(recipe)


def fit_fast_step(recipe: dict, model, train_ds, coll, device) -> tuple[dict, dict]:
    """The fast mode's step fitted to this GPU (lib.trainer.fit_micro_batch, DS_STATE_BYTES a trainable parameter
    set apart): its one micro-batch where it fits, else the fewest micro-batches that fit, the same rows per
    optimizer step, else the recipe's own micro-batch with checkpointing on. For the trials the model is moved and
    cast as DeepSpeed's engine would (to the rank's GPU, bf16 where the recipe trains in it), with liger-kernel's
    kernels patched in and the decoder blocks compiled where the run has them. Returns the recipe as it will run
    (speed_changes updated) and metrics' fast_memory_plan."""
    import torch

    model.to(device)
    dtype = torch.bfloat16 if recipe["bf16"] else torch.float32
    if recipe["bf16"]:
        model.to(dtype)
    rows = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
    steps = total_optimizer_steps(recipe, len(train_ds))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    split, plan = fit_micro_batch(model, train_ds, coll, dtype, rows, recipe["padding"] == "packed", steps,
                                  DS_STATE_BYTES * trainable, recipe=recipe)
    changes = dict(recipe["speed_changes"])
    fitted = fitted_step(recipe, recipe["speed_written"], changes, split)
    plan["chosen"] = step_shape(fitted)
    print(f"{recipe['name']}: fast mode's step on this GPU: {plan['chosen']} ({plan})", flush=True)
    torch.cuda.reset_peak_memory_stats()  # metrics' peak_mem_mb: the run's from here, not the trials'
    return {**fitted, "speed_changes": changes}, plan


def training_args(recipe: dict, output_dir: str, use_cpu: bool, **overrides):
    """The Trainer's arguments from the recipe."""
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
        gradient_checkpointing=recipe["gradient_checkpointing"], use_liger_kernel=bool(recipe["liger_kernel"]),
        liger_kernel_config=liger_kernel_config(recipe),
        torch_compile=recipe["torch_compile"],
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
        logging_nan_inf_filter=False,  # the filter reads every micro-batch's loss back from the GPU (counting_trainer)
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=not use_cpu,
        **loader_arguments(recipe),
        remove_unused_columns=False,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


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
    import torch

    lora = recipe["only_optimize_lora"]
    return {
        "target": recipe["name"], "stage": "sft", "scale": recipe["scale"], "model": recipe["model"],
        "model_source": m["source"], "dataset": recipe["dataset"], "split": recipe["split"],
        "deepspeed_config": recipe["deepspeed_config"], "zero_stage": int(zero.get("stage", 0)),
        "zero_choice": recipe["zero_choice"],
        "zero_offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none"),
        "zero_offload_param": (zero.get("offload_param") or {}).get("device", "none"),
        "launcher": "deepspeed", "world_size": world, "device": device, "bf16": recipe["bf16"],
        "gradient_checkpointing": recipe["gradient_checkpointing"], "mask_prompt": recipe["mask_prompt"],
        "padding": recipe["padding"], "speed": recipe["speed"], "speed_changes": recipe["speed_changes"],
        **({"packed_attention": varlen.describe(device, torch.bfloat16 if recipe["bf16"] else torch.float32),
            "packed_multiple_of": recipe["packed_multiple_of"]} if recipe["padding"] == "packed" else {}),
        "liger_kernel": int(recipe["liger_kernel"]), "torch_compile": int(recipe["torch_compile"]),
        **({"speed_note": recipe["speed_note"]} if recipe["speed_note"] else {}),
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


def outcome_metrics(state, evals: dict[int, float], train_loss: float, train_s: float, start_step: int,
                    tokens_before: int, peak: float, final: Path, saved_loss: float) -> dict:
    """What the run reached: steps, the best epoch, the saved model's eval loss, throughput, eval per epoch."""
    best_epoch = min((e for e in evals if e > 0), key=lambda e: evals[e], default=0)
    tokens = int(state.num_input_tokens_seen or 0)
    metrics = {"global_step": state.global_step, "resumed_from_step": start_step,
               "best_epoch": best_epoch, "best_checkpoint_step": state.best_global_step,
               "best_eval_loss": evals.get(best_epoch),
               "best_eval_ppl": _safe_exp(evals[best_epoch]) if evals else None,
               "saved_model_eval_loss": saved_loss, "saved_model_eval_ppl": _safe_exp(saved_loss),
               "model_dir": str(final), "train_loss": train_loss, "train_seconds": train_s,
               # non-padding tokens over the wall time of trainer.train() (per-epoch eval and checkpoints included)
               "train_tokens": tokens, "train_tokens_per_s": (tokens - tokens_before) / max(train_s, 1e-9),
               "peak_mem_mb": peak}
    for e, loss in evals.items():
        metrics[f"eval_loss_epoch{e}"] = loss
        metrics[f"eval_ppl_epoch{e}"] = _safe_exp(loss)
    return metrics


def speed_metrics(count, timer, flops_token: float, device: str) -> dict:
    """This rank's training steps (one GPU's share): the input positions computed and those holding a real token,
    their rates over the steps' own seconds (evaluation, checkpoints and the first, warm-up step left out), and the model-FLOPs utilisation
    of the real tokens against this machine's matmul rate measured here (bf16 on a GPU, fp32 on a CPU)."""
    if not (count.computed and timer.seconds):
        return {}
    rate, dtype = matmul_tflops(device)
    real_s = timer.real / timer.seconds
    return {"input_tokens_computed": count.computed, "input_tokens_real": count.real,
            "pad_fraction": 1.0 - count.real / count.computed, "step_seconds": timer.seconds,
            "timed_steps": timer.steps, "timed_tokens_real": timer.real, "warmup_step_seconds": timer.warmup_seconds,
            "real_tokens_per_s": real_s, "computed_tokens_per_s": timer.computed / timer.seconds,
            "flops_per_token": flops_token, "matmul_tflops": rate, "matmul_dtype": dtype,
            "mfu": flops_token * real_s / (rate * 1e12)}


def saved_model_loss(final: Path, recipe: dict, device: str, eval_ds, coll) -> float:
    """Reload the output the way a user would and evaluate it on the same eval split."""
    import torch
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.bfloat16 if recipe["bf16"] else torch.float32)
    saved.to(device)
    return dataset_loss(saved, eval_ds, coll, recipe["per_device_eval_batch_size"])


def resume_state(ckpt_dir: Path) -> tuple[str | None, int, int]:
    """The last complete checkpoint (None: a fresh run), its global step and the tokens it had seen."""
    resume = complete_checkpoints(ckpt_dir)
    if not resume:
        return None, 0, 0
    resumed = json.loads((resume[-1] / "trainer_state.json").read_text())
    return str(resume[-1]), int(resumed.get("global_step", 0)), int(resumed.get("num_input_tokens_seen") or 0)


def train(recipe_path: str, out: str, cfg: dict, num_gpus: int) -> dict | None:
    from .lib.common import seed_everything
    from .lib.config import resolve_model
    from .lib.tb import TBWriter, peak_memory_mb

    recipe = check_inputs(recipe_path, cfg)
    m = resolve_model(cfg, recipe["model"], must_exist=True)
    recipe = kernel_settings(recipe, m, "cuda" if num_gpus else "cpu", str(recipe_path))
    blas = use_blas_library(recipe["blas_library"], "cuda" if num_gpus else "cpu")
    outp = Path(out)
    ckpt_dir = checkpoint_dir(outp)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        dropped = drop_incomplete_checkpoints(ckpt_dir)
        if dropped:
            print(f"dropped incomplete checkpoints: {', '.join(dropped)}", flush=True)
    lora = recipe["only_optimize_lora"]
    lr = recipe["lora_lr"] if lora else recipe["learning_rate"]
    use_cpu = num_gpus == 0
    if use_cpu and os.environ.get("WORLD_SIZE", "1") == "1":
        skip_cpu_shm_op()
    # TrainingArguments first: with a ZeRO-3 config, from_pretrained then loads the model partitioned
    args = training_args(recipe, str(ckpt_dir), use_cpu, learning_rate=lr)
    seed_everything(recipe["seed"])
    model, tok = _build_model(m["source"], recipe, m["trust_remote_code"])
    params = count_parameters(model)
    train_ds, eval_ds, data_stats = prepare_data(cfg, recipe, tok)
    coll = collator(tok, packed=recipe["padding"] == "packed",
                    max_length=recipe["max_seq_len"] if recipe["padding"] == "max_length" else None)
    zero = json.loads(ds_config_path(recipe).read_text()).get("zero_optimization", {})
    fast_plan = None
    if fits_fast_step(recipe, num_gpus, int(zero.get("stage", 0))):  # then the Trainer's arguments as it runs
        recipe, fast_plan = fit_fast_step(recipe, model, train_ds, coll, args.device)
        args = training_args(recipe, str(ckpt_dir), use_cpu, learning_rate=lr)

    resume_from, start_step, tokens_before = resume_state(ckpt_dir)
    args.eval_on_start = resume_from is None  # the seed's "epoch 0" eval; a resumed run already has it
    if is_main and resume_from is None:  # a fresh run: no events of an earlier run of this target in its tb/
        shutil.rmtree(outp / "tb", ignore_errors=True)
    writer = TBWriter(outp / "tb") if is_main else None
    count = TokenCount()
    timer = step_timer(count)
    prof = profiler(os.environ.get("QUANTUNE_PROFILE"))
    # the Trainer's batches: packed ones rounded to the recipe's packed_multiple_of (the trials and re-scoring
    # above and below take them exact)
    train_coll = collator(tok, packed=True, packed_multiple_of=recipe["packed_multiple_of"]) \
        if recipe["padding"] == "packed" and recipe["packed_multiple_of"] else coll
    trainer = counting_trainer(count)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                      data_collator=train_coll, processing_class=tok,
                                      callbacks=callbacks_for(recipe, writer) + [timer] + ([prof] if prof else []))
    flops_token = train_flops_per_token(model.config, params["params_total"], data_stats["tokens_mean_train"])
    if is_main:
        print(f"world size {args.world_size}, device {args.device}, ZeRO config {recipe['deepspeed_config']}, "
              f"train {len(train_ds)} / eval {len(eval_ds)} rows"
              + (f", resuming from {resume_from}" if resume_from else ""), flush=True)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_s = time.time() - t0
    state = trainer.state
    final = save_model_dir(trainer, tok, outp, lora, m["source"], m["trust_remote_code"], is_main)
    if not is_main:
        return None

    evals = epoch_evals(state.log_history)
    peak = peak_memory_mb()
    world = args.world_size
    device = "cpu" if use_cpu else "cuda"
    regions = compiled_modules(trainer.model_wrapped)
    del trainer, model
    saved_loss = saved_model_loss(final, recipe, device, eval_ds, coll)
    metrics = {**sft_metrics(recipe, m, zero, world, device, lr, data_stats, params, evals),
               **outcome_metrics(state, evals, result.training_loss, train_s, start_step, tokens_before, peak,
                                 final, saved_loss),
               **speed_metrics(count, timer, flops_token, device),
               "torch_compile_regions": regions, "dataloader_num_workers": args.dataloader_num_workers,  # as it ran
               **({"fast_memory_plan": fast_plan} if fast_plan else {}),
               **({"blas_library": blas} if blas else {})}
    writer.final({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, state.global_step)
    writer.close()
    if not recipe["keep_checkpoints"]:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    written = write_metrics(outp / "metrics.json", metrics)
    print(f"{recipe['name']}: best eval loss {metrics['best_eval_loss']:.4f} (ppl {metrics['best_eval_ppl']:.3f}) "
          f"at epoch {metrics['best_epoch']}; {final} reloads to eval loss {saved_loss:.4f}", flush=True)
    return written


# ================================================================ the launcher side

def _cmd(a) -> None:
    from .lib.config import config_from_args, job_config, resolve_model

    cfg = config_from_args(a)
    num_gpus = a.num_gpus
    if a.worker:
        train(a.recipe, a.out, cfg, 0 if num_gpus is None else num_gpus)
        return
    recipe = check_inputs(a.recipe, cfg)
    if num_gpus is None:
        num_gpus = 0 if cfg["scale"] == "tiny" else int(recipe["gpus"])  # a CPU rank at tiny scale
    check_gpus(num_gpus, f"{a.recipe}: key gpus (--num-gpus {num_gpus})")
    m = resolve_model(cfg, recipe["model"], where=str(a.recipe), must_exist=True)
    recipe = kernel_settings(recipe, m, "cuda" if num_gpus else "cpu", str(a.recipe))
    auto_ranks = recipe["zero_auto_ranks"]
    if auto_ranks and max(num_gpus, 1) != auto_ranks:
        raise fail(f"{a.recipe}: key deepspeed_config", f"auto chose {recipe['deepspeed_config']} for {auto_ranks} "
                   f"rank(s) (the recipe's gpus), but --num-gpus {num_gpus} runs {max(num_gpus, 1)}",
                   f"set gpus: {num_gpus} in the recipe, or name a ZeRO file in deepspeed_config")
    # before any rank starts: checkpoints written under other settings (another speed mode, batch, model) go
    keep_checkpoints_of(checkpoint_dir(Path(a.out)), fingerprint(recipe, m["source"], RESUME_IGNORES), a.recipe)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    worker = ["--worker", "--recipe", str(a.recipe), "--out", str(a.out), "--num-gpus", str(num_gpus),
              "--job-json", json.dumps(job_config(cfg, recipe), sort_keys=True)]
    cmd = launch_command("quantune.sft", worker, num_gpus, env)
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
