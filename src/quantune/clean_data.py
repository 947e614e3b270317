"""The clean_data stage: raw instruction data in, clean splits out, and every
dropped row kept with its reason.

Reasons, checked in this order (a row is dropped for the first that applies):
  malformed      not a JSON object, or a required field missing / not a string
  empty_output   output is blank
  output_is_input  output equals the instruction or the input (after whitespace normalisation)
  wrong_script   the output is not mostly in the recipe's language's script (zh: Han; en: Latin)
  too_short / too_long   token count of prompt + output outside [min_tokens, max_tokens]
  exact_duplicate  same instruction, input and output as a kept row
  near_duplicate   MinHash (datasketch) Jaccard of character shingles >= near_dup_threshold with a kept row

    python -m quantune.clean_data --recipe recipes/data_clean.yaml --out results/data_clean
"""
from __future__ import annotations

import argparse
import json
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

from .lib.common import atomic_dir, fail, run_cli, write_json, write_jsonl, write_metrics
from .lib.data import FORMATS, near_key, shingles
from .lib.tables import markdown_table

REASONS = ("malformed", "empty_output", "output_is_input", "wrong_script", "too_short", "too_long",
           "exact_duplicate", "near_duplicate")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def script_ratio(text: str, lang: str) -> float:
    letters = [c for c in text if unicodedata.category(c)[0] in "LN" and not c.isdigit()]
    if not letters:
        return 0.0
    pat = _HAN if lang == "zh" else _LATIN
    return sum(1 for c in letters if pat.match(c)) / len(letters)


def _norm(s: str) -> str:
    return " ".join(s.split())


