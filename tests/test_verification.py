"""Verified by default: a pass that claims to keep the outputs is checked, and a model that cannot
run is never returned; shared tensors and sizes read off tensors never lead to a broken model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from graphprune.rules import base as rule_registry
from tests import models
from tests.helpers import assert_exact, run


class ReverseChannels(nn.Module):
    """Mixes channels (reverses their order) but will be registered, wrongly, as channel-wise."""

    def forward(self, x):
        return x.flip(1)


class Reversing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.rev = ReverseChannels()
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.rev(self.a(x)))


@pytest.fixture
def broken_rule():
    gp.register_rule(ReverseChannels, gp.ChannelwiseRule(1))  # deliberately wrong: the module is not channel-wise
    yield [ReverseChannels]
    rule_registry._by_type.pop(ReverseChannels)


def test_a_shrink_that_is_not_exact_raises_and_names_the_first_diverging_node(broken_rule):
    x = (torch.randn(2, 3, 4, 4),)
    with pytest.raises(gp.VerificationError) as info:
        gp.compile(Reversing(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x, leaf_modules=broken_rule)
    msg = str(info.value)
    assert "Shrink" in msg and "first divergence at node b [b]" in msg and "verify=False" in msg


def test_verify_false_skips_the_check(broken_rule):
    x = (torch.randn(2, 3, 4, 4),)
    out = gp.compile(
        Reversing(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x, leaf_modules=broken_rule, verify=False
    )
    assert run(out, x).shape == (2, 2, 4, 4)


def test_a_model_broken_by_a_pass_is_never_returned():
    def break_it(gm, ctx):
        gm.get_submodule("fc2").weight = nn.Parameter(torch.randn(16, 31))
        return gp.PassResult(gm, True)

    with pytest.raises(gp.VerificationError, match="after break_it the model no longer runs"):
        gp.compile(models.Mlp(), [break_it], example_inputs=(torch.randn(2, 10),))


class Tied(nn.Module):
    """b reads a's weight (b.weight = a.weight): a's input columns are the model input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class CalledTwice(nn.Module):
    """One linear layer applied to a feature map and to the raw input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.shared, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.cat([self.shared(torch.relu(self.a(x))), self.shared(x)], dim=-1))


@pytest.mark.parametrize("factory", [Tied, CalledTwice])
def test_a_tensor_read_twice_with_unprunable_slices_freezes_them_and_says_why(factory):
    model = factory()
    x = (torch.randn(4, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    assert run(shrunk, x).shape == run(model, x).shape
    frozen = gp.summary(model, shrunk, x).frozen
    assert any("shared" in f.site.reason for f in frozen)


class SizeFromAnotherTensor(nn.Module):
    """maxvit's attention: the output is reshaped to a width read off the input (`D` of x.shape),
    while its own channels are heads that prune apart from the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.qkv = nn.Linear(8, 24)
        self.merge = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.inp(x)
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, 2, 4).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.head(self.merge(out) + x)


def test_a_size_read_off_one_tensor_and_used_to_reshape_another_stays_exact():
    torch.manual_seed(0)
    model = SizeFromAnotherTensor()
    x = (torch.randn(2, 5, 6),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x, output="graph")
    assert_exact(masked, shrunk, x)
    assert shrunk.get_submodule("qkv").out_features == 12  # a head of each went


def test_spatial_sizes_read_for_resampling_and_splitting_do_not_freeze_channels():
    class Resample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            feat = self.b(x)
            small = F.max_pool2d(self.a(x), 2)
            big = F.interpolate(small, size=feat.shape[-2:])  # spatial sizes of a tensor with channels
            top, bottom = torch.split(big, feat.shape[2] // 2, dim=2)
            return self.out(torch.cat([top, bottom], dim=2) + feat)

    model = Resample()
    x = (torch.randn(1, 3, 8, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    assert shrunk.a.out_channels == shrunk.b.out_channels == 4


class ExportedCnn(nn.Module):
    """fx cannot trace `len(x)`: the graph comes from torch.export, with ATen convolutions, batch and
    group norms and a depthwise conv whose group count Shrink must rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(4, 8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        scale = float(len(x))
        y = self.gn(self.dw(F.relu(self.bn(self.a(x)))))
        return self.b(F.silu(y)) * scale


def test_exported_convolutions_and_norms_prune_exactly():
    torch.manual_seed(0)
    model = models.randomize_bn(ExportedCnn()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert type(shrunk) is ExportedCnn and shrunk.dw.groups == shrunk.dw.out_channels == 4
    assert shrunk.gn.num_groups == 2 and shrunk.a.out_channels == 4
    assert_exact(masked, shrunk, x)


def test_half_precision_rounding_with_no_node_to_blame_is_kept_with_a_warning():
    from graphprune.ir.verify import Before, Reference, check_keeps_outputs

    class Identity(nn.Module):
        def forward(self, x):
            return x * 1.0

    gm = torch.fx.symbolic_trace(Identity())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for dtype, off, kept in ((torch.bfloat16, 0.04, True), (torch.bfloat16, 0.2, False), (torch.float32, 0.04, False)):
        inputs = (x.to(dtype),)
        expected = inputs[0].clone()
        expected[0, 0] += off * float(expected.abs().max())  # what the graph computed before the pass
        ref = Reference(expected, Before(gm))  # (the graph itself: no node differs)
        if kept:
            with pytest.warns(gp.GraphPruneWarning, match="taken as rounding"):
                check_keeps_outputs("Shrink", gm, ref, inputs)
        else:
            with pytest.raises(gp.VerificationError, match="must keep the model's outputs"):
                check_keeps_outputs("Shrink", gm, ref, inputs)


class _ScaleInPlace(gp.PassBase):
    """Claims to keep the outputs but doubles a weight in place."""

    keeps_outputs = True

    def call(self, gm, ctx):
        with torch.no_grad():
            gm.get_submodule("b").weight.mul_(2)
        return gp.PassResult(gm, True)


class _Rewire(gp.PassBase):
    """Claims to keep the outputs but makes the second conv read the input's relu instead."""

    keeps_outputs = True

    def call(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "b")
        node.args = (node.args[0].args[0],)  # b(relu(a(x))) -> b(a(x))
        return gp.PassResult(gm, True)


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_the_diverging_node_is_found_after_a_check_fails_from_the_graph_as_it_was():
    # node fingerprints are taken only when a check fails, from the graph put back as it was before
    # the pass; a pass that changed a tensor in place leaves nothing to compare nodes with, and says so
    x = (torch.randn(2, 3, 4, 4),)
    model = _Chain().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        gp.VerificationError,
        match=r"_Rewire \(after L2Score, ChannelMask, Shrink\) must keep.*first divergence at node b \[b\]",
    ):
        gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink(), _Rewire()], example_inputs=x)
    with pytest.raises(gp.VerificationError, match="changed in place, so the node .* cannot be named"):
        gp.compile(model, [_ScaleInPlace()], example_inputs=x)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
