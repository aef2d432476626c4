"""Recovery: gp.finetune trains a masked model in place (masked weights stay zero, so it still
shrinks exactly), on a task loss, on a teacher's logits, or both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests.helpers import assert_exact


def _task():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))
    x = torch.randn(512, 10)
    y = (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval(), x, y, [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("how", ["task", "distill", "both"])
def test_finetune_recovers_a_masked_model_and_keeps_it_shrinkable(how):
    teacher, x, y, loader = _task()
    masked = gp.compile(teacher, [L2Score(), ChannelMask(0.85)], example_inputs=(x[:2],))
    before = _accuracy(masked, x, y)
    kwargs = {"task": dict(loss_fn=F.cross_entropy), "distill": dict(distill_from=teacher)}.get(
        how, dict(loss_fn=F.cross_entropy, distill_from=teacher)
    )
    history = gp.finetune(masked, loader, epochs=15, lr=1e-2, **kwargs)
    assert len(history) == 15 and history[-1] < history[0]
    assert _accuracy(masked, x, y) > max(before, 0.9)
    zero_rows = masked[0].weight.abs().sum(1) == 0
    assert int(zero_rows.sum()) == round(0.85 * 64)  # the masked units are still masked
    shrunk = gp.compile(masked, [Shrink()], example_inputs=(x[:2],))
    assert shrunk[0].out_features == 64 - round(0.85 * 64)
    assert_exact(masked, shrunk, (x[:2],))


def test_finetune_needs_something_to_learn_from():
    teacher, _, _, loader = _task()
    with pytest.raises(gp.ArgumentError, match="loss_fn"):
        gp.finetune(teacher, loader)
    with pytest.raises(gp.ArgumentError, match="no batches"):
        gp.finetune(teacher, [], F.cross_entropy)
