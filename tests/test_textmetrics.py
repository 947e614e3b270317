"""BLEU-4 and ROUGE-1/2/L on Chinese with jieba, as LLaMA-Factory computes them, checked against numbers worked
out by hand and against LLaMA-Factory's own loop (ComputeSimilarity in src/llamafactory/train/sft/metric.py)."""
import math

import pytest

from quantune.lib.common import QuantuneError
from quantune.lib.textmetrics import corpus_scores, score_pair, words


def llamafactory_reference(pred: str, label: str) -> dict:
    """LLaMA-Factory's per-sample computation, line for line (jieba words for ROUGE, characters for BLEU)."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis = list(jieba.cut(pred))
    reference = list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    out = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    out["bleu-4"] = round(sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3) * 100, 4)
    return out


def test_chinese_pair_worked_by_hand():
    # jieba: 红色|连衣裙 vs 黑色|连衣裙 -> one of two words shared, no shared bigram, LCS 1 of 2
    assert words("红色连衣裙") == ["红色", "连衣裙"]
    s = score_pair("红色连衣裙", "黑色连衣裙")
    assert s["rouge-1"] == 50.0 and s["rouge-2"] == 0.0 and s["rouge-l"] == 50.0, s
    # characters: 1-gram 4/5, 2-gram 3/4, 3-gram 2/3, 4-gram 1/2, no brevity penalty -> (0.2)^(1/4)
    assert s["bleu-4"] == pytest.approx(100 * 0.2 ** 0.25, abs=1e-4), s


def test_english_is_whitespace_tokenized():
    s = score_pair("the cat is on the mat", "the cat sat on the mat")
    # rouge_chinese counts distinct n-grams: unigrams {the,cat,is,on,mat} vs {the,cat,sat,on,mat} -> 4/5
    assert s["rouge-1"] == 80.0 and s["rouge-2"] == 60.0, s
    assert s["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-4), s  # LCS "the cat on the mat"
    # words: p1 5/6, p2 3/5, p3 1/4, p4 0/3 -> method3 gives 1/(2*3); BLEU = (5/6*3/5*1/4*1/6)^(1/4)
    assert s["bleu-4"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=1e-3), s


@pytest.mark.parametrize("pred,ref", [
    ("这一款连衣裙撞色圆领的设计，修饰脖颈精致优雅。简约的版式，穿着大方优雅。",
     "连衣裙采用撞色印花图案设计，搭配上精致圆领设计，穿着尽显文艺气息。而其修身版型设计。"),
    ("此款红色连衣裙，宽松版型遮肉显瘦，是日常出街的不错选择。", "此款红色连衣裙，宽松版型遮肉显瘦，蕾丝点缀浪漫迷人。"),
    ("这款 T恤 采用 cotton 面料", "这款T恤采用棉质面料"),
    ("", "这款T恤采用棉质面料"),
    ("完全一样的句子。", "完全一样的句子。"),
])
def test_chinese_matches_llamafactory(pred, ref):
    assert score_pair(pred, ref) == pytest.approx(llamafactory_reference(pred, ref), abs=1e-4)


def test_identical_scores_100_and_corpus_is_the_mean():
    assert score_pair("黑色百搭又显瘦。", "黑色百搭又显瘦。") == {"rouge-1": 100.0, "rouge-2": 100.0,
                                                             "rouge-l": 100.0, "bleu-4": 100.0}
    c = corpus_scores(["黑色百搭又显瘦。", ""], ["黑色百搭又显瘦。", "黑色百搭又显瘦。"])
    assert c["bleu-4"] == 50.0 and c["rouge-l"] == 50.0, c
    assert all(math.isfinite(v) for v in c.values())


def test_bad_input_is_one_line():
    with pytest.raises(QuantuneError, match="2 predictions for 1 references; fix:"):
        corpus_scores(["a", "b"], ["a"])
