"""Property test: random architectures (residual adds, concats, splits, literal slices, grouped and depthwise
convs, group norms, squeeze-excite, linear heads); shrink of mask is exact on every one."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, RandomScore, Shrink
from tests.helpers import assert_exact, run

EXAMPLES = int(os.environ.get("GRAPHPRUNE_EXAMPLES", 40))  # more for a longer hunt


class RandomNet(nn.Module):
    """Runs a recipe of ops over a growing list of feature maps (the recipe is static, so fx traces it)."""

    def __init__(self, recipe: list[tuple], layers: dict[str, nn.Module], head_in: int, flatten: bool) -> None:
        super().__init__()
        self.recipe = recipe
        self.layers = nn.ModuleDict(layers)
        self.flatten = flatten
        self.head = nn.Linear(head_in * (4 if flatten else 1), 3)

    def forward(self, x):
        feats = [x]
        for op, *args in self.recipe:
            if op == "layer":
                name, src = args
                feats.append(self.layers[name](feats[src]))
            elif op == "add":
                feats.append(feats[args[0]] + feats[args[1]])
            elif op == "cat":
                feats.append(torch.cat([feats[args[0]], feats[args[1]]], dim=1))
            elif op == "chunk":
                a, b = feats[args[0]].chunk(2, dim=1)
                feats.append([a, b * 2.0, torch.cat([b, a], dim=1)][args[1]])
            elif op == "se":
                src, name = args
                s = torch.sigmoid(self.layers[name](feats[src].mean((2, 3), keepdim=True)))
                feats.append(feats[src] * s)
            elif op == "relu":
                feats.append(F.relu(feats[args[0]]))
            elif op == "slice":  # GhostNet's cut to a literal width
                src, start, stop = args
                feats.append(feats[src][:, start:stop])
        y = feats[-1]
        y = torch.flatten(F.adaptive_avg_pool2d(y, 2), 1) if self.flatten else y.mean((2, 3))
        return self.head(y)


@st.composite
def random_nets(draw):
    channels = [3]
    recipe, layers = [], {}

    def add_layer(module, src, out):
        name = f"l{len(layers)}"
        layers[name] = module
        recipe.append(("layer", name, src))
        channels.append(out)
        return len(channels) - 1

    add_layer(nn.Conv2d(3, draw(st.sampled_from([4, 6, 8])), 3, padding=1), 0, None)
    channels[-1] = layers["l0"].out_channels
    for _ in range(draw(st.integers(2, 7))):
        kinds = ["conv", "grouped", "dw", "bn", "gn", "add", "cat", "chunk", "se", "relu", "slice"]
        kind = draw(st.sampled_from(kinds))
        src = draw(st.integers(1, len(channels) - 1))
        c = channels[src]
        if kind == "conv":
            out = draw(st.sampled_from([4, 6, 8]))
            add_layer(nn.Conv2d(c, out, draw(st.sampled_from([1, 3])), padding="same"), src, out)
        elif kind == "grouped" and c % 2 == 0:
            out = draw(st.sampled_from([4, 8]))
            add_layer(nn.Conv2d(c, out, 3, padding=1, groups=2), src, out)
        elif kind == "dw":
            mult = draw(st.sampled_from([1, 2]))
            add_layer(nn.Conv2d(c, c * mult, 3, padding=1, groups=c), src, c * mult)
        elif kind == "bn":
            add_layer(nn.BatchNorm2d(c), src, c)
        elif kind == "gn" and c % 2 == 0:
            add_layer(nn.GroupNorm(2, c), src, c)
        elif kind == "add":
            other = draw(st.integers(1, len(channels) - 1))
            if channels[other] != c:
                other = add_layer(nn.Conv2d(channels[other], c, 1), other, c)
            recipe.append(("add", src, other))
            channels.append(c)
        elif kind == "cat":
            other = draw(st.integers(1, len(channels) - 1))
            recipe.append(("cat", src, other))
            channels.append(c + channels[other])
        elif kind == "chunk" and c % 2 == 0:
            which = draw(st.integers(0, 2))
            recipe.append(("chunk", src, which))
            channels.append(c if which == 2 else c // 2)
        elif kind == "se":
            name = f"l{len(layers)}"
            layers[name] = nn.Conv2d(c, c, 1)
            recipe.append(("se", src, name))
            channels.append(c)
        elif kind == "slice" and c > 1:
            start = draw(st.integers(0, c - 1))
            stop = draw(st.integers(start + 1, c))
            recipe.append(("slice", src, start, stop))
            channels.append(stop - start)
        elif kind == "relu":
            recipe.append(("relu", src))
            channels.append(c)
    return RandomNet(recipe, layers, channels[-1], draw(st.booleans())), draw(st.integers(0, 2**16))


def _randomize_norms(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(), st.sampled_from([0.25, 0.5, 0.75]), st.sampled_from(["local", "global"]))
def test_shrink_is_exact_on_random_architectures(net_and_seed, ratio, scope):
    net, seed = net_and_seed
    torch.manual_seed(seed)
    _randomize_norms(net, seed)
    net.eval()
    x = (torch.randn(2, 3, 6, 6),)
    masked = gp.compile(net, [RandomScore(seed), ChannelMask(ratio, scope=scope)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    assert run(shrunk, x).shape == (2, 3)
    assert gp.count_params(shrunk) <= gp.count_params(net)
