"""What the training stages (sft, lora_sft) share around the Hugging Face Trainer.

Checkpoints of a training target (results/.checkpoints/<target>/, common.checkpoint_dir): which checkpoint-N
directories are complete, dropping the rest, and discarding those written for another recipe or model, so that
a rerun resumes only from what it would itself have written. And a run's steps and its own record: the tokens and
step it began at and the seconds at each logged step, for this run's throughput when it resumed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .common import fail, write_json
from .measure import profile_report, synced_clock
from .varlen import FILLER

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = ("trainer_state.json",)  # the file the Trainer writes last into a checkpoint


def complete_checkpoints(ckpt_dir: Path, required: tuple[str, ...] = TRAINER_STATE) -> list[Path]:
    """checkpoint-N directories the Trainer finished writing, oldest first: each name or glob pattern of
    `required` matches a file in it."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT.fullmatch(p.name)]
    done = [p for p in found if all(any(f.is_file() for f in p.glob(pat)) for pat in required)]
    return sorted(done, key=lambda p: int(p.name.split("-")[-1]))


def drop_incomplete_checkpoints(ckpt_dir: Path, required: tuple[str, ...] = TRAINER_STATE) -> list[str]:
    """Remove the checkpoint-* directories an interrupted run left half written; returns their names."""
    dropped = []
    if ckpt_dir.is_dir():
        complete = set(complete_checkpoints(ckpt_dir, required))
        for p in ckpt_dir.glob("checkpoint-*"):
            if p.is_dir() and p not in complete:
                shutil.rmtree(p, ignore_errors=True)
                dropped.append(p.name)
    return dropped


