"""graphprune.eval.perplexity: every token predicted once, whatever the windows and batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp


class Bigram(nn.Module):
    """Logits from the current token only: the NLL of a stream does not depend on the windows."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, ids):
        return self.table(ids)


def _reference(model: Bigram, tokens: torch.Tensor) -> float:
    logits = model(tokens[:-1]).detach()
    return math.exp(F.cross_entropy(logits, tokens[1:]).item())


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    model = Bigram()
    nn.init.zeros_(model.table.weight)
    tokens = torch.randint(0, 11, (50,))
    assert gp.perplexity(model, tokens, seq_len=16) == pytest.approx(11.0)


@pytest.mark.parametrize("seq_len, stride, batch_size", [(64, None, 1), (8, 3, 1), (8, 4, 3), (7, 7, 2)])
def test_windows_and_batches_score_each_token_once(seq_len, stride, batch_size):
    torch.manual_seed(0)
    model, tokens = Bigram(), torch.randint(0, 11, (41,))
    got = gp.perplexity(model, tokens, seq_len=seq_len, stride=stride, batch_size=batch_size)
    if stride is None or stride < seq_len or seq_len >= len(tokens):
        assert got == pytest.approx(_reference(model, tokens), rel=1e-6)
    else:  # windows side by side: a window's first token has no context in it and is not predicted
        starts = range(0, len(tokens) - 1, stride)
        keep = torch.tensor([i not in starts for i in range(1, len(tokens))])
        nll = F.cross_entropy(model(tokens[:-1]), tokens[1:], reduction="none").detach()[keep]
        assert got == pytest.approx(math.exp(float(nll.mean())), rel=1e-6)


def test_perplexity_leaves_the_mode_and_refuses_bad_arguments():
    model = Bigram().train()
    gp.perplexity(model, torch.randint(0, 11, (20,)), seq_len=8)
    assert model.training
    with pytest.raises(gp.ArgumentError, match="integer token ids"):
        gp.perplexity(model, torch.randn(20), seq_len=8)
    with pytest.raises(gp.ArgumentError, match="skip tokens"):
        gp.perplexity(model, torch.randint(0, 11, (20,)), seq_len=8, stride=9)
    with pytest.raises(gp.ArgumentError, match="at least 2"):
        gp.perplexity(model, torch.randint(0, 11, (20,)), seq_len=1)
    with pytest.raises(gp.ArgumentError, match="one stream"):
        gp.perplexity(model, torch.randint(0, 11, (2, 20)), seq_len=8)
