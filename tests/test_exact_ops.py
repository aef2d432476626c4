"""Small models around one op each (division by a parameter, rsqrt, splits and chunks, slices, unflatten,
group norms, clamp, expand, tied weights, squeeze, functional batch norm): masked and shrunk agree."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L1Score, L2Score, Shrink
from tests.helpers import assert_exact, prune, run


class DivideByParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.t = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x):
        return self.d(self.c(x) / self.t)  # a masked t would make 0/0 in the masked model


class Rsqrt(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.d(torch.rsqrt(self.c(x).abs() + 1) * self.c(x).pow(-1))


class SplitInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a, b = self.c(x).split(4, dim=1)
        return self.d(a) + self.d(b)


class SplitSections(nn.Module):
    """Uneven sections: each part keeps what its own consumer's group keeps."""

    def __init__(self):
        super().__init__()
        self.c, self.d, self.e = nn.Conv2d(3, 12, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = torch.split(self.c(x).relu(), [4, 8], dim=1)
        return self.d(a) + self.e(b)


class UnflattenLiteral(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.b(self.a(x).unflatten(-1, (4, 16)).relu().transpose(-1, -2).flatten(-2))


class UnflattenFree(UnflattenLiteral):
    def forward(self, x):
        return self.b(self.a(x).unflatten(-1, (4, -1)).relu().transpose(-1, -2).flatten(-2))


class GroupNormNoAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.g, self.d = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8, affine=False), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.d(self.g(self.c(x)))


class FunctionalGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.w, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

    def forward(self, x):
        return self.d(F.group_norm(self.c(x), 2, self.w, self.b))


class ClampTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.register_buffer("lo", torch.rand(8, 1, 1))

    def forward(self, x):
        return self.d(torch.clamp(self.c(x), min=self.lo))


class ExpandLiteral(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.d = nn.Linear(3, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        v = self.l(x.mean((2, 3)))[:, :, None, None].expand(2, 8, 5, 5)
        return self.d(v * x.sum(1, keepdim=True))


class ParamReadWhole(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.g = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x):
        return self.d(self.c(x) * self.g) * self.g.mean()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.s, self.a, self.b, self.h = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.h(self.b(self.a(self.s(x)).relu()))


class SharedModule(nn.Module):
    """timm's CoaT: one positional conv reached under two names (``cpe`` and ``blocks.0.cpe``)."""

    def __init__(self):
        super().__init__()
        self.s, self.cpe, self.h = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 2, 1)
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].cpe = self.cpe

    def forward(self, x):
        y = self.s(x)
        y = y + self.cpe(y)
        return self.h(y + self.blocks[0].cpe(y))


class SqueezeAll(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.p, self.l = nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Linear(2, 5)

    def forward(self, x):
        return self.l(self.p(self.c(x)).squeeze())


class FunctionalBatchNorm(nn.Module):
    """timm's BatchNormAct2d: F.batch_norm on the module's own tensors."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.d = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        bn = self.bn
        y = F.batch_norm(self.c(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)
        return self.d(F.relu(y))


class GhostSlice(nn.Module):
    """GhostNet: a primary conv and a cheap depthwise one concatenated, then cut to `out_chs` (a literal
    slice: its bound counts channels some of which go)."""

    def __init__(self):
        super().__init__()
        self.out_chs = 6
        self.primary, self.cheap = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.d = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = F.relu(self.primary(x))
        return self.d(torch.cat([y, self.cheap(y)], 1)[:, : self.out_chs])


class AtenSliceKeywords(nn.Module):
    """aten.slice with its bounds as keywords: Shrink moves them all the same."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.d(torch.ops.aten.slice.Tensor(self.c(x), dim=1, start=2, end=5))


class SlicesComputed(nn.Module):
    """Slices at bounds read off the tensor (nodes of the graph): they would cut elsewhere once channels
    go, so those channels stay."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.c(x)
        return self.d(y[:, : y.shape[1] // 2 - 1])


CASES = [
    FunctionalBatchNorm,
    GhostSlice,
    AtenSliceKeywords,
    SlicesComputed,
    DivideByParam,
    Rsqrt,
    SplitInt,
    SplitSections,
    UnflattenLiteral,
    UnflattenFree,
    GroupNormNoAffine,
    FunctionalGroupNorm,
    ClampTensor,
    ExpandLiteral,
    ParamReadWhole,
    Tied,
    SharedModule,
    SqueezeAll,
]


@pytest.mark.parametrize("factory", CASES, ids=[c.__name__ for c in CASES])
def test_masked_and_shrunk_agree_around_the_op(factory):
    torch.manual_seed(0)
    model = factory().eval()
    x = (torch.randn(2, 8),) if "Unflatten" in factory.__name__ else (torch.randn(2, 3, 5, 5),)
    masked, shrunk = prune(model, x, 0.5)
    assert not torch.isnan(run(masked, x)).any()
    assert_exact(masked, shrunk, x)


def test_split_sections_are_rewritten_to_what_each_part_keeps():
    _, shrunk = prune(SplitSections(), (torch.randn(2, 3, 5, 5),), 0.5)
    (split,) = [n for n in shrunk.graph.nodes if n.op == "call_function" and n.target is torch.split]
    assert split.args[1] == [2, 4] and shrunk.get_submodule("c").out_channels == 6


def test_a_literal_slice_moves_to_the_kept_channels_and_lands_in_the_attribute_it_came_from():
    torch.manual_seed(0)
    model, x = GhostSlice().eval(), (torch.randn(2, 3, 5, 5),)
    masked, shrunk = prune(model, x, 0.5)
    assert type(shrunk) is GhostSlice  # the user's class: its `out_chs` now counts the kept channels
    assert shrunk.primary.out_channels == 2 and shrunk.out_chs == shrunk.d.in_channels < 6
    graph = gp.compile(masked, [Shrink()], example_inputs=x, output="graph")
    (cut,) = [n for n in graph.graph.nodes if n.target is operator.getitem]
    assert cut.args[1][1] == slice(None, shrunk.out_chs, None)
    assert_exact(masked, graph, x)


def test_a_slice_at_bounds_the_graph_computes_freezes_the_channels_it_cuts():
    model, x = SlicesComputed(), (torch.randn(2, 3, 5, 5),)
    (cut,) = [f for f in gp.analyze(model, example_inputs=x).frozen if f.site.source == "c"]
    assert cut.site.kind == "indexing" and cut.channels == 8


def test_functional_batch_norm_still_prunes():
    _, shrunk = prune(FunctionalBatchNorm(), (torch.randn(2, 3, 5, 5),), 0.5)
    assert shrunk.get_submodule("c").out_channels == 4 and shrunk.get_submodule("bn").weight.shape == (4,)


def test_unflatten_with_free_size_still_prunes():
    _, shrunk = prune(UnflattenFree(), (torch.randn(2, 8),), 0.5)
    assert shrunk.get_submodule("a").out_features < 64


def test_tied_weights_stay_tied():
    _, shrunk = prune(Tied(), (torch.randn(2, 3, 5, 5),), 0.5)
    assert shrunk.get_submodule("a").weight is shrunk.get_submodule("b").weight


def test_a_shared_module_is_sliced_once():
    _, shrunk = prune(SharedModule(), (torch.randn(2, 3, 5, 5),), 0.5)
    assert shrunk.get_submodule("blocks.0.cpe") is shrunk.get_submodule("cpe")
    assert shrunk.get_submodule("cpe").weight.shape[0] == shrunk.get_submodule("s").out_channels < 8


def test_example_inputs_are_not_modified():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            x.mul_(2)
            return self.c(x)

    x = torch.ones(1, 3, 2, 2)
    gp.compile(InPlace(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=(x,), verify_each=True)
    assert torch.equal(x, torch.ones(1, 3, 2, 2))


def test_exported_chunk_parts_lose_the_same_channels():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.d1, self.d2 = nn.Linear(8, 64), nn.Linear(32, 8), nn.Linear(32, 8)

        def forward(self, x):
            a, b = self.up(x).chunk(2, dim=-1)
            return self.d1(torch.relu(a)) + self.d2(torch.relu(b))

    torch.manual_seed(0)
    x = (torch.randn(4, 8),)
    exported = torch.export.export(Two().eval(), x).module()
    masked = gp.compile(exported, [L1Score(), ChannelMask(0.5, scope="global")], example_inputs=x)
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=x), x)


class L2Norm(nn.Module):
    """SSD300's L2Norm: channels normalised to unit length, then scaled per channel."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        y = F.normalize(self.c(x), dim=1) * self.scale.view(1, -1, 1, 1)
        return self.d(y + self.c(x) / self.c(x).norm(dim=1, keepdim=True).clamp_min(1e-6))


class NormAsFeature(nn.Module):
    """A norm over the channels is a feature of its own (no channels left in it); ord=0 counts the
    non-zero channels."""

    def __init__(self, ord: float = 2):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.ord = ord

    def forward(self, x):
        h = self.a(x)
        return self.b(h) * torch.linalg.vector_norm(h, ord=self.ord, dim=-1, keepdim=True)


@pytest.mark.parametrize(
    "factory, exported",
    # (exported, F.normalize becomes norm -> expand(literal sizes) -> div, and a size-1 dim expanded
    # across the channels is not followed yet: those channels stay, frozen with the reason)
    [(L2Norm, False), (NormAsFeature, False), (NormAsFeature, True)],
)
def test_p_norms_over_pruned_channels_are_exact(factory, exported):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 5, 5),) if factory is L2Norm else (torch.randn(3, 8),)
    model = factory().eval()
    if exported:
        model = torch.export.export(model, x).module()
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert gp.count_params(shrunk) < gp.count_params(model)
    assert_exact(masked, shrunk, x)


