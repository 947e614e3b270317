"""DeepSpeed for the sft stage: the recipe's ZeRO file and its check against the recipe, the launcher command
(one rank per GPU, or one CPU rank), the GPUs visible, and the trained model written as one Hugging Face model
directory (ZeRO shards consolidated, LoRA merged)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .common import ROOT, atomic_dir, fail, free_port


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


def save_model_dir(trainer, tok, out: Path, lora: bool, model_source: str, trust_remote_code: bool,
                   is_main: bool) -> Path:
    """Write <out>/model: a Hugging Face model directory (consolidated; a LoRA adapter merged into the model at
    model_source). Collective: all ranks call it; rank 0 writes."""
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
        if lora:
            from peft import PeftModel

            from .models import load_model

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


def skip_cpu_shm_op() -> None:
    """One CPU rank (scale tiny): DeepSpeed's CPU accelerator JIT-compiles its shared-memory all-reduce op
    (used by inference_all_reduce between ranks of one host; 1-2 minutes of C++ on 2 cores) when its comm
    backend starts. Training never calls it: mark it unavailable (deepspeed.ops.__compatible_ops__, the
    module's cached probe result) and gloo alone serves the rank."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def launch_command(module: str, worker_args: list[str], num_gpus: int, env: dict) -> list[str]:
    """The DeepSpeed launcher command (and env changes) running `python -m <module> <worker_args>` as num_gpus
    ranks; 0 means one CPU rank."""
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
    return cmd + ["--module", module, *worker_args]


def check_gpus(num_gpus: int, where: str) -> None:
    """num_gpus CUDA devices are visible (none needed for one CPU rank)."""
    if num_gpus == 0:
        return
    import torch

    have = torch.cuda.device_count()
    if have < num_gpus:
        raise fail(where, f"{num_gpus} GPUs asked for, {have} visible",
                   "run on a node with that many GPUs, or lower the recipe's gpus (scale tiny runs on the CPU)")
