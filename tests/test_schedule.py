"""Pruning during training: schedules, hooks, pattern lock, and the final Shrink."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphprune as gp
from graphprune.passes import ChannelMask, L1Score
from tests import models
from tests.helpers import assert_exact


def test_cubic_and_linear_schedules():
    kw = dict(start_step=0, end_step=100, initial=0.0, target=0.8)
    assert gp.sparsity_at(0, **kw) == 0.0 and gp.sparsity_at(100, **kw) == pytest.approx(0.8)
    assert gp.sparsity_at(50, schedule="linear", **kw) == pytest.approx(0.4)
    assert gp.sparsity_at(50, **kw) == pytest.approx(0.8 * (1 - 0.5**3))  # cubic: fast early, slow late
    assert gp.sparsity_at(150, **kw) == pytest.approx(0.8)


def test_unstructured_pruning_during_a_training_loop_keeps_zeros_zero():
    torch.manual_seed(0)
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    pruner = gp.Pruner(models.Mlp(), example_inputs=(x,), target_sparsity=0.8, end_step=40, frequency=10)
    model = pruner.model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner.on_train_begin()
    seen = []
    for step in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        zeros = model.get_submodule("fc1").weight == 0
        if seen:
            assert bool((zeros | ~seen[-1]).all())  # once zero, always zero (pattern lock)
        seen.append(zeros)
        pruner.on_step_end(step)
    assert [s for s, _ in pruner.history] == [10, 20, 30, 40]
    w = model.get_submodule("fc1").weight
    assert float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    assert model.training


def test_channel_pruning_per_epoch_then_shrink():
    torch.manual_seed(0)
    model = models.randomize_bn(models.ConvBnConv())
    x = (torch.randn(4, 3, 8, 8),)
    pruner = gp.Pruner(
        model,
        example_inputs=x,
        target_sparsity=0.5,
        end_step=2,
        frequency=1,
        per="epoch",
        schedule="linear",
        score=L1Score(),
        mask=lambda s: ChannelMask(s),
    )
    opt = torch.optim.SGD(pruner.model.parameters(), lr=0.01)
    for epoch in range(3):
        opt.zero_grad()
        pruner.model(*x).pow(2).mean().backward()
        opt.step()
        pruner.on_epoch_end(epoch)
    assert [round(s, 2) for _, s in pruner.history] == [0.25, 0.5]
    masked = pruner.model
    pruned = pruner.finalize()
    assert pruned.get_submodule("conv1").out_channels == 4
    assert_exact(masked, pruned, x)


def test_pruner_rejects_bad_settings():
    x = (torch.randn(2, 10),)
    with pytest.raises(ValueError, match="target_sparsity"):
        gp.Pruner(models.Mlp(), example_inputs=x, target_sparsity=1.0, end_step=10)
    with pytest.raises(ValueError, match="schedule"):
        gp.Pruner(models.Mlp(), example_inputs=x, target_sparsity=0.5, end_step=10, schedule="exp")
    with pytest.raises(ValueError, match="start_step < end_step"):
        gp.Pruner(models.Mlp(), example_inputs=x, target_sparsity=0.5, end_step=0)


def test_pruner_penalty_reads_the_masked_copy_it_trains_not_the_callers_model():
    torch.manual_seed(0)
    model = models.randomize_bn(models.ConvBnConv())
    x = (torch.randn(4, 3, 8, 8),)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reg = gp.GroupLasso(model, 0.1, example_inputs=x)
    pruner = gp.Pruner(
        model,
        example_inputs=x,
        target_sparsity=0.5,
        end_step=4,
        frequency=2,
        schedule="linear",
        score=L1Score(),
        mask=lambda s: ChannelMask(s),
        regularizer=reg,
    )
    assert pruner.regularizer is not reg and reg.model is model  # bound to the copy; the one given is untouched
    torch.testing.assert_close(pruner.penalty(), reg())  # same weights, same value
    opt = torch.optim.SGD(pruner.model.parameters(), lr=0.01)
    for step in range(5):
        opt.zero_grad()
        (pruner.model(*x).pow(2).mean() + pruner.penalty()).backward()
        assert model.conv1.weight.grad is None  # the penalty never reaches the caller's model
        opt.step()
        pruner.on_step_end(step)
    assert [s for s, _ in pruner.history] == [2, 4]
    (norms,) = pruner.regularizer.norms()
    pruned = (pruner.model.conv1.weight.abs().sum((1, 2, 3)) == 0).nonzero().reshape(-1)
    assert len(pruned) == 4 and bool((norms[pruned] < 1e-5).all())  # it reads the masks of pruner.model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_pruner_steps_a_growing_regulariser_and_takes_plain_functions():
    torch.manual_seed(0)
    model, x = models.Mlp(), (torch.randn(8, 10),)
    reg = gp.GrowingReg(model, 0.5, example_inputs=x, delta=0.1, every=2)
    pruner = gp.Pruner(model, example_inputs=x, target_sparsity=0.5, end_step=10, frequency=10, regularizer=reg)
    for step in range(6):
        pruner.on_step_end(step)
    assert pruner.regularizer.lam == pytest.approx(0.3) and reg.lam == 0.0
    seen = []
    fn = gp.Pruner(
        model,
        example_inputs=x,
        target_sparsity=0.5,
        end_step=10,
        regularizer=lambda m: seen.append(m) or m.get_submodule("fc1").weight.abs().sum(),
    )
    fn.penalty()
    assert seen == [fn.model]
    bn = gp.Pruner(
        models.ConvBnConv(),
        example_inputs=(torch.randn(1, 3, 8, 8),),
        target_sparsity=0.5,
        end_step=2,
        regularizer=gp.BNScaleL1(models.ConvBnConv(), 0.5),
    )
    torch.testing.assert_close(bn.penalty(), 0.5 * bn.model.bn.weight.abs().sum())
    assert float(gp.Pruner(model, example_inputs=x, target_sparsity=0.5, end_step=2).penalty()) == 0.0


def test_pruner_rejects_a_regulariser_it_cannot_bind():
    x = (torch.randn(2, 10),)
    with pytest.raises(gp.ArgumentError, match="regularizer"):
        gp.Pruner(models.Mlp(), example_inputs=x, target_sparsity=0.5, end_step=10, regularizer=0.1)
    with pytest.raises(gp.ArgumentError, match="fn\\(model\\)"):
        gp.Pruner(models.Mlp(), example_inputs=x, target_sparsity=0.5, end_step=10, regularizer=lambda: 0.0)


def test_growing_regularisation_in_a_pruner_zeroes_the_selected_units_and_those_are_pruned():
    torch.manual_seed(0)
    model, x = models.Mlp(), torch.randn(64, 10)
    y = torch.randn(64, 3)
    reg = gp.GrowingReg(model, 0.5, example_inputs=(x[:2],), delta=0.05, every=1, ceiling=2.0, threshold=1e-2)
    pruner = gp.Pruner(
        model,
        example_inputs=(x[:2],),
        target_sparsity=0.5,
        end_step=60,
        frequency=60,
        score=L1Score(),
        mask=lambda s: ChannelMask(s),
        regularizer=reg,
    )
    opt = torch.optim.SGD(pruner.model.parameters(), lr=0.1)
    for step in range(1, 61):
        opt.zero_grad()
        (F.mse_loss(pruner.model(x), y) + pruner.penalty()).backward()
        opt.step()
        pruner.on_step_end(step)
    bound = pruner.regularizer
    assert bound.done and pruner.history == [(60, 0.5)]
    for key, units in bound.selected.items():
        weight = pruner.model.get_submodule(key).weight
        assert (weight.abs().sum(1) == 0).nonzero().reshape(-1).tolist() == units
    pruned = pruner.finalize()
    assert pruned.get_submodule("fc1").out_features == 16 and pruned.get_submodule("fc2").out_features == 8