def test_a_norm_that_counts_zeros_freezes_its_channels():
    deps = gp.analyze(NormAsFeature(ord=0), (torch.randn(3, 8),))
    assert any("counts zeros" in f.site.reason for f in deps.frozen)
    assert all(g.key != "a" for g in deps.groups)


class SpatialRms(nn.Module):
    """Each channel divided by its own root mean square over the positions (Qwen3 does this per
    head with q_norm/k_norm): rsqrt(mean(h²) + eps) is never 1/0 when eps > 0."""

    def __init__(self, eps: float, square: bool = True):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.eps, self.square = eps, square

    def forward(self, x):
        h = self.c(x)
        energy = (h.pow(2) if self.square else h).mean(dim=(2, 3), keepdim=True)
        return self.d(h * torch.rsqrt(energy + self.eps))


def test_a_per_channel_rms_with_a_positive_epsilon_prunes_exactly():
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 5, 5),)
    masked, shrunk = prune(SpatialRms(1e-5).eval(), x, 0.5)
    assert shrunk.c.out_channels == 4 and not torch.isnan(run(masked, x)).any()
    assert_exact(masked, shrunk, x)
    # without the epsilon a masked channel is 0 * rsqrt(0); a mean that is not of squares can be -eps
    for model in (SpatialRms(0.0), SpatialRms(1e-5, square=False)):
        deps = gp.analyze(model.eval(), x)
        assert any("1/0" in f.site.reason for f in deps.frozen)
        assert all("c" not in g.modules for g in deps.groups)


class CatEmpty(nn.Module):
    """A part of size 0 concatenated with channels (Phi-3's rotary pass-through at full rotary)."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.c(x)
        return self.d(torch.cat([h, h[..., :0]], dim=-1))  # channels along dim 1, nothing along the last


def test_an_empty_part_of_a_concat_holds_no_channels():
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 5, 5),)
    assert not [f for f in gp.analyze(CatEmpty().eval(), x).frozen if f.site.kind == "no_rule"]
    masked, shrunk = prune(CatEmpty().eval(), x, 0.5)
    assert shrunk.c.out_channels == 4
    assert_exact(masked, shrunk, x)
