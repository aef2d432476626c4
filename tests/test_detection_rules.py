"""Detection, segmentation and video models (issue 16): FrozenBatchNorm2d's buffers, sizes read off
tensors, functions that fill in their list arguments, RAFT through torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_exact, prune

torchvision = pytest.importorskip("torchvision")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def out_channels(model: nn.Module, prefix: str) -> dict[str, int]:
    return {
        name: m.out_channels
        for name, m in model.named_modules()
        if name.startswith(prefix) and isinstance(m, nn.Conv2d)
    }


# -- 3. functions that fill in their list arguments -----------------------------------------------


def _clip_window(window: list, size: list) -> list:
    for i in range(len(window)):  # writes into its argument, as torchvision's video Swin does
        if size[i] < window[i]:
            window[i] = size[i]
    return window


fx.wrap("_clip_window")


class MutatesItsList(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        window = _clip_window([4, 4], [x.shape[2], x.shape[3]])
        return self.d(F.avg_pool2d(torch.relu(self.c(x)), window))


def test_functions_that_mutate_their_list_arguments_run_in_the_analysis():
    torch.manual_seed(0)
    model, x = MutatesItsList().eval(), torch.randn(2, 3, 3, 8)
    masked, shrunk = prune(model, (x,))
    assert type(shrunk) is MutatesItsList and shrunk.c.out_channels == 4
    assert_exact(masked, shrunk, (x,))
