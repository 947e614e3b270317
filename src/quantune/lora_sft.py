"""The lora_sft stage: LoRA / QLoRA supervised fine-tuning of a causal or seq2seq LM.

    python -m quantune.lora_sft --recipe recipes/qlora_chatglm_linear.yaml --out results/qlora_chatglm_linear
    python -m quantune.lora_sft count --recipe recipes/lora_mt0_large.yaml --set scale=full

A causal LM (AutoModelForCausalLM, PEFT task CAUSAL_LM) or an encoder-decoder (AutoModelForSeq2SeqLM,
SEQ_2_SEQ_LM), loaded in 4-bit NF4 with double quantization (`quantization: nf4`, QLoRA: bitsandbytes +
`prepare_model_for_kbit_training`) or in full precision (`quantization: none`, plain LoRA), trained with the
Hugging Face Trainer on `advertisegen` (content -> summary) or `alpaca` (instruction/input -> output) rows.
Prompt and answer are tokenized separately and truncated to max_input_length / max_output_length; prompt and
padding positions get label -100; batches are padded to their longest row (`padding: longest`) unless the
recipe asks for `padding: max_length`, or `padding: packed` (lib.varlen: a batch's rows end to end in one row, no
pad, position ids restarting at each row, each row attending to itself only through torch's variable-length flash
attention on a GPU; the same rows per optimizer step and the same loss, averaged over the answer tokens of the
batch). `speed` (speed_settings) says how the recipe's rows are computed: `seed` as written (the
seed notebooks' configuration), `fast` (packed where the model allows, the optimizer step's rows in one
micro-batch, no gradient checkpointing) or `lean` (packed, checkpointing on); metrics.json records what it
changed. Checkpoints go to results/.checkpoints/<target>/ every `save_steps`;
a rerun resumes from the last complete one. On success the target directory appears in one rename:
  adapter/ (PEFT save_pretrained, safetensors), metrics.json, tb/, trainer_log.jsonl, training_loss.png,
  recipe.json (the recipe as run, read back by lora_compare).

count: the LoRA parameter count of a lora_sft (or lora_sweep) recipe's model, printed by PEFT's own
print_trainable_parameters, computed on the meta device from the model's config.json (tiny world, local path, or
the repository's copy named by `hub_config` at full scale): no weights are downloaded or allocated.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .lib import varlen
from .lib.common import atomic_dir, checkpoint_dir, fail, run_cli, seed_everything, write_json, write_jsonl, write_metrics
from .lib.lora import add_lora, check_target_modules, check_targets_in, compute_dtype, load_base, lora_config
from .lib.lora import peft_trainable_line
from .lib.models import pick_device, set_cpu_threads
from .lib.plots import plot_losses
from .lib.prompts import ANSWER_FIELD, SFTCollator, build_split, template_of
from .lib.trainer import (StepLosses, TokenCount, check_packing, compiled_modules, complete_checkpoints,
                          counting_trainer, fingerprint, fit_micro_batch, fits_step, fitted_step, keep_checkpoints_of,
                          liger_kernel_config, loader_arguments, packing_refusal, profiler, run_record,
                          speed_changes, step_shape, step_timer, tokens_counting, total_optimizer_steps,
                          with_auto_switches)


def _fmt_of(cfg: dict, recipe: dict) -> str:
    from .lib.config import resolve_dataset

    return resolve_dataset(cfg, recipe["dataset"])["format"]


def task_type_of(cfg: dict, recipe: dict, where: str) -> str:
    """CAUSAL_LM or SEQ_2_SEQ_LM: the recipe's `task_type`, which must agree with the model's family."""
    from .lib.config import resolve_model
    from .lib.models import SEQ2SEQ_FAMILIES

    fam = resolve_model(cfg, recipe["model"])["family"]
    implied = "SEQ_2_SEQ_LM" if fam in SEQ2SEQ_FAMILIES else "CAUSAL_LM"
    tt = recipe.get("task_type", implied)
    if tt != implied:
        raise fail(f"{where}: key task_type", f"{tt} does not fit model {recipe['model']!r} (an "
                   f"{'encoder-decoder' if implied == 'SEQ_2_SEQ_LM' else 'decoder-only'} model)",
                   f"set task_type: {implied} or remove the key")
    return tt


def check_sft_recipe(recipe: dict, cfg: dict, where: str) -> dict:
    """lora_sft's cross-key checks (config.load_recipe calls them); returns the recipe with task_type filled."""
    r = dict(recipe)
    fmt = _fmt_of(cfg, r)
    if fmt not in ANSWER_FIELD:
        raise fail(f"{where}: key dataset", f"data set {r['dataset']!r} has format {fmt}, which lora_sft cannot train on",
                   f"use a data set of format {' or '.join(ANSWER_FIELD)}")
    template_of(r, fmt, where)
    r["task_type"] = task_type_of(cfg, r, where)
    if "max_steps" not in r and "num_train_epochs" not in r:
        raise fail(where, "neither max_steps nor num_train_epochs is set", "set one of them")
    if r.get("padding") == "packed":
        check_packing(cfg, r["model"], r["task_type"] == "SEQ_2_SEQ_LM", where)
    return r


