import math

import pytest
import torch

from quantune.lib.common import QuantuneError
from quantune.lib.measure import perplexity


class Bigram(torch.nn.Module):
    """A fixed model whose logits depend only on the previous token: easy to score by hand."""

    def __init__(self, vocab=7):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward(self, ids):
        return type("Out", (), {"logits": self.table[ids]})()


def test_disjoint_and_strided_windows_match_hand_computation():
    m = Bigram()
    ids = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(m.table, -1)
    # a bigram model sees all the context it uses in any window: every scored token costs the same
    full_nll = -logp[ids[:-1], ids[1:]].mean().item()
    strided = perplexity(m, ids, context=10, stride=5)
    assert strided["tokens_scored"] == 49
    assert strided["ppl"] == pytest.approx(math.exp(full_nll), rel=1e-5)
    disjoint = perplexity(m, ids, context=10, stride=10)
    # disjoint windows lose the first token of each window after the first: 5 windows, 45 scored
    assert disjoint["tokens_scored"] == 45
    keep = [i for i in range(1, 50) if i % 10 != 0]
    want = -logp[ids[[i - 1 for i in keep]], ids[keep]].mean().item()
    assert disjoint["ppl"] == pytest.approx(math.exp(want), rel=1e-5)


def test_stride_larger_than_context_is_refused():
    with pytest.raises(QuantuneError, match="stride 20 must be in 1..context"):
        perplexity(Bigram(), torch.zeros(30, dtype=torch.long), context=10, stride=20)
