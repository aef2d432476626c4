"""Data-driven criteria: they run calibration batches through the model.

`calibration` is an iterable of `(inputs, targets)` where `inputs` has the
form of `example_inputs` (a tuple of positional arguments or a dict of
keyword arguments); activation-based scores ignore the targets.  Loss-based
scores call `loss_fn(model_output, targets)`.

Activations of a unit are read where its channels enter the linear/conv ops
that consume them (after the activation function), averaged over consumers:
`nn.Linear`/`nn.ConvNd` modules in symbolically traced graphs, `aten.linear` /
`aten.conv*d` on the model's parameters in exported ones (see
`graphprune.ir.weight_ops`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from graphprune.analysis.dependency import ChannelGroup
from graphprune.analysis.scores import WeightScores
from graphprune.errors import ArgumentError, PreconditionError
from graphprune.ir.distributed import sum_over_ranks
from graphprune.ir.inputs import calibration_batches, call_with, eval_mode
from graphprune.ir.masking import raw_tensor, resolve
from graphprune.ir.weight_ops import WeightOp, input_channel_stats, input_sq_norms, per_index_sums, weight_ops
from graphprune.passes.scores.magnitude import ScorePass
from graphprune.pipeline import PassContext

__all__ = ["TaylorScore", "HeadSensitivityScore", "ActivationScore", "APoZScore", "WandaScore", "FLAPScore"]


def _tensor(gm: nn.Module, qualified: str) -> torch.Tensor:
    """The tensor the forward reads (masked, if a mask is on it)."""
    owner, attr = resolve(gm, qualified)
    return getattr(owner, attr).detach()


class TaylorScore(ScorePass):
    """First-order Taylor importance |w * dL/dw| summed over calibration batches (Molchanov et al.),
    per unit over all its parameter slices, averaged over the group's parameters."""

    def __init__(self, calibration: Iterable | None = None, loss_fn: Callable | None = None) -> None:
        self.calibration, self.loss_fn = calibration, loss_fn

    def _weight_times_gradient(self, gm, groups) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per parameter of the groups: (w, dL/dw summed over the calibration batches).  Autograd
        sums the gradients over the batches, and w * (sum of gradients) is the sum of w * dL/dw:
        one gradient per weight is held, not a float64 copy of every weight (LLM-Pruner does the same)."""
        batches = calibration_batches(self.calibration, self.name)
        if self.loss_fn is None:
            raise ArgumentError(f"{self.name} needs loss_fn=, called as loss_fn(model_output, targets)")
        params = {}
        for g in groups:
            for slot in g.slots:
                owner, attr = resolve(gm, slot.tensor)
                t = raw_tensor(owner, attr)
                if isinstance(t, nn.Parameter):
                    params[slot.tensor] = t
        grads = [(p, p.grad) for p in gm.parameters()]  # the caller's gradients, put back afterwards
        try:
            gm.zero_grad(set_to_none=True)
            with eval_mode(gm):
                for inputs, targets in tqdm(batches, desc=self.name, unit="batch", disable=None, leave=False):
                    self.loss_fn(call_with(gm, inputs), targets).backward()
            summed = {name: p.grad.detach() for name, p in params.items() if p.grad is not None}
        finally:
            for p, grad in grads:
                p.grad = grad
        summed = sum_over_ranks(summed, self.name)  # under torch.distributed: summed over every rank's batches
        return {name: (params[name].detach(), grad) for name, grad in summed.items()}

    @staticmethod
    def _per_unit(g: ChannelGroup, s: int, acc: dict, absolute: bool) -> torch.Tensor:
        """Sum of w * dL/dw (or of its magnitude) over each unit's indices of slot s, in float64."""
        slot = g.slots[s]
        product = (lambda w, grad: (w * grad).abs()) if absolute else torch.mul
        rows = per_index_sums(slot.dim, product, *acc[slot.tensor])
        index, unit = g.flat[s]
        return torch.zeros(g.size, dtype=torch.float64).index_add_(0, unit, rows[index])

    def _taylor(self, g: ChannelGroup, acc: dict) -> torch.Tensor:
        parts = [self._per_unit(g, s, acc, True) for s, slot in enumerate(g.slots) if slot.tensor in acc]
        return torch.stack(parts).mean(0) if parts else torch.zeros(g.size, dtype=torch.float64)

    def scores(self, gm, groups, ctx):
        acc = self._weight_times_gradient(gm, groups)
        return {g.key: self._taylor(g, acc) for g in groups}


