"""CompensateBias: fold what removed channels contributed on average into the next layer's bias.

Placed between a mask pass and Shrink.  Over the calibration data it measures
the mean of each pruned channel as the *unmasked* model computes it, and
adds W[:, pruned] @ mean(x[pruned]) to the bias of every linear/conv op that
consumed it, as FLAP does, so one-shot pruning without fine-tuning keeps much
more of the model's function.  Ops without a bias get one: the module's, which
in exported graphs the functional call on its weight then reads too.  Shrink
stays exact afterwards: the compensated biases belong to channels that are kept.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from graphprune.analysis import Dependencies, Scores, WeightScores
from graphprune.ir.inputs import calibration_batches
from graphprune.ir.masking import (
    channel_mask,
    ensure_channel_mask,
    masks_disabled,
    raw_tensor,
    refuse_lowered,
    replace_tensor,
    resolve,
    unit_mask_state,
)
from graphprune.ir.weight_ops import WeightOp, input_channel_stats, weight_ops
from graphprune.pipeline import PassBase, PassContext, PassResult

__all__ = ["CompensateBias"]


class AddBias(PassBase):
    """Replays CompensateBias's `add_bias` plan step: these linear/conv modules get a (zero) bias,
    whose values come with the saved weights."""

    plan_op = "add_bias"
    preserves = frozenset({Scores, WeightScores})

    def __init__(self, modules: Iterable[str]) -> None:
        self.modules = list(modules)

    @classmethod
    def from_plan(cls, step: dict) -> AddBias:
        return cls(step["modules"])

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ops = weight_ops(gm)
        for path in self.modules:
            _add_bias(
                gm, path, ops.get(f"{path}.weight"), torch.zeros(raw_tensor(gm.get_submodule(path), "weight").shape[0])
            )
        ctx.record(plan={"op": "add_bias", "modules": self.modules})
        return PassResult(gm, bool(self.modules))


def _bias_slot_free(gm: fx.GraphModule, op: WeightOp) -> bool:
    """The op has a bias, or its weight's module has no `bias` attribute of another use to overwrite."""
    return op.bias is not None or getattr(resolve(gm, op.weight)[0], "bias", None) is None


def _add_bias(gm: fx.GraphModule, path: str, op: WeightOp | None, values: torch.Tensor) -> nn.Module:
    """Give the module at `path` a bias parameter holding `values`; where the graph calls a functional
    linear/conv on its weight (exported graphs) rather than the module, those calls read it too."""
    module = gm.get_submodule(path)
    weight = raw_tensor(module, "weight")
    module.bias = nn.Parameter(values.to(dtype=weight.dtype, device=weight.device))
    if op is not None and op.module is None:
        for node in [n for n in gm.graph.nodes if n.name in op.nodes]:
            with gm.graph.inserting_before(node):
                bias = gm.graph.get_attr(f"{path}.bias")
            args = list(node.args) + [None] * (3 - len(node.args))
            args[2] = bias
            node.args = tuple(args)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
    return module


class CompensateBias(PassBase):
    preserves = frozenset({Dependencies, Scores, WeightScores})

    def __init__(self, calibration: Iterable | None = None) -> None:
        self.calibration = calibration

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        refuse_lowered(gm, "CompensateBias")
        batches = calibration_batches(self.calibration, "CompensateBias")
        deps = ctx.get(Dependencies, gm)
        ops = weight_ops(gm)
        targets: dict[str, tuple[WeightOp, set[int]]] = {}
        skipped = []
        for g in deps.groups:
            ids = torch.nonzero(unit_mask_state(gm, g)[0]).reshape(-1).tolist()
            if not ids:
                continue
            for slot, idx in g.indices(ids).items():
                if slot not in g.consumers:
                    continue
                op = ops.get(slot.tensor)
                if op is not None and slot.dim == op.in_dim and op.groups == 1 and _bias_slot_free(gm, op):
                    targets.setdefault(op.weight, (op, set()))[1].update(idx)
                else:
                    skipped.append(slot.tensor)
        if not targets:
            ctx.record(compensated=[], skipped=skipped)
            return PassResult(gm, False)
        with masks_disabled(gm):  # the means the pruned channels had before masking
            means = input_channel_stats(gm, {name: op for name, (op, _) in targets.items()}, batches, "mean")
        new_biases = []
        for name, (op, indices) in targets.items():
            idx = torch.tensor(sorted(indices), dtype=torch.long)
            w = raw_tensor(*resolve(gm, name)).detach().movedim(op.in_dim, 1).double()
            cols = (
                w.index_select(1, idx).reshape(w.shape[0], len(idx), -1).sum(2)
            )  # a constant input meets every kernel tap
            delta = cols @ means[name][idx]
            if op.bias is None:  # a linear / conv without bias gets one, masked like its outputs
                path = op.weight.rpartition(".")[0]
                module = _add_bias(gm, path, op, delta)
                new_biases.append(path)
                mask = channel_mask(module, "weight")
                if mask is not None and hasattr(mask, "keep_0"):
                    ensure_channel_mask(module, "bias").drop(0, len(delta), torch.nonzero(~mask.keep_0).reshape(-1))
            else:
                owner, attr = resolve(gm, op.bias)
                replace_tensor(owner, attr, raw_tensor(owner, attr).detach() + delta.to(raw_tensor(owner, attr).dtype))
        ctx.record(compensated=sorted(targets), skipped=skipped, plan={"op": "add_bias", "modules": new_biases})
        # new bias tensors: the channel groups must be found again (the scores stay the units' scores)
        return PassResult(gm, True, self.preserves - {Dependencies} if new_biases else None)
