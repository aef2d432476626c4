"""Sparsity regularisation: the group lasso over graphprune's channel groups drives whole units to
zero while training, and those are the units a magnitude prune then removes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import BNScaleScore, ChannelMask, L2Score, MaskUnits, Shrink
from tests import models
from tests.helpers import assert_exact


class _Wide(nn.Module):
    """16 hidden units for a target that needs two of the inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_group_lasso_drives_whole_units_to_zero_and_those_are_pruned():
    torch.manual_seed(0)
    model, x = _Wide(), torch.randn(256, 8)
    y = (x[:, :1] - x[:, 1:2]).relu()
    reg = gp.GroupLasso(model, 0.02, example_inputs=(x[:2],))
    before = reg.norms()[0].detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) + reg()
        loss.backward()
        opt.step()
    norms = reg.norms()[0].detach()
    small = set(torch.nonzero(norms < 0.05 * before.mean()).reshape(-1).tolist())
    assert len(small) >= 8, norms  # most of the 16 units are no longer used
    assert nn.functional.mse_loss(model(x), y) < 0.05 * y.var()  # and the task is still learnt
    masked = gp.compile(model.eval(), [L2Score(), ChannelMask(len(small) / 16)], example_inputs=(x[:2],))
    pruned_rows = set(torch.nonzero(masked.fc1.weight.abs().sum(1) == 0).reshape(-1).tolist())
    assert pruned_rows == small
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=(x[:2],)), (x[:2],))


def test_group_lasso_covers_every_trainable_tensor_of_a_group():
    torch.manual_seed(0)
    model = models.randomize_bn(models.ConvBnConv())
    reg = gp.GroupLasso(model, 1.0, example_inputs=(torch.randn(1, 3, 8, 8),))
    (norms,) = reg.norms()  # one group: conv1's filters, the BN's scale and shift, conv2's input columns
    expected = (
        model.conv1.weight.pow(2).sum((1, 2, 3))
        + model.conv1.bias.pow(2)
        + model.bn.weight.pow(2)
        + model.bn.bias.pow(2)
        + model.conv2.weight.pow(2).sum((0, 2, 3))
    ).sqrt()
    torch.testing.assert_close(norms, expected)
    torch.testing.assert_close(reg(), expected.sum())
    reg().backward()
    assert model.conv1.weight.grad is not None and model.conv2.weight.grad is not None


def test_bn_scale_l1_then_bn_scale_score_prunes_the_zeroed_channels():
    torch.manual_seed(0)
    model, x = models.randomize_bn(models.ConvBnConv()), torch.randn(4, 3, 8, 8)
    reg = gp.BNScaleL1(model, 0.5)
    torch.testing.assert_close(reg(), 0.5 * model.bn.weight.abs().sum())
    with torch.no_grad():
        model.bn.weight[[1, 4, 6]] = 1e-4  # as slimming leaves them
    masked = gp.compile(model.eval(), [BNScaleScore(), ChannelMask(3 / 8)], example_inputs=(x,))
    assert set(torch.nonzero(masked.bn.weight == 0).reshape(-1).tolist()) == {1, 4, 6}


def test_bad_regularisers_say_why():
    with pytest.raises(gp.ArgumentError, match="lam"):
        gp.GroupLasso(_Wide(), -1, example_inputs=(torch.randn(1, 8),))
    with pytest.raises(gp.GraphPruneError, match="no BatchNorm"):
        gp.BNScaleL1(_Wide(), 0.1)


