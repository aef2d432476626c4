"""The dependency analyzer: which parameter slices form a group, and what is frozen."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from tests import models
from tests.helpers import assert_exact, prune


def deps_of(model, shape=(1, 3, 8, 8)):
    gm = gp.trace(model)
    return gp.analyze_dependencies(gm, (torch.randn(*shape),))


def slots(group):
    return {(s.tensor, s.dim) for s in group.slots}


def test_conv_bn_conv_is_one_group_with_every_member():
    deps = deps_of(models.ConvBnConv())
    assert [g.key for g in deps.groups] == ["conv1"]
    g = deps.groups[0]
    assert g.size == 8
    assert slots(g) == {
        ("conv1.weight", 0),
        ("conv1.bias", 0),
        ("bn.weight", 0),
        ("bn.bias", 0),
        ("bn.running_mean", 0),
        ("bn.running_var", 0),
        ("conv2.weight", 1),
    }
    assert all(len(idx) == 1 for unit in g.units for idx in unit)
    # conv2's outputs are the model's output: frozen, and said so.
    assert any(f.site.kind == "output" and f.channels == 4 for f in deps.frozen)


def test_residual_add_couples_both_branches():
    deps = deps_of(models.Residual())
    stream = next(g for g in deps.groups if ("stem.weight", 0) in slots(g))
    assert {("b.weight", 0), ("a.weight", 1), ("head.weight", 1)} <= slots(stream)
    assert stream.size == 8
    inner = next(g for g in deps.groups if ("a.weight", 0) in slots(g))
    assert inner.size == 6 and ("b.weight", 1) in slots(inner)


def test_concat_offsets_index_maps():
    deps = deps_of(models.Concat())
    a = deps.group("a")
    b = deps.group("b")
    c_in = lambda g: sorted(
        i for unit in g.units for s, idx in zip(g.slots, unit) if s.tensor == "c.weight" for i in idx
    )
    assert c_in(a) == [0, 1, 2, 3]
    assert c_in(b) == [4, 5, 6, 7, 8, 9]


def test_grouped_conv_prunes_alike_in_every_group_and_depthwise_follows():
    deps = deps_of(models.Grouped())
    a = deps.group("a")
    # 8 inputs in 4 groups of 2: the j-th channel of every group is one unit.
    assert a.size == 2
    assert sorted(a.units[0][[s.tensor for s in a.slots].index("a.weight")]) == [0, 2, 4, 6]
    g = deps.group("g")
    assert g.size == 3  # 12 outputs / 4 groups
    dw = dict(zip(g.slots, g.units[0]))
    assert len(dw[gp.Slot("dw.weight", 0)]) == 8  # 4 channels x multiplier 2


def test_groupnorm_units_are_whole_groups():
    deps = deps_of(models.GroupNormNet())
    g = deps.group("a")
    assert g.size == 4
    assert all(len(unit[0]) == 2 for unit in g.units)


def test_flatten_expands_each_channel_to_its_spatial_positions():
    deps = deps_of(models.FlattenLinear())
    g = deps.group("conv")
    fc = [s.tensor for s in g.slots].index("fc.weight")
    assert g.size == 6
    assert list(g.units[1][fc]) == list(range(16, 32))


def test_channel_shuffle_and_chunk_constrain_units():
    deps = deps_of(models.Shuffle())
    g = deps.group("a")
    a = [s.tensor for s in g.slots].index("a.weight")
    assert sorted(sorted(u[a]) for u in g.units) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_parameter_broadcast_against_channels_is_a_member():
    deps = deps_of(models.LayerScale())
    assert ("graphprune_root.scale", 0) in slots(deps.group("a"))  # root tensors live in a holder module


def test_op_without_rule_freezes_its_channels_and_names_itself():
    deps = deps_of(models.WithCustomOp())
    assert [g.key for g in deps.groups] == ["a"]
    site = next(f for f in deps.frozen if f.site.kind == "no_rule")
    assert "custom_op" in site.site.reason and f"{site.channels}" == "8"


def test_mean_over_channels_prunes_exactly_and_max_over_them_freezes():
    class M(torch.nn.Module):
        def __init__(self, reduce):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 1)
            self.b = torch.nn.Conv2d(4, 4, 1)
            self.reduce = reduce

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + self.reduce(y)

    x = (torch.randn(2, 3, 5, 5),)
    deps = deps_of(M(lambda y: y.mean(1, keepdim=True)))
    assert any(("a.weight", 0) in slots(g) for g in deps.groups) and list(deps.reductions) == ["mean"]
    masked, shrunk = prune(M(lambda y: y.mean(1, keepdim=True)).eval(), x, 0.5)
    assert_exact(masked, shrunk, x)
    deps = deps_of(M(lambda y: y.amax(1, keepdim=True)))
    assert not any(("a.weight", 0) in slots(g) for g in deps.groups)
    assert any(f.site.kind == "reduction" for f in deps.frozen)


def test_channel_count_used_in_arithmetic_freezes():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 1)
            self.b = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y / y.shape[1])

    deps = deps_of(M())
    assert not deps.groups
    assert any(f.site.kind == "size" for f in deps.frozen)


def test_custom_rule_lets_a_leaf_module_prune_through():
    class Scale(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.w = torch.nn.Parameter(torch.rand(c))

        def forward(self, x):
            return x * self.w.view(1, -1, 1, 1)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 1)
            self.s = Scale(4)
            self.b = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.s(self.a(x)))

    x = (torch.randn(1, 3, 4, 4),)
    gm = gp.trace(M(), leaf_modules=[Scale])
    assert not gp.analyze_dependencies(gm, x).groups  # a leaf with no rule: frozen
    gp.register_rule(Scale, gp.ChannelwiseRule(1, {"w": 0}))
    deps = gp.analyze_dependencies(gm, x)
    assert ("s.w", 0) in slots(deps.group("a"))


def test_register_rule_rejects_non_rules():
    with pytest.raises(TypeError, match="Rule instance"):
        gp.register_rule(torch.nn.Conv2d, object())
