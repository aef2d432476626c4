"""Attention written out with matrix products (`q @ k.transpose(-2, -1)`, `probs @ v`): the
channels of q, k and v prune, masked and shrunk agree, in fx and torch.export graphs; a product
whose rows and columns both carry channels (a Gram matrix) freezes them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score
from tests.helpers import assert_exact, prune


class ConvAttention(nn.Module):
    """Ultralytics' PSA attention, reduced: packed qkv from a 1x1 conv, heads by view and split."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim, self.key_dim = heads, dim // heads, dim // heads // 2
        self.scale = self.key_dim**-0.5
        self.qkv = nn.Conv2d(dim, dim + 2 * self.key_dim * heads, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.stem = nn.Conv2d(3, dim, 1)

    def forward(self, x):
        x = self.stem(x)
        b, _, h, w = x.shape
        q, k, v = (
            self.qkv(x)
            .view(b, self.heads, 2 * self.key_dim + self.head_dim, h * w)
            .split([self.key_dim, self.key_dim, self.head_dim], dim=2)
        )
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
        return self.proj((v @ attn.transpose(-2, -1)).reshape(b, self.heads * self.head_dim, h, w))


class TokenAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape

        def split(y):
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        probs = (torch.matmul(q, k.transpose(-2, -1)) / 2.0).softmax(-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, t, -1))


class Gram(nn.Module):
    """x @ x^T over channels: rows and columns both carry them, so nothing there can go."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(3, 8, 1)

    def forward(self, x):
        y = self.c(x)
        return y @ y.transpose(-2, -1)


@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize(
    "factory, shape",
    [(ConvAttention, (2, 3, 4, 4)), (TokenAttention, (2, 5, 16))],
    ids=["conv_heads", "token_heads"],
)
def test_attention_by_matmul_prunes_exactly(factory, shape, exported):
    torch.manual_seed(0)
    model = factory().eval()
    x = (torch.randn(*shape),)
    if exported:
        model = torch.export.export(model, x).module()
    deps = gp.analyze(model, x)
    assert not [f for f in deps.frozen if "matmul" in f.site.reason or "matmul" in f.site.node]
    masked, shrunk = prune(model, x, 0.5)
    assert_exact(masked, shrunk, x)
    inner = "qkv" if factory is ConvAttention else "q"
    weight = dict(shrunk.named_parameters())[f"{inner}.weight"]
    assert weight.shape[0] < dict(model.named_parameters())[f"{inner}.weight"].shape[0]


def test_a_gram_matrix_freezes_its_channels():
    x = (torch.randn(2, 3, 5),)
    deps = gp.analyze(Gram(), x)
    assert not deps.groups
    assert any("rows and columns both carry channels" in f.site.reason for f in deps.frozen)
    with pytest.warns(gp.GraphPruneWarning, match="no channel group can be pruned"):
        out = gp.compile(Gram(), [L2Score(), ChannelMask(0.5)], example_inputs=x)
    assert out.c.out_channels == 8
