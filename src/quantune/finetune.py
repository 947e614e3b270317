"""LoRA / QLoRA supervised fine-tuning (stage `lora_sft`) and the side-by-side comparison of adapters
(stage `lora_compare`).

    python -m quantune.finetune --recipe recipes/qlora_chatglm_linear.yaml --out results/qlora_chatglm_linear
    python -m quantune.finetune compare --recipe recipes/qlora_compare.yaml --out results/qlora_compare

lora_sft: a causal LM (AutoModelForCausalLM, PEFT task CAUSAL_LM) or an encoder-decoder (AutoModelForSeq2SeqLM,
SEQ_2_SEQ_LM), loaded in 4-bit NF4 with double quantization (`quantization: nf4`, QLoRA: bitsandbytes +
`prepare_model_for_kbit_training`) or in full precision (`quantization: none`, plain LoRA), trained with the
Hugging Face Trainer on `advertisegen` (content -> summary) or `alpaca` (instruction/input -> output) rows.
Prompt and answer are tokenized separately and truncated to max_input_length / max_output_length; prompt and
padding positions get label -100; batches are padded to their longest row (`padding: longest`) unless the
recipe asks for `padding: max_length`. Checkpoints go to results/.checkpoints/<target>/ every `save_steps`;
a rerun resumes from the last complete one. On success the target directory appears in one rename:
  adapter/ (PEFT save_pretrained, safetensors), metrics.json, tb/, trainer_log.jsonl, training_loss.png,
  recipe.json (the recipe as run, read back by the comparison).

count: the LoRA parameter count of a lora_sft (or lora_sweep) recipe's model, printed by PEFT's own
print_trainable_parameters, computed on the meta device from the model's config.json (tiny world, local path, or
the repository's copy named by `hub_config` at full scale): no weights are downloaded or allocated.
    python -m quantune.finetune count --recipe recipes/lora_mt0_large.yaml --set scale=full

lora_sweep (sweep-run, sweep): one lora_sft run per rank of `ranks` (lora_alpha = alpha_per_rank x rank) into
<target>/r<rank>/, each scored by greedy generation on held-out prompts (BLEU-4 / ROUGE-L); then one table
(<target>.md, <target>.csv) and one plot (<target>.png) over the ranks, and metrics.json with r<rank>_<field>.
    python -m quantune.finetune sweep-run --rank 8 --recipe recipes/lora_rank_sweep.yaml --out results/lora_rank_sweep/r8
    python -m quantune.finetune sweep --recipe recipes/lora_rank_sweep.yaml --out results/lora_rank_sweep

lora_compare: the base model (quantized as trained) with each adapter and without any, greedy and sampled
(fixed seed) generations for the same held-out prompts, BLEU-4 / ROUGE-1/2/L (quantune.textmetrics, jieba),
comparison.md + comparison.json side by side, and loss_curves.png with every adapter's training loss.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import string
import time
from pathlib import Path
from typing import Any

from .common import (atomic_dir, atomic_savefig, atomic_write_text, fail, read_json, run_cli, seed_everything,
                     write_json, write_jsonl, write_metrics)

IGNORE_INDEX = -100
ANSWER_FIELD = {"advertisegen": "summary", "alpaca": "output"}
# Built-in prompt templates. `advertisegen`: the attribute string alone, what the seed notebooks trained on
# (prompt_text '' + content). `alpaca`: Stanford Alpaca's two templates (with and without an input).
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATES = {"advertisegen": {"advertisegen": "{content}"},
             "alpaca": {"alpaca": (ALPACA_INPUT, ALPACA_NO_INPUT)}}
TEMPLATE_FIELDS = {"advertisegen": {"content"}, "alpaca": {"instruction", "input"}}
DEFAULTS = {"train_split": "train", "eval_split": "validation", "double_quant": True, "compute_dtype": "bfloat16",
            "device": "auto", "env": "finetune", "padding": "longest", "gradient_checkpointing": True,
            "weight_decay": 0.0, "optim": "adamw_torch", "save_total_limit": 2}


# ================================================================ recipe checks (before any work)

def _fmt_of(cfg: dict, recipe: dict) -> str:
    from .config import resolve_dataset

    return resolve_dataset(cfg, recipe["dataset"])["format"]


def task_type_of(cfg: dict, recipe: dict, where: str) -> str:
    """CAUSAL_LM or SEQ_2_SEQ_LM: the recipe's `task_type`, which must agree with the model's family."""
    from .config import resolve_model
    from .models import SEQ2SEQ_FAMILIES

    fam = resolve_model(cfg, recipe["model"])["family"]
    implied = "SEQ_2_SEQ_LM" if fam in SEQ2SEQ_FAMILIES else "CAUSAL_LM"
    tt = recipe.get("task_type", implied)
    if tt != implied:
        raise fail(f"{where}: key task_type", f"{tt} does not fit model {recipe['model']!r} (an "
                   f"{'encoder-decoder' if implied == 'SEQ_2_SEQ_LM' else 'decoder-only'} model)",
                   f"set task_type: {implied} or remove the key")
    return tt


def template_of(recipe: dict, fmt: str, where: str):
    """The prompt template: a built-in name or a format string whose fields belong to the data format."""
    t = recipe["prompt_template"]
    if "{" not in t:
        if t not in TEMPLATES.get(fmt, {}):
            raise fail(f"{where}: key prompt_template", f"{t!r} is not a built-in template for format {fmt}",
                       f"use one of: {', '.join(TEMPLATES.get(fmt, {}))}, or a string with "
                       f"{', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS[fmt]))}")
        return TEMPLATES[fmt][t]
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
    except ValueError as e:
        raise fail(f"{where}: key prompt_template", f"not a valid format string ({e})", "escape braces as {{ }}") from None
    bad = fields - TEMPLATE_FIELDS[fmt]
    if bad or not fields:
        raise fail(f"{where}: key prompt_template", f"placeholder(s) {sorted(bad) or '(none)'} do not fit format {fmt}",
                   f"use {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS[fmt]))}")
    return t


def check_sft_recipe(cfg: dict, recipe: dict, where: str) -> dict:
    """Checks JSON Schema cannot express; returns the recipe with defaults filled in."""
    r = {**DEFAULTS, **recipe}
    fmt = _fmt_of(cfg, r)
    if fmt not in ANSWER_FIELD:
        raise fail(f"{where}: key dataset", f"data set {r['dataset']!r} has format {fmt}, which lora_sft cannot train on",
                   f"use a data set of format {' or '.join(ANSWER_FIELD)}")
    template_of(r, fmt, where)
    r["task_type"] = task_type_of(cfg, r, where)
    if "max_steps" not in r and "num_train_epochs" not in r:
        raise fail(where, "neither max_steps nor num_train_epochs is set", "set one of them")
    if r.get("env") == "chatglm3" and cfg["scale"] == "full":
        _check_pinned_transformers(where)
    return r


def _check_pinned_transformers(where: str) -> None:
    """THUDM/chatglm3-6b's remote code runs on the transformers that envs/chatglm3.yaml pins, not on newer ones."""
    import transformers
    import yaml

    from .config import ROOT

    env = yaml.safe_load((ROOT / "envs" / "chatglm3.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pin = next(p.split("==")[1] for p in pip if p.startswith("transformers=="))
    if transformers.__version__ != pin:
        raise fail(f"{where}: key env", f"chatglm3 remote code needs transformers {pin} (envs/chatglm3.yaml), "
                   f"this Python has {transformers.__version__}",
                   "run through snakemake --use-conda (or activate an env built from envs/chatglm3.yaml)")


# ================================================================ data

def render_prompt(row: dict, fmt: str, template) -> str:
    if fmt == "alpaca" and isinstance(template, tuple):
        with_input, no_input = template
        return (with_input if row["input"].strip() else no_input).format(**row)
    return template.format(**row)


def tokenize_example(tok, prompt: str, answer: str, max_in: int, max_out: int, seq2seq: bool) -> dict:
    """Prompt and answer tokenized separately and truncated separately; labels -100 on the prompt.

    Decoder-only: input = prompt (with the tokenizer's own special tokens, e.g. ChatGLM3's [gMASK] sop) + answer
    + eos, at most max_in + max_out tokens. Encoder-decoder: encoder input = prompt (+ eos), labels = answer + eos.
    """
    eos = tok.eos_token_id
    if seq2seq:
        ids = tok(prompt, add_special_tokens=True, truncation=True, max_length=max_in)["input_ids"]
        if not ids or ids[-1] != eos:
            ids = ids[: max_in - 1] + [eos]
        lab = tok(answer, add_special_tokens=False)["input_ids"][: max_out - 1] + [eos]
        return {"input_ids": ids, "labels": lab}
    p = tok(prompt, add_special_tokens=True, truncation=True, max_length=max_in)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"][: max_out - 1] + [eos]
    return {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}


class SFTCollator:
    """Right-pads a batch to its longest row (or to a fixed length): input_ids with the pad id, attention_mask 0,
    labels -100. The seed notebooks' DataCollatorForChatGLM, generalised (attention mask, encoder-decoder, fixed
    length for comparison). Written here rather than DataCollatorForSeq2Seq: that one pads through the tokenizer's
    `_pad`, whose signature ChatGLM3's remote tokenizer breaks on transformers >= 4.45, and before 4.45 it pads
    labels only to the longest label under padding='max_length'."""

    def __init__(self, pad_id: int, padding: str = "longest", max_length: int | None = None,
                 max_label_length: int | None = None, seq2seq: bool = False):
        self.pad_id, self.padding, self.seq2seq = pad_id, padding, seq2seq
        self.max_length, self.max_label_length = max_length, max_label_length

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        def pad(seqs, value, fixed):
            n = fixed if (self.padding == "max_length" and fixed) else max(len(s) for s in seqs)
            return torch.tensor([list(s[:n]) + [value] * (n - len(s[:n])) for s in seqs], dtype=torch.long)

        ids = [r["input_ids"] for r in rows]
        batch = {"input_ids": pad(ids, self.pad_id, self.max_length),
                 "attention_mask": pad([[1] * len(s) for s in ids], 0, self.max_length)}
        labels = [r["labels"] for r in rows]
        batch["labels"] = pad(labels, IGNORE_INDEX, self.max_label_length if self.seq2seq else self.max_length)
        return batch


def build_split(tok, rows: list[dict], fmt: str, template, recipe: dict, seq2seq: bool):
    import datasets

    ans = ANSWER_FIELD[fmt]
    feats = [tokenize_example(tok, render_prompt(r, fmt, template), r[ans], recipe["max_input_length"],
                              recipe["max_output_length"], seq2seq) for r in rows]
    return datasets.Dataset.from_list(feats)


# ================================================================ model

def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


from .models import pick_device  # noqa: E402  (shared with the other stages)


def compute_dtype(recipe: dict, device: str):
    import torch

    return getattr(torch, recipe.get("compute_dtype", "bfloat16")) if device == "cuda" else torch.float32


def check_target_modules(m: dict, recipe: dict, where: str) -> None:
    """Instantiate the architecture on the meta device (no weights) and check every LoRA target exists."""
    from .models import meta_model

    try:
        meta = meta_model(m["source"], trust_remote_code=m["trust_remote_code"])
    except Exception as e:  # noqa: BLE001 - remote code may not build on meta; PEFT checks again after loading
        print(f"note: could not pre-check target_modules on the meta device ({type(e).__name__}: {e})")
        return
    check_targets_in(meta, recipe, m["source"], where)


def check_targets_in(meta, recipe: dict, source: str, where: str) -> None:
    """Every LoRA target of the recipe names a module of the (meta-device) model; else one line listing its own."""
    names = {n.rsplit(".", 1)[-1] for n, _ in meta.named_modules()}
    missing = [t for t in recipe["target_modules"] if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, mod in meta.named_modules()
                         if type(mod).__name__ == "Linear" and "." in n})
        raise fail(f"{where}: key target_modules", f"{missing} not in {source}",
                   f"use module names of this model: {', '.join(linear)}")


def load_base(m: dict, recipe: dict, device: str, training: bool):
    """Tokenizer and model, NF4 double-quant (QLoRA) or full precision, as the recipe says."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

    from .models import model_class

    cdt = compute_dtype(recipe, device)
    kwargs: dict[str, Any] = {"trust_remote_code": m["trust_remote_code"], _dtype_kwarg(): cdt}
    if recipe.get("quantization", "nf4") == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=bool(recipe.get("double_quant", True)), bnb_4bit_compute_dtype=cdt)
        if device == "cuda":
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    config = AutoConfig.from_pretrained(m["source"], trust_remote_code=m["trust_remote_code"])
    model = model_class(config).from_pretrained(m["source"], **kwargs)
    if device == "cuda" and "device_map" not in kwargs:
        model.to(device)
    tok = AutoTokenizer.from_pretrained(m["source"], trust_remote_code=m["trust_remote_code"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not training:
        model.eval()
    return model, tok


def add_lora(model, recipe: dict, task_type: str):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    gc = bool(recipe.get("gradient_checkpointing", True))
    gc_kwargs = {"use_reentrant": False}  # torch warns (and will fail) when it is not given
    if recipe.get("quantization", "nf4") == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    cfg = LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                     target_modules=list(recipe["target_modules"]), bias="none", inference_mode=False,
                     task_type=getattr(TaskType, task_type))
    return get_peft_model(model, cfg)


# ================================================================ checkpoints

def checkpoint_dir(out: str | Path) -> Path:
    """Checkpoints live beside the target, never inside it: results/.checkpoints/<target>/."""
    out = Path(out)
    return out.parent / ".checkpoints" / out.name


def last_complete_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint-N whose trainer state, optimizer and adapter weights were all written."""
    best = None
    for p in ckpt_root.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if not m or not p.is_dir():
            continue
        done = (p / "trainer_state.json").is_file() and (p / "optimizer.pt").is_file() and (
            any(p.glob("adapter_model.*")))
        if done and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None


def fingerprint(recipe: dict, m: dict) -> str:
    """What a checkpoint must match to be resumed: the recipe as run and the model it started from."""
    keep = {k: v for k, v in recipe.items() if k not in ("logging_steps", "save_steps", "save_total_limit",
                                                          "description", "max_eval_samples",
                                                          "per_device_eval_batch_size")}
    blob = json.dumps({"recipe": keep, "model": m["source"]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ================================================================ training

def total_optimizer_steps(recipe: dict, n_rows: int) -> int:
    if recipe.get("max_steps"):
        return int(recipe["max_steps"])
    batches = math.ceil(n_rows / recipe["per_device_train_batch_size"])
    per_epoch = max(1, math.ceil(batches / recipe["gradient_accumulation_steps"]))
    return max(1, math.ceil(per_epoch * float(recipe["num_train_epochs"])))


def _tokens_counting() -> Any:
    from transformers import TrainingArguments

    return "non_padding" if "non_padding" in (TrainingArguments.__doc__ or "") else True


def _state_callback():
    from transformers import TrainerCallback

    class _Record(TrainerCallback):
        """Tokens seen when this run (first or resumed) began, for this run's own tokens/s."""

        def __init__(self):
            self.tokens_at_begin, self.step_at_begin = 0, 0
            self.t_begin, self.elapsed = time.time(), {}

        def on_train_begin(self, args, state, control, **kw):
            self.tokens_at_begin = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            self.step_at_begin = int(state.global_step)
            self.t_begin = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # seconds since this run's training began, per logged step
                self.elapsed[int(state.global_step)] = time.time() - self.t_begin

    return _Record()


def plot_losses(series: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, title: str) -> None:
    """Raw loss and an exponentially smoothed line per series (LLaMA-Factory's --plot_loss style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (label, pts) in enumerate(series.items()):
        if not pts:
            continue
        xs, ys = zip(*pts)
        color = f"C{i}"
        ax.plot(xs, ys, color=color, alpha=0.35, linewidth=1)
        w = 1.8 * (1 / (1 + math.exp(-0.05 * len(ys))) - 0.5)  # more points -> more smoothing
        sm, last = [], ys[0]
        for y in ys:
            last = last * w + (1 - w) * y
            sm.append(last)
        ax.plot(xs, sm, color=color, linewidth=2, label=f"{label} (smoothed)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)


def train(recipe_path: str, out: str, cfg: dict, run_recipe: dict | None = None, after_train=None) -> dict:
    """Train one adapter. run_recipe: an already loaded lora_sft recipe (one run of a lora_sweep) instead of the
    file's; after_train(model, tok, recipe, device) -> dict of extra metrics (key `_generations`: rows written to
    generations.jsonl), called after training and evaluation, before the outputs are written."""
    import torch
    from transformers import Trainer, TrainingArguments

    from .config import load_recipe, resolve_dataset, resolve_model
    from .data import load_split
    from .tb import TBWriter, peak_memory_mb, trainer_callback

    where = str(recipe_path) if run_recipe is None else f"{recipe_path} (rank {run_recipe['lora_r']})"
    recipe = load_recipe(recipe_path, cfg) if run_recipe is None else run_recipe
    if recipe["stage"] != "lora_sft":
        raise fail(f"{where}: key stage", f"{recipe['stage']!r} is not lora_sft", "use `compare` for lora_compare recipes")
    r = check_sft_recipe(cfg, recipe, where)
    m = resolve_model(cfg, r["model"], where, must_exist=True)
    ds = resolve_dataset(cfg, r["dataset"])
    fmt = ds["format"]
    template = template_of(r, fmt, where)
    seq2seq = r["task_type"] == "SEQ_2_SEQ_LM"
    device = pick_device(r, where)
    if r["quantization"] == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise fail(f"{where}: key quantization", "nf4 needs bitsandbytes, which is not installed",
                       "pip install bitsandbytes (envs/finetune.yaml pins it) or set quantization: none") from None
    check_target_modules(m, r, where)
    train_rows = load_split(ds, r["train_split"], r.get("max_train_samples"))
    eval_rows = load_split(ds, r["eval_split"], r.get("max_eval_samples"))
    if not train_rows:
        raise fail(f"{where}: key dataset", f"split {r['train_split']} is empty", "point the recipe at data")

    out_p = Path(out)
    ckpt_root = checkpoint_dir(out_p)
    fp = fingerprint(r, m)
    fp_file = ckpt_root / "fingerprint.json"
    if ckpt_root.exists():
        old = json.loads(fp_file.read_text()).get("fingerprint") if fp_file.is_file() else None
        if old != fp:
            print(f"discarding checkpoints in {ckpt_root}: they were written for another recipe or model")
            shutil.rmtree(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, {"fingerprint": fp, "recipe": str(recipe_path)})
    resume = last_complete_checkpoint(ckpt_root)

    seed_everything(r["seed"])
    if device == "cpu":
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 2)))
    t_load = time.time()
    model, tok = load_base(m, r, device, training=True)
    model = add_lora(model, r, r["task_type"])
    load_s = time.time() - t_load
    peft_line = peft_trainable_line(model)
    print(peft_line)
    trainable, total = model.get_nb_trainable_parameters()

    train_ds = build_split(tok, train_rows, fmt, template, r, seq2seq)
    eval_ds = build_split(tok, eval_rows, fmt, template, r, seq2seq) if eval_rows else None
    if r["padding"] == "max_length":
        collator = SFTCollator(tok.pad_token_id, "max_length",
                               r["max_input_length"] + (0 if seq2seq else r["max_output_length"]),
                               r["max_output_length"], seq2seq)
    else:
        collator = SFTCollator(tok.pad_token_id, "longest", seq2seq=seq2seq)
    steps = total_optimizer_steps(r, len(train_ds))
    warmup = math.ceil(steps * float(r["warmup_ratio"]))
    cdt = compute_dtype(r, device)
    args_kw: dict[str, Any] = dict(
        output_dir=str(ckpt_root), per_device_train_batch_size=r["per_device_train_batch_size"],
        per_device_eval_batch_size=r.get("per_device_eval_batch_size", r["per_device_train_batch_size"]),
        gradient_accumulation_steps=r["gradient_accumulation_steps"], learning_rate=float(r["learning_rate"]),
        lr_scheduler_type=r["lr_scheduler_type"], warmup_steps=warmup, weight_decay=float(r["weight_decay"]),
        optim=r["optim"], logging_steps=r["logging_steps"], logging_first_step=True, save_strategy="steps",
        save_steps=r["save_steps"], save_total_limit=r["save_total_limit"], seed=r["seed"], data_seed=r["seed"],
        report_to="none", remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        include_num_input_tokens_seen=_tokens_counting(), use_cpu=device == "cpu",
        bf16=device == "cuda" and cdt == torch.bfloat16, fp16=device == "cuda" and cdt == torch.float16,
    )
    if r.get("max_steps"):
        args_kw["max_steps"] = int(r["max_steps"])
    else:
        args_kw["num_train_epochs"] = float(r["num_train_epochs"])
    args = TrainingArguments(**args_kw)

    tb_dir = ckpt_root / "tb"
    writer = TBWriter(tb_dir, r["name"])
    rec = _state_callback()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                      callbacks=[trainer_callback(writer), rec])
    if resume:
        print(f"resuming {r['name']} from {resume}")
    ev0 = {}
    if r.get("eval_before_training") and eval_ds is not None and not resume:
        ev0 = trainer.evaluate()  # LoRA's B matrices start at zero: this is the untuned base model's eval loss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    peak = peak_memory_mb()
    tm = dict(result.metrics)
    ev = trainer.evaluate() if eval_ds is not None else {}
    hist = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    tokens_total = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    tokens_run = tokens_total - rec.tokens_at_begin
    metrics = {
        "target": r["name"], "stage": "lora_sft", "scale": cfg["scale"], "model": r["model"],
        "model_source": m["source"], "dataset": r["dataset"], "data_format": fmt, "task_type": r["task_type"],
        "quantization": r["quantization"], "double_quant": r["double_quant"] if r["quantization"] == "nf4" else None,
        "compute_dtype": str(cdt).replace("torch.", ""), "device": device,
        "lora_r": r["lora_r"], "lora_alpha": r["lora_alpha"], "lora_dropout": r["lora_dropout"],
        "target_modules": ",".join(r["target_modules"]), "params_trainable": trainable, "params_total": total,
        "params_trainable_pct": 100.0 * trainable / max(total, 1),
        "train_rows": len(train_ds), "eval_rows": len(eval_ds) if eval_ds is not None else 0,
        "batch_size": r["per_device_train_batch_size"], "gradient_accumulation_steps": r["gradient_accumulation_steps"],
        "learning_rate": float(r["learning_rate"]), "lr_scheduler_type": r["lr_scheduler_type"],
        "warmup_ratio": float(r["warmup_ratio"]), "warmup_steps": warmup, "planned_steps": steps,
        "max_input_length": r["max_input_length"], "max_output_length": r["max_output_length"],
        "padding": r["padding"], "gradient_checkpointing": r["gradient_checkpointing"],
        "global_step": trainer.state.global_step, "epochs": float(trainer.state.epoch or 0),
        "resumed_from_step": rec.step_at_begin, "steps_this_run": trainer.state.global_step - rec.step_at_begin,
        "train_runtime": tm.get("train_runtime"), "train_samples_per_second": tm.get("train_samples_per_second"),
        "total_flos": tm.get("total_flos", trainer.state.total_flos), "train_loss": tm.get("train_loss"),
        "train_loss_first": hist[0]["loss"] if hist else None, "train_loss_last": hist[-1]["loss"] if hist else None,
        "tokens_seen": tokens_total, "tokens_counted": "non_padding" if _tokens_counting() == "non_padding" else "all",
        "tokens_per_s": tokens_run / tm["train_runtime"] if tm.get("train_runtime") else None,
        "peak_mem_mb": peak, "load_seconds": load_s,
        "eval_loss": ev.get("eval_loss"), "eval_ppl": math.exp(ev["eval_loss"]) if "eval_loss" in ev else None,
        "eval_loss_before": ev0.get("eval_loss"), "peft_trainable_line": peft_line, "peak_mem_kind": "cuda_max_allocated" if device == "cuda" else "max_rss",
    }
    run_steps = metrics["steps_this_run"]
    if tm.get("train_runtime") and run_steps:
        metrics["seconds_per_step"] = tm["train_runtime"] / run_steps
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
    gens = None
    if after_train is not None:
        extra = dict(after_train(model, tok, r, device))
        gens = extra.pop("_generations", None)
        metrics.update(extra)
    writer.scalars({"eval/loss": metrics["eval_loss"], "eval/ppl": metrics["eval_ppl"],
                    "system/tokens_per_s": metrics["tokens_per_s"]}, trainer.state.global_step)
    writer.final({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                 trainer.state.global_step)
    writer.close()

    with atomic_dir(out_p) as tmp:
        model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        write_json(tmp / "recipe.json", {**r, "model_source": m["source"], "data_format": fmt})
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


def peft_trainable_line(model) -> str:
    """PEFT's own print_trainable_parameters line ("trainable params: ... || all params: ... || trainable%: ...")."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


# ================================================================ parameter count from the config (no weights)

def model_config_json(m: dict, where: str) -> tuple[dict, str]:
    """The serialized config.json of a resolved model and where it was read: the local directory (tiny world or
    `path`), else the repository's copy named by the model's `hub_config`. No hub access."""
    if m["local"]:  # resolved with must_exist: config.json is there
        p = Path(m["source"]) / "config.json"
        return read_json(p), str(p)
    if m.get("hub_config"):
        from .config import ROOT

        p = Path(m["hub_config"])
        return read_json(p), str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
    raise fail(f"{where}: key model", f"{m['source']} has no config.json here (no hub_config in config/config.yaml)",
               "add hub_config: config/hub_configs/<name>.json (a copy of the hub config.json) to the model's entry")


def count_lora(cfg: dict, recipe: dict, where: str) -> dict:
    """Trainable / total parameters of the recipe's model with its LoRA, on the meta device: what PEFT prints
    after loading the real weights (quantization aside: PEFT counts a 4-bit weight as its full-precision size)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from .config import resolve_model
    from .models import meta_model_from_config

    r = check_sft_recipe(cfg, recipe, where)
    m = resolve_model(cfg, r["model"], where, must_exist=True)
    conf, conf_from = model_config_json(m, where)
    try:
        model = meta_model_from_config(conf, trust_remote_code=m["trust_remote_code"])
    except ValueError as e:
        raise fail(f"{where}: key model", f"cannot build {m['source']} from {conf_from} ({e})",
                   "count a model of a native transformers architecture") from None
    check_targets_in(model, r, m["source"], where)
    base_total = sum(p.numel() for p in model.parameters())
    lcfg = LoraConfig(r=r["lora_r"], lora_alpha=r["lora_alpha"], lora_dropout=r["lora_dropout"],
                      target_modules=list(r["target_modules"]), bias="none", inference_mode=False,
                      task_type=getattr(TaskType, r["task_type"]))
    pm = get_peft_model(model, lcfg)
    trainable, total = pm.get_nb_trainable_parameters()
    return {"model_source": m["source"], "config_from": conf_from, "lora_r": r["lora_r"],
            "lora_alpha": r["lora_alpha"], "target_modules": ",".join(r["target_modules"]),
            "tie_word_embeddings_serialized": conf.get("tie_word_embeddings"), "params_base": base_total,
            "params_trainable": trainable, "params_total": total, "peft_trainable_line": peft_trainable_line(pm)}


def count(recipe_path: str, cfg: dict) -> list[dict]:
    """count for a lora_sft recipe (one line) or a lora_sweep recipe (one line per rank)."""
    from .config import load_recipe, sweep_run_recipe

    recipe = load_recipe(recipe_path, cfg)
    if recipe["stage"] == "lora_sft":
        return [count_lora(cfg, recipe, str(recipe_path))]
    if recipe["stage"] == "lora_sweep":
        return [count_lora(cfg, sweep_run_recipe(recipe, k, str(recipe_path)), f"{recipe_path} (rank {k})")
                for k in recipe["ranks"]]
    raise fail(f"{recipe_path}: key stage", f"{recipe['stage']!r} trains no adapter", "count a lora_sft or lora_sweep recipe")


# ================================================================ rank sweep (stage lora_sweep)

SWEEP_DEFAULTS = {"eval_prompts_split": "test", "generation_batch_size": 16}


def _prompt_ids(tok, prompts: list[str], max_in: int, seq2seq: bool) -> list[list[int]]:
    ids = [tok(p, add_special_tokens=True, truncation=True, max_length=max_in)["input_ids"] for p in prompts]
    if seq2seq:
        ids = [s if s and s[-1] == tok.eos_token_id else s[: max_in - 1] + [tok.eos_token_id] for s in ids]
    return ids


def sweep_scorer(cfg: dict, sweep: dict):
    """after_train for one sweep run: greedy generations on held-out prompts, BLEU-4 / ROUGE-1/2/L (x100)."""
    from .config import resolve_dataset
    from .data import load_split
    from .textmetrics import corpus_scores

    sw = {**SWEEP_DEFAULTS, **sweep}

    def score(model, tok, r, device):
        import torch

        ds = resolve_dataset(cfg, r["dataset"])
        fmt = ds["format"]
        template = template_of(r, fmt, r["name"])
        rows = load_split(ds, sw["eval_prompts_split"], sw["num_prompts"])
        prompts = [render_prompt(row, fmt, template) for row in rows]
        refs = [row[ANSWER_FIELD[fmt]] for row in rows]
        seq2seq = r["task_type"] == "SEQ_2_SEQ_LM"
        model.eval()
        t0 = time.time()
        with torch.no_grad():
            preds = generate_all(model, tok, _prompt_ids(tok, prompts, r["max_input_length"], seq2seq),
                                 batch_size=sw["generation_batch_size"], max_new_tokens=sw["max_new_tokens"],
                                 seq2seq=seq2seq, sample=None)
        sc = corpus_scores(preds, refs)
        return {"gen_split": sw["eval_prompts_split"], "gen_prompts": len(rows), "gen_max_new_tokens": sw["max_new_tokens"],
                "generation_seconds": time.time() - t0, "bleu4": sc["bleu-4"], "rouge1": sc["rouge-1"],
                "rouge2": sc["rouge-2"], "rougeL": sc["rouge-l"],
                "_generations": [{"prompt": p, "reference": ref, "prediction": pr}
                                 for p, ref, pr in zip(prompts, refs, preds)]}

    return score


def sweep_run(recipe_path: str, rank: int, out: str, cfg: dict) -> dict:
    from .config import load_recipe, sweep_run_recipe

    sweep = load_recipe(recipe_path, cfg)
    run = sweep_run_recipe(sweep, rank, str(recipe_path))
    flat = train(recipe_path, out, cfg, run_recipe=run, after_train=sweep_scorer(cfg, sweep))
    return {**flat, "rank": rank}


SWEEP_COLUMNS = [  # (metrics key of a run, column header, format)
    ("lora_alpha", "lora_alpha", "{:g}"), ("params_trainable", "trainable params", "{:,}"),
    ("params_trainable_pct", "trainable %", "{:.4f}"), ("train_runtime", "train time s", "{:.1f}"),
    ("seconds_per_step", "s/step", "{:.3f}"), ("train_loss_last", "final train loss", "{:.4f}"),
    ("eval_loss", "eval loss", "{:.4f}"), ("bleu4", "BLEU-4", "{:.2f}"), ("rougeL", "ROUGE-L", "{:.2f}"),
    ("peak_mem_mb", "peak mem MiB", "{:.0f}"),
]


def sweep(recipe_path: str, out: str, cfg: dict) -> dict:
    """The table (markdown + CSV), the plot and metrics.json of a finished sweep. The runs stay in out/r<rank>/:
    this writes its files one by one (each atomically) beside them, never replacing the directory."""
    import csv
    import io

    from .config import load_recipe

    where = str(recipe_path)
    rc = load_recipe(recipe_path, cfg)
    if rc["stage"] != "lora_sweep":
        raise fail(f"{where}: key stage", f"{rc['stage']!r} is not lora_sweep", "give a lora_sweep recipe")
    out_p = Path(out)
    runs = {}
    for k in rc["ranks"]:
        f = out_p / f"r{k}" / "metrics.json"
        if not f.is_file():
            raise fail(f"{where}: key ranks", f"rank {k} has no finished run ({f} is missing)",
                       f"build it first: snakemake --cores 2 {f}")
        runs[k] = read_json(f)
    ranks = sorted(runs)
    first = runs[ranks[0]]
    head = ["rank"] + [c[1] for c in SWEEP_COLUMNS]

    def cell(v, f):
        return f.format(v) if isinstance(v, (int, float)) else "-"

    md = [f"# {rc['name']}: LoRA rank sweep", "",
          f"Model `{first['model_source']}`, data `{rc['dataset']}` ({first['train_rows']} training rows), LoRA on "
          f"{first['target_modules']}, lora_alpha = {rc['alpha_per_rank']:g} x rank, dropout {rc['lora_dropout']}, "
          f"{first['global_step']} optimizer steps of batch {first['batch_size']} x {first['gradient_accumulation_steps']}, "
          f"lr {rc['learning_rate']:g} ({rc['lr_scheduler_type']}). BLEU-4 / ROUGE-L (x100, quantune.textmetrics): greedy "
          f"generations for the first {first.get('gen_prompts', '-')} prompts of split `{first.get('gen_split', '-')}`, "
          f"at most {first.get('gen_max_new_tokens', '-')} new tokens. Peak memory: {first.get('peak_mem_kind', '-')} of "
          f"each run's process (scale {rc['scale']}, device {first.get('device', '-')}).", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank"] + [c[0] for c in SWEEP_COLUMNS])
    metrics: dict[str, Any] = {"target": rc["name"], "stage": "lora_sweep", "scale": cfg["scale"], "model": rc["model"],
                               "model_source": first["model_source"], "dataset": rc["dataset"],
                               "ranks": ",".join(map(str, ranks)), "alpha_per_rank": rc["alpha_per_rank"],
                               "target_modules": first["target_modules"], "global_step": first["global_step"]}
    for k in ranks:
        m = runs[k]
        md.append("| " + " | ".join([str(k)] + [cell(m.get(key), f) for key, _, f in SWEEP_COLUMNS]) + " |")
        w.writerow([k] + [m.get(key, "") for key, _, _ in SWEEP_COLUMNS])
        for key, _, _ in SWEEP_COLUMNS:
            if isinstance(m.get(key), (int, float)):
                metrics[f"r{k}_{key}"] = m[key]
    md += ["", f"Per run: `r<rank>/` (adapter, metrics.json, trainer_log.jsonl, generations.jsonl, tb/). "
           f"Plot: `{rc['name']}.png`. Data: `{rc['name']}.csv`."]
    _plot_sweep(runs, out_p / f"{rc['name']}.png", rc["name"])
    atomic_write_text(out_p / f"{rc['name']}.csv", buf.getvalue())
    atomic_write_text(out_p / f"{rc['name']}.md", "\n".join(md) + "\n")
    return write_metrics(out_p / "metrics.json", metrics)


def _plot_sweep(runs: dict[int, dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(runs)

    def col(key):
        return [runs[k].get(key) for k in ks]

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), dpi=110)
    panels = [(axes[0][0], [("params_trainable", "trainable params")], "parameters"),
              (axes[0][1], [("train_loss_last", "final train loss"), ("eval_loss", "eval loss")], "loss"),
              (axes[1][0], [("bleu4", "BLEU-4"), ("rougeL", "ROUGE-L")], "score (x100)"),
              (axes[1][1], [("train_runtime", "train time s")], "train time (s)")]
    mem = axes[1][1].twinx()  # peak memory on its own axis (MiB), beside the train time (s)
    pts = [(k, runs[k]["peak_mem_mb"]) for k in ks if isinstance(runs[k].get("peak_mem_mb"), (int, float))]
    if pts:
        mem.plot(*zip(*pts), marker="s", color="C3", label="peak mem MiB")
        mem.set_ylabel("peak memory (MiB)")
        mem.legend(fontsize=8, loc="lower right")
    for ax, series, ylabel in panels:
        for key, label in series:
            ys = col(key)
            pts = [(k, y) for k, y in zip(ks, ys) if isinstance(y, (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("LoRA rank r (alpha = 2r)" if all(runs[k].get("lora_alpha") == 2 * k for k in ks) else "LoRA rank r")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{name}: LoRA rank sweep")
    fig.tight_layout()
    atomic_savefig(fig, path)


# ================================================================ comparison

def adapter_dirs(cfg: dict, recipe: dict, where: str) -> dict[str, Path]:
    from .config import results_dir

    out = {}
    for label, target in recipe["adapters"].items():
        d = Path(results_dir(cfg)) / target
        if not (d / "adapter" / "adapter_config.json").is_file() or not (d / "recipe.json").is_file():
            raise fail(f"{where}: key adapters.{label}", f"no trained adapter in {d}",
                       f"build it first: snakemake {target}")
        out[label] = d
    return out


def _left_pad(seqs: list[list[int]], pad_id: int):
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (n - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def generate_all(model, tok, prompts_ids: list[list[int]], *, batch_size: int, max_new_tokens: int,
                 seq2seq: bool, sample: dict | None) -> list[str]:
    import torch

    device = next(p for p in model.parameters()).device
    outs: list[str] = []
    if sample is not None:
        from transformers import set_seed

        set_seed(sample["seed"])  # the same random stream for every model
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    if sample is None:
        kw.update(do_sample=False, num_beams=1)
    else:
        kw.update(do_sample=True, temperature=sample["temperature"], top_p=sample["top_p"])
    for i in range(0, len(prompts_ids), batch_size):
        chunk = prompts_ids[i:i + batch_size]
        if seq2seq:  # encoder inputs pad on the right
            n = max(len(s) for s in chunk)
            ids = torch.tensor([s + [tok.pad_token_id] * (n - len(s)) for s in chunk], dtype=torch.long)
            mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in chunk], dtype=torch.long)
        else:
            ids, mask = _left_pad(chunk, tok.pad_token_id)
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        new = gen if seq2seq else gen[:, ids.shape[1]:]
        outs.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return outs


def compare(recipe_path: str, out: str, cfg: dict) -> dict:
    import torch
    from peft import PeftModel

    from .config import load_recipe, resolve_dataset, resolve_model
    from .data import load_split
    from .tb import TBWriter, peak_memory_mb
    from .textmetrics import corpus_scores, score_pair

    where = str(recipe_path)
    rc = {"split": "validation", "quantization": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
          "device": "auto", "include_base": True, "show_examples": 8, **load_recipe(recipe_path, cfg)}
    if rc["stage"] != "lora_compare":
        raise fail(f"{where}: key stage", f"{rc['stage']!r} is not lora_compare", "drop `compare` for lora_sft recipes")
    dirs = adapter_dirs(cfg, rc, where)
    trained = {lab: read_json(d / "recipe.json") for lab, d in dirs.items()}
    m = resolve_model(cfg, rc["model"], must_exist=True)
    for lab, tr in trained.items():
        if tr["model_source"] != m["source"]:
            raise fail(f"{where}: key adapters.{lab}", f"adapter was trained on {tr['model_source']}, not {m['source']}",
                       "compare adapters of the recipe's base model only")
    first = next(iter(trained.values()))
    for lab, tr in trained.items():
        for k in ("prompt_template", "data_format", "task_type"):
            if tr[k] != first[k]:
                raise fail(f"{where}: key adapters.{lab}", f"{k} {tr[k]!r} differs from the other adapters' {first[k]!r}",
                           "compare adapters trained on the same prompt format")
    ds = resolve_dataset(cfg, rc["dataset"])
    fmt = ds["format"]
    if fmt != first["data_format"]:
        raise fail(f"{where}: key dataset", f"format {fmt} differs from the adapters' {first['data_format']}",
                   "use the data set the adapters were trained on")
    template = template_of(first, fmt, where)
    seq2seq = first["task_type"] == "SEQ_2_SEQ_LM"
    device = pick_device(rc, where)
    rows = load_split(ds, rc["split"], rc["num_prompts"])
    ans = ANSWER_FIELD[fmt]
    prompts = [render_prompt(r, fmt, template) for r in rows]
    refs = [r[ans] for r in rows]

    seed_everything(rc["sample_seed"])
    if device == "cpu":
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 2)))
    t0 = time.time()
    base, tok = load_base(m, rc, device, training=False)
    labels = list(dirs)
    model = PeftModel.from_pretrained(base, str(dirs[labels[0]] / "adapter"), adapter_name=labels[0])
    for lab in labels[1:]:
        model.load_adapter(str(dirs[lab] / "adapter"), adapter_name=lab)
    model.eval()
    load_s = time.time() - t0
    max_in = max(tr["max_input_length"] for tr in trained.values())
    p_ids = [tok(p, add_special_tokens=True, truncation=True, max_length=max_in)["input_ids"] for p in prompts]
    if seq2seq:
        p_ids = [s if s and s[-1] == tok.eos_token_id else s[: max_in - 1] + [tok.eos_token_id] for s in p_ids]
    sample = {"seed": rc["sample_seed"], "temperature": rc["temperature"], "top_p": rc["top_p"]}
    modes = {"greedy": None, "sampled": sample}
    gens: dict[str, dict[str, list[str]]] = {}
    t_gen = time.time()
    systems = (["base"] if rc["include_base"] else []) + labels
    for sysname in systems:
        gens[sysname] = {}
        for mode, smp in modes.items():
            kw = dict(batch_size=rc["batch_size"], max_new_tokens=rc["max_new_tokens"], seq2seq=seq2seq, sample=smp)
            if sysname == "base":
                with model.disable_adapter():
                    gens[sysname][mode] = generate_all(model, tok, p_ids, **kw)
            else:
                model.set_adapter(sysname)
                gens[sysname][mode] = generate_all(model, tok, p_ids, **kw)
            print(f"{sysname} {mode}: {len(gens[sysname][mode])} generations")
    gen_s = time.time() - t_gen

    scores = {s: {mode: corpus_scores(g, refs) for mode, g in by.items()} for s, by in gens.items()}
    key = {"bleu-4": "bleu4", "rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}
    metrics: dict[str, Any] = {"target": rc["name"], "stage": "lora_compare", "scale": cfg["scale"],
                               "model": rc["model"], "model_source": m["source"], "dataset": rc["dataset"],
                               "split": rc["split"], "num_prompts": len(rows), "max_new_tokens": rc["max_new_tokens"],
                               "temperature": rc["temperature"], "top_p": rc["top_p"], "sample_seed": rc["sample_seed"],
                               "quantization": rc["quantization"], "device": device, "load_seconds": load_s,
                               "generation_seconds": gen_s, "peak_mem_mb": peak_memory_mb(),
                               "adapters": ",".join(f"{lab}={t}" for lab, t in rc["adapters"].items())}
    for s, by in scores.items():
        for mode, sc in by.items():
            for k, v in sc.items():
                metrics[f"{s}_{mode}_{key[k]}"] = v
                if s != "base" and "base" in scores:
                    metrics[f"{s}_{mode}_{key[k]}_gain"] = v - scores["base"][mode][k]
    train_m = {lab: read_json(d / "metrics.json") for lab, d in dirs.items()}
    for lab, tm in train_m.items():
        for k in ("train_loss_first", "train_loss_last", "eval_loss", "train_runtime", "total_flos", "tokens_per_s"):
            if k in tm:
                metrics[f"{lab}_{k}"] = tm[k]

    table = []
    for i, (row, ref) in enumerate(zip(rows, refs)):
        item = {"prompt": prompts[i], "reference": ref, "generations": {}}
        for s in gens:
            item["generations"][s] = {mode: {"text": gens[s][mode][i], **score_pair(gens[s][mode][i], ref)}
                                      for mode in modes}
        table.append(item)
    md = _markdown(rc, metrics, scores, train_m, trained, table, systems)

    with atomic_dir(Path(out)) as tmp:
        write_json(tmp / "comparison.json", {"settings": {k: v for k, v in rc.items() if k != "tiny"},
                                             "scores": scores, "rows": table})
        (tmp / "comparison.md").write_text(md, encoding="utf-8")
        curves_step, curves_epoch = {}, {}
        for lab, d in dirs.items():
            hist = [json.loads(line) for line in (d / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
            hist = [h for h in hist if "loss" in h and "step" in h]
            curves_step[f"{lab} ({rc['adapters'][lab]})"] = [(h["step"], h["loss"]) for h in hist]
            curves_epoch[f"{lab} ({rc['adapters'][lab]})"] = [(h.get("epoch", 0.0), h["loss"]) for h in hist]
        plot_losses(curves_step, tmp / "loss_curves.png", "optimizer step", "training loss per adapter")
        plot_losses(curves_epoch, tmp / "loss_curves_epoch.png", "epoch (fraction of the training data seen)",
                    "training loss per adapter")
        with TBWriter(tmp / "tb", rc["name"]) as tb:
            tb.final({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            tb.text("comparison", md)
        flat = write_metrics(tmp / "metrics.json", metrics)
    return flat


def _cell(text: str, n: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def _markdown(rc, metrics, scores, train_m, trained, table, systems) -> str:
    lines = [f"# {rc['name']}: {', '.join(rc['adapters'])} vs the untuned base", "",
             f"Base model `{metrics['model_source']}` ({rc['quantization']}), {metrics['num_prompts']} held-out prompts "
             f"from `{rc['dataset']}` split `{rc['split']}`, at most {rc['max_new_tokens']} new tokens. Greedy decoding, "
             f"and sampling with temperature {rc['temperature']}, top_p {rc['top_p']}, seed {rc['sample_seed']} "
             "(the same seed for every model). BLEU-4 on characters and ROUGE F1 on jieba words, x100 "
             "(LLaMA-Factory's computation).", "",
             "## Scores", "", "| model | decoding | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|---|---|"]
    for s in systems:
        for mode in ("greedy", "sampled"):
            sc = scores[s][mode]
            lines.append(f"| {s} | {mode} | {sc['bleu-4']:.2f} | {sc['rouge-1']:.2f} | {sc['rouge-2']:.2f} | "
                         f"{sc['rouge-l']:.2f} |")
    lines += ["", "## Training runs", "",
              "| adapter | target | scheduler | warmup | batch x accum | lengths in/out | LoRA r | steps | loss first -> last "
              "| eval loss | train_runtime s | total_flos | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lab, tm in train_m.items():
        tr = trained[lab]

        def f(k, fmt="{:.4g}"):
            v = tm.get(k)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"

        lines.append(f"| {lab} | {rc['adapters'][lab]} | {tr['lr_scheduler_type']} | {tr['warmup_ratio']} | "
                     f"{tr['per_device_train_batch_size']} x {tr['gradient_accumulation_steps']} | "
                     f"{tr['max_input_length']}/{tr['max_output_length']} | {tr['lora_r']} | {f('global_step', '{}')} | "
                     f"{f('train_loss_first')} -> {f('train_loss_last')} | {f('eval_loss')} | {f('train_runtime', '{:.1f}')} "
                     f"| {f('total_flos', '{:.3g}')} | {f('tokens_per_s', '{:.1f}')} |")
    lines += ["", "Loss curves: `loss_curves.png` (per optimizer step) and `loss_curves_epoch.png` (per epoch).", "",
              "## Side by side (greedy)", "", "| prompt | reference | " + " | ".join(systems) + " |",
              "|" + "---|" * (2 + len(systems))]
    for item in table[: rc["show_examples"]]:
        cells = [_cell(item["prompt"], 80), _cell(item["reference"])]
        cells += [_cell(item["generations"][s]["greedy"]["text"]) for s in systems]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Side by side (sampled)", "", "| prompt | " + " | ".join(systems) + " |",
              "|" + "---|" * (1 + len(systems))]
    for item in table[: rc["show_examples"]]:
        cells = [_cell(item["prompt"], 80)] + [_cell(item["generations"][s]["sampled"]["text"]) for s in systems]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ================================================================ workflow helpers (rules/finetune.smk)

def workflow_env(recipe: dict, scale: str) -> str:
    """The env (envs/<env>.yaml, its image) a recipe's job runs in. THUDM/chatglm3-6b's remote code runs only on
    the transformers that envs/chatglm3.yaml pins (recipes say `env: chatglm3`); at tiny scale the same code runs
    on the tiny native-GLM model, which needs the project's current stack (envs/finetune.yaml)."""
    return "chatglm3" if scale == "full" and recipe.get("env") == "chatglm3" else "finetune"


def workflow_runtime(recipe: dict, scale: str) -> int:
    """Minutes. Seed 000 on one RTX 4090: 100 steps 8 min, one AdvertiseGen epoch (1,791 / 1,194 steps) 2.2 h;
    the limits leave room for a slower GPU, the held-out evaluation and the model download."""
    if scale == "tiny":
        return 30
    if recipe["stage"] == "lora_compare":
        return 180
    return 120 if recipe.get("max_steps") else 720


def adapter_targets(recipes: dict, name: str, where: str) -> list[str]:
    """The lora_sft targets a lora_compare recipe reads; anything else stops the workflow with one line."""
    out = []
    for label, target in recipes[name]["adapters"].items():
        if recipes.get(target, {}).get("stage") != "lora_sft":
            known = sorted(n for n, r in recipes.items() if r.get("stage") == "lora_sft")
            raise fail(f"{where}: key adapters.{label}", f"{target!r} is not a lora_sft recipe",
                       f"use one of: {', '.join(known)}")
        out.append(target)
    return out


# ================================================================ CLI

def _cmd(a) -> None:
    from .config import config_from_args, load_yaml

    cfg = config_from_args(a)
    stage = (load_yaml(a.recipe) or {}).get("stage") if Path(a.recipe).is_file() else None
    action = a.action or {"lora_compare": "compare", "lora_sweep": "sweep"}.get(stage, "train")
    if action != "count" and not a.out:
        raise fail("--out", f"{action} needs an output directory", "give --out results/<target>")
    if action == "count":
        for c in count(a.recipe, cfg):
            print(f"{c['model_source']} (config {c['config_from']}), LoRA r={c['lora_r']} alpha={c['lora_alpha']:g} "
                  f"on {c['target_modules']}:")
            print(c["peft_trainable_line"])
    elif action == "sweep-run":
        if a.rank is None:
            raise fail("--rank", "sweep-run needs the rank of the run", "give --rank N (one of the recipe's ranks)")
        m = sweep_run(a.recipe, a.rank, a.out, cfg)
        print(f"{m['target']} r={a.rank}: loss {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f}, "
              f"trainable {m['params_trainable']}, BLEU-4 {m['bleu4']:.2f}, ROUGE-L {m['rougeL']:.2f}")
    elif action == "sweep":
        m = sweep(a.recipe, a.out, cfg)
        print(json.dumps({k: v for k, v in m.items() if k.startswith("r") and k[1:2].isdigit()}))
    elif action == "compare":
        m = compare(a.recipe, a.out, cfg)
        best = {k: v for k, v in m.items() if k.endswith("_greedy_bleu4") or k.endswith("_greedy_rougeL")}
        print(json.dumps(best))
    else:
        m = train(a.recipe, a.out, cfg)
        print(f"{m['target']}: {m['global_step']} steps, loss {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f}, "
              f"eval loss {m.get('eval_loss', float('nan')):.3f}, trainable {m['params_trainable']} "
              f"({m['params_trainable_pct']:.4f}%), {m['tokens_per_s']:.1f} tokens/s")


def build_parser() -> argparse.ArgumentParser:
    from .config import stage_parser

    p = stage_parser("quantune.finetune", __doc__, _cmd, out_required=False)
    p.add_argument("action", nargs="?", choices=["train", "compare", "count", "sweep-run", "sweep"],
                   help="train (lora_sft), compare (lora_compare), count (parameters from the config, no --out), "
                        "sweep-run --rank N / sweep (lora_sweep); default: from the recipe's stage")
    p.add_argument("--rank", type=int, default=None, help="sweep-run: the LoRA rank of this run")
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
