"""Problems a review of the sparse-lowering / hidden-size / saving work found, each pinned."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.ir.masking import masks_disabled
from graphprune.passes import ChannelMask, CompensateBias, L1Score, L2Score, Shrink, SparseLower, UnstructuredMask
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


def test_exported_chunk_parts_lose_the_same_channels():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.d1, self.d2 = nn.Linear(8, 64), nn.Linear(32, 8), nn.Linear(32, 8)

        def forward(self, x):
            a, b = self.up(x).chunk(2, dim=-1)
            return self.d1(torch.relu(a)) + self.d2(torch.relu(b))

    torch.manual_seed(0)
    x = (torch.randn(4, 8),)
    exported = torch.export.export(Two().eval(), x).module()
    masked = gp.compile(exported, [L1Score(), ChannelMask(0.5, scope="global")], example_inputs=x)
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=x), x)


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


def test_a_weight_read_with_and_without_its_bias_stays_dense():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x, y):
            return self.fc(x) + F.linear(y, self.fc.weight)

    torch.manual_seed(0)
    x = (torch.randn(4, 64), torch.randn(4, 64))
    masked = gp.compile(M().eval(), [UnstructuredMask(0.9)], example_inputs=x)
    lowered = gp.compile(masked, [SparseLower(choose="first")], example_inputs=x)
    torch.testing.assert_close(lowered(*x), masked(*x))


def test_sparse_layers_keep_their_dtype_when_loading_and_odd_inputs_stay_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = (torch.randn(4, 64),)
    lowered = gp.compile(model, [UnstructuredMask(0.9), SparseLower(choose="first")], example_inputs=x)
    saved = {k: v.clone() for k, v in lowered.state_dict().items()}
    lowered.double().load_state_dict(saved)
    assert lowered.get_submodule("0").values.dtype == torch.float64
    assert lowered(x[0].double()).dtype == torch.float64
    half = gp.compile(model.to(torch.bfloat16), [UnstructuredMask(0.9), SparseLower(choose="first")],
                      example_inputs=(x[0].to(torch.bfloat16),))
    assert all("bfloat16" in why for _, fmt, why in gp.summary(model, half, (x[0].to(torch.bfloat16),)).lowered)
    convs = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    unbatched = (torch.randn(8, 5, 5),)
    masked = gp.compile(convs, [UnstructuredMask(0.9)], example_inputs=unbatched)
    out = gp.compile(masked, [SparseLower(choose="first")], example_inputs=unbatched)
    torch.testing.assert_close(out(*unbatched), masked(*unbatched))


def test_compensating_a_layer_without_bias_whose_outputs_are_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = (torch.randn(64, 8),)
    calib = [(x, None)]
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5), CompensateBias(calib)], example_inputs=x)
    assert masked.get_submodule("2").bias.shape == (16,)
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=x), x)
    one_call = gp.compile(model, [L2Score(), ChannelMask(0.5), CompensateBias(calib), Shrink()], example_inputs=x)
    torch.testing.assert_close(one_call(*x), masked(*x))
