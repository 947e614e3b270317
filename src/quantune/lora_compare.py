"""The lora_compare stage: the base model (quantized as trained) with each trained adapter and without any,
greedy and sampled (fixed seed) generations for the same held-out prompts, BLEU-4 / ROUGE-1/2/L
(quantune.lib.textmetrics, jieba), comparison.md + comparison.json side by side, and loss_curves.png with every
adapter's training loss.

    python -m quantune.lora_compare --recipe recipes/qlora_compare.yaml --out results/qlora_compare
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .lib.common import atomic_dir, fail, read_json, run_cli, seed_everything, write_json, write_metrics
from .lib.lora import load_base
from .lib.models import pick_device, set_cpu_threads
from .lib.plots import plot_losses
from .lib.tables import markdown_table
from .lib.prompts import ANSWER_FIELD, generate_all, prompt_ids, render_prompt, template_of


def adapter_dirs(cfg: dict, recipe: dict, where: str) -> dict[str, Path]:
    from .lib.config import results_dir

    out = {}
    for label, target in recipe["adapters"].items():
        d = Path(results_dir(cfg)) / target
        if not (d / "adapter" / "adapter_config.json").is_file() or not (d / "recipe.json").is_file():
            raise fail(f"{where}: key adapters.{label}", f"no trained adapter in {d}",
                       f"build it first: snakemake {target}")
        out[label] = d
    return out


def check_adapters(rc: dict, cfg: dict, where: str):
    """The adapters' directories and recipes as trained, the base model; all trained on it, in one prompt format."""
    from .lib.config import resolve_model

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
    return dirs, trained, m, first


def generations(model, tok, p_ids, rc: dict, systems: list[str], seq2seq: bool) -> dict[str, dict[str, list[str]]]:
    """Greedy and sampled (fixed seed) generations of every system: the base (adapters off) and each adapter."""
    sample = {"seed": rc["sample_seed"], "temperature": rc["temperature"], "top_p": rc["top_p"]}
    gens: dict[str, dict[str, list[str]]] = {}
    for sysname in systems:
        gens[sysname] = {}
        for mode, smp in (("greedy", None), ("sampled", sample)):
            kw = dict(batch_size=rc["batch_size"], max_new_tokens=rc["max_new_tokens"], seq2seq=seq2seq, sample=smp)
            if sysname == "base":
                with model.disable_adapter():
                    gens[sysname][mode] = generate_all(model, tok, p_ids, **kw)
            else:
                model.set_adapter(sysname)
                gens[sysname][mode] = generate_all(model, tok, p_ids, **kw)
            print(f"{sysname} {mode}: {len(gens[sysname][mode])} generations")
    return gens


def compare(recipe_path: str, out: str, cfg: dict) -> dict:
    from peft import PeftModel

    from .lib.config import load_recipe, resolve_dataset
    from .lib.data import load_split
    from .lib.tb import peak_memory_mb
    from .lib.textmetrics import corpus_scores, score_pair

    where = str(recipe_path)
    rc = load_recipe(recipe_path, cfg)
    if rc["stage"] != "lora_compare":
        raise fail(f"{where}: key stage", f"{rc['stage']!r} is not lora_compare",
                   f"run it with python -m quantune.{rc['stage']}")
    dirs, trained, m, first = check_adapters(rc, cfg, where)
    ds = resolve_dataset(cfg, rc["dataset"])
    fmt = ds["format"]
    if fmt != first["data_format"]:
        raise fail(f"{where}: key dataset", f"format {fmt} differs from the adapters' {first['data_format']}",
                   "use the data set the adapters were trained on")
    template = template_of(first, fmt, where)
    seq2seq = first["task_type"] == "SEQ_2_SEQ_LM"
    device = pick_device(rc, where)
    rows = load_split(ds, rc["split"], rc["num_prompts"])
    prompts = [render_prompt(r, fmt, template) for r in rows]
    refs = [r[ANSWER_FIELD[fmt]] for r in rows]

    seed_everything(rc["sample_seed"])
    if device == "cpu":
        set_cpu_threads()
    t0 = time.time()
    base, tok = load_base(m, rc, device, training=False)
    labels = list(dirs)
    model = PeftModel.from_pretrained(base, str(dirs[labels[0]] / "adapter"), adapter_name=labels[0])
    for lab in labels[1:]:
        model.load_adapter(str(dirs[lab] / "adapter"), adapter_name=lab)
    model.eval()
    load_s = time.time() - t0
    p_ids = prompt_ids(tok, prompts, max(tr["max_input_length"] for tr in trained.values()), seq2seq)
    t_gen = time.time()
    systems = (["base"] if rc["include_base"] else []) + labels
    gens = generations(model, tok, p_ids, rc, systems, seq2seq)
    gen_s = time.time() - t_gen

    scores = {s: {mode: corpus_scores(g, refs) for mode, g in by.items()} for s, by in gens.items()}
    metrics: dict[str, Any] = {"target": rc["name"], "stage": "lora_compare", "scale": cfg["scale"],
                               "model": rc["model"], "model_source": m["source"], "dataset": rc["dataset"],
                               "split": rc["split"], "num_prompts": len(rows), "max_new_tokens": rc["max_new_tokens"],
                               "temperature": rc["temperature"], "top_p": rc["top_p"], "sample_seed": rc["sample_seed"],
                               "quantization": rc["quantization"], "device": device, "load_seconds": load_s,
                               "generation_seconds": gen_s, "peak_mem_mb": peak_memory_mb(),
                               "adapters": dict(rc["adapters"])}
    train_m = {lab: read_json(d / "metrics.json") for lab, d in dirs.items()}
    metrics.update(score_metrics(scores, train_m))
    table = [{"prompt": prompts[i], "reference": ref,
              "generations": {s: {mode: {"text": gens[s][mode][i], **score_pair(gens[s][mode][i], ref)}
                                  for mode in gens[s]} for s in gens}}
             for i, ref in enumerate(refs)]
    md = _markdown(rc, metrics, scores, train_m, trained, table, systems)
    return write_comparison(Path(out), rc, dirs, scores, table, md, metrics)


