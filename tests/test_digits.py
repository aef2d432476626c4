"""Real training on real data: prune a trained digits CNN by 50 % of its channels, fine-tune, compare."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphprune as gp
from graphprune.passes import ChannelMask, FPGMScore, L2Score, Shrink, TaylorScore
from tests import digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    tx, ty, vx, vy = digits.load()
    model = digits.train(digits.DigitsCNN(), tx, ty, epochs=8)
    return model, (tx, ty, vx, vy), digits.accuracy(model, vx, vy)


@pytest.mark.parametrize("criterion", ["l2", "taylor", "fpgm"])
def test_pruned_and_fine_tuned_within_three_points(trained, criterion):
    model, (tx, ty, vx, vy), dense_acc = trained
    assert dense_acc > 0.9
    score = {"l2": L2Score(), "fpgm": FPGMScore(), "taylor": TaylorScore(digits.calibration(tx, ty), F.cross_entropy)}[
        criterion
    ]
    x = (vx[:8],)
    masked = gp.compile(model, [score, ChannelMask(0.5)], example_inputs=x)
    digits.train(masked, tx, ty, epochs=3, lr=1e-3)  # fine-tune with the masks on
    pruned = gp.compile(masked, [Shrink()], example_inputs=x)
    acc = digits.accuracy(pruned, vx, vy)
    assert acc >= dense_acc - 0.03, f"{criterion}: {acc:.3f} vs dense {dense_acc:.3f}"
    assert abs(acc - digits.accuracy(masked, vx, vy)) < 1e-6  # shrink changed nothing
    assert gp.count_macs(pruned, x) < 0.4 * gp.count_macs(model, x)
