"""The evaluate stage: a base model's perplexity with a stated context and stride and its greedy generation
speed (quantune.lib.measure), the "before" of every quantization and fine-tuning target.

    python -m quantune.evaluate --recipe recipes/eval_opt67b.yaml --out results/eval_opt67b
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .lib.common import run_cli, write_metrics
from .lib.measure import evaluate_model


# ---------------------------------------------------------------- the evaluate stage

def eval_text(cfg: dict, recipe: dict) -> str:
    from .lib.config import resolve_dataset
    from .lib.data import join_text, load_split

    ds = resolve_dataset(cfg, recipe["dataset"])
    return join_text(load_split(ds, recipe["split"]))


def run(recipe_path: str, out: str, cfg: dict) -> dict:

    from .lib.config import load_recipe, resolve_model
    from .lib.models import count_parameters, load_model, pick_device
    from .lib.tb import TBWriter, peak_memory_mb

    recipe = load_recipe(recipe_path, cfg)
    m = resolve_model(cfg, recipe["model"], must_exist=True)
    device = pick_device(recipe, recipe_path)
    dtype = recipe.get("dtype", "float32") if device == "cuda" else "float32"
    t0 = time.time()
    model, tok = load_model(m["source"], trust_remote_code=m["trust_remote_code"], dtype=dtype)
    model.to(device)
    load_s = time.time() - t0
    text = eval_text(cfg, recipe)
    res = evaluate_model(model, tok, text, context=recipe["context"], stride=recipe["stride"],
                         max_tokens=recipe.get("max_eval_tokens"), prompt=recipe["prompt"],
                         new_tokens=recipe["gen_tokens"])
    metrics = {"target": recipe["name"], "stage": "evaluate", "scale": cfg["scale"], "model": recipe["model"],
               "model_source": m["source"], "dataset": recipe["dataset"], "split": recipe["split"],
               "device": device, "dtype": dtype, "load_seconds": load_s, "peak_mem_mb": peak_memory_mb(),
               **count_parameters(model), **res}
    outp = Path(out)
    with TBWriter(outp / "tb") as tb:
        tb.scalars({"eval/ppl": metrics["eval_ppl"], "eval/loss": metrics["eval_nll"],
                    "system/gen_tokens_per_s": metrics.get("gen_tokens_per_s")}, 0)
        tb.final(metrics)
        tb.text("generation", metrics.get("gen_text", ""))
    return write_metrics(outp / "metrics.json", metrics)


def _cmd(a) -> None:
    from .lib.config import config_from_args

    m = run(a.recipe, a.out, config_from_args(a))
    print(f"{m['target']}: ppl {m['eval_ppl']:.3f} over {m['eval_tokens_scored']} tokens "
          f"(context {m['eval_context']}, stride {m['eval_stride']})")


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    p = stage_parser("quantune.evaluate", __doc__, _cmd)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
