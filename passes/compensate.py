"""CompensateBias: fold what removed channels contributed on average into the next layer's bias.

Placed between a mask pass and Shrink.  Over the calibration data it measures
the mean of each pruned channel as the *unmasked* model computes it, and
adds W[:, pruned] @ mean(x[pruned]) to the bias of every Conv/Linear that
consumed it (as FLAP does), so one-shot pruning without fine-tuning keeps
much more of the model's function.  Shrink stays exact afterwards: the
compensated biases belong to channels that are kept.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from graphprune.masking import masks_disabled, raw_tensor, resolve, unit_mask_state
from graphprune.pipeline import PassBase, PassContext, PassResult
from graphprune.passes.data_scores import _batches, input_channel_stats

__all__ = ["CompensateBias"]

_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class CompensateBias(PassBase):
    preserves = frozenset({"dependencies", "scores", "weight_scores"})

    def __init__(self, calibration: Iterable | None = None) -> None:
        self.calibration = calibration

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        batches = _batches(self.calibration, "CompensateBias")
        deps = ctx.dependencies(gm)
        targets: dict[int, tuple[nn.Module, str, set[int]]] = {}
        skipped = []
        for g in deps.groups:
            ids = torch.nonzero(unit_mask_state(gm, g)[0]).reshape(-1).tolist()
            if not ids:
                continue
            for slot, idx in g.indices(ids).items():
                if slot not in g.consumers:
                    continue
                owner, attr = resolve(gm, slot.tensor)
                if attr == "weight" and slot.dim == 1 and isinstance(owner, _CONSUMERS) and getattr(owner, "groups", 1) == 1:
                    targets.setdefault(id(owner), (owner, slot.tensor.rpartition(".")[0], set()))[2].update(idx)
                else:
                    skipped.append(slot.tensor)
        if not targets:
            ctx.record(compensated=[], skipped=skipped)
            return PassResult(gm, False)
        with masks_disabled(gm):  # the means the pruned channels had before masking
            means = input_channel_stats(gm, {k: m for k, (m, _, _) in targets.items()}, batches, "mean")
        for key, (module, _, indices) in targets.items():
            idx = torch.tensor(sorted(indices), dtype=torch.long)
            w = raw_tensor(module, "weight").detach().double()
            cols = w.index_select(1, idx).reshape(w.shape[0], len(idx), -1).sum(2)  # a constant input meets every kernel tap
            delta = cols @ means[key][idx]
            if getattr(module, "bias", None) is None:
                module.bias = nn.Parameter(delta.to(module.weight.dtype))
            else:
                with torch.no_grad():
                    raw_tensor(module, "bias").add_(delta.to(raw_tensor(module, "bias").dtype))
        ctx.record(compensated=sorted(name for _, name, _ in targets.values()), skipped=skipped)
        return PassResult(gm, True)
