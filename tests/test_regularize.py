"""Sparsity regularisation: the group lasso over graphprune's channel groups drives whole units to
zero while training, and those are the units a magnitude prune then removes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import BNScaleScore, ChannelMask, L2Score, Shrink
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
