"""Generation quality: BLEU-4 and ROUGE-1/2/L computed the way LLaMA-Factory (and ChatGLM's fine-tuning demos)
compute them for Chinese text (LLaMA-Factory `src/llamafactory/train/sft/metric.py`, ComputeSimilarity):

  * ROUGE-1/2/L: F1 from `rouge_chinese.Rouge` on jieba words (`" ".join(jieba.cut(text))`); an empty
    prediction or reference scores 0.
  * BLEU-4: `nltk` `sentence_bleu([list(reference)], list(prediction),
    smoothing_function=SmoothingFunction().method3)`, i.e. on characters for Chinese text.
  * Every score is multiplied by 100 and rounded to 4 decimals per sample; a corpus score is the mean.

Text without CJK characters (English) is whitespace-tokenized instead: the same units feed ROUGE and BLEU
(character n-grams would say little about English).

    python -m quantune.lib.textmetrics --pred "这款连衣裙..." --ref "这款连衣裙..."
"""
from __future__ import annotations

import argparse
import json
import re
from functools import lru_cache

from .common import fail, run_cli

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def words(text: str, chinese: bool | None = None) -> list[str]:
    """The units ROUGE is computed on: jieba words for Chinese text, whitespace tokens otherwise."""
    chinese = is_chinese(text) if chinese is None else chinese
    if chinese:
        return [w for w in _jieba().cut(text) if w.strip()]
    return text.split()


def bleu_units(text: str, chinese: bool) -> list[str]:
    """The units BLEU-4 is computed on: characters for Chinese text (LLaMA-Factory), words otherwise."""
    return list(text) if chinese else text.split()


def score_pair(pred: str, ref: str, chinese: bool | None = None) -> dict[str, float]:
    """One prediction against one reference: BLEU-4 and ROUGE-1/2/L F1, each in 0..100 (4 decimals)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    if not isinstance(pred, str) or not isinstance(ref, str):
        raise fail("textmetrics", f"prediction and reference must be strings, got {type(pred).__name__} and "
                   f"{type(ref).__name__}", "decode the generated ids to text first")
    chinese = is_chinese(ref) if chinese is None else chinese
    hyp_w, ref_w = words(pred, chinese), words(ref, chinese)
    out: dict[str, float] = {}
    if not hyp_w or not ref_w:
        out.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    else:
        scores = Rouge().get_scores(" ".join(hyp_w), " ".join(ref_w))[0]
        for k in ("rouge-1", "rouge-2", "rouge-l"):
            out[k] = round(scores[k]["f"] * 100, 4)
    hyp_b, ref_b = bleu_units(pred, chinese), bleu_units(ref, chinese)
    if not hyp_b or not ref_b:
        out["bleu-4"] = 0.0
    else:
        out["bleu-4"] = round(sentence_bleu([ref_b], hyp_b, smoothing_function=SmoothingFunction().method3) * 100, 4)
    return out


def corpus_scores(preds: list[str], refs: list[str], chinese: bool | None = None) -> dict[str, float]:
    """Mean of the per-sample scores (what LLaMA-Factory reports as predict_bleu-4, predict_rouge-l, ...)."""
    if len(preds) != len(refs):
        raise fail("textmetrics", f"{len(preds)} predictions for {len(refs)} references", "score equal-length lists")
    if not preds:
        raise fail("textmetrics", "nothing to score", "give at least one prediction")
    per = [score_pair(p, r, chinese) for p, r in zip(preds, refs)]
    return {k: sum(s[k] for s in per) / len(per) for k in METRICS}


# ---------------------------------------------------------------- CLI

def _cmd(a) -> None:
    print(json.dumps(score_pair(a.pred, a.ref), ensure_ascii=False))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantune.lib.textmetrics", description=__doc__.splitlines()[0])
    p.add_argument("--pred", required=True)
    p.add_argument("--ref", required=True)
    p.set_defaults(func=_cmd)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
