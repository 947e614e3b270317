"""The merge stage: a LoRA adapter merged into its base model (PEFT merge_and_unload), saved as a plain
transformers model, with a logits check against the unmerged model.

    python -m quantune.merge --recipe recipes/merge_lora_qwen.yaml --out results/merge_lora_qwen

The recipe's `adapter` names the lora_sft target it reads (results/<adapter>/adapter/); --adapter DIR reads
another adapter directory instead.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from .lib.common import atomic_dir, fail, run_cli, write_metrics
from .lib.gguf import sha256_file, target_dir, torch_dtype, write_tb


def find_adapter(path: Path) -> Path:
    """A PEFT adapter directory: `path` itself, or the shallowest folder under it with adapter_config.json."""
    if (path / "adapter_config.json").is_file():
        return path
    found = sorted(path.rglob("adapter_config.json"), key=lambda p: (len(p.parts), str(p))) if path.is_dir() else []
    if not found:
        raise fail(str(path), "no PEFT adapter here (adapter_config.json missing)",
                   "build the adapter target first (snakemake <adapter target>) or pass --adapter DIR")
    return found[0].parent


def _modules(tm) -> str:
    return ",".join(sorted(tm)) if isinstance(tm, (set, list, tuple)) else str(tm)


def _same_base(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    if pa.exists() != pb.exists():
        return True  # a local copy of a hub model: cannot tell, the shapes decide
    return a.rstrip("/") == b.rstrip("/")


def sentencepiece_model_for(source: str, family: str, cfg: dict) -> Path | None:
    """tokenizer.model of a model: its own, or (tiny world) the SentencePiece model its tokenizer was saved
    from, when that tokenizer's tokenizer.json is byte-identical to the model's."""
    own = Path(source) / "tokenizer.model"
    if own.is_file():
        return own
    from .lib.config import tiny_world_dir
    from .lib.models import TOKENIZER_OF_FAMILY

    tok_dir = Path(tiny_world_dir(cfg)) / "tokenizers" / TOKENIZER_OF_FAMILY.get(family, "")
    cand = tok_dir / "tokenizer.model"
    tj_model, tj_tok = Path(source) / "tokenizer.json", tok_dir / "tokenizer.json"
    if cand.is_file() and tj_model.is_file() and tj_tok.is_file() and sha256_file(tj_model) == sha256_file(tj_tok):
        return cand
    return None


def check_text(cfg: dict, recipe: dict) -> str:
    from .lib.config import resolve_dataset
    from .lib.data import join_text, load_split

    return join_text(load_split(resolve_dataset(cfg, recipe["check_dataset"], key="check_dataset"),
                                recipe.get("check_split", "test")))


def merge(recipe_path: str, out: str, cfg: dict, adapter: str | None = None) -> dict:
    import torch
    from peft import PeftConfig, PeftModel

    from .lib.config import load_recipe, resolve_model
    from .lib.models import count_parameters, load_model

    recipe = load_recipe(recipe_path, cfg)
    m = resolve_model(cfg, recipe["model"], must_exist=True)
    adapter_dir = find_adapter(Path(adapter) if adapter else target_dir(cfg, recipe["adapter"]))
    pcfg = PeftConfig.from_pretrained(str(adapter_dir))
    if pcfg.peft_type.value != "LORA":
        raise fail(f"{adapter_dir}/adapter_config.json", f"peft_type {pcfg.peft_type.value} is not LORA",
                   "merge a LoRA adapter (the lora_sft stage writes one)")
    if pcfg.base_model_name_or_path and not _same_base(pcfg.base_model_name_or_path, m["source"]):
        raise fail(f"{recipe_path}: key model", f"the adapter was trained on {pcfg.base_model_name_or_path}, "
                   f"the recipe's base is {m['source']}", "use the adapter's base model (or the adapter of this base)")
    text = check_text(cfg, recipe)  # read before any model is loaded: a missing data set fails at once
    t0 = time.time()
    model, tok = load_model(m["source"], trust_remote_code=m["trust_remote_code"], dtype=recipe["dtype"])
    device = "cuda" if torch.cuda.is_available() and recipe.get("device", "auto") != "cpu" else "cpu"
    model.to(device)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, : recipe["check_tokens"]]
    ids = ids.to(device)
    with torch.no_grad():
        adapted = peft_model(ids).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(ids).logits.float()
        merged = peft_model.merge_and_unload()
        merged.eval()
        merged_logits = merged(ids).logits.float()
    merge_diff = (merged_logits - adapted).abs().max().item()
    adapter_delta = (adapted - base).abs().max().item()
    if merge_diff > recipe["logit_tolerance"]:
        raise fail(f"{recipe_path}: key logit_tolerance", f"merged logits differ from base+adapter by "
                   f"{merge_diff:.3g} > {recipe['logit_tolerance']}", "merge in float32 (key dtype) or check the adapter")
    spm = sentencepiece_model_for(m["source"], m["family"], cfg)
    outp = Path(out)
    with atomic_dir(outp / "model") as tmp:
        merged.to(torch_dtype(recipe["save_dtype"])).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if spm is not None:
            shutil.copyfile(spm, tmp / "tokenizer.model")
    metrics = {"target": recipe["name"], "stage": "merge", "scale": cfg["scale"], "model": recipe["model"],
               "model_source": m["source"], "adapter_dir": str(adapter_dir), "lora_r": pcfg.r,
               "lora_alpha": pcfg.lora_alpha, "lora_target_modules": _modules(pcfg.target_modules),
               "merge_dtype": recipe["dtype"], "save_dtype": recipe["save_dtype"], "device": device,
               "check_tokens": int(ids.shape[1]), "merge_max_abs_logit_diff": merge_diff,
               "adapter_max_abs_logit_delta": adapter_delta, "logit_tolerance": recipe["logit_tolerance"],
               "tokenizer_model_copied_from": str(spm) if spm else "none",
               "merged_bytes": sum(f.stat().st_size for f in (outp / "model").iterdir() if f.is_file()),
               "wall_s": time.time() - t0, **count_parameters(merged)}
    write_tb(outp, {"quant/merge_max_abs_logit_diff": merge_diff,
                     "quant/adapter_max_abs_logit_delta": adapter_delta}, metrics)
    return write_metrics(outp / "metrics.json", metrics)


def _cmd(a) -> None:
    from .lib.config import config_from_args

    m = merge(a.recipe, a.out, config_from_args(a), adapter=a.adapter)
    print(f"{m['target']}: merged {m['adapter_dir']} into {m['model_source']}; max |logit diff| "
          f"{m['merge_max_abs_logit_diff']:.3g} (adapter moves logits by up to {m['adapter_max_abs_logit_delta']:.3g})")


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    p = stage_parser("quantune.merge", __doc__, _cmd)
    p.add_argument("--adapter", default=None, help="an adapter directory to merge instead of the recipe's target's")
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
