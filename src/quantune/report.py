"""Reports: gather finished targets' metrics into tables.

    python -m quantune.report tiny-world --models DIR... --tokenizers DIR... --data DIR... --out FILE
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import read_json, run_cli, write_metrics


def tiny_world_summary(models: list[str], tokenizers: list[str], data: list[str]) -> dict:
    """One flat metrics.json for the tiny world: per-family perplexities, tokenizer and data set stats."""
    out: dict = {"target": "tiny_world", "stage": "tiny_world"}
    for d in models:
        m = read_json(Path(d) / "metrics.json")
        fam = m["family"]
        for k in ("ppl_heldout", "ppl_heldout_untrained", "params_total", "train_seconds", "train_loss_last"):
            out[f"{fam}_{k}"] = m[k]
        out[f"{fam}_ppl_ratio_trained_vs_untrained"] = m["ppl_heldout"] / m["ppl_heldout_untrained"]
    for d in tokenizers:
        s = read_json(Path(d) / "tokenizer_stats.json")
        out[f"tokenizer_{s['kind']}_vocab_size"] = s["vocab_size"]
        out[f"tokenizer_{s['kind']}_chars_per_token_heldout"] = s["chars_per_token_heldout"]
    for d in data:
        s = read_json(Path(d) / "stats.json")
        for k, v in s.items():
            if isinstance(v, (int, float)) and k != "seed":
                out[f"data_{Path(d).name}_{k}"] = v
    return out


def _cmd_tiny_world(a) -> None:
    m = write_metrics(a.out, tiny_world_summary(a.models, a.tokenizers, a.data))
    for k in sorted(m):
        if k.endswith("_ppl_heldout"):
            print(f"{k}: {m[k]:.2f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantune.report", description=__doc__.splitlines()[0])
    sub = p.add_subparsers()
    t = sub.add_parser("tiny-world", help="summarise the tiny world into one metrics.json")
    t.add_argument("--models", nargs="+", required=True)
    t.add_argument("--tokenizers", nargs="+", required=True)
    t.add_argument("--data", nargs="+", required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(func=_cmd_tiny_world)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