def _fit(model, reg, x, y, steps: int, lr: float = 0.1, pruner=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        penalty = pruner.penalty() if pruner is not None else reg()
        (nn.functional.mse_loss(model(x), y) + penalty).backward()
        opt.step()
        if pruner is not None:
            pruner.on_step_end(step)
        else:
            reg.step()


def test_growing_reg_drives_the_selected_units_to_zero_and_exactly_those_are_pruned():
    torch.manual_seed(0)
    model, x = _Wide(), torch.randn(256, 8)
    y = (x[:, :1] - x[:, 1:2]).relu() + 0.5 * x[:, 2:3]
    reg = gp.GrowingReg(model, 0.5, example_inputs=(x[:2],), delta=0.05, every=1, ceiling=2.0, threshold=1e-2)
    first = reg.norms()[0].detach()
    assert reg.selected == {"fc1": sorted(torch.argsort(first)[:8].tolist())}  # the lowest half by norm
    _fit(model, reg, x, y, steps=60)
    with torch.no_grad():
        (selected,) = reg.selected_norms()
        others = reg.norms()[0][~reg._chosen[0]]
    assert float(selected.max()) < 1e-2 and reg.done  # below the threshold within a few dozen steps
    assert float(others.min()) > 0.1  # the kept units carry on (no penalty on them)
    assert 0.5 < reg.lam < 2.0 and reg.history[-1][1] == reg.lam  # the threshold stopped the growth
    masked = gp.compile(model.eval(), [L2Score(), ChannelMask(0.5)], example_inputs=(x[:2],))
    pruned_rows = torch.nonzero(masked.fc1.weight.abs().sum(1) == 0).reshape(-1).tolist()
    assert pruned_rows == reg.selected["fc1"]
    by_units = gp.compile(model, [MaskUnits(reg.selected)], example_inputs=(x[:2],))
    assert torch.equal(by_units.fc1.weight, masked.fc1.weight)


def test_growing_reg_strength_grows_by_delta_every_few_steps_up_to_the_ceiling():
    reg = gp.GrowingReg(_Wide(), 0.25, example_inputs=(torch.randn(2, 8),), delta=0.3, every=3, ceiling=1.0)
    seen = []
    for _ in range(14):
        reg.step()
        seen.append(reg.lam)
    assert seen == pytest.approx([0, 0, 0.3, 0.3, 0.3, 0.6, 0.6, 0.6, 0.9, 0.9, 0.9, 1.0, 1.0, 1.0])
    assert [reg.strength_at(s) for s in (0, 2, 3, 8, 9, 12, 100)] == pytest.approx([0, 0, 0.3, 0.6, 0.9, 1.0, 1.0])
    assert reg.done and reg.history == [(0, 0.0), (3, 0.3), (6, 0.6), (9, pytest.approx(0.9)), (12, 1.0)]
    with torch.no_grad():
        norms, chosen = reg.norms()[0], reg._chosen[0]
        torch.testing.assert_close(reg(), norms[chosen].pow(2).sum())  # lam 1, nothing on the kept units
    kept = gp.GrowingReg(_Wide(), 0.25, example_inputs=(torch.randn(2, 8),), kept=0.5)
    with torch.no_grad():
        norms, chosen = kept.norms()[0], kept._chosen[0]
        torch.testing.assert_close(kept(), 0.5 * norms[~chosen].pow(2).sum())  # lam 0 before any step


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"delta": -1e-3}, "delta"),
        ({"delta": 2.0}, "delta"),
        ({"every": 0}, "every"),
        ({"ceiling": 0}, "ceiling"),
        ({"threshold": -1.0}, "threshold"),
        ({"kept": -0.1}, "kept"),
        ({"min_channels": 0}, "min_channels"),
    ],
)
def test_growing_reg_names_a_bad_argument(kwargs, name):
    args = {"ratio": 0.5, **kwargs}
    ratio = args.pop("ratio")
    with pytest.raises(gp.ArgumentError, match=name):
        gp.GrowingReg(_Wide(), ratio, example_inputs=(torch.randn(2, 8),), **args)


def test_a_regulariser_bound_to_a_model_without_its_tensors_says_so():
    reg = gp.GroupLasso(_Wide(), 0.1, example_inputs=(torch.randn(2, 8),))
    with pytest.raises(gp.ArgumentError, match="fc1.weight"):
        reg.bind(models.Mlp())
