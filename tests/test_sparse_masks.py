"""Unstructured, N:M and block masks: patterns, scopes, composition with channel masks and Shrink."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import BlockMask, ChannelMask, L2Score, NMMask, Shrink, UnstructuredMask, WandaScore
from tests import models
from tests.helpers import assert_exact

X = (torch.randn(4, 10),)


def test_unstructured_layer_scope_masks_the_smallest_share_of_each_weight():
    torch.manual_seed(0)
    model = models.Mlp()
    masked = gp.compile(model, [UnstructuredMask(0.75)], example_inputs=X)
    for name in ("fc1", "fc2", "fc3"):
        w, orig = masked.get_submodule(name).weight, getattr(model, name).weight
        k = int(0.75 * w.numel())
        assert int((w == 0).sum()) == k
        assert orig.abs().flatten().sort().values[k - 1] <= orig[w != 0].abs().min()  # the smallest went
        assert int((masked.get_submodule(name).bias == 0).sum()) == 0  # biases untouched by default


def test_unstructured_row_scope_masks_the_same_share_of_every_output_row():
    torch.manual_seed(0)
    model = models.Mlp()
    masked = gp.compile(model, [UnstructuredMask(0.5, scope="row")], example_inputs=X)
    w, orig = masked.get_submodule("fc1").weight, model.fc1.weight
    assert bool(((w == 0).sum(1) == 5).all())  # 5 of each row's 10
    kept_min = orig.abs().masked_fill(w == 0, float("inf")).min(1).values
    dropped_max = orig.abs().masked_fill(w != 0, -1).max(1).values
    assert bool((dropped_max <= kept_min).all())


def test_unstructured_global_scope_counts_across_layers():
    model = models.Mlp()
    with torch.no_grad():
        model.fc2.weight.mul_(100)  # fc2 keeps almost everything under a global threshold
    masked = gp.compile(model, [UnstructuredMask(0.5, scope="global", exclude=["fc3"])], example_inputs=X)
    z1 = int((masked.get_submodule("fc1").weight == 0).sum())
    z2 = int((masked.get_submodule("fc2").weight == 0).sum())
    assert z1 + z2 == int(0.5 * (320 + 512))
    assert z2 < z1
    assert int((masked.get_submodule("fc3").weight == 0).sum()) == 0


def test_masks_stay_applied_while_training():
    masked = gp.compile(models.Mlp(), [UnstructuredMask(0.5)], example_inputs=X)
    zero = masked.get_submodule("fc1").weight == 0
    opt = torch.optim.SGD(masked.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        masked(*X).pow(2).sum().backward()
        opt.step()
    assert torch.equal(masked.get_submodule("fc1").weight == 0, zero)


def test_second_mask_only_adds_zeros():
    once = gp.compile(models.Mlp(), [UnstructuredMask(0.3)], example_inputs=X)
    twice = gp.compile(once, [UnstructuredMask(0.6)], example_inputs=X)
    a, b = once.get_submodule("fc1").weight == 0, twice.get_submodule("fc1").weight == 0
    assert bool((b | ~a).all()) and int(b.sum()) == int(0.6 * b.numel())


def test_nm_mask_keeps_n_of_every_m():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    masked = gp.compile(model, [NMMask(2, 4)], example_inputs=(torch.randn(3, 16),))
    for name in ("0", "2"):
        w = masked.get_submodule(name).weight
        assert torch.equal((w != 0).reshape(-1, 4).sum(1), torch.full((w.numel() // 4,), 2))
    assert int((masked.get_submodule("4").weight == 0).sum()) == 0  # 6 inputs: not a multiple of 4, left dense
    assert masked.graphprune_report[-1].details["skipped"] == ["4.weight"]


def test_block_mask_removes_whole_blocks():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masked = gp.compile(model, [BlockMask(0.5, (4, 1))], example_inputs=(torch.randn(3, 8),))
    w = masked.get_submodule("0").weight
    blocks = (w == 0).reshape(4, 4, 8)  # (block row, row in block, col)
    assert bool((blocks.all(1) | (~blocks).all(1)).all())  # each 4x1 block is all zero or all kept
    assert int(blocks.all(1).sum()) == 16


def test_conv_weights_are_masked_too():
    masked = gp.compile(models.ConvBnConv(), [NMMask(2, 4)], example_inputs=(torch.randn(1, 3, 8, 8),))
    w = masked.get_submodule("conv2").weight
    assert int((w == 0).sum()) == w.numel() // 2


def test_channel_and_unstructured_masks_compose_and_shrink_exactly():
    torch.manual_seed(0)
    model = models.randomize_bn(models.Residual()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5), UnstructuredMask(0.9)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    a = shrunk.get_submodule("a")
    assert a.out_channels == 3 and a.weight.shape == (3, 4, 3, 3)
    assert hasattr(a, "parametrizations") and a.parametrizations.weight[0].mask.shape == (3, 4, 3, 3)
    # 90 % of the tensor: 75 % came from the channel mask, the rest now sits inside the kept block
    assert float((a.weight == 0).float().mean()) > 0.3
    s = gp.summary(model, shrunk, x)
    assert s.state == "masked" and any(n == "a.weight" for n, _ in s.sparsity)


def test_wanda_weight_scores_protect_weights_on_loud_inputs():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    data = [((torch.randn(8, 4) * torch.tensor([100.0, 1, 1, 1]),), None) for _ in range(2)]
    masked = gp.compile(model, [WandaScore(data), UnstructuredMask(0.5)], example_inputs=(torch.randn(8, 4),))
    w = masked.get_submodule("0").weight
    assert bool((w[:, 0] != 0).all())  # input 0 is loud: its weights survive despite equal magnitude


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: UnstructuredMask(1.0), r"\[0, 1\)"),
        (lambda: UnstructuredMask(0.5, scope="local"), "scope"),
        (lambda: NMMask(4, 4), "0 < n < m"),
        (lambda: BlockMask(0.5, (0, 1)), "block"),
        (lambda: BlockMask(1.5), r"\[0, 1\)"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unstructured_matches_torch_prune():
    import torch.nn.utils.prune as tprune

    torch.manual_seed(0)
    model = models.Mlp()
    ref = copy.deepcopy(model)
    masked = gp.compile(model, [UnstructuredMask(0.6)], example_inputs=X)
    for name in ("fc1", "fc2", "fc3"):
        tprune.l1_unstructured(getattr(ref, name), "weight", amount=0.6)
        assert torch.equal(masked.get_submodule(name).weight == 0, getattr(ref, name).weight_mask == 0)
    ref = copy.deepcopy(model)
    masked = gp.compile(model, [UnstructuredMask(0.6, scope="global")], example_inputs=X)
    tprune.global_unstructured(
        [(ref.fc1, "weight"), (ref.fc2, "weight"), (ref.fc3, "weight")],
        pruning_method=tprune.L1Unstructured,
        amount=0.6,
    )
    for name in ("fc1", "fc2", "fc3"):
        assert torch.equal(masked.get_submodule(name).weight == 0, getattr(ref, name).weight_mask == 0)


def test_sparsity_report_reads_like_the_pytorch_tutorial():
    masked = gp.compile(models.Mlp(), [UnstructuredMask(0.5)], example_inputs=X)
    report = gp.summary(models.Mlp(), masked, X).sparsity_report()
    assert "Sparsity in fc1.weight: 50.00%" in report and "Global sparsity: 50.00%" in report