class HeadSensitivityScore(TaylorScore):
    """Head importance |dL/d gate_h| (Michel et al. 2019, as FastFormers uses it): the gradient of the
    loss with respect to a gate multiplying head h's output.  That gate meets the output projection,
    so dL/d gate_h is the sum of w * dL/dw over the projection's columns of head h, computed without
    inserting gates.  Groups that are not attention heads get the Taylor score."""

    def scores(self, gm, groups, ctx):
        acc = self._weight_times_gradient(gm, groups)
        out = {}
        for g in groups:
            gate = [s for s, slot in enumerate(g.slots) if slot in g.consumers and slot.tensor in acc]
            if g.kind == "head" and gate:
                out[g.key] = torch.stack([self._per_unit(g, s, acc, False) for s in gate]).sum(0).abs()
            else:
                out[g.key] = self._taylor(g, acc)
        return out


class _ActivationStats(ScorePass):
    """Collects per-channel statistics of each group's channels where consumers read them."""

    statistic = "mean_abs"  # or "zero_fraction", "rms"

    def __init__(self, calibration: Iterable | None = None) -> None:
        self.calibration = calibration

    def _consumers(self, ops: dict[str, WeightOp], g: ChannelGroup) -> list[tuple[int, WeightOp]]:
        """(slot position, op) for each linear/conv op that reads the group's channels as input."""
        return [
            (s, ops[slot.tensor])
            for s, slot in enumerate(g.slots)
            if slot in g.consumers and slot.tensor in ops and slot.dim == ops[slot.tensor].in_dim
        ]

    def _collect(self, gm: fx.GraphModule, ops: dict[str, WeightOp]) -> dict[str, torch.Tensor]:
        batches = calibration_batches(self.calibration, type(self).__name__)
        return input_channel_stats(gm, ops, batches, self.statistic)

    @staticmethod
    def _per_weight_index(op: WeightOp, per_channel: torch.Tensor) -> torch.Tensor:
        """Weight index j of a grouped conv reads channel j of every group: average them."""
        return per_channel.reshape(op.groups, -1).mean(0) if op.groups > 1 else per_channel

    def unit_stats(
        self, gm: fx.GraphModule, groups, stats: dict[str, torch.Tensor] | None = None
    ) -> dict[str, list[tuple[WeightOp, int, torch.Tensor]]]:
        """Per group: (consumer op, slot position, per-unit statistic)."""
        ops = weight_ops(gm)
        if stats is None:
            stats = self._collect(gm, {op.weight: op for g in groups for _, op in self._consumers(ops, g)})
        out: dict[str, list] = {}
        for g in groups:
            rows = []
            for s, op in self._consumers(ops, g):
                if op.weight not in stats:
                    continue
                index, unit = g.flat[s]
                per_index = self.per_channel(gm, op, self._per_weight_index(op, stats[op.weight]))[index]
                total = torch.zeros(g.size, dtype=torch.float64).index_add_(0, unit, per_index)
                if not self.summed:
                    total /= torch.zeros(g.size, dtype=torch.float64).index_add_(0, unit, torch.ones_like(per_index))
                rows.append((op, s, total))
            out[g.key] = rows
        return out

    summed = False  # a unit's statistic is the mean over its channels (True: the sum)

    def per_channel(self, gm: fx.GraphModule, op: WeightOp, stat: torch.Tensor) -> torch.Tensor:
        """The value of each weight input index of `op`, from its input channel's statistic."""
        return stat

    def scores(self, gm, groups, ctx: PassContext):
        per_group = self.unit_stats(gm, groups, self._stats_for(gm, groups, ctx))
        out, missing = {}, []
        for g in groups:
            rows = per_group[g.key]
            if not rows:
                missing.append(g.key)
                out[g.key] = torch.zeros(g.size, dtype=torch.float64)
                continue
            out[g.key] = self.combine(gm, g, rows)
        if missing:
            ctx.record(unscored=missing)
        if groups and len(missing) == len(groups):
            raise PreconditionError(f"{self.name}: no group has a linear or conv consumer to read activations at")
        return out

    def _stats_for(self, gm, groups, ctx) -> dict[str, torch.Tensor] | None:
        return None

    def combine(self, gm, g, rows) -> torch.Tensor:
        return torch.stack([r for _, _, r in rows]).mean(0)