def read_raw(path: Path) -> list[tuple[int, str]]:
    """(line number, raw text) of each non-blank JSONL line; a JSON array file gives one entry per element."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise fail(f"{path}:{e.lineno}", f"the JSON array does not parse ({e.msg})",
                       "fix the file or convert it to JSONL (one row per line, so bad rows can be dropped alone)") from None
        return [(i, json.dumps(r, ensure_ascii=False)) for i, r in enumerate(data)]
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def clean_rows(raw: list[tuple[int, str]], tokenizer, *, lang: str, min_tokens: int, max_tokens: int,
               script_min_ratio: float, near_dup_threshold: float, num_perm: int = 64):
    """Return (kept rows, rejects, token lengths before, token lengths after)."""
    from datasketch import MinHash, MinHashLSH

    fields = FORMATS["alpaca"]
    kept, rejects, len_before = [], [], []
    seen_exact: set[tuple] = set()
    lsh = MinHashLSH(threshold=near_dup_threshold, num_perm=num_perm)
    kept_grams: dict[str, set[str]] = {}

    def reject(line, raw_text, reason, detail=""):
        rejects.append({"line": line, "reason": reason, "detail": detail, "raw": raw_text})

    for line, text in raw:
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            reject(line, text, "malformed", f"invalid JSON: {e.msg}")
            continue
        if not isinstance(row, dict):
            reject(line, text, "malformed", f"a {type(row).__name__}, not an object")
            continue
        bad = [f for f in fields if not isinstance(row.get(f), str)]
        if bad:
            reject(line, text, "malformed", f"field {bad[0]!r} missing or not a string")
            continue
        row = {f: row[f] for f in fields}
        n_tok = len(tokenizer(row["instruction"] + "\n" + row["input"] + "\n" + row["output"],
                              add_special_tokens=False)["input_ids"])
        len_before.append(n_tok)
        out = _norm(row["output"])
        if not out:
            reject(line, text, "empty_output")
            continue
        if out in (_norm(row["instruction"]), _norm(row["input"])):
            reject(line, text, "output_is_input")
            continue
        ratio = script_ratio(row["output"], lang)
        if ratio < script_min_ratio:
            reject(line, text, "wrong_script", f"{lang} script ratio {ratio:.2f} < {script_min_ratio}")
            continue
        if n_tok < min_tokens:
            reject(line, text, "too_short", f"{n_tok} tokens < {min_tokens}")
            continue
        if n_tok > max_tokens:
            reject(line, text, "too_long", f"{n_tok} tokens > {max_tokens}")
            continue
        key = tuple(_norm(row[f]) for f in fields)
        if key in seen_exact:
            reject(line, text, "exact_duplicate")
            continue
        near = near_key(row)
        grams = shingles(near)
        mh = MinHash(num_perm=num_perm, seed=1)
        for g in sorted(grams):
            mh.update(g.encode("utf-8"))
        # LSH proposes candidates; the exact Jaccard of their shingle sets decides (no LSH false positives)
        sims = [(len(grams & kept_grams[c]) / len(grams | kept_grams[c]), c) for c in lsh.query(mh)]
        sim, other = max(sims, default=(0.0, None))
        if sim >= near_dup_threshold:
            reject(line, text, "near_duplicate", f"Jaccard {sim:.2f} with kept row at line {other}")
            continue
        seen_exact.add(key)
        lsh.insert(str(line), mh)
        kept_grams[str(line)] = grams
        kept.append({**row, "_tokens": n_tok})
    return kept, rejects, len_before


def length_stats(lengths: list[int], prefix: str) -> dict:
    import numpy as np

    if not lengths:
        return {f"{prefix}_rows": 0}
    a = np.asarray(lengths)
    return {f"{prefix}_rows": int(a.size), f"{prefix}_tokens_mean": float(a.mean()),
            **{f"{prefix}_tokens_p{p}": float(np.percentile(a, p)) for p in (5, 50, 95)},
            f"{prefix}_tokens_max": int(a.max()), f"{prefix}_tokens_min": int(a.min())}


def run(recipe_path: str, out: str, cfg: dict) -> dict:
    from transformers import AutoTokenizer

    from .lib.config import load_recipe, resolve_dataset, resolve_model

    recipe = load_recipe(recipe_path, cfg)
    ds = resolve_dataset(cfg, recipe["dataset"])
    src = Path(ds["source"])
    if ds["local"]:
        path = src / f"{recipe['split']}.jsonl" if src.is_dir() else src
        if not path.is_file():
            raise fail(str(path), "raw data file not found", "build it (snakemake data_clean builds the tiny one) or fix the path")
        raw = read_raw(path)
    else:  # a hub data set: rows are already parsed by `datasets`
        import datasets

        hf = datasets.load_dataset(ds["source"], split=recipe["split"])
        raw = [(i, json.dumps(r, ensure_ascii=False)) for i, r in enumerate(hf)]
    tok_model = resolve_model(cfg, recipe["tokenizer_model"], key="tokenizer_model", must_exist=True)
    tok = AutoTokenizer.from_pretrained(tok_model["source"], trust_remote_code=tok_model["trust_remote_code"])
    kept, rejects, len_before = clean_rows(
        raw, tok, lang=recipe["language"], min_tokens=recipe["min_tokens"], max_tokens=recipe["max_tokens"],
        script_min_ratio=recipe["script_min_ratio"], near_dup_threshold=recipe["near_dup_threshold"])
    rng = random.Random(recipe["seed"])
    rng.shuffle(kept)
    n_val = round(len(kept) * recipe["validation_fraction"])
    n_test = round(len(kept) * recipe["test_fraction"])
    splits = {"validation": kept[:n_val], "test": kept[n_val:n_val + n_test], "train": kept[n_val + n_test:]}
    counts = Counter(r["reason"] for r in rejects)
    metrics = {"target": recipe["name"], "stage": "clean_data", "scale": cfg["scale"], "dataset": recipe["dataset"],
               "rows_raw": len(raw), "rows_kept": len(kept), "rows_rejected": len(rejects),
               **{f"rejected_{r}": counts.get(r, 0) for r in REASONS},
               **{f"rows_{s}": len(v) for s, v in splits.items()},
               **length_stats(len_before, "before"), **length_stats([r["_tokens"] for r in kept], "after")}
    assert metrics["rows_kept"] + metrics["rows_rejected"] == metrics["rows_raw"], "a row was lost"
    with atomic_dir(out) as tmp:
        for s, rows in splits.items():
            write_jsonl(tmp / f"{s}.jsonl", [{k: v for k, v in r.items() if k != "_tokens"} for r in rows])
        write_jsonl(tmp / "rejects.jsonl", rejects)
        write_json(tmp / "length_histogram.json", _histograms(len_before, [r["_tokens"] for r in kept]))
        (tmp / "report.md").write_text(_report_md(metrics), encoding="utf-8")
        write_metrics(tmp / "metrics.json", metrics)
    return metrics


def _histograms(before: list[int], after: list[int]) -> dict:
    import numpy as np

    hi = max(before + after + [1])
    edges = np.linspace(0, hi, 21)
    return {"edges": edges.tolist(), "before": np.histogram(before, edges)[0].tolist(),
            "after": np.histogram(after, edges)[0].tolist()}


def _report_md(m: dict) -> str:
    lines = [f"# {m['target']}: {m['dataset']} ({m['scale']})", "",
             f"{m['rows_raw']} raw rows -> {m['rows_kept']} kept ({m['rows_train']} train / "
             f"{m['rows_validation']} validation / {m['rows_test']} test), {m['rows_rejected']} rejected "
             "(each in rejects.jsonl with its reason).", ""]
    lines += markdown_table(["reason", "rows", "share of raw"],
                            [[r, m[f"rejected_{r}"], f"{100 * m[f'rejected_{r}'] / max(m['rows_raw'], 1):.1f}%"]
                             for r in REASONS])

    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines += [""] + markdown_table(["tokens", "before", "after"],
                                   [[k, fmt(m.get(f"before_{k}", "-")), fmt(m.get(f"after_{k}", "-"))]
                                    for k in ("rows", "tokens_mean", "tokens_p5", "tokens_p50", "tokens_p95", "tokens_max")])
    return "\n".join(lines) + "\n"


def _cmd(a) -> None:
    from .lib.config import config_from_args

    m = run(a.recipe, a.out, config_from_args(a))
    print(f"{m['rows_raw']} raw -> {m['rows_kept']} kept, {m['rows_rejected']} rejected: "
          + ", ".join(f"{r} {m[f'rejected_{r}']}" for r in REASONS))


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    return stage_parser("quantune.clean_data", __doc__, _cmd)


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
