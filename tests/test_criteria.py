"""Scoring criteria: each ranks units the way its paper says, and data-driven ones demand data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.analysis import Scores
from graphprune.passes import (
    ActivationScore,
    APoZScore,
    BNScaleScore,
    ChannelMask,
    FLAPScore,
    FPGMScore,
    MagnitudeScore,
    Shrink,
    TaylorScore,
    WandaScore,
)
from tests import models
from tests.helpers import assert_exact


def scores_of(model, score, x):
    """Run one score pass and return its scores by group key."""
    seen = {}

    def grab(gm, ctx):
        seen.update(ctx.cached(Scores))
        return gp.PassResult(gm, False)

    gp.compile(model, [score, grab], example_inputs=x)
    return seen


def calib(shape, n=3, classes=None):
    g = torch.Generator().manual_seed(0)
    return [
        ((torch.randn(*shape, generator=g),), torch.randint(0, classes or 2, (shape[0],), generator=g))
        for _ in range(n)
    ]


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
    with pytest.raises(ValueError, match="what a DataLoader yields"):
        scores_of(model, APoZScore([42]), x)


@pytest.mark.parametrize("score", ["bn", "fpgm", "taylor", "activation", "apoz", "wanda", "flap"])
def test_every_criterion_prunes_exactly(score):
    torch.manual_seed(0)
    model = models.randomize_bn(models.Residual()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    data = [((torch.randn(2, 3, 8, 8),), torch.randn(2, 2, 8, 8)) for _ in range(2)]
    make = {
        "bn": lambda: BNScaleScore(),
        "fpgm": lambda: FPGMScore(),
        "taylor": lambda: TaylorScore(data, lambda out, t: F.mse_loss(out, t)),
        "activation": lambda: ActivationScore(data),
        "apoz": lambda: APoZScore(data),
        "wanda": lambda: WandaScore(data),
        "flap": lambda: FLAPScore(data),
    }
    if score == "bn":
        model = models.randomize_bn(models.ConvBnConv()).eval()
        x = (torch.randn(2, 3, 8, 8),)
    masked = gp.compile(model, [make[score](), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    assert gp.count_params(shrunk) < gp.count_params(model)


def tiny():
    """Linear(2, 3) -> ReLU -> Linear(3, 1) with weights chosen to make the arithmetic easy."""
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        m[0].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
        m[2].weight.copy_(torch.tensor([[1.0, -2.0, 3.0]]))
        m[2].bias.zero_()
    return m


def test_magnitude_and_fpgm_by_hand():
    x = (torch.randn(2, 2),)
    l1 = scores_of(tiny(), MagnitudeScore(1), x)["0"]
    # unit u: mean over (W0 row u, b0[u], W2 column u) of each slice's L1 norm
    torch.testing.assert_close(l1, torch.tensor([5 / 3, 3.0, 5.0], dtype=torch.float64))
    l2 = scores_of(tiny(), MagnitudeScore(2), x)["0"]
    torch.testing.assert_close(
        l2, torch.tensor([(5**0.5 + 2) / 3, (25**0.5 + 2) / 3, (61**0.5 + 4) / 3], dtype=torch.float64)
    )
    fpgm = scores_of(tiny(), FPGMScore(), x)["0"]
    r2 = 2**0.5
    torch.testing.assert_close(fpgm, torch.tensor([6 * r2, 4 * r2, 6 * r2], dtype=torch.float64))


def test_data_scores_by_hand():
    m = tiny()
    xs = torch.tensor([[1.0, -1.0], [0.5, 0.0], [-2.0, 1.0]])
    data = [((xs,), torch.zeros(3, 1))]
    h = torch.relu(xs @ m[0].weight.T + m[0].bias).double()  # the activations fc2 reads
    act = scores_of(m, ActivationScore(data), (xs,))["0"]
    torch.testing.assert_close(act, h.abs().mean(0))
    apoz = scores_of(m, APoZScore(data), (xs,))["0"]
    torch.testing.assert_close(apoz, 1 - (h == 0).double().mean(0))
    wanda = scores_of(m, WandaScore(data), (xs,))["0"]
    torch.testing.assert_close(wanda, m[2].weight.detach().double().abs()[0] * h.pow(2).mean(0).sqrt())
    flap = scores_of(m, FLAPScore(data), (xs,))["0"]
    fluctuation = h.var(0, unbiased=False) * m[2].weight.detach().double().pow(2)[0]
    torch.testing.assert_close(flap, 1 + (fluctuation - fluctuation.mean()) / fluctuation.std())
    loss = lambda out, t: (out - t).pow(2).sum()  # noqa: E731
    taylor = scores_of(m, TaylorScore(data, loss), (xs,))["0"]
    ref = tiny()
    loss(ref(xs), torch.zeros(3, 1)).backward()
    parts = [
        (ref[0].weight * ref[0].weight.grad).abs().sum(1),
        (ref[0].bias * ref[0].bias.grad).abs(),
        (ref[2].weight * ref[2].weight.grad).abs().sum(0),
    ]
    torch.testing.assert_close(taylor, torch.stack(parts).mean(0).double())


def test_bn_scale_is_gamma():
    model = models.ConvBnConv()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([-8.0, 1, 7, 2, 6, 3, 5, 4]))
    s = scores_of(model, BNScaleScore(), (torch.randn(1, 3, 8, 8),))["conv1"]
    torch.testing.assert_close(s, torch.tensor([8.0, 1, 7, 2, 6, 3, 5, 4], dtype=torch.float64))


def test_weight_ops_are_the_same_on_symbolic_and_exported_graphs():
    """One scan covers nn.Linear modules and aten.linear on get_attr weights, with equal statistics."""
    from graphprune.ir.weight_ops import input_channel_stats, weight_ops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=False)).eval()
    x = torch.randn(4, 6)
    symbolic = gp.trace(model, example_inputs=(x,))
    exported = torch.export.export(model, (x,)).module()
    batches = [((torch.randn(4, 6),), None) for _ in range(2)]
    stats = []
    for gm in (symbolic, exported):
        ops, before = weight_ops(gm), str(gm.graph)
        assert sorted(ops) == ["0.weight", "2.weight"]
        assert ops["0.weight"].bias == "0.bias" and ops["2.weight"].bias is None
        stats.append(input_channel_stats(gm, ops, batches, "rms"))
        assert str(gm.graph) == before  # the taps are gone
    hidden = torch.relu(model[0](torch.cat([b[0][0] for b in batches])))
    torch.testing.assert_close(stats[0]["2.weight"], hidden.double().pow(2).mean(0).sqrt())
    for name in stats[0]:
        torch.testing.assert_close(stats[0][name], stats[1][name])
