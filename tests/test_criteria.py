"""Scoring criteria: each ranks units the way its paper says, and data-driven ones demand data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.passes import (
    ActivationScore, APoZScore, BNScaleScore, ChannelMask, FPGMScore, L2Score, Shrink, TaylorScore, WandaScore,
)
from tests import models
from tests.helpers import assert_exact


def scores_of(model, score, x):
    """Run one score pass and return its scores by group key."""
    seen = {}

    def grab(gm, ctx):
        seen.update(ctx.get_analysis("scores"))
        return gp.PassResult(gm, False)

    gp.compile(model, [score, grab], example_inputs=x)
    return seen


def calib(shape, n=3, classes=None):
    g = torch.Generator().manual_seed(0)
    return [((torch.randn(*shape, generator=g),), torch.randint(0, classes or 2, (shape[0],), generator=g)) for _ in range(n)]


def test_bn_scale_ranks_by_gamma():
    model = models.ConvBnConv()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([8.0, 1, 7, 2, 6, 3, 5, 4]))
    s = scores_of(model, BNScaleScore(), (torch.randn(1, 3, 8, 8),))["conv1"]
    assert torch.equal(torch.argsort(s), torch.tensor([1, 3, 5, 7, 6, 4, 2, 0]))


def test_bn_scale_needs_a_batchnorm():
    with pytest.raises(gp.PreconditionError, match="BatchNorm"):
        scores_of(models.Mlp(), BNScaleScore(), (torch.randn(2, 10),))


def test_fpgm_scores_the_filter_nearest_the_median_lowest():
    model = models.Mlp()
    with torch.no_grad():
        w = torch.randn(32, 10) * 3
        w[5] = w.median(0).values  # the most replaceable filter
        model.fc1.weight.copy_(w)
    s = scores_of(model, FPGMScore(), (torch.randn(2, 10),))["fc1"]
    assert int(torch.argmin(s)) == 5


def test_taylor_uses_gradients_and_needs_loss_and_data():
    model = models.Mlp()
    x = (torch.randn(4, 10),)
    data = calib((4, 10), classes=3)
    s = scores_of(model, TaylorScore(data, F.cross_entropy), x)
    assert set(s) == {"fc1", "fc2"} and all(bool((v >= 0).all()) and v.sum() > 0 for v in s.values())
    # a unit whose weights never receive gradient (its output is cut by a dead ReLU downstream) scores 0
    with torch.no_grad():
        model.fc1.weight[3].zero_()
        model.fc1.bias[3] = -100.0
    assert float(scores_of(model, TaylorScore(data, F.cross_entropy), x)["fc1"][3]) == 0.0
    with pytest.raises(ValueError, match="loss_fn"):
        scores_of(model, TaylorScore(data), x)
    with pytest.raises(ValueError, match="calibration"):
        scores_of(model, TaylorScore(None, F.cross_entropy), x)
    assert list(model.parameters())[0].grad is None  # the caller's model saw no backward pass


def test_activation_scores_read_the_consumers_input():
    model = models.Mlp()
    with torch.no_grad():
        model.fc1.bias.zero_()
        model.fc1.bias[:8] = -100.0  # units 0..7 are always zero after the ReLU
    x = (torch.randn(4, 10),)
    data = calib((4, 10))
    act = scores_of(model, ActivationScore(data), x)["fc1"]
    apoz = scores_of(model, APoZScore(data), x)["fc1"]
    wanda = scores_of(model, WandaScore(data), x)["fc1"]
    for s in (act, wanda):
        assert torch.all(s[:8] == 0) and torch.all(s[8:] > 0)
    assert torch.all(apoz[:8] == 0) and torch.all(apoz[8:] > 0)
    with pytest.raises(ValueError, match="calibration"):
        scores_of(model, ActivationScore(), x)
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        scores_of(model, APoZScore([torch.randn(4, 10)]), x)


@pytest.mark.parametrize("score", ["bn", "fpgm", "taylor", "activation", "apoz", "wanda"])
def test_every_criterion_prunes_exactly(score):
    torch.manual_seed(0)
    model = models.randomize_bn(models.Residual()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    data = [((torch.randn(2, 3, 8, 8),), torch.randn(2, 2, 8, 8)) for _ in range(2)]
    make = {
        "bn": lambda: BNScaleScore(), "fpgm": lambda: FPGMScore(),
        "taylor": lambda: TaylorScore(data, lambda out, t: F.mse_loss(out, t)),
        "activation": lambda: ActivationScore(data), "apoz": lambda: APoZScore(data), "wanda": lambda: WandaScore(data),
    }
    if score == "bn":
        model = models.randomize_bn(models.ConvBnConv()).eval()
        x = (torch.randn(2, 3, 8, 8),)
    masked = gp.compile(model, [make[score](), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    assert gp.count_params(shrunk) < gp.count_params(model)