def packing_of(cfg: dict, r: dict, where: str) -> tuple[str, str] | None:
    """Why this recipe's rows cannot be packed here (lib.trainer.packing_refusal), or None."""
    return packing_refusal(cfg, r["model"], r["task_type"] == "SEQ_2_SEQ_LM", where)


def speed_settings(cfg: dict, r: dict, where: str) -> tuple[dict, dict, str]:
    """The recipe as its `speed` mode runs it (lib.trainer.speed_changes: the Trainer's loss is a token-level mean
    over the optimizer step's rows in every mode), what the mode changed, and a switch it could not turn on."""
    changes, note = speed_changes(r, lambda: packing_of(cfg, r, where))
    if r["kbit_upcast"] == "auto":  # PEFT's fp32 upcast as the seed ran it; fast and lean keep compute_dtype
        upcast = r["speed"] == "seed" or r["quantization"] != "nf4"
        if not upcast:
            changes = {**changes, "kbit_upcast": False}
        r = {**r, "kbit_upcast": upcast}
    return {**r, **changes}, changes, note


def _check_pinned_transformers(where: str) -> None:
    """THUDM/chatglm3-6b's remote code runs on the transformers that envs/chatglm3.yaml pins, not on newer ones."""
    import transformers
    import yaml

    from .lib.config import ROOT

    env = yaml.safe_load((ROOT / "envs" / "chatglm3.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pin = next(p.split("==")[1] for p in pip if p.startswith("transformers=="))
    if transformers.__version__ != pin:
        raise fail(f"{where}: key env", f"chatglm3 remote code needs transformers {pin} (envs/chatglm3.yaml), "
                   f"this Python has {transformers.__version__}",
                   "run through snakemake --use-conda (or activate an env built from envs/chatglm3.yaml)")


@dataclass
class Job:
    """One lora_sft run as checked before any weight is loaded: the recipe with its defaults, the resolved model,
    the data rows and what follows from them."""
    r: dict
    m: dict
    where: str
    fmt: str
    template: Any
    seq2seq: bool
    device: str
    train_rows: list
    eval_rows: list
    speed_changes: dict = field(default_factory=dict)  # what the recipe's speed mode changed (key -> value run)
    speed_note: str = ""  # a switch the mode could not turn on here, and why
    written: dict = field(default_factory=dict)  # the recipe's own values of the keys the mode changed


def prepare(recipe_path: str, cfg: dict, run_recipe: dict | None = None) -> Job:
    """Every check that needs no weights: recipe, installed libraries, LoRA targets on the meta device, data."""
    from .lib.config import load_recipe, resolve_dataset, resolve_model
    from .lib.data import load_split

    where = str(recipe_path) if run_recipe is None else f"{recipe_path} (rank {run_recipe['lora_r']})"
    recipe = load_recipe(recipe_path, cfg) if run_recipe is None else run_recipe
    if recipe["stage"] != "lora_sft":
        raise fail(f"{where}: key stage", f"{recipe['stage']!r} is not lora_sft",
                   f"run it with python -m quantune.{recipe['stage']}")
    # load_recipe has checked a recipe file; a sweep's run recipe is checked here
    r = recipe if run_recipe is None else check_sft_recipe(recipe, cfg, where)
    written = dict(r)
    r, changes, note = speed_settings(cfg, r, where)
    if r["env"] == "chatglm3" and cfg["scale"] == "full":
        _check_pinned_transformers(where)
    m = resolve_model(cfg, r["model"], where, must_exist=True)
    ds = resolve_dataset(cfg, r["dataset"])
    device = pick_device(r, where)
    if r["quantization"] == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise fail(f"{where}: key quantization", "nf4 needs bitsandbytes, which is not installed",
                       "pip install bitsandbytes (envs/finetune.yaml pins it) or set quantization: none") from None
    check_target_modules(m, r, where)
    r, changes, note = with_auto_switches(r, m, device, where, changes, note)
    train_rows = load_split(ds, r["train_split"], r.get("max_train_samples"))
    eval_rows = load_split(ds, r["eval_split"], r.get("max_eval_samples"))
    if not train_rows:
        raise fail(f"{where}: key dataset", f"split {r['train_split']} is empty", "point the recipe at data")
    return Job(r=r, m=m, where=where, fmt=ds["format"], template=template_of(r, ds["format"], where),
               seq2seq=r["task_type"] == "SEQ_2_SEQ_LM", device=device, train_rows=train_rows, eval_rows=eval_rows,
               speed_changes=changes, speed_note=note, written={k: written[k] for k in changes if k in written})


# keys that change nothing a checkpoint holds: a checkpoint written under other values of them is resumed
RESUME_IGNORES = ("logging_steps", "save_steps", "save_total_limit", "description", "max_eval_samples",
                  "per_device_eval_batch_size", "dataloader_num_workers")
# an adapter checkpoint is complete when its trainer state, optimizer and adapter weights were all written
ADAPTER_CHECKPOINT = ("trainer_state.json", "optimizer.pt", "adapter_model.*")


def resume_point(out_p: Path, job: Job, recipe_path: str) -> tuple[Path, Path | None]:
    """The checkpoint directory and the checkpoint to resume from; checkpoints of another recipe or model go."""
    fp = fingerprint(job.r, job.m["source"], RESUME_IGNORES)
    ckpt_root = keep_checkpoints_of(checkpoint_dir(out_p), fp, recipe_path)
    done = complete_checkpoints(ckpt_root, ADAPTER_CHECKPOINT)
    return ckpt_root, done[-1] if done else None


def training_arguments(job: Job, ckpt_root: Path, steps: int, warmup: int, cdt):
    """The Hugging Face TrainingArguments of the recipe (bf16 / fp16 as its compute dtype on a GPU)."""
    import torch
    from transformers import TrainingArguments

    r = job.r
    kw: dict[str, Any] = dict(
        output_dir=str(ckpt_root), per_device_train_batch_size=r["per_device_train_batch_size"],
        per_device_eval_batch_size=r.get("per_device_eval_batch_size", r["per_device_train_batch_size"]),
        gradient_accumulation_steps=r["gradient_accumulation_steps"], learning_rate=float(r["learning_rate"]),
        lr_scheduler_type=r["lr_scheduler_type"], warmup_steps=warmup, weight_decay=float(r["weight_decay"]),
        optim=r["optim"], logging_steps=r["logging_steps"], logging_first_step=True, save_strategy="steps",
        save_steps=r["save_steps"], save_total_limit=r["save_total_limit"], seed=r["seed"], data_seed=r["seed"],
        report_to="none", remove_unused_columns=False, **loader_arguments(r), disable_tqdm=True,
        include_num_input_tokens_seen=True if r["padding"] == "packed" else tokens_counting(),  # packed: no pads
        logging_nan_inf_filter=False,  # the filter reads every micro-batch's loss back from the GPU (counting_trainer)
        use_cpu=job.device == "cpu", use_liger_kernel=bool(r["liger_kernel"]),
        liger_kernel_config=liger_kernel_config(r),
        torch_compile=bool(r["torch_compile"]),
        bf16=job.device == "cuda" and cdt == torch.bfloat16, fp16=job.device == "cuda" and cdt == torch.float16,
    )
    if r.get("max_steps"):
        kw["max_steps"] = int(r["max_steps"])
    else:
        kw["num_train_epochs"] = float(r["num_train_epochs"])
    return TrainingArguments(**kw)


def fit_fast_step(job: Job, model, train_ds, collator, cdt, steps: int) -> dict:
    """The fast mode on a GPU: its one micro-batch per optimizer step without checkpointing stays where measured
    trials say its largest micro-batch fits this GPU (lib.trainer.fit_micro_batch; AdamW's fp32 moments and the
    gradients of the trainable weights set apart); else the fewest micro-batches that fit, the same rows per
    optimizer step; else the recipe's own micro-batch with checkpointing on (the lean mode's shape). The trials run the
    model as the run will: compiled where it compiles, with liger-kernel's loss where it has it. Updates job.r and
    job.speed_changes; returns metrics' fast_memory_plan."""
    r = job.r
    rows = r["per_device_train_batch_size"] * r["gradient_accumulation_steps"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    split, plan = fit_micro_batch(model, train_ds, collator, cdt, rows, r["padding"] == "packed", steps,
                                  12 * trainable, recipe=r)
    job.r = fitted_step(r, job.written, job.speed_changes, split)
    if job.r["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plan["chosen"] = step_shape(job.r)
    print(f"{r['name']}: fast mode's step on this GPU: {plan['chosen']} ({plan})")
    return plan


def arguments_and_fast_step(job: Job, model, train_ds, collator, cdt, steps: int, ckpt_root: Path,
                            warmup: int) -> tuple[Any, dict | None]:
    """The run's TrainingArguments and, for the fast mode on a GPU, its step fitted to the GPU (fit_fast_step's
    fast_memory_plan; else None). The arguments come first, as in the sft stage: transformers turns TF32 on for the
    whole process as it builds a compiling run's arguments, and dynamo guards every compiled graph on that state,
    so trials compiled before it would leave the run's first step to compile every decoder block again (and two of
    dynamo's 8 graphs a block spent). Built again after a fit, whose step changes the batch keys."""
    args = training_arguments(job, ckpt_root, steps, warmup, cdt)
    if job.device != "cuda" or not fits_step(job.r):
        return args, None
    plan = fit_fast_step(job, model, train_ds, collator, cdt, steps)
    return training_arguments(job, ckpt_root, steps, warmup, cdt), plan


def collator_for(job: Job, tok):
    r = job.r
    if r["padding"] == "packed":  # one row of the batch's rows end to end, each attending to itself only
        return varlen.packed_collator()
    if r["padding"] == "max_length":
        return SFTCollator(tok.pad_token_id, "max_length",
                           r["max_input_length"] + (0 if job.seq2seq else r["max_output_length"]),
                           r["max_output_length"], job.seq2seq)
    return SFTCollator(tok.pad_token_id, "longest", seq2seq=job.seq2seq)


def train(recipe_path: str, out: str, cfg: dict, run_recipe: dict | None = None, after_train=None) -> dict:
    """Train one adapter. run_recipe: an already loaded lora_sft recipe (one run of a lora_sweep) instead of the
    file's; after_train(model, tok, recipe, device) -> dict of extra metrics (key `_generations`: rows written to
    generations.jsonl), called after training and evaluation, before the outputs are written."""
    import torch

    from .lib.tb import TBWriter, peak_memory_mb, trainer_callback

    job = prepare(recipe_path, cfg, run_recipe)
    r, device = job.r, job.device
    out_p = Path(out)
    ckpt_root, resume = resume_point(out_p, job, recipe_path)

    seed_everything(r["seed"])
    if device == "cpu":
        set_cpu_threads()
    t_load = time.time()
    model, tok = load_base(job.m, r, device, training=True)
    if r["padding"] == "packed":
        varlen.use(model)
    model = add_lora(model, r, r["task_type"])
    load_s = time.time() - t_load
    peft_line = peft_trainable_line(model)
    print(peft_line)

    t_data = time.time()
    train_ds = build_split(tok, job.train_rows, job.fmt, job.template, r, job.seq2seq)
    eval_ds = build_split(tok, job.eval_rows, job.fmt, job.template, r, job.seq2seq) if job.eval_rows else None
    data_s = time.time() - t_data
    steps = total_optimizer_steps(r, len(train_ds))
    warmup = math.ceil(steps * float(r["warmup_ratio"]))
    cdt = compute_dtype(r, device)
    collator = collator_for(job, tok)
    model.config.use_cache = False  # training uses no KV cache (nor do the fast plan's trials)
    args, fast_plan = arguments_and_fast_step(job, model, train_ds, collator, cdt, steps, ckpt_root, warmup)
    r = job.r
    tb_dir = ckpt_root / "tb"
    writer = TBWriter(tb_dir, r["name"])
    writer.text("config/speed", f"speed: {r['speed']}; changed: {job.speed_changes or 'nothing'}"
                + (f"; {job.speed_note}" if job.speed_note else "")
                + (f"; this GPU's step: {fast_plan['chosen']}" if fast_plan else ""))
    count = TokenCount()
    losses = StepLosses() if r.get("record_losses") else None
    timer = step_timer(count)
    rec = run_record()
    prof = profiler(os.environ.get("QUANTUNE_PROFILE"))
    trainer = counting_trainer(count, losses)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        callbacks=[trainer_callback(writer), rec, timer] + ([prof] if prof else []))
    if resume:
        print(f"resuming {r['name']} from {resume}")
    ev0 = {}
    if r.get("eval_before_training") and eval_ds is not None and not resume:
        ev0 = trainer.evaluate()  # LoRA's B matrices start at zero: this is the untuned base model's eval loss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    peak = peak_memory_mb()
    t_eval = time.time()
    ev = trainer.evaluate() if eval_ds is not None else {}
    eval_s = time.time() - t_eval
    metrics = run_metrics(job, trainer, rec, dict(result.metrics), ev, ev0)
    if losses is not None:
        metrics["train_loss_by_step"] = {str(k): v for k, v in sorted(losses.by_step.items())}
    if fast_plan:
        metrics["fast_memory_plan"] = fast_plan
    if count.computed:  # this run's input positions: all computed, and those holding a real token
        metrics.update(input_tokens_computed=count.computed, input_tokens_real=count.real,
                       pad_fraction=1.0 - count.real / count.computed)
    if timer.seconds:  # rates over the optimizer steps' own seconds, the first (warm-up) step left out
        metrics.update(timed_steps=timer.steps, timed_tokens_real=timer.real, step_seconds=timer.seconds,
                       warmup_step_seconds=timer.warmup_seconds,
                       seconds_per_step=timer.seconds / timer.steps, optimizer_steps_per_s=timer.steps / timer.seconds,
                       computed_tokens_per_s=timer.computed / timer.seconds,
                       real_tokens_per_s=timer.real / timer.seconds)
    trainable, total = model.get_nb_trainable_parameters()
    metrics.update(params_trainable=trainable, params_total=total, params_trainable_pct=100.0 * trainable / max(total, 1),
                   train_rows=len(train_ds), eval_rows=len(eval_ds) if eval_ds is not None else 0,
                   warmup_steps=warmup, planned_steps=steps, compute_dtype=str(cdt).replace("torch.", ""),
                   peak_mem_mb=peak, load_seconds=load_s, data_seconds=data_s, eval_seconds=eval_s,
                   peft_trainable_line=peft_line)
    if "shape_full" in r and metrics.get("seconds_per_step"):  # the full recipe's run on this device, projected
        full_steps = total_optimizer_steps({**r, **r["shape_full"]}, len(train_ds))
        metrics.update(full_recipe_steps=full_steps, projected_full_seconds=full_steps * metrics["seconds_per_step"])
    gens = None
    if after_train is not None:
        extra = dict(after_train(model, tok, r, device))
        gens = extra.pop("_generations", None)
        metrics.update(extra)
    writer.scalars({"eval/loss": metrics["eval_loss"], "eval/ppl": metrics["eval_ppl"],
                    "system/tokens_per_s": metrics["tokens_per_s"],
                    **({"system/pad_fraction": metrics["pad_fraction"]} if "pad_fraction" in metrics else {})},
                   trainer.state.global_step)
    writer.final({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                 trainer.state.global_step)
    writer.close()
    return write_target(out_p, job, model, trainer, metrics, gens, tb_dir, ckpt_root)


def run_metrics(job: Job, trainer, rec, tm: dict, ev: dict, ev0: dict) -> dict:
    """metrics.json of a finished run: the recipe as run, the Trainer's own numbers, this run's speed."""
    r = job.r
    hist = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    tokens_total = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    tokens_run = tokens_total - rec.tokens_at_begin
    metrics = {
        "target": r["name"], "stage": "lora_sft", "scale": r["scale"], "model": r["model"],
        "model_source": job.m["source"], "dataset": r["dataset"], "data_format": job.fmt, "task_type": r["task_type"],
        "quantization": r["quantization"], "double_quant": r["double_quant"] if r["quantization"] == "nf4" else None,
        "device": job.device, "lora_r": r["lora_r"], "lora_alpha": r["lora_alpha"], "lora_dropout": r["lora_dropout"],
        "target_modules": ",".join(r["target_modules"]),
        "batch_size": r["per_device_train_batch_size"], "gradient_accumulation_steps": r["gradient_accumulation_steps"],
        "learning_rate": float(r["learning_rate"]), "lr_scheduler_type": r["lr_scheduler_type"],
        "warmup_ratio": float(r["warmup_ratio"]),
        "max_input_length": r["max_input_length"], "max_output_length": r["max_output_length"],
        "padding": r["padding"], "gradient_checkpointing": r["gradient_checkpointing"],
        **({"packed_attention": varlen.describe(job.device, compute_dtype(r, job.device))}
           if r["padding"] == "packed" else {}),
        "speed": r["speed"], "speed_changes": dict(job.speed_changes), "liger_kernel": int(r["liger_kernel"]),
        "dataloader_num_workers": trainer.args.dataloader_num_workers,  # as the Trainer ran
        "torch_compile": int(r["torch_compile"]), "torch_compile_regions": compiled_modules(trainer.model_wrapped),
        **({"kbit_upcast": int(r["kbit_upcast"])} if r["quantization"] == "nf4" else {}),
        **({"speed_note": job.speed_note} if job.speed_note else {}),
        "global_step": trainer.state.global_step, "epochs": float(trainer.state.epoch or 0),
        "resumed_from_step": rec.step_at_begin, "steps_this_run": trainer.state.global_step - rec.step_at_begin,
        "train_runtime": tm.get("train_runtime"), "train_samples_per_second": tm.get("train_samples_per_second"),
        "total_flos": tm.get("total_flos", trainer.state.total_flos), "train_loss": tm.get("train_loss"),
        "train_loss_first": hist[0]["loss"] if hist else None, "train_loss_last": hist[-1]["loss"] if hist else None,
        "tokens_seen": tokens_total,
        "tokens_counted": "non_padding" if r["padding"] == "packed" or tokens_counting() == "non_padding" else "all",
        "tokens_per_s": tokens_run / tm["train_runtime"] if tm.get("train_runtime") else None,
        "eval_loss": ev.get("eval_loss"), "eval_ppl": math.exp(ev["eval_loss"]) if "eval_loss" in ev else None,
        "eval_loss_before": ev0.get("eval_loss"),
        "peak_mem_kind": "cuda_max_allocated" if job.device == "cuda" else "max_rss",
    }
    if hist and hist[0]["loss"]:
        metrics["train_loss_drop_pct"] = 100.0 * (hist[0]["loss"] - hist[-1]["loss"]) / hist[0]["loss"]
    if r.get("record_losses"):  # the seed's per-step table: loss, lr and elapsed seconds at each logged step
        for h in hist:
            st = int(h["step"])
            metrics[f"loss_step{st}"] = h["loss"]
            if "learning_rate" in h:
                metrics[f"lr_step{st}"] = h["learning_rate"]
            if st in rec.elapsed:
                metrics[f"elapsed_s_step{st}"] = rec.elapsed[st]
    return metrics


def write_target(out_p: Path, job: Job, model, trainer, metrics: dict, gens, tb_dir: Path, ckpt_root: Path) -> dict:
    """The target directory in one rename: adapter, recipe.json, trainer log, loss plot, metrics.json, tb/."""
    r = job.r
    hist = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    with atomic_dir(out_p) as tmp:
        model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        write_json(tmp / "recipe.json", {**r, "model_source": job.m["source"], "data_format": job.fmt})
        (tmp / "trainer_log.jsonl").write_text(
            "".join(json.dumps(h) + "\n" for h in trainer.state.log_history), encoding="utf-8")
        plot_losses({r["name"]: [(h["step"], h["loss"]) for h in hist]}, tmp / "training_loss.png", "step",
                    f"{r['name']}: training loss")
        if gens is not None:
            write_jsonl(tmp / "generations.jsonl", gens)
        flat = write_metrics(tmp / "metrics.json", metrics)
        shutil.copytree(tb_dir, tmp / "tb")
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return flat


def count_lora(cfg: dict, recipe: dict, where: str) -> dict:
    """Trainable / total parameters of the recipe's model with its LoRA, on the meta device: what PEFT prints
    after loading the real weights (quantization aside: PEFT counts a 4-bit weight as its full-precision size)."""
    from peft import get_peft_model

    from .lib.config import resolve_model
    from .lib.models import meta_model_from_config, model_config_json

    r = check_sft_recipe(recipe, cfg, where)
    m = resolve_model(cfg, r["model"], where, must_exist=True)
    conf, conf_from = model_config_json(m, where)
    try:
        model = meta_model_from_config(conf, trust_remote_code=m["trust_remote_code"])
    except ValueError as e:
        raise fail(f"{where}: key model", f"cannot build {m['source']} from {conf_from} ({e})",
                   "count a model of a native transformers architecture") from None
    check_targets_in(model, r, m["source"], where)
    base_total = sum(p.numel() for p in model.parameters())
    pm = get_peft_model(model, lora_config(r, r["task_type"]))
    trainable, total = pm.get_nb_trainable_parameters()
    return {"model_source": m["source"], "config_from": conf_from, "lora_r": r["lora_r"],
            "lora_alpha": r["lora_alpha"], "target_modules": ",".join(r["target_modules"]),
            "tie_word_embeddings_serialized": conf.get("tie_word_embeddings"), "params_base": base_total,
            "params_trainable": trainable, "params_total": total, "peft_trainable_line": peft_trainable_line(pm)}


def count(recipe_path: str, cfg: dict) -> list[dict]:
    """count for a lora_sft recipe (one line) or a lora_sweep recipe (one line per rank)."""
    from .lib.config import load_recipe, sweep_run_recipe

    recipe = load_recipe(recipe_path, cfg)
    if recipe["stage"] == "lora_sft":
        return [count_lora(cfg, recipe, str(recipe_path))]
    if recipe["stage"] == "lora_sweep":
        return [count_lora(cfg, sweep_run_recipe(recipe, k, str(recipe_path)), f"{recipe_path} (rank {k})")
                for k in recipe["ranks"]]
    raise fail(f"{recipe_path}: key stage", f"{recipe['stage']!r} trains no adapter", "count a lora_sft or lora_sweep recipe")


def workflow_env(recipe: dict, scale: str) -> str:
    """The env (envs/<env>.yaml, its image) a recipe's job runs in. THUDM/chatglm3-6b's remote code runs only on
    the transformers that envs/chatglm3.yaml pins (recipes say `env: chatglm3`); at tiny scale the same code runs
    on the tiny native-GLM model, which needs the project's current stack (envs/finetune.yaml)."""
    return "chatglm3" if scale == "full" and recipe["env"] == "chatglm3" else "finetune"


def workflow_runtime(recipe: dict, scale: str) -> int:
    """Minutes. Seed 000 on one RTX 4090: 100 steps 8 min, one AdvertiseGen epoch (1,791 / 1,194 steps) 2.2 h;
    the limits leave room for a slower GPU, the held-out evaluation and the model download."""
    if scale == "tiny":
        return 30
    if recipe["stage"] == "lora_compare":
        return 180
    return 120 if recipe.get("max_steps") else 720


def _cmd(a) -> None:
    from .lib.config import config_from_args

    cfg = config_from_args(a)
    if a.action == "count":
        for c in count(a.recipe, cfg):
            print(f"{c['model_source']} (config {c['config_from']}), LoRA r={c['lora_r']} alpha={c['lora_alpha']:g} "
                  f"on {c['target_modules']}:")
            print(c["peft_trainable_line"])
        return
    if not a.out:
        raise fail("--out", "training needs an output directory", "give --out results/<target>")
    m = train(a.recipe, a.out, cfg)
    print(f"{m['target']}: {m['global_step']} steps, loss {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f}, "
          f"eval loss {m.get('eval_loss', float('nan')):.3f}, trainable {m['params_trainable']} "
          f"({m['params_trainable_pct']:.4f}%), {m['tokens_per_s']:.1f} tokens/s")


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    p = stage_parser("quantune.lora_sft", __doc__, _cmd, out_required=False)
    p.add_argument("action", nargs="?", choices=["train", "count"], default="train",
                   help="train (default), or count: the LoRA parameter count from the model's config (no --out)")
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
