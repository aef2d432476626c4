"""Calibration statistics summed over the ranks of a `torch.distributed` job.

When a process group is initialised, each rank runs its own shard of the calibration data
and every data-driven pass sums its statistics (activation sums and counts, gradients,
Hessians) over the ranks before it scores, so every rank decides the same masks, equal to
those of one process that saw all the shards.  Outside a process group nothing happens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from graphprune.errors import PreconditionError

__all__ = ["world_size", "sum_over_ranks"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(tensors: dict[str, torch.Tensor], who: str) -> dict[str, torch.Tensor]:
    """The element-wise sum over all ranks of each tensor (same names and shapes on every rank);
    the tensors themselves when there is one rank."""
    if world_size() == 1:
        return tensors
    names = sorted(tensors)
    layout = [(n, tuple(tensors[n].shape)) for n in names]
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, layout)
    if any(other != layout for other in everyone):
        raise PreconditionError(
            f"{who}: the ranks collected different statistics (rank {dist.get_rank()} has {len(layout)} tensors, "
            f"others {[len(o) for o in everyone]}); every rank must run the same model on batches of the same form"
        )
    out = {}
    for n in names:
        t = tensors[n].detach().clone()
        dist.all_reduce(t)
        out[n] = t
    return out
