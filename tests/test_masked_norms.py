"""Masked means and LayerNorms (statistics over the kept channels): exact through a second compile
and saving, restored by masks_disabled, frozen where a norm cannot carry a mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.ir.masking import masks_disabled
from graphprune.passes import ChannelMask, L2Score
from tests.helpers import assert_exact, prune
from tests.test_transformers import GatedSum, RMSNorm


class RootScaleRMS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        self.scale = nn.Parameter(torch.rand(32) + 0.5)  # read off the root module

    def forward(self, x):
        h = self.up(x) * self.scale
        return self.down(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_masked_means_survive_compiling_again_and_saving(tmp_path):
    torch.manual_seed(0)
    x = (torch.randn(4, 8),)
    masked, shrunk = prune(RootScaleRMS().eval(), x, 0.5)  # two compiles: the root tensors' holder is reused
    assert_exact(masked, shrunk, x)
    model = GatedSum().eval()
    once = gp.compile(model, [L2Score(), ChannelMask(0.25)], example_inputs=x)
    twice = gp.compile(once, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    gp.save(twice, tmp_path)
    torch.testing.assert_close(gp.load(model, tmp_path, x)(*x), twice(*x), rtol=0, atol=0)


class OddLayerNorms(nn.Module):
    def __init__(self, buffer: bool) -> None:
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(8, 32), nn.Linear(32, 8), nn.Module()
        if buffer:  # a frozen affine kept as a buffer: nothing to carry a mask
            self.norm.register_buffer("weight", torch.rand(32) + 0.5)
        else:
            self.norm.weight = nn.Parameter(torch.rand(32) + 0.5)
        self.buffer = buffer

    def forward(self, x):
        h = self.up(x)
        shape = (32,) if self.buffer else h.shape[-1:]  # or a shape computed at run time
        return self.down(F.layer_norm(h, shape, self.norm.weight))


@pytest.mark.parametrize("buffer", [True, False])
def test_layer_norms_that_cannot_carry_a_mask_freeze(buffer):
    torch.manual_seed(0)
    x = (torch.randn(4, 8),)
    masked, shrunk = prune(OddLayerNorms(buffer).eval(), x, 0.5)
    assert_exact(masked, shrunk, x)
    assert shrunk.get_submodule("up").out_features == 32


def test_masks_disabled_also_restores_masked_means():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.norm, self.down = nn.Linear(8, 32), RMSNorm(32), nn.Linear(32, 8)

        def forward(self, x):
            return self.down(self.norm(self.up(x)))

    torch.manual_seed(0)
    model, x = M().eval(), (torch.randn(16, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    with masks_disabled(masked):
        torch.testing.assert_close(masked(*x), model(*x))
