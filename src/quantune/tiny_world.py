"""The tiny world: what every target runs on at tiny scale, built from text that ships with the machine.
Each rule of rules/tiny.smk is one command here:

    python -m quantune.tiny_world corpus --out DIR --pydoc --fortunes F...   # tiny_corpus: pydoc topics + fortunes-zh
    python -m quantune.tiny_world dataset advertisegen --out DIR --train N --validation N --test N --seed S
    python -m quantune.tiny_world tokenizer --kind bpe|spm --corpus DIR --out DIR --vocab-size N
    python -m quantune.tiny_world pretrain --family opt --tokenizer DIR --corpus DIR --out DIR --spec-json JSON
    python -m quantune.tiny_world raw-instructions --out DIR --seed S         # raw data with known defects
    python -m quantune.tiny_world summary --models DIR... --tokenizers DIR... --data DIR... --out FILE
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from .lib.common import atomic_dir, fail, read_json, run_cli, write_json, write_metrics
from .lib.data import build_corpus, generate, near_key, shingles
from .lib.models import build_tokenizer
from .lib.pretrain import pretrain


DEFECTS = {"malformed_json": 6, "missing_field": 4, "empty_output": 5, "output_is_input": 5, "wrong_script": 6,
           "too_long": 4, "too_short": 3, "exact_duplicate": 7, "near_duplicate": 5}


def make_raw(out: str, seed: int, n_good: int = 200) -> dict:
    """Chinese instruction rows in Alpaca format plus known numbers of each defect, shuffled."""
    from .lib.data import ADV_ATTRS, ADV_TYPES

    rng = random.Random(seed)
    good, seen = [], []
    while len(good) < n_good:
        cat = rng.choice(sorted(ADV_TYPES))
        garment = rng.choice(ADV_TYPES[cat])
        k1, k2 = rng.sample(sorted(ADV_ATTRS), 2)
        v1, v2 = rng.choice(sorted(ADV_ATTRS[k1])), rng.choice(sorted(ADV_ATTRS[k2]))
        row = {"instruction": f"请为这件{garment}写一句广告文案。", "input": f"{k1}：{v1}；{k2}：{v2}",
               "output": f"{rng.choice(ADV_ATTRS[k1][v1])}，{rng.choice(ADV_ATTRS[k2][v2])}，这款{garment}值得拥有。"}
        # good rows are pairwise dissimilar (exact Jaccard of character 3-grams < 0.6), so that the only
        # near duplicates in the file are the injected ones
        grams = shingles(near_key(row))
        if all(len(grams & g) / len(grams | g) < 0.6 for g in seen):
            seen.append(grams)
            good.append(row)
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    d = DEFECTS
    lines += ['{"instruction": "写一句文案", "input": "", "output": "好看' for _ in range(d["malformed_json"] - 2)]
    lines += ["[1, 2, 3]", '"just a string"']
    lines += [json.dumps({"instruction": "写一句文案", "input": f"缺{i}"}, ensure_ascii=False) for i in range(d["missing_field"])]
    lines += [json.dumps({"instruction": f"写第{i}句文案", "input": "颜色：红色", "output": "   "}, ensure_ascii=False)
              for i in range(d["empty_output"])]
    lines += [json.dumps({"instruction": f"重复这句话{i}", "input": f"这是第{i}句话", "output": f"这是第{i}句话"},
                         ensure_ascii=False) for i in range(d["output_is_input"])]
    lines += [json.dumps({"instruction": f"请为这件衬衫写一句广告文案{i}", "input": "颜色：白色",
                          "output": f"This white shirt number {i} is clean and simple."}, ensure_ascii=False)
              for i in range(d["wrong_script"])]
    lines += [json.dumps({"instruction": f"请写一篇长文{i}", "input": "",
                          "output": "这款衣服很好看，" * 400 + str(i)}, ensure_ascii=False) for i in range(d["too_long"])]
    lines += [json.dumps({"instruction": "写", "input": "", "output": f"好{i}"}, ensure_ascii=False)
              for i in range(d["too_short"])]
    lines += [json.dumps(good[i], ensure_ascii=False) for i in range(d["exact_duplicate"])]
    for i in range(d["near_duplicate"]):  # same text, different punctuation and spacing
        r = dict(good[20 + i])
        r["output"] = r["output"].replace("，", ", ").replace("。", "!")
        lines.append(json.dumps(r, ensure_ascii=False))
    body = lines[:n_good]
    tail = lines[n_good:]
    rng.shuffle(tail)
    # defects land after the originals they copy, so "first seen" is the good row
    all_lines = body + tail
    with atomic_dir(out) as tmp:
        (tmp / "train.jsonl").write_text("\n".join(all_lines) + "\n", encoding="utf-8")
        write_json(tmp / "expected.json", {"good": n_good, **d})
        write_json(tmp / "stats.json", {"rows_train": len(all_lines), "format": "alpaca", "seed": seed})
    return {"rows": len(all_lines), **d}


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


def _cmd_pretrain(a) -> None:
    if a.spec_json:  # what Snakemake passes: only this family's spec and the pretrain settings
        spec = json.loads(a.spec_json)
        fam, hp = spec["family"], dict(spec["pretrain"])
    else:
        from .lib.config import config_from_args, pretrain_settings

        cfg = config_from_args(a)
        tw = cfg["tiny_world"]
        if a.family not in tw["families"]:
            raise fail("config/config.yaml: key tiny_world.families", f"no family {a.family!r}",
                       f"use one of: {', '.join(tw['families'])}")
        fam, hp = tw["families"][a.family], pretrain_settings(cfg, a.family)
    if a.steps:
        hp["steps"] = a.steps
    m = pretrain(a.family, fam, hp, a.tokenizer, a.corpus, a.out, a.stop_after)
    print(json.dumps({k: v for k, v in m.items() if not k.startswith("version_")}))


def _cmd_summary(a) -> None:
    m = write_metrics(a.out, tiny_world_summary(a.models, a.tokenizers, a.data))
    for k in sorted(m):
        if k.endswith("_ppl_heldout"):
            print(f"{k}: {m[k]:.2f}")


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import add_config_args

    p = argparse.ArgumentParser(prog="python -m quantune.tiny_world", description=__doc__.splitlines()[0])
    sub = p.add_subparsers()
    c = sub.add_parser("corpus", help="text corpus from pydoc topics and fortunes-zh, split by document")
    c.add_argument("--out", required=True)
    c.add_argument("--pydoc", action="store_true")
    c.add_argument("--fortunes", nargs="*", default=[])
    c.add_argument("--heldout", type=float, default=0.05)
    c.add_argument("--validation", type=float, default=0.05)
    c.set_defaults(func=lambda a: print(json.dumps(build_corpus(a.out, a.pydoc, a.fortunes, a.heldout, a.validation))))
    g = sub.add_parser("dataset", help="a data set in a real format")
    g.add_argument("kind", choices=["advertisegen", "alpaca", "summary_pref"])
    g.add_argument("--out", required=True)
    g.add_argument("--train", type=int, required=True)
    g.add_argument("--validation", type=int, required=True)
    g.add_argument("--test", type=int, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=lambda a: print(json.dumps(generate(
        a.kind, a.out, {"train": a.train, "validation": a.validation, "test": a.test}, a.seed), ensure_ascii=False)))
    t = sub.add_parser("tokenizer", help="train a tokenizer on the tiny corpus")
    t.add_argument("--kind", choices=["bpe", "spm"], required=True)
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--min-frequency", type=int, default=2)
    t.set_defaults(func=lambda a: print(json.dumps(build_tokenizer(a.kind, a.corpus, a.out, a.vocab_size,
                                                                   a.min_frequency))))
    r = sub.add_parser("pretrain", help="pretrain one tiny base model")
    r.add_argument("--family", required=True)
    r.add_argument("--tokenizer", required=True)
    r.add_argument("--corpus", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=None, help="override tiny_world.pretrain.steps")
    r.add_argument("--spec-json", default=None, help='{"family": {...}, "pretrain": {...}}')
    r.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    add_config_args(r)
    r.set_defaults(func=_cmd_pretrain)
    w = sub.add_parser("raw-instructions", help="tiny raw instruction data with known defect counts")
    w.add_argument("--out", required=True)
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(func=lambda a: print(json.dumps(make_raw(a.out, a.seed))))
    s = sub.add_parser("summary", help="summarise the tiny world into one metrics.json")
    s.add_argument("--models", nargs="+", required=True)
    s.add_argument("--tokenizers", nargs="+", required=True)
    s.add_argument("--data", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_summary)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