def fingerprint(recipe: dict, model_source: str, ignore: tuple[str, ...] = ()) -> str:
    """What a checkpoint must match to be resumed: the recipe as run (less the keys in `ignore`, which do not
    change what is trained) and the model it started from."""
    keep = {k: v for k, v in recipe.items() if k not in ignore}
    blob = json.dumps({"recipe": keep, "model": model_source}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def keep_checkpoints_of(ckpt_root: Path, fp: str, recipe_path: str) -> Path:
    """ckpt_root, emptied first when its checkpoints were written under another fingerprint; records `fp`."""
    fp_file = ckpt_root / "fingerprint.json"
    if ckpt_root.exists():
        old = json.loads(fp_file.read_text()).get("fingerprint") if fp_file.is_file() else None
        if old != fp:
            print(f"discarding checkpoints in {ckpt_root}: they were written for another recipe or model")
            shutil.rmtree(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, {"fingerprint": fp, "recipe": str(recipe_path)})
    return ckpt_root


# ---------------------------------------------------------------- a run's steps and its own record

def total_optimizer_steps(recipe: dict, n_rows: int) -> int:
    """The optimizer steps a run of the recipe takes: its max_steps, else its epochs over n_rows rows."""
    if recipe.get("max_steps"):
        return int(recipe["max_steps"])
    batches = math.ceil(n_rows / recipe["per_device_train_batch_size"])
    per_epoch = max(1, math.ceil(batches / recipe["gradient_accumulation_steps"]))
    return max(1, math.ceil(per_epoch * float(recipe["num_train_epochs"])))


def tokens_counting() -> Any:
    """TrainingArguments' include_num_input_tokens_seen: "non_padding" where this transformers has it (the
    pinned transformers of envs/chatglm3.yaml counts every token: True)."""
    from transformers import TrainingArguments

    return "non_padding" if "non_padding" in (TrainingArguments.__doc__ or "") else True


class TokenCount:
    """The input positions of the batches a run trained on: all of them (`computed`, padding included) and those
    holding a real token (`real`: the attention mask's ones; a packed batch has no mask and no padding). Counted in
    the training step (counting_trainer), not in the collator, which also sees the batch the data loader fetches
    ahead and never trains on."""

    def __init__(self):
        self.computed, self._real = 0, 0

    def add(self, inputs) -> None:
        self.computed += int(inputs["input_ids"].numel())
        real = host_tokens_seen(inputs, "non_padding")
        # a mask is summed where it lives: no wait for the GPU per micro-batch; read at step boundaries (step_timer)
        self._real = self._real + (real if real is not None else inputs["attention_mask"].sum())

    @property
    def real(self) -> int:
        return int(self._real)


class StepLosses:
    """Every optimizer step's training loss as the Trainer logs it with logging_steps 1 (the sum of the step's
    micro-batch losses that training_step returns), kept on the device and read once, when training ends
    (counting_trainer): a log at every step would read each one back, waiting for the step's last kernels. `by_step`:
    global step -> loss, for the steps this process trained (a resumed run's from its checkpoint on)."""

    def __init__(self):
        self._open = None  # the step being trained: its micro-batches' losses summed on the device
        self._closed: list = []  # (global step, loss tensor), not yet read
        self.by_step: dict[int, float] = {}

    def add(self, loss) -> None:
        self._open = loss.detach() if self._open is None else self._open + loss.detach()

    def close(self, step: int) -> None:
        if self._open is not None:
            self._closed.append((step, self._open))
            self._open = None

    def read(self, reduce=None) -> dict[int, float]:
        """The recorded losses, read back in one transfer (`reduce`: over a distributed run's processes)."""
        import torch

        if self._closed:
            t = torch.stack([loss.float().reshape(()) for _, loss in self._closed])
            t = reduce(t) if reduce is not None else t
            self.by_step.update(zip((step for step, _ in self._closed), t.tolist()))
            self._closed = []
        return self.by_step


def host_tokens_seen(inputs, mode) -> int | None:
    """A micro-batch's count for the Trainer's num_input_tokens_seen (`mode`: its include_num_input_tokens_seen)
    where the host knows it without reading the batch back from the GPU: a packed batch (no attention mask, no
    padding: each position but a rounded batch's filler holds a token, one equal to the pad id included) or every
    position ("all"); None where the count needs the batch's values (an attention mask to sum). TokenCount's real
    tokens by the same rule."""
    ids = inputs.get("input_ids")
    if ids is None or mode in ("no", False):
        return None
    if mode in ("all", True):
        return int(ids.numel())
    return None if inputs.get("attention_mask") is not None else int(ids.numel()) - int(inputs.get(FILLER, 0))


def without_filler(inputs):
    """A batch without a rounded packed batch's FILLER length (lib.varlen.packed_collator), which is not a model
    input."""
    return {k: v for k, v in inputs.items() if k != FILLER} if FILLER in inputs else inputs


def counting_trainer(count: TokenCount, losses: StepLosses | None = None):
    """transformers' Trainer that adds each micro-batch it trains on to `count` (a rounded packed batch's filler as
    padding, taken out of the batch before the model) and, with `losses`, each optimizer step's loss to it (read when
    training ends, the mean over processes), compiles as `torch_compile` says
    (dynamo_plugin), and trains with liger's fused linear cross-entropy at FLCE_CHUNK_MEM_CONST where
    use_liger_kernel is on (liger_flce_chunks). Between optimizer steps it reads nothing back from the GPU that
    the Trainer would read there only to log it (host_tokens_seen, the gradient norm kept a tensor; the stages turn
    logging_nan_inf_filter off): each such read waits for the step's last kernels, so the host cannot run its
    bookkeeping and the next batch's launches while the GPU finishes the optimizer step."""
    import torch
    from transformers import Trainer

    class _CountingTrainer(Trainer):
        def train(self, *args, **kwargs):
            with liger_flce_chunks(bool(self.args.use_liger_kernel)):
                out = super().train(*args, **kwargs)
            if losses is not None:
                many = self.accelerator.num_processes > 1
                losses.read((lambda t: self.accelerator.reduce(t, "mean")) if many else None)
            return out

        def training_step(self, model, inputs, *args, **kwargs):
            count.add(inputs)
            loss = super().training_step(model, without_filler(inputs), *args, **kwargs)
            if losses is not None:
                losses.add(loss)
            return loss

        def _maybe_log_save_evaluate(self, *args, **kwargs):  # once an optimizer step, after it, before any log
            if losses is not None:
                losses.close(self.state.global_step)
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def _track_num_input_tokens(self, inputs):
            n = host_tokens_seen(inputs, self.args.include_num_input_tokens_seen)
            if n is None or self.accelerator.num_processes > 1:  # the Trainer's count: on the device, gathered
                return super()._track_num_input_tokens(inputs)
            self.state.num_input_tokens_seen += n

        def _get_grad_norm(self, model, grad_norm=None):
            if torch.is_tensor(grad_norm):  # read when the Trainer logs it (under DeepSpeed it reads it every step)
                return grad_norm
            return super()._get_grad_norm(model, grad_norm)

        def prediction_step(self, model, inputs, *args, **kwargs):
            return super().prediction_step(model, without_filler(inputs), *args, **kwargs)

        def _build_accelerator_args(self, **kwargs):
            args = super()._build_accelerator_args(**kwargs)
            if "dynamo_plugin" in args:
                args["dynamo_plugin"] = dynamo_plugin(self.args.torch_compile)
            return args

    return _CountingTrainer


DYNAMO = {"backend": "inductor", "dynamic": True}  # torch.compile's settings for a run's decoder blocks


def dynamo_plugin(on: bool):
    """accelerate's torch.compile settings for a run: with `torch_compile` each repeated decoder block is compiled
    on its own (regional compilation: the block's graph is compiled once and reused by every layer; under DeepSpeed
    through the engine's module.compile) with dynamic shapes from the start (packed rows change the token count at
    every step); without it, no compilation, whatever ACCELERATE_DYNAMO_* an earlier TrainingArguments with
    torch_compile left in this process's environment."""
    from accelerate.utils import TorchDynamoPlugin

    if on:
        return TorchDynamoPlugin(**DYNAMO, use_regional_compilation=True)
    return TorchDynamoPlugin(backend="no")


def compiled_view(model, on: bool):
    """The model as a run with `torch_compile` on computes it (dynamo_plugin's regional compilation, its settings:
    accelerate's compile_regions, a view whose repeated blocks are compiled, sharing the model's weights and
    leaving the model itself as it was), or the model itself where the run does not compile."""
    if not on:
        return model
    from accelerate.utils import compile_regions

    return compile_regions(model, **DYNAMO)


def compiled_modules(model) -> int:
    """Compiled modules in a trained model (the Trainer's model_wrapped), for metrics: regional compilation's
    blocks, compiled in place under DeepSpeed (nn.Module.compile) or wrapped (torch.compile's OptimizedModule)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return sum(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def packing_refusal(cfg: dict, model: str, seq2seq: bool, where: str) -> tuple[str, str] | None:
    """Why a recipe's rows cannot be packed here, and the fix, or None. Packed rows stay apart only where the model's
    attention goes through transformers' AttentionInterface (lib.varlen reads the row boundaries there): a
    decoder-only model of transformers' own code, not an encoder-decoder, not remote code."""
    from .config import resolve_model

    if seq2seq:
        return "packed rows need a decoder-only model; this one is an encoder-decoder", "use padding: longest"
    if resolve_model(cfg, model, where=where, key="model")["trust_remote_code"]:
        return (f"model {model!r} runs remote code here, which would attend across packed rows",
                "use padding: longest at this scale")
    return None


def check_packing(cfg: dict, model: str, seq2seq: bool, where: str) -> None:
    """packing_refusal as the one-line error of a recipe that asks for padding: packed."""
    refused = packing_refusal(cfg, model, seq2seq, where)
    if refused:
        raise fail(f"{where}: key padding", *refused)


def speed_changes(r: dict, refusal) -> tuple[dict, str]:
    """What a recipe's `speed` mode changes (key -> value run) and a switch it could not turn on here. The recipe's
    own keys are the seed configuration; fast and lean keep its rows per optimizer step, schedule, data order and
    loss, and change only how the rows are computed: packed padding-free unless `refusal()` (packing_refusal of
    the recipe) says why not, and for fast the step's rows in one micro-batch with gradient checkpointing off, for
    lean checkpointing on and, where the rows are packed and the written accumulation is even, twice the written
    micro-batch at half the accumulation. The packed rows compute no padding, lean drops the NF4 model's fp32
    upcast (lora_sft.speed_settings) and, with liger_kernel (with_auto_switches), the loss never holds the logits: on
    ChatGLM3-6B's shape lean's 32 x 2 peaked at 6.47 GiB against the seed configuration's 9.44 at 1.89x its real
    tokens/s (linear), 48 x 2 at 7.81 against 11.53 at 1.65x (cosine; one H100, bench/results/qlora_speed.md);
    without liger 9.17 and 11.83 GiB (`git show 9317a17:bench/results/qlora_speed.md`)."""
    if r["speed"] == "seed":
        return {}, ""
    refusal = refusal() if r["padding"] != "packed" else None  # a packed recipe's check_packing has passed
    want: dict[str, Any] = {} if refusal else {"padding": "packed"}
    if r["speed"] == "fast":
        want.update(per_device_train_batch_size=r["per_device_train_batch_size"] * r["gradient_accumulation_steps"],
                    gradient_accumulation_steps=1, gradient_checkpointing=False)
    else:
        want["gradient_checkpointing"] = True
        acc = r["gradient_accumulation_steps"]
        if not refusal and acc % 2 == 0:
            want.update(per_device_train_batch_size=2 * r["per_device_train_batch_size"],
                        gradient_accumulation_steps=acc // 2)
    note = f"padding stays {r['padding']}: {refusal[0]}" if refusal else ""
    return {k: v for k, v in want.items() if r[k] != v}, note


LIGER_KERNEL = "liger-kernel==0.8.5"  # envs/finetune.yaml and envs/deepspeed.yaml pin the same


def liger_refusal(m: dict, device: str, where: str) -> tuple[str, str] | None:
    """Why liger-kernel's fused kernels (transformers' use_liger_kernel: RMSNorm, RoPE, SwiGLU and linear
    cross-entropy patched into the model) cannot run here, as (reason, fix), or None: they need a CUDA GPU (Triton),
    the package, and a model type liger patches (read from the resolved model `m`'s config.json only then)."""
    from .models import model_config_json

    if device != "cuda":
        return "liger-kernel's Triton kernels need a CUDA GPU and this run has none", \
            "set liger_kernel: false on this machine"
    try:
        patches = liger_patches()
    except ImportError:
        return "liger-kernel is not installed", f"pip install {LIGER_KERNEL} or set liger_kernel: false"
    model_type = model_config_json(m, where)[0].get("model_type", "?")
    if model_type not in patches:
        return (f"liger-kernel has no kernels for model type {model_type!r}",
                f"set liger_kernel: false (it patches {', '.join(sorted(patches)[:12])}, ...)")
    return None


def apply_liger_kernel_to_glm(fused_linear_cross_entropy: bool = True, model=None) -> None:
    """liger-kernel's fused linear cross-entropy for transformers' `glm` type (ChatGLM3's architecture, the tiny and
    shape scale model), which liger 0.8.5 lists under no model type: its GLM-4 causal-LM forward
    (liger_kernel.transformers.model.glm4.lce_forward) reads only the decoder (`self.model`), `self.lm_head` and the
    config, which GlmForCausalLM has alike. The loss never holds the logits of a micro-batch; at ChatGLM3's 65,024-token
    vocabulary they are most of a checkpointed step's peak. Its other kernels (RMSNorm, SwiGLU) are not patched here."""
    from types import MethodType

    from liger_kernel.transformers.model.glm4 import lce_forward

    if not fused_linear_cross_entropy:
        return
    if model is not None:
        model.forward = MethodType(lce_forward, model)
    else:
        from transformers.models.glm import modeling_glm

        modeling_glm.GlmForCausalLM.forward = lce_forward


def liger_patches() -> dict:
    """liger's table of model type -> patch, where the Trainer's use_liger_kernel looks a model up, with `glm`
    (apply_liger_kernel_to_glm) added; ImportError without liger-kernel."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    MODEL_TYPE_TO_APPLY_LIGER_FN.setdefault("glm", apply_liger_kernel_to_glm)
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def liger_setting(r: dict, m: dict, device: str, where: str) -> tuple[bool, str]:
    """Whether liger-kernel runs, and why not where the recipe's mode wanted it: `liger_kernel: true` is the
    recipe's demand (one line where it cannot run), false its refusal, auto (the default) turns it on in the fast
    and lean modes wherever it can run (its fused cross-entropy never holds the logits: less memory, and less time
    for a large vocabulary) and leaves the seed configuration as written."""
    want = r["liger_kernel"]
    if want is False or (want == "auto" and r["speed"] == "seed"):
        return False, ""
    refusal = liger_refusal(m, device, where)
    if refusal and want is True:
        raise fail(f"{where}: key liger_kernel", *refusal)
    return refusal is None, f"liger-kernel stays off: {refusal[0]}" if refusal else ""


def compile_setting(r: dict, device: str) -> bool:
    """Whether the decoder blocks are compiled (dynamo_plugin): `torch_compile: true` / false as written; auto (the
    default) compiles them in the fast mode on a CUDA GPU, where it paid on an H100 (bench/results/sft_speed.md,
    `git show 6af5722:bench/results/qlora_speed.md`: 1.35x and 1.31x fast's eager rate, losses within the runs'
    noise), and nowhere else: the seed configuration runs as written, lean did not gain from it
    (bench/results/qlora_speed_lean.md), and on a CPU the first step's
    compilation costs more than a tiny run's steps save."""
    want = r["torch_compile"]
    return want is True or (want == "auto" and r["speed"] == "fast" and device == "cuda")


def use_blas_library(want: str, device: str) -> str | None:
    """Set this process's library for CUDA matmuls (torch.backends.cuda.preferred_blas_library) as the recipe's
    `blas_library` asks (auto: torch's own choice, cuBLAS unless TORCH_BLAS_PREFER_CUBLASLT is set) and return the
    one in force, None without CUDA. Packed rows give every matmul a new token count at every step, and a matmul of
    a shape cuBLAS has not seen cost the host 63 us against cuBLASLt's 40 (bench/results/sft_mm_check.json, H100);
    through the sft stage's fast mode cuBLASLt measured 0.99x cuBLAS (sft_speed_blas.md), so auto keeps torch's."""
    if device != "cuda":
        return None
    import torch

    if want != "auto":
        torch.backends.cuda.preferred_blas_library(want)
    return torch.backends.cuda.preferred_blas_library().name.lower()


LOADER_WORKERS = 2


def loader_workers(r: dict, device: str) -> int:
    """The data loader's worker processes: `dataloader_num_workers` as written; auto (the default) LOADER_WORKERS in
    the fast and lean modes on a CUDA GPU, where collating a packed batch on the training process left the GPU idle
    (sft's fast step on an H100: 80,410 real tokens/s with them against 64,677 without, bench/results/sft_profile.md,
    sixth run), and 0 elsewhere: the seed configuration runs as written, and on a CPU the workers would take cores
    from the step."""
    want = r["dataloader_num_workers"]
    if want != "auto":
        return int(want)
    return LOADER_WORKERS if r["speed"] != "seed" and device == "cuda" else 0


def loader_arguments(r: dict) -> dict:
    """The Trainer's data-loader arguments for a recipe whose workers with_auto_switches decided: its worker processes,
    kept from epoch to epoch when there are any."""
    return {"dataloader_num_workers": r["dataloader_num_workers"],
            "dataloader_persistent_workers": r["dataloader_num_workers"] > 0}


def with_auto_switches(r: dict, m: dict, device: str, where: str, changes: dict, note: str) -> tuple[dict, dict, str]:
    """The recipe with torch_compile (compile_setting), liger_kernel (liger_setting) and dataloader_num_workers
    (loader_workers) decided for this device, its mode's changes with what auto turned on, and its note with why
    liger stayed off."""
    compiled = compile_setting(r, device)
    if compiled and r["torch_compile"] == "auto":
        changes = {**changes, "torch_compile": True}
    workers = loader_workers(r, device)
    if workers and r["dataloader_num_workers"] == "auto":
        changes = {**changes, "dataloader_num_workers": workers}
    r = {**r, "torch_compile": compiled, "dataloader_num_workers": workers}
    on, why = liger_setting(r, m, device, where)
    if on and r["liger_kernel"] == "auto":
        changes = {**changes, "liger_kernel": True}
    if on:
        changes = {**changes, "liger_flce_chunk_mem_const": FLCE_CHUNK_MEM_CONST}
    if on and r.get("torch_compile"):
        why = "liger-kernel: its fused linear cross-entropy only (torch_compile fuses the decoder blocks)"
    return {**r, "liger_kernel": on}, changes, "; ".join(x for x in (note, why) if x)


# liger-kernel with torch_compile: only its fused linear cross-entropy, at the LM head outside the compiled decoder
# blocks. Its in-block kernels (RMSNorm, RoPE, SwiGLU) are autograd Functions around Triton launches that dynamo
# cannot trace (an AssertionError in higher_order_ops on the H200, Qwen3 under DeepSpeed), and inductor fuses those
# same operations itself.
LIGER_WITH_COMPILE = {"fused_linear_cross_entropy": True, "cross_entropy": False, "rms_norm": False, "rope": False,
                      "swiglu": False, "geglu": False, "layer_norm": False}


# liger-kernel's fused linear cross-entropy cuts an LM head's positions into chunks whose logits take about
# chunk_mem_const x positions x hidden; at its default 1, Qwen3-0.6B's 151,936-token vocabulary and hidden 1,024 give
# 128-position chunks, ~100 small products a 12k-position step. At 8 (liger's own choice for gpt-oss) one such step's
# loss and gradients took 0.0213 s against 0.0597 s, 0.92 GiB of added peak against 0.98, the same loss and gradients
# within 1.3e-3 relative (`python bench/sft_speed.py --flce-check`, one H100: bench/results/sft_flce_check.json);
# through the sft stage the fast step fell from 284 to 210 ms (bench/results/sft_profile.md, fourth run)
FLCE_CHUNK_MEM_CONST = 8


@contextlib.contextmanager
def liger_flce_chunks(on: bool, chunk_mem_const: int = FLCE_CHUNK_MEM_CONST):
    """While `on`, liger's fused linear cross-entropy runs with `chunk_mem_const` unless its caller passes one.
    Neither TrainingArguments.liger_kernel_config nor liger's apply_liger_kernel_to_* take it, and a forward keyword
    would reach the decoder too; liger's model forwards call it through its functional module
    (loss_utils' F.liger_fused_linear_cross_entropy), so that attribute is wrapped for the training run."""
    if not on:
        yield
        return
    import functools

    import liger_kernel.transformers.functional as F

    orig = F.liger_fused_linear_cross_entropy

    @functools.wraps(orig)
    def chunked(*args, **kwargs):
        kwargs.setdefault("chunk_mem_const", chunk_mem_const)
        return orig(*args, **kwargs)

    F.liger_fused_linear_cross_entropy = chunked
    try:
        yield
    finally:
        F.liger_fused_linear_cross_entropy = orig


def liger_kernel_config(r: dict) -> dict | None:
    """TrainingArguments.liger_kernel_config for the recipe: liger's defaults, or LIGER_WITH_COMPILE when its
    decoder blocks are compiled."""
    return dict(LIGER_WITH_COMPILE) if r["liger_kernel"] and r.get("torch_compile") else None


def patch_liger(model, r: dict) -> None:
    """liger-kernel's kernels patched into `model` as the Trainer's use_liger_kernel patches them (transformers'
    apply_liger_kernel with liger_kernel_config(r), `glm` included: liger_patches); the Trainer's own patch after
    it patches the same."""
    from transformers.integrations.liger import apply_liger_kernel

    liger_patches()
    apply_liger_kernel(model, liger_kernel_config(r))


# The fast mode computes an optimizer step's rows as one micro-batch without checkpointing where measured trials
# say its largest micro-batch fits the GPU; predicted activation bytes are multiplied by this before the comparison
FAST_MEMORY_MARGIN = 1.10
# rows of the two trial micro-batches, the run's longest: two at least, as in the run's micro-batches, whose packed
# rows transformers gives a block-diagonal mask (one row gets none: in a compiled block, another graph)
TRIAL_ROWS = (2, 4)


def micro_batch_positions(lengths, packed: bool):
    """Input positions a micro-batch of rows of these lengths computes (along the last axis of an array of them):
    packed rows end to end, padded ones each to the longest of the micro-batch."""
    import numpy as np

    lens = np.asarray(lengths, dtype=np.int64)
    return lens.sum(-1) if packed else lens.max(-1) * lens.shape[-1]


def largest_micro_batch(lengths: list[int], rows: int, packed: bool, micro_batches: int, seed: int = 0) -> int:
    """The most input positions among micro-batches of `rows` rows as shuffled epochs draw them: seeded random
    orders of all rows, cut into micro-batches, at least four orders and twice the run's `micro_batches`; packed
    rows end to end, padded ones each to the longest of its micro-batch. The Trainer draws its own order, so this
    is the tail of what the run will meet, not its exact maximum (the `rows` longest rows together would be, and
    would be met once in astronomically many epochs)."""
    import numpy as np

    lens = np.asarray(lengths, dtype=np.int64)
    rows = min(rows, len(lens))
    per_order = len(lens) // rows
    rng = np.random.default_rng(seed)
    worst = 0
    for _ in range(max(4, math.ceil(2 * micro_batches / per_order))):
        mb = lens[rng.permutation(len(lens))][: per_order * rows].reshape(per_order, rows)
        worst = max(worst, int(micro_batch_positions(mb, packed).max()))
    return worst


def plan_fast_step(lengths: list[int], rows: int, packed: bool, steps: int, fixed: float, per_position: float,
                   available: float) -> tuple[int, int] | None:
    """How the fast mode splits an optimizer step's `rows` rows over the run's `steps` steps: (micro-batch,
    accumulation) with the fewest micro-batches whose largest needs (`fixed` + largest_micro_batch x `per_position`
    bytes, x FAST_MEMORY_MARGIN) no more than `available` bytes; None where not even one row a micro-batch fits."""
    for acc in range(1, rows + 1):
        if rows % acc == 0 and ((fixed + largest_micro_batch(lengths, rows // acc, packed, steps * acc) * per_position)
                                * FAST_MEMORY_MARGIN <= available):
            return rows // acc, acc
    return None


def fits_step(r: dict) -> bool:
    """A recipe whose step fit_micro_batch may fit to the GPU: the fast mode's, still one micro-batch without
    gradient checkpointing (speed_changes' shape; the stages add where they run it)."""
    return r["speed"] == "fast" and r["gradient_accumulation_steps"] == 1 and not r["gradient_checkpointing"]


def fit_micro_batch(model, train_ds, collator, dtype, rows: int, packed: bool, steps: int,
                    state_bytes: float, recipe: dict | None = None) -> tuple[tuple[int, int] | None, dict]:
    """The fast mode's step on this GPU: (micro-batch, accumulation) for an optimizer step's `rows` rows from two
    measured trials (activation_bytes of the run's TRIAL_ROWS longest rows, two and four: a fixed part and bytes
    per input position) and the memory this GPU has for activations (free to the driver plus what this process's
    allocator holds unused, less `state_bytes`, what training adds beside them (the optimizer's states, fp32
    copies), and 5% for fragmentation), planned by plan_fast_step; None where not even one row a micro-batch fits
    or the trial itself did not. Ranks of a distributed run plan from the largest trials and the least memory
    among them, so they agree. `recipe`: the run's; where its liger_kernel is on, the trials run with liger's
    kernels patched in as the Trainer will (patch_liger), so that the loss's memory is that of the run, not that of
    a micro-batch's whole logits; where its torch_compile is on, through the decoder blocks compiled as the run
    compiles them (compiled_view), which keep fewer activations than eager ones. Returns it with metrics'
    fast_memory_plan (less its `chosen`)."""
    import pyarrow.compute as pc
    import torch

    r = recipe or {}
    liger, compiled = bool(r.get("liger_kernel")), bool(r.get("torch_compile"))
    if liger:
        patch_liger(model, r)
    net = compiled_view(model, compiled)
    lengths = pc.list_value_length(train_ds.with_format("arrow")["input_ids"]).to_pylist()  # no rows copied out
    longest = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)[:min(TRIAL_ROWS[-1], rows)]
    batches = [(int(micro_batch_positions([lengths[i] for i in rows_], packed)),
                collator([train_ds[i] for i in rows_])) for rows_ in (longest[:TRIAL_ROWS[0]], longest)]
    fixed = per_position = None
    try:
        with liger_flce_chunks(liger):
            if compiled:  # compiles the blocks first, so that no trial's peak holds what compiling them allocated
                activation_bytes(net, batches[0][1], dtype)
            trials = [(positions, activation_bytes(net, batch, dtype)) for positions, batch in batches]
        (p1, b1), (p2, b2) = trials
        per_position = (b2 - b1) / (p2 - p1) if p2 > p1 and b2 > b1 else b2 / p2
        fixed = max(b2 - per_position * p2, 0.0)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    available = free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated() - state_bytes - 0.05 * total
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        fixed, per_position, available = agreed_trials(fixed, per_position, available)
    split = (plan_fast_step(lengths, rows, packed, steps, fixed, per_position, available)
             if per_position is not None else None)
    plan = {"trials": "compiled" if compiled else "eager",
            "activation_mib_per_position": round(per_position / 2**20, 4) if per_position is not None else None,
            "available_gib": round(available / 2**30, 2),
            "one_micro_batch_gib": round((fixed + largest_micro_batch(lengths, rows, packed, steps) * per_position)
                                         * FAST_MEMORY_MARGIN / 2**30, 2) if per_position is not None else None}
    return split, plan


def fitted_step(r: dict, written: dict, changes: dict, split: tuple[int, int] | None) -> dict:
    """The recipe `r` (a fast mode's) with the step fit_micro_batch chose (`split`) or, where none fits, with the
    recipe's own micro-batch as `written` and gradient checkpointing on (the lean mode's shape, what the seed
    configuration fits in and more); `changes` (speed_changes) keeps only what then differs from `written`."""
    rows = r["per_device_train_batch_size"] * r["gradient_accumulation_steps"]
    if split is None:
        change = {"per_device_train_batch_size": written.get("per_device_train_batch_size", rows),
                  "gradient_accumulation_steps": written.get("gradient_accumulation_steps", 1),
                  "gradient_checkpointing": True}
    else:
        change = {"per_device_train_batch_size": split[0], "gradient_accumulation_steps": split[1]}
    for k, v in change.items():
        if k in written and written[k] == v:
            changes.pop(k, None)
        else:
            changes[k] = v
    return {**r, **change}


def step_shape(r: dict) -> str:
    """micro-batch x accumulation, and whether checkpointing is on (metrics' fast_memory_plan.chosen)."""
    return (f"{r['per_device_train_batch_size']} x {r['gradient_accumulation_steps']}, "
            + ("checkpointing on" if r["gradient_checkpointing"] else "no checkpointing"))


def agreed_trials(fixed: float | None, per_position: float | None, available: float) -> tuple:
    """The largest trial figures and the least memory over the ranks (a rank whose trial did not fit: none)."""
    import torch

    dev = torch.device("cuda", torch.cuda.current_device())
    failed = per_position is None
    most = torch.tensor([float(failed), fixed or 0.0, per_position or 0.0, -available], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    failed, fixed, per_position, available = most.tolist()
    return (None, None, -available) if failed else (fixed, per_position, -available)


def activation_bytes(model, batch: dict, dtype) -> float:
    """A measured trial on the GPU: one forward and backward of `batch` (from the run's own collator) under autocast
    to `dtype`, with no KV cache as in training (a cache would also give each compiled block a graph the run cannot
    reuse), the CUDA allocator's peak above what was allocated before. The gradients it leaves are dropped and the
    random states restored: the run computes what it would have without it."""
    import torch

    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    device = next(model.parameters()).device
    try:
        model.train()
        with torch.autocast(device.type, dtype=dtype):
            loss = model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}, use_cache=False).loss
        loss.backward()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    finally:
        loss = None
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state_all(cuda_rng)


def step_timer(count: TokenCount | None = None, warmup: int = 1):
    """A TrainerCallback timing the optimizer steps (their micro-batches, backward and update; not evaluation,
    logging or checkpoints). The GPU is synchronised only where a stretch of consecutive steps ends (before the
    Trainer logs, evaluates, saves or stops, at an epoch's end, and after the warm-up), not at every step: within a
    stretch the host runs on into the next step while the GPU finishes the last, as it does untimed. The first
    `warmup` steps of a run are kept apart (`warmup_seconds`): they hold one-time work (CUDA and cuBLAS handles,
    Triton and bitsandbytes kernels, the allocator's growth; on one H200 the QLoRA seed configuration's first run of
    12 steps measured 1.34x slower than the same run again with them counted in). `seconds`, `steps` and, with
    `count`, the timed steps' own input positions `real` / `computed` cover the steps after them; a run of no more
    steps than that times all."""
    from transformers import TrainerCallback

    class _StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.steps, self.real, self.computed = 0.0, 0, 0, 0
            self.warmup_seconds, self.warmup_steps, self.warmup_real, self.warmup_computed = 0.0, 0, 0, 0
            self._t = self._c = None
            self._open = 0  # steps in the stretch being timed

        def _tokens(self) -> tuple[int, int]:
            return (count.real, count.computed) if count is not None else (0, 0)

        def on_step_begin(self, args, state, control, **kw):
            if self._t is None:
                self._t, self._c = synced_clock(), self._tokens()

        def _close(self):
            if self._t is None:
                return
            dt = synced_clock() - self._t
            real, computed = (b - a for a, b in zip(self._c, self._tokens()))
            if self.warmup_steps < warmup:
                self.warmup_seconds += dt
                self.warmup_steps += self._open
                self.warmup_real += real
                self.warmup_computed += computed
            else:
                self.seconds += dt
                self.steps += self._open
                self.real += real
                self.computed += computed
            self._t, self._open = None, 0

        def on_step_end(self, args, state, control, **kw):
            if self._t is None:
                return
            self._open += 1
            # DefaultFlowCallback, first in the list, has set what the Trainer does next
            if (self.warmup_steps + self._open <= warmup or control.should_log or control.should_evaluate
                    or control.should_save or control.should_training_stop):
                self._close()

        def on_epoch_end(self, args, state, control, **kw):
            self._close()  # before the epoch's evaluation and checkpoint

        def on_train_end(self, args, state, control, **kw):
            self._close()
            if not self.steps:  # no step after the warm-up: time what ran
                self.seconds, self.steps = self.warmup_seconds, self.warmup_steps
                self.real, self.computed = self.warmup_real, self.warmup_computed

    return _StepTimer()


def profiler(out_dir: str | None, wait: int = 2, active: int = 2):
    """A TrainerCallback profiling `active` optimizer steps after the first `wait` of a run with torch.profiler, or
    None without `out_dir` (the benches' QUANTUNE_PROFILE, a diagnostic: it changes no result). Rank 0 writes
    out_dir/profile.txt: those steps' wall seconds, the GPU's busy seconds in them (its kernels' own time), the
    operators with the most GPU and CPU time, which say whether a step waits on the GPU or on Python, and the host
    operators the GPU's idle stretches fall in (lib.measure.profile_report); and their timeline, trace.json.gz."""
    if not out_dir:
        return None
    import os

    import torch
    from transformers import TrainerCallback

    from .common import atomic_write_text

    class _Profile(TrainerCallback):
        def __init__(self):
            self.seen, self.prof, self.t0 = 0, None, 0.0

        def on_step_begin(self, args, state, control, **kw):
            if self.seen == wait and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t0 = synced_clock()

        def on_step_end(self, args, state, control, **kw):
            self.seen += 1
            if self.prof is None or self.seen != wait + active:
                return
            wall = synced_clock() - self.t0
            self.prof.__exit__(None, None, None)
            if int(os.environ.get("RANK", "0")) != 0:
                return
            report = profile_report(self.prof, f"steps {wait + 1}-{wait + active}", wall)
            atomic_write_text(Path(out_dir, "profile.txt"), report)
            self.prof.export_chrome_trace(str(Path(out_dir, "trace.json.gz")))  # the timeline, for chrome://tracing
            self.prof = None

    return _Profile()


def run_record():
    """A TrainerCallback recording where this run (first or resumed) began, for this run's own tokens/s, and
    the seconds since it began at each logged step."""
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