class ActivationScore(_ActivationStats):
    """Mean |activation| of each unit's channels over the calibration data."""

    statistic = "mean_abs"


class APoZScore(_ActivationStats):
    """Average Percentage of Zeros (Hu et al. 2016): channels that are mostly zero after their
    activation matter least, so the score is 1 - APoZ (higher = keep)."""

    statistic = "zero_fraction"

    def combine(self, gm, g, rows):
        return 1.0 - super().combine(gm, g, rows)


class WandaScore(_ActivationStats):
    """Wanda (Sun et al. 2023) and its structured form (FLAP): per weight |W_ij| * ||x_j||, left in
    the context for UnstructuredMask / NMMask / BlockMask; per unit ||W[:, j]|| * RMS(x_j) over the
    consumers of its channels, for ChannelMask."""

    statistic = "rms"

    def _stats_for(self, gm, groups, ctx):
        ops = weight_ops(gm)
        stats = self._collect(gm, ops)
        # per weight |W| * ||x||, made only for the weights a fine-grained mask then reads (a float64
        # copy of every weight of an LLM would be four times its bfloat16 size)
        ctx.put(WeightScores({name: partial(_wanda, gm, op, stats[name]) for name, op in ops.items() if name in stats}))
        return stats

    def combine(self, gm, g, rows):
        scores = []
        for op, s, rms in rows:
            col = input_sq_norms(_tensor(gm, op.weight), op.in_dim)
            index, unit = g.flat[s]
            norm = torch.zeros(g.size, dtype=torch.float64).index_add_(0, unit, col[index]).sqrt()
            scores.append(norm * rms)
        return torch.stack(scores).mean(0)


class FLAPScore(_ActivationStats):
    """FLAP's fluctuation metric (An et al. 2024): per unit, the variance of its input channels over
    the calibration data times the squared norm of the weight columns that read them, summed over
    its channels.  A channel that barely fluctuates can be replaced by its mean, which
    CompensateBias then folds into the next bias.  Standardised within each group (mean 1, unit
    spread), so that ChannelMask(scope="global") ranks units of different layers on one scale:
    FLAP's adaptive structure, where each layer keeps as many units as its scores earn."""

    statistic = "variance"
    summed = True

    def per_channel(self, gm, op, variance):
        return variance * input_sq_norms(_tensor(gm, op.weight), op.in_dim)

    def combine(self, gm, g, rows):
        s = torch.stack([r for _, _, r in rows]).sum(0)
        z = (s - s.mean()) / s.std() if g.size > 1 and s.std() > 0 else torch.zeros_like(s)
        return 1 + z  # mean 1: global ranking divides each group by its mean, which leaves these as they are


def _wanda(gm: nn.Module, op: WeightOp, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||x_j|| for every weight of one linear/conv op (a grouped conv's weight j of group g
    reads input channel g * (in / groups) + j)."""
    w = _tensor(gm, op.weight).abs().double()
    if op.kind == "linear":
        return w * (norms.reshape(-1, 1) if op.transposed else norms.reshape(1, -1))
    cog, cig = w.shape[0] // op.groups, w.shape[1]
    channel = (torch.arange(w.shape[0]) // cog).unsqueeze(1) * cig + torch.arange(cig).unsqueeze(0)
    return w * norms[channel].reshape(*channel.shape, *([1] * (w.ndim - 2)))
