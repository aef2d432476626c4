"""Score, mask, shrink and reinsert-zeros passes: structure, `modified`, and exactness."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.analysis import Dependencies, Scores
from graphprune.passes import (
    ChannelMask,
    L1Score,
    L2Score,
    MagnitudeScore,
    MaskUnits,
    RandomScore,
    ReinsertZeros,
    ScorePass,
    Shrink,
)
from tests import models
from tests.helpers import assert_exact, prune, run

TINY = [
    (models.ConvBnConv, (1, 3, 8, 8)),
    (models.Residual, (2, 3, 8, 8)),
    (models.Concat, (1, 3, 5, 5)),
    (models.Grouped, (1, 3, 6, 6)),
    (models.GroupNormNet, (2, 3, 6, 6)),
    (models.FlattenLinear, (3, 3, 8, 8)),
    (models.Shuffle, (1, 3, 4, 4)),
    (models.SqueezeExcite, (2, 3, 6, 6)),
    (models.Mlp, (4, 10)),
    (models.LayerScale, (1, 3, 4, 4)),
    (models.WithCustomOp, (1, 3, 6, 6)),
]


@pytest.mark.parametrize("factory,shape", TINY, ids=[f.__name__ for f, _ in TINY])
def test_shrink_of_mask_is_exact(factory, shape):
    torch.manual_seed(0)
    model = models.randomize_bn(factory()).eval()
    x = (torch.randn(*shape),)
    masked, shrunk = prune(model, x, 0.5)
    assert_exact(masked, shrunk, x)
    assert run(shrunk, x).shape == run(model, x).shape
    assert gp.count_params(shrunk) < gp.count_params(model)


def test_mask_zeroes_group_members_and_keeps_the_model_trainable():
    torch.manual_seed(0)
    model = models.ConvBnConv()
    x = (torch.randn(2, 3, 8, 8),)
    masked = gp.compile(model, [L1Score(), ChannelMask(0.5)], example_inputs=x)
    conv1 = masked.get_submodule("conv1")
    dead = conv1.weight.flatten(1).abs().sum(1) == 0
    assert int(dead.sum()) == 4
    assert torch.all(masked.get_submodule("bn").weight[dead] == 0)
    assert torch.all(masked.get_submodule("conv2").weight[:, dead] == 0)
    # training through the mask: gradients reach the original weights, masked entries get none
    masked.train()
    masked(*x).sum().backward()
    grad = conv1.parametrizations.weight.original.grad
    assert grad is not None and torch.all(grad[dead] == 0) and grad[~dead].abs().sum() > 0


def test_lowest_scores_are_masked():
    model = models.Mlp()
    with torch.no_grad():
        model.fc1.weight.mul_(0).add_(100 * torch.arange(1.0, 33.0).unsqueeze(1))  # row i dominates its unit's score
    x = (torch.randn(2, 10),)
    masked = gp.compile(model, [L1Score(), ChannelMask(0.25, exclude=["fc2"])], example_inputs=x)
    dead = masked.get_submodule("fc1").weight.abs().sum(1) == 0
    assert torch.equal(torch.nonzero(dead).flatten(), torch.arange(8))
    assert bool((masked.get_submodule("fc2").weight.abs().sum(1) != 0).all())  # excluded


def test_local_ratio_round_to_and_min_channels():
    x = (torch.randn(2, 10),)
    shrunk = gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.5, round_to=12), Shrink()], example_inputs=x)
    assert shrunk.get_submodule("fc1").out_features == 24  # 16 kept, rounded up to 24
    assert shrunk.get_submodule("fc2").out_features == 12
    shrunk = gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.9, min_channels=10), Shrink()], example_inputs=x)
    assert shrunk.get_submodule("fc2").out_features == 10


def test_global_scope_ranks_across_groups_and_keeps_minimum():
    model = models.Mlp()
    with torch.no_grad():
        model.fc1.weight.mul_(0).add_(torch.linspace(0.01, 1, 32).unsqueeze(1))  # spread: many low scores
        model.fc2.weight.fill_(1.0)  # all equal: no unit below the mean
        model.fc3.weight.fill_(1.0)
    x = (torch.randn(2, 10),)
    pruned = gp.compile(
        model, [L1Score(), ChannelMask(0.5, scope="global", min_channels=2), Shrink()], example_inputs=x
    )
    fc1, fc2 = pruned.get_submodule("fc1").out_features, pruned.get_submodule("fc2").out_features
    assert fc1 + fc2 == 48 - 24
    assert fc1 < 16 < fc2 or fc2 >= 2


def test_joint_scope_ranks_every_unit_on_one_scale_and_counts_parameters():
    class Given(ScorePass):  # fc1's units all score above fc2's
        def score_group(self, gm, group, ctx):
            base = 100.0 if group.key == "fc1" else 0.0
            return base + torch.arange(group.size, dtype=torch.float64)

    x = (torch.randn(2, 10),)
    # a unit of fc1 holds 10 + 1 + 16 = 27 numbers (its row, bias, fc2's column), one of fc2 32 + 1 + 3 = 36:
    # 30 % of 32 * 27 + 16 * 36 = 1440 is 432, twelve of fc2's units
    pruned = gp.compile(models.Mlp(), [Given(), ChannelMask(0.3, scope="joint"), Shrink()], example_inputs=x)
    assert pruned.get_submodule("fc1").out_features == 32
    assert pruned.get_submodule("fc2").out_features == 4
    with pytest.raises(gp.ArgumentError, match="joint"):
        ChannelMask({"ffn": 0.5}, scope="joint")


def test_random_score_is_seeded():
    x = (torch.randn(2, 10),)
    a = gp.compile(models.Mlp(), [RandomScore(3), ChannelMask(0.5)], example_inputs=x)
    b = gp.compile(models.Mlp(), [RandomScore(3), ChannelMask(0.5)], example_inputs=x)
    ka = a.get_submodule("fc1").parametrizations.weight[0].keep_0
    kb = b.get_submodule("fc1").parametrizations.weight[0].keep_0
    assert torch.equal(ka, kb)


def test_iterative_masking_counts_from_the_original_width():
    x = (torch.randn(2, 10),)
    once = gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.25)], example_inputs=x)
    twice = gp.compile(once, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    keep = twice.get_submodule("fc1").parametrizations.weight[0].keep_0
    first = once.get_submodule("fc1").parametrizations.weight[0].keep_0
    assert int(keep.sum()) == 16
    assert bool((keep <= first).all())  # what was masked stays masked


def test_shrink_updates_module_attributes():
    x = (torch.randn(1, 3, 6, 6),)
    shrunk = gp.compile(models.Grouped(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    g, dw = shrunk.get_submodule("g"), shrunk.get_submodule("dw")
    assert (g.in_channels, g.out_channels, g.groups) == (4, 8, 4)
    assert (dw.in_channels, dw.out_channels, dw.groups) == (8, 16, 8)
    assert dw.weight.shape == (16, 1, 3, 3)
    gn = gp.compile(models.GroupNormNet(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x).get_submodule(
        "gn"
    )
    assert (gn.num_groups, gn.num_channels) == (2, 4)


def test_shrink_rewrites_reshape_constants():
    torch.manual_seed(0)
    model = models.randomize_bn(models.SeedCNN()).eval()
    x = (torch.randn(2, 3, 32, 32),)
    masked, shrunk = prune(model, x, 0.5)
    view = next(n for n in shrunk.graph.nodes if n.target == "view")
    assert view.args[1:] == (-1, 512 * 2 * 2)
    assert_exact(masked, shrunk, x)


def test_shrink_without_masks_changes_nothing():
    x = (torch.randn(1, 3, 8, 8),)
    model = models.ConvBnConv()
    out = gp.compile(model, [Shrink()], example_inputs=x)
    assert gp.count_params(out) == gp.count_params(model)
    assert out.graphprune_report[-1].modified is False


def test_reinsert_zeros_lets_output_channels_prune_and_keeps_the_width():
    torch.manual_seed(0)
    model = models.ConvBnConv().eval()
    x = (torch.randn(1, 3, 8, 8),)
    masked = gp.compile(model, [ReinsertZeros(), L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert shrunk.get_submodule("conv2").out_channels == 2
    out = run(shrunk, x)
    assert out.shape == (1, 4, 8, 8)
    assert int((out.abs().sum((0, 2, 3)) == 0).sum()) == 2
    assert_exact(masked, shrunk, x)


def test_reinsert_zeros_in_front_of_an_op_without_rule():
    torch.manual_seed(0)
    model = models.WithCustomOp().eval()
    x = (torch.randn(1, 3, 6, 6),)
    masked = gp.compile(model, [ReinsertZeros(outputs=False), L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert shrunk.get_submodule("b").out_channels == 4
    assert_exact(masked, shrunk, x)


def test_custom_score_pass_and_function_pass():
    class FirstHalf(gp.PassBase):
        def call(self, gm, ctx):
            deps = ctx.get(Dependencies, gm)
            ctx.put(Scores({g.key: torch.arange(g.size, dtype=torch.float64) for g in deps.groups}))
            return gp.PassResult(gm, False)

    seen = []

    def spy(gm, ctx):
        seen.append(len(ctx.get(Dependencies, gm).groups))
        return gp.PassResult(gm, False)

    x = (torch.randn(2, 10),)
    pruned = gp.compile(models.Mlp(), [FirstHalf(), spy, ChannelMask(0.5), Shrink()], example_inputs=x)
    assert seen == [2]
    assert pruned.get_submodule("fc1").out_features == 16


def test_magnitude_score_rejects_bad_p():
    with pytest.raises(ValueError, match="positive"):
        MagnitudeScore(p=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1.0}, r"\[0, 1\)"),
        ({"ratio": -0.1}, r"\[0, 1\)"),
        ({"ratio": 0.5, "scope": "layer"}, "local"),
        ({"ratio": 0.5, "round_to": 0}, "round_to"),
        ({"ratio": 0.5, "min_channels": 0}, "min_channels"),
    ],
)
def test_channel_mask_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelMask(**kwargs)


def test_mask_without_scores_says_what_to_do():
    with pytest.raises(gp.PreconditionError, match="score pass"):
        gp.compile(models.Mlp(), [ChannelMask(0.5)], example_inputs=(torch.randn(2, 10),))


def test_exclude_must_name_real_modules():
    with pytest.raises(ValueError, match="named_modules"):
        gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.5, exclude=["nope"])], example_inputs=(torch.randn(2, 10),))


def test_units_masked_on_one_instance_apply_to_another_of_the_same_architecture():
    x = (torch.randn(4, 10),)
    torch.manual_seed(0)
    small = gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.5)], example_inputs=x)
    step = gp.saving.plan_of(small)["steps"][-1]
    torch.manual_seed(1)
    other = models.Mlp().eval()
    moved = gp.compile(other, [MaskUnits(step["units"])], example_inputs=x)
    assert gp.saving.plan_of(moved)["steps"][-1] == step
    expected = gp.compile(other, [L2Score(), ChannelMask(0.5)], example_inputs=x)  # scored on its own weights
    assert run(moved, x).ne(run(expected, x)).any()  # the units came from the first instance, not these weights
    for key, ids in step["units"].items():
        fc = moved.get_submodule(key)
        assert fc.weight[ids].abs().sum() == 0 and fc.weight.abs().sum(1).ne(0).sum() == fc.out_features - len(ids)
    with pytest.raises(gp.ArgumentError, match="does not have"):
        gp.compile(other, [MaskUnits({"fc9": [0]})], example_inputs=x)
    with pytest.raises(gp.ArgumentError, match="units of group fc1"):
        gp.compile(other, [MaskUnits({"fc1": [32]})], example_inputs=x)


class Halve(gp.PassBase):
    """A user's structural pass: owns its plan step, so a model it made saves and loads."""

    plan_op = "test_halve"

    def __init__(self, name: str) -> None:
        self.module = name

    @classmethod
    def from_plan(cls, step):
        return cls(step["module"])

    def call(self, gm, ctx):
        with torch.no_grad():
            gm.get_submodule(self.module).weight.mul_(0.5)
        ctx.record(plan={"op": self.plan_op, "module": self.module})
        return gp.PassResult(gm, True)


def test_a_users_pass_replays_its_own_plan_step(tmp_path):
    x = (torch.randn(4, 10),)
    model = models.Mlp().eval()
    halved = gp.compile(model, [Halve("fc1"), L2Score(), ChannelMask(0.5)], example_inputs=x)
    gp.save(halved, tmp_path)
    torch.testing.assert_close(gp.load(model, tmp_path, x)(*x), halved(*x), rtol=0, atol=0)
    with pytest.raises(gp.ArgumentError, match="replayed by"):
        type("Other", (gp.PassBase,), {"plan_op": "test_halve", "call": lambda self, gm, ctx: None})
