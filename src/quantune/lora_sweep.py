"""The lora_sweep stage: one lora_sft run per LoRA rank of the recipe's `ranks` (lora_alpha = alpha_per_rank x
rank) into <target>/r<rank>/, each scored by greedy generation on held-out prompts (BLEU-4 / ROUGE-L); then one
table (<target>.md, <target>.csv) and one plot (<target>.png) over the ranks, and metrics.json with
runs: {"<rank>": {field: value}}.

    python -m quantune.lora_sweep --rank 8 --recipe recipes/lora_rank_sweep.yaml --out results/lora_rank_sweep/r8
    python -m quantune.lora_sweep --recipe recipes/lora_rank_sweep.yaml --out results/lora_rank_sweep
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .lib.common import atomic_savefig, atomic_write_text, fail, read_json, run_cli, write_metrics
from .lib.tables import markdown_table
from .lib.prompts import ANSWER_FIELD, generate_all, prompt_ids, render_prompt, template_of
from .lora_sft import check_sft_recipe, train


def check_sweep_recipe(recipe: dict, cfg: dict, where: str) -> dict:
    """Every run of a lora_sweep is a valid lora_sft recipe."""
    from .lib.config import sweep_run_recipe

    for rank in recipe["ranks"]:
        check_sft_recipe(sweep_run_recipe(recipe, rank, where), cfg, f"{where} (rank {rank})")
    return recipe


def sweep_scorer(cfg: dict, sweep: dict):
    """after_train for one sweep run: greedy generations on held-out prompts, BLEU-4 / ROUGE-1/2/L (x100)."""
    from .lib.config import resolve_dataset
    from .lib.data import load_split
    from .lib.textmetrics import corpus_scores

    sw = sweep

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
            preds = generate_all(model, tok, prompt_ids(tok, prompts, r["max_input_length"], seq2seq),
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
    from .lib.config import load_recipe, sweep_run_recipe

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

    from .lib.config import load_recipe

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
          f"lr {rc['learning_rate']:g} ({rc['lr_scheduler_type']}). BLEU-4 / ROUGE-L (x100, quantune.lib.textmetrics): greedy "
          f"generations for the first {first.get('gen_prompts', '-')} prompts of split `{first.get('gen_split', '-')}`, "
          f"at most {first.get('gen_max_new_tokens', '-')} new tokens. Peak memory: {first.get('peak_mem_kind', '-')} of "
          f"each run's process (scale {rc['scale']}, device {first.get('device', '-')}).", ""]
    md += markdown_table(head, [[k] + [cell(runs[k].get(key), f) for key, _, f in SWEEP_COLUMNS] for k in ranks])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank"] + [c[0] for c in SWEEP_COLUMNS])
    metrics: dict[str, Any] = {"target": rc["name"], "stage": "lora_sweep", "scale": cfg["scale"], "model": rc["model"],
                               "model_source": first["model_source"], "dataset": rc["dataset"],
                               "ranks": ",".join(map(str, ranks)), "alpha_per_rank": rc["alpha_per_rank"],
                               "target_modules": first["target_modules"], "global_step": first["global_step"],
                               "runs": {}}
    for k in ranks:
        m = runs[k]
        w.writerow([k] + [m.get(key, "") for key, _, _ in SWEEP_COLUMNS])
        metrics["runs"][str(k)] = {key: m[key] for key, _, _ in SWEEP_COLUMNS if isinstance(m.get(key), (int, float))}
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


def _cmd(a) -> None:
    from .lib.config import config_from_args

    cfg = config_from_args(a)
    if a.rank is not None:
        m = sweep_run(a.recipe, a.rank, a.out, cfg)
        print(f"{m['target']} r={a.rank}: loss {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f}, "
              f"trainable {m['params_trainable']}, BLEU-4 {m['bleu4']:.2f}, ROUGE-L {m['rougeL']:.2f}")
    else:
        m = sweep(a.recipe, a.out, cfg)
        print(json.dumps(m["runs"]))


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    p = stage_parser("quantune.lora_sweep", __doc__, _cmd)
    p.add_argument("--rank", type=int, default=None,
                   help="train the run of this LoRA rank (one of the recipe's ranks); without it: the table over the runs")
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
