"""Property test for sequence models: random stacks of attention blocks (heads through view and
transpose, grouped-query attention with repeat_interleave, fused q/k/v taken apart with unbind),
tied weights, reshapes (unflatten/flatten, sizes read off tensors), cat/split/chunk, literal slices, LayerNorms and
residual adds, called with keyword inputs.  Shrink of mask is exact on every one, or the channels
that cannot be pruned are frozen: never a broken model."""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, RandomScore, Shrink
from tests.helpers import assert_exact, run

EXAMPLES = int(os.environ.get("GRAPHPRUNE_EXAMPLES", 30))  # more for a longer hunt


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, head_dim: int, fused: bool, merge: str) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.fused, self.merge = heads, kv_heads, head_dim, fused, merge
        if fused:
            self.qkv = nn.Linear(width, 3 * heads * head_dim)
        else:
            self.q = nn.Linear(width, heads * head_dim)
            self.kv = nn.ModuleList(nn.Linear(width, kv_heads * head_dim) for _ in range(2))
        self.o = nn.Linear(heads * head_dim, width)

    def forward(self, x):
        b, t, c = x.shape
        if self.fused:
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in self.kv)
            k, v = (z.repeat_interleave(self.heads // self.kv_heads, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        if self.merge == "minus_one":
            y = y.reshape(b, t, -1)
        elif self.merge == "literal":
            y = y.reshape(b, t, self.heads * self.head_dim)
        else:  # the width read off the input, as timm and MaxViT do (only when it is the same width)
            y = y.reshape(b, t, c) if c == self.heads * self.head_dim else y.flatten(2)
        return self.o(y)


class RandomSeqNet(nn.Module):
    def __init__(self, recipe: list[tuple], layers: dict[str, nn.Module], width: int, out: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.layers = nn.ModuleDict(layers)
        self.embed = nn.Linear(6, width)
        self.head = nn.Linear(out, 3)

    def forward(self, x, shift=None):
        h = [self.embed(x if shift is None else x + shift)]
        for op, *args in self.recipe:
            src = h[args[0]]
            if op == "layer":
                h.append(self.layers[args[1]](src))
            elif op == "residual":
                h.append(src + self.layers[args[1]](src))
            elif op == "cat":
                h.append(torch.cat([src, h[args[1]]], dim=-1))
            elif op == "split":
                a, b = src.split(src.shape[-1] // 2, dim=-1)
                h.append(a * torch.sigmoid(b))
            elif op == "chunk":
                a, b = src.chunk(2, dim=-1)
                h.append(F.gelu(a) + b)
            elif op == "slice":  # q, k and v cut out of one projection at literal bounds (Phi-3)
                h.append(src[..., args[1] : args[2]])
            elif op == "unflatten":
                h.append(src.unflatten(-1, (2, src.shape[-1] // 2)).flatten(-2))
        return self.head(h[-1].mean(1))


@st.composite
def random_seq_nets(draw):
    width = draw(st.sampled_from([8, 12, 16]))
    widths, recipe, layers = [width], [], {}

    def add(module, src, out, op="layer"):
        name = f"l{len(layers)}"
        layers[name] = module
        recipe.append((op, src, name))
        widths.append(out)

    for _ in range(draw(st.integers(2, 6))):
        kinds = ["attn", "linear", "tied", "ln", "cat", "split", "chunk", "unflatten", "mlp", "slice"]
        kind = draw(st.sampled_from(kinds))
        src = draw(st.integers(0, len(widths) - 1))
        c = widths[src]
        if kind == "attn":
            kv_heads = draw(st.sampled_from([1, 2]))
            heads = kv_heads * draw(st.sampled_from([1, 2]))
            head_dim = draw(st.sampled_from([2, 4]))
            fused = draw(st.booleans()) and kv_heads == heads
            merge = draw(st.sampled_from(["minus_one", "literal", "input"]))
            add(Attention(c, heads, kv_heads, head_dim, fused, merge), src, c, op="residual")
        elif kind == "linear":
            add(nn.Linear(c, draw(st.sampled_from([8, 12, 16]))), src, None)
            widths[-1] = layers[f"l{len(layers) - 1}"].out_features
        elif kind == "tied":  # two square layers sharing a weight
            a, b = nn.Linear(c, c), nn.Linear(c, c)
            b.weight = a.weight
            add(nn.Sequential(a, nn.ReLU(), b), src, c)
        elif kind == "ln":
            add(nn.LayerNorm(c), src, c)
        elif kind == "mlp":
            add(nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)), src, c, op="residual")
        elif kind == "cat":
            other = draw(st.integers(0, len(widths) - 1))
            recipe.append(("cat", src, other))
            widths.append(c + widths[other])
        elif kind == "slice" and c > 1:
            start = draw(st.integers(0, c - 1))
            stop = draw(st.integers(start + 1, c))
            recipe.append(("slice", src, start, stop))
            widths.append(stop - start)
        elif kind in ("split", "chunk", "unflatten") and c % 2 == 0:
            recipe.append((kind, src))
            widths.append(c if kind in ("chunk", "unflatten") else c // 2)
            if kind == "chunk":
                widths[-1] = c // 2
    return RandomSeqNet(recipe, layers, width, widths[-1]), draw(st.integers(0, 2**16)), draw(st.booleans())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_seq_nets(), st.sampled_from([0.25, 0.5]), st.sampled_from(["local", "global"]))
def test_shrink_is_exact_on_random_sequence_models(net_seed_kw, ratio, scope):
    net, seed, keyword = net_seed_kw
    torch.manual_seed(seed)
    net.eval()
    x = torch.randn(2, 5, 6)
    inputs = {"x": x, "shift": torch.randn(6)} if keyword else (x,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gp.GraphPruneWarning)  # a net with nothing prunable says so
        masked = gp.compile(net, [RandomScore(seed), ChannelMask(ratio, scope=scope)], example_inputs=inputs)
        shrunk = gp.compile(masked, [Shrink()], example_inputs=inputs)
    assert_exact(masked, shrunk, inputs)
    assert run(shrunk, inputs).shape == (2, 3)
    assert gp.count_params(shrunk) <= gp.count_params(net)
