"""The zero-reinsertion module: keeps an interface width while the channels behind it shrink."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ZeroReinsert"]


class ZeroReinsert(nn.Module):
    """Identity that zeroes pruned channels while masked; after Shrink, scatters the kept channels
    back into a zero tensor of the original width along `dim`."""

    graphprune_maskable = ("keep",)

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.width, self.dim = width, dim
        self.register_buffer("keep", torch.ones(width))
        self.register_buffer("index", torch.arange(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.dim] = -1
        x = x * self.keep.reshape(shape).to(x.dtype)
        if x.shape[self.dim] == self.width:
            return x
        out_shape = list(x.shape)
        out_shape[self.dim] = self.width
        return x.new_zeros(out_shape).index_copy(self.dim, self.index, x)

    def graphprune_shrink(self, removed: dict[str, dict[int, torch.Tensor]]) -> None:
        gone = removed.get("keep", {}).get(0)
        if gone is None:
            return
        kept = torch.ones(self.keep.numel(), dtype=torch.bool)
        kept[gone] = False
        self.index = self.index[kept]
        self.keep = torch.ones(int(kept.sum()), dtype=self.keep.dtype)

    def extra_repr(self) -> str:
        return f"width={self.width}, dim={self.dim}, kept={self.index.numel()}"