TRAINING_KEYS = ("train_loss_first", "train_loss_last", "eval_loss", "train_runtime", "total_flos", "tokens_per_s")


def score_metrics(scores: dict, train_m: dict) -> dict:
    """scores: {system: {mode: {metric: value}}}; gain_vs_base: the same for each adapter, minus the base's (when
    the base was scored); training: {label: {key: value}}, each adapter's numbers from its lora_sft metrics.json."""
    key = {"bleu-4": "bleu4", "rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}
    out: dict[str, Any] = {"scores": {s: {mode: {key[k]: v for k, v in sc.items()} for mode, sc in by.items()}
                                      for s, by in scores.items()}}
    if "base" in scores:
        out["gain_vs_base"] = {s: {mode: {key[k]: v - scores["base"][mode][k] for k, v in sc.items()}
                                   for mode, sc in by.items()} for s, by in scores.items() if s != "base"}
    out["training"] = {lab: {k: tm[k] for k in TRAINING_KEYS if k in tm} for lab, tm in train_m.items()}
    return out


def tb_numbers(metrics: dict, prefix: str = "") -> dict:
    """The numbers of a metrics.json, objects included, for TensorBoard (final/scores/base/greedy/bleu4)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(tb_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def write_comparison(out: Path, rc: dict, dirs: dict, scores: dict, table: list, md: str, metrics: dict) -> dict:
    """comparison.json / .md, the adapters' loss curves, tb/ and metrics.json, in one rename."""
    from .lib.tb import TBWriter

    with atomic_dir(out) as tmp:
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
            tb.final(tb_numbers(metrics))
            tb.text("comparison", md)
        return write_metrics(tmp / "metrics.json", metrics)


def _cell(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _markdown(rc, metrics, scores, train_m, trained, table, systems) -> str:
    lines = [f"# {rc['name']}: {', '.join(rc['adapters'])} vs the untuned base", "",
             f"Base model `{metrics['model_source']}` ({rc['quantization']}), {metrics['num_prompts']} held-out prompts "
             f"from `{rc['dataset']}` split `{rc['split']}`, at most {rc['max_new_tokens']} new tokens. Greedy decoding, "
             f"and sampling with temperature {rc['temperature']}, top_p {rc['top_p']}, seed {rc['sample_seed']} "
             "(the same seed for every model). BLEU-4 on characters and ROUGE F1 on jieba words, x100 "
             "(LLaMA-Factory's computation).", "",
             "## Scores", ""]
    lines += markdown_table(["model", "decoding", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"],
                            [[s, mode] + [f"{scores[s][mode][k]:.2f}" for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")]
                             for s in systems for mode in ("greedy", "sampled")])
    lines += ["", "## Training runs", ""]
    runs = []
    for lab, tm in train_m.items():
        tr = trained[lab]

        def f(k, fmt="{:.4g}"):
            v = tm.get(k)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"

        runs.append([lab, rc["adapters"][lab], tr["lr_scheduler_type"], tr["warmup_ratio"],
                     f"{tr['per_device_train_batch_size']} x {tr['gradient_accumulation_steps']}",
                     f"{tr['max_input_length']}/{tr['max_output_length']}", tr["lora_r"], f("global_step", "{}"),
                     f"{f('train_loss_first')} -> {f('train_loss_last')}", f("eval_loss"), f("train_runtime", "{:.1f}"),
                     f("total_flos", "{:.3g}"), f("tokens_per_s", "{:.1f}")])
    lines += markdown_table(["adapter", "target", "scheduler", "warmup", "batch x accum", "lengths in/out", "LoRA r",
                             "steps", "loss first -> last", "eval loss", "train_runtime s", "total_flos", "tokens/s"], runs)
    shown = table[: rc["show_examples"]]
    lines += ["", "Loss curves: `loss_curves.png` (per optimizer step) and `loss_curves_epoch.png` (per epoch).", "",
              "## Side by side (greedy)", ""]
    lines += markdown_table(["prompt", "reference", *systems],
                            [[_cell(it["prompt"], 80), _cell(it["reference"])]
                             + [_cell(it["generations"][s]["greedy"]["text"]) for s in systems] for it in shown])
    lines += ["", "## Side by side (sampled)", ""]
    lines += markdown_table(["prompt", *systems],
                            [[_cell(it["prompt"], 80)] + [_cell(it["generations"][s]["sampled"]["text"]) for s in systems]
                             for it in shown])
    return "\n".join(lines) + "\n"


def _cmd(a) -> None:
    from .lib.config import config_from_args

    m = compare(a.recipe, a.out, config_from_args(a))
    print(json.dumps({s: {k: by["greedy"][k] for k in ("bleu4", "rougeL")} for s, by in m["scores"].items()}))


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    return stage_parser("quantune.lora_compare", __doc__, _cmd)


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
