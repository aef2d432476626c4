"""Sparsity regularisation: penalties to add to the training loss so that whole channel groups
go to zero before they are pruned (then the prune removes what training already gave up).

    reg = gp.GroupLasso(model, 1e-3, example_inputs=(x,))
    loss = task_loss + reg()          # every step
    ...
    pruned = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=(x,))

`GroupLasso` is the group lasso over the channel groups graphprune finds (Torch-Pruning's
GroupNormPruner, Intel Neural Compressor's group lasso): for each prunable unit, the L2 norm of
all its slices across every trainable tensor of its group (a conv's output filters, the next
conv's input columns, the BN scale and shift between), summed.  `BNScaleL1` is network slimming's
L1 on BatchNorm scales.  Both read the model's tensors when called (masked ones as masked), so
they follow the parameters the optimizer updates; `reg.bind(other)` is the same penalty on another
model with the same modules (what `Pruner(regularizer=reg)` does with the masked copy it trains).

`GrowingReg` is growing regularisation (Wang et al., ICLR 2021): the units to prune are chosen
first (the lowest-norm `ratio` of every group), and only they get an L2 penalty whose strength
grows step by step, so that the network moves what they did elsewhere before they are removed:

    reg = gp.GrowingReg(model, 0.5, example_inputs=(x,), delta=1e-3, every=10, ceiling=1.0)
    for step, (xb, yb) in enumerate(loader):
        (loss_fn(model(xb), yb) + reg()).backward(); opt.step(); opt.zero_grad()
        reg.step()                    # a Pruner(regularizer=reg) calls it from on_step_end
    pruned = gp.compile(model, [MaskUnits(reg.selected), Shrink()], example_inputs=(x,))
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from typing import Iterable

import torch
from torch import nn

from graphprune.arguments import fraction, positive_int
from graphprune.compile import analyze, compile
from graphprune.errors import ArgumentError, GraphPruneError
from graphprune.ir.inputs import calibration_batches, call_with, eval_mode
from graphprune.ir.masking import resolve
from graphprune.ir.tokens import SoftTokenMask
from graphprune.ir.trace import ROOT_HOLDER
from graphprune.passes import TokenPrune
from graphprune.passes.token_prune import SOFT, restore_fused_attention

logger = logging.getLogger(__name__)

__all__ = ["GroupLasso", "GrowingReg", "BNScaleL1", "TokenSparsity", "token_rates", "harden_tokens"]


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or value != value:
        raise ArgumentError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _strength(lam, name: str) -> float:
    """A penalty strength: a number >= 0 (`name` says which)."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not lam >= 0:
        raise ArgumentError(f"{name} must be a number >= 0, got {lam!r}")
    return float(lam)


class GroupLasso:
    """`lam * Σ_units ||unit||_2`, where a unit's norm covers its slices in every trainable tensor of
    its channel group (buffers such as BN running statistics are not trained and not counted)."""

    def __init__(
        self, model: nn.Module, lam: float, example_inputs: tuple | dict, *, leaf_modules: Iterable[type] = ()
    ) -> None:
        self.lam = _strength(lam, f"{type(self).__name__} lam")
        who = type(self).__name__
        trained = {n for n, _ in model.named_parameters()}
        kept = {n for n, _ in model.named_buffers()}
        self._groups = []  # per group: (key, size, [(tensor name, shape, dim, index, unit)])
        for g in analyze(model, example_inputs, leaf_modules).groups:
            slots = []
            for slot, (index, unit) in zip(g.slots, g.flat):
                name = slot.tensor.removeprefix(ROOT_HOLDER + ".")
                owner, attr = resolve(model, name)
                plain = f"{name.rpartition('.')[0]}.parametrizations.{attr}.original".lstrip(".")
                if name in trained or plain in trained:
                    slots.append((name, tuple(getattr(owner, attr).shape), slot.dim, index, unit))
                elif name not in kept:
                    raise GraphPruneError(f"{who}: {name} of group {g.key} is not a tensor of the model")
            if slots:
                self._groups.append((g.key, g.size, slots))
        if not self._groups:
            raise GraphPruneError(f"{who}: the model has no channel group with trainable tensors to regularise")
        self._bind(model)

    @property
    def keys(self) -> list[str]:
        """The keys of the groups regularised, in the order of `norms()`."""
        return [key for key, _, _ in self._groups]

    def _bind(self, model: nn.Module) -> None:
        terms = []
        for key, size, slots in self._groups:
            bound = []
            for name, shape, dim, index, unit in slots:
                try:
                    owner, attr = resolve(model, name)
                    t = getattr(owner, attr)
                except AttributeError:
                    t = None
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                    raise ArgumentError(
                        f"{type(self).__name__}: the model to regularise has no tensor {name} shaped like the one "
                        f"of group {key}; bind it to a model with the same modules (e.g. a masked copy)"
                    )
                bound.append((owner, attr, dim, index, unit))
            terms.append((size, bound))
        self.model, self.terms = model, terms

    def bind(self, model: nn.Module) -> GroupLasso:
        """This penalty on `model`, a model with the same module names and shapes (e.g. the masked
        copy a `Pruner` trains): the groups are not analysed again; this one is left as it is."""
        other = copy.copy(self)
        other._bind(model)
        return other

    def norms(self) -> list[torch.Tensor]:
        """Per group, the L2 norm of each unit (differentiable)."""
        out = []
        for size, slots in self.terms:
            sq = None
            for owner, attr, dim, index, unit in slots:
                t = getattr(owner, attr)
                per = t.pow(2).sum(dim=[d for d in range(t.dim()) if d != dim]) if t.dim() > 1 else t.pow(2)
                part = torch.zeros(size, dtype=per.dtype, device=per.device).index_add(
                    0, unit.to(per.device), per[index]
                )
                sq = part if sq is None else sq + part
            out.append(sq.clamp_min(1e-12).sqrt())
        return out

    def __call__(self) -> torch.Tensor:
        return self.lam * sum(n.sum() for n in self.norms())


class GrowingReg(GroupLasso):
    """Growing regularisation (Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021,
    GReg-1): the `ratio` lowest-norm units of every group are selected for pruning at the start
    (their norms as `norms()` counts them, ties by index; as many per group as `ChannelMask(ratio)`
    removes); the penalty is

        lam * Σ_selected ||unit||² + kept * Σ_other ||unit||²

    and `step()` (a `Pruner` calls it from `on_step_end`) raises `lam` by `delta` every `every`
    steps, from 0 up to `ceiling`: `lam = min(ceiling, delta * (steps // every))`
    (`strength_at`).  A strength that grows slowly lets the rest of the network take over what the
    selected units did before they are gone, rather than cutting them at once.  With `threshold`,
    `lam` stops growing once every selected unit's norm is below it; `done` says when growing is
    over.  Then prune exactly `selected` (`MaskUnits(reg.selected)`, or a magnitude score and
    `ChannelMask(ratio)`, which find the same units near zero)."""

    def __init__(
        self,
        model: nn.Module,
        ratio: float,
        example_inputs: tuple | dict,
        *,
        delta: float = 1e-4,
        every: int = 10,
        ceiling: float = 1.0,
        threshold: float | None = None,
        kept: float = 0.0,
        min_channels: int = 1,
        leaf_modules: Iterable[type] = (),
    ) -> None:
        self.ratio = fraction(
            ratio, "GrowingReg ratio (the share of each group's units to drive to zero)", open_low=True
        )
        self.delta = _positive(delta, "GrowingReg delta (the step of the strength)")
        self.every = positive_int(every, "GrowingReg every (steps between increases)")
        self.ceiling = _positive(ceiling, "GrowingReg ceiling (the largest strength)")
        if self.delta > self.ceiling:
            raise ArgumentError(f"GrowingReg delta ({delta!r}) must not exceed ceiling ({ceiling!r})")
        self.threshold = None if threshold is None else _positive(threshold, "GrowingReg threshold (a unit norm)")
        self.kept = _strength(kept, "GrowingReg kept (the fixed strength on the other units)")
        min_channels = positive_int(min_channels, "GrowingReg min_channels")
        super().__init__(model, 0.0, example_inputs, leaf_modules=leaf_modules)
        self.selected: dict[str, list[int]] = {}
        self._chosen = []
        with torch.no_grad():
            for (key, size, _), norms in zip(self._groups, self.norms()):
                keep = max(size - math.floor(self.ratio * size + 1e-9), min(min_channels, size))
                units = sorted(torch.argsort(norms.double(), stable=True)[: size - keep].tolist())
                chosen = torch.zeros(size, dtype=torch.bool)
                chosen[units] = True
                self._chosen.append(chosen)
                if units:
                    self.selected[key] = units
        self.steps, self.done = 0, False
        self.history: list[tuple[int, float]] = [(0, 0.0)]  # (step, lam) at each change

    def bind(self, model: nn.Module) -> GrowingReg:
        other = super().bind(model)
        other.history = list(self.history)  # the rest is numbers (or not changed in place)
        return other

    def strength_at(self, step: int) -> float:
        """The strength the schedule gives after `step` steps (without `threshold` stopping it)."""
        return min(self.ceiling, self.delta * (step // self.every))

    def selected_norms(self) -> list[torch.Tensor]:
        """Per group, the norms of its selected units (a group with none selected gives an empty tensor)."""
        return [n[c.to(n.device)] for n, c in zip(self.norms(), self._chosen)]

    def step(self) -> None:
        """One training step done: raise the strength when the schedule says so."""
        self.steps += 1
        if self.done:
            return
        if self.threshold is not None:
            with torch.no_grad():
                largest = max((float(n.max()) for n in self.selected_norms() if n.numel()), default=0.0)
            if largest < self.threshold:
                self.done = True
                logger.info(
                    "GrowingReg: every selected unit below %g at step %d (lam %g)", self.threshold, self.steps, self.lam
                )
                return
        lam = self.strength_at(self.steps)
        if lam != self.lam:
            self.lam = lam
            self.history.append((self.steps, lam))
        if self.lam >= self.ceiling:
            self.done = True

    def __call__(self) -> torch.Tensor:
        total = None
        for n, c in zip(self.norms(), self._chosen):
            sq = n.pow(2)
            c = c.to(sq.device)
            term = self.lam * sq[c].sum() + self.kept * sq[~c].sum()
            total = term if total is None else total + term
        return total


class BNScaleL1:
    """`lam * Σ |γ|` over the scales of the model's BatchNorm layers (network slimming); prune with
    `BNScaleScore` afterwards."""

    def __init__(self, model: nn.Module, lam: float) -> None:
        self.lam = _strength(lam, "BNScaleL1 lam")
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        self.model = model
        self.norms = [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        ]
        if not self.norms:
            raise GraphPruneError("BNScaleL1: the model has no BatchNorm layer with a scale")

    def bind(self, model: nn.Module) -> BNScaleL1:
        """This penalty on the BatchNorm layers of `model` (e.g. the masked copy a `Pruner` trains)."""
        other = copy.copy(self)
        other._bind(model)
        return other

    def __call__(self) -> torch.Tensor:
        return self.lam * sum(m.weight.abs().sum() for m in self.norms)


def _soft_masks(model: nn.Module, who: str) -> list[SoftTokenMask]:
    masks = [m for m in model.modules() if isinstance(m, SoftTokenMask)]
    if not masks:
        raise ArgumentError(f"{who}: the model has no soft token masks; compile it with TokenThreshold() first")
    return masks


class TokenSparsity:
    """LTP's sparsity term: `lam * Σ_layers mean soft token mask` of the last forward (add it to the
    task loss; the learned thresholds rise where tokens can go)."""

    def __init__(self, model: nn.Module, lam: float) -> None:
        self.masks, self.lam = _soft_masks(model, "TokenSparsity"), _strength(lam, "TokenSparsity lam")

    def __call__(self) -> torch.Tensor:
        if any(m.mean is None for m in self.masks):
            raise GraphPruneError("TokenSparsity reads the last forward's masks: run the model first")
        return self.lam * sum(m.mean for m in self.masks)


def token_rates(model: nn.Module, calibration: Iterable) -> dict[int, float]:
    """Per layer, the share of scored tokens below its learned threshold on the calibration batches."""
    masks = _soft_masks(model, "token_rates")
    for m in masks:
        m.counts = [0, 0]
    with eval_mode(model), torch.no_grad():
        for batch, _ in calibration_batches(calibration, "token_rates"):
            call_with(model, batch)
    return {m.layer: m.counts[0] / max(m.counts[1], 1) for m in masks}


def harden_tokens(model: nn.Module, calibration: Iterable, example_inputs, *, max_rate: float = 0.95) -> nn.Module:
    """A model trained with TokenThreshold, its soft masks removed and its tokens pruned by
    `TokenPrune` at the rates the learned thresholds give on `calibration` (capped at max_rate)."""
    max_rate = fraction(max_rate, "harden_tokens max_rate")
    rates = token_rates(model, calibration)
    plain = copy.deepcopy(model)
    first = next(m for m in plain.modules() if isinstance(m, SoftTokenMask))
    for node in list(plain.graph.nodes):  # each added value gives way to what it stands for
        if SOFT in node.meta:
            stand_in = node
            for i in node.meta[SOFT]:
                stand_in = stand_in.args[i]
            for user in list(node.users):
                user.replace_input_with(node, stand_in)
    plain.graph.eliminate_dead_code()
    for name, module in list(plain.named_children()):
        if isinstance(module, SoftTokenMask):
            delattr(plain, name)
    restore_fused_attention(plain)  # where no layer will read the scores
    schedule = {i: min(r, max_rate) for i, r in rates.items()}
    return compile(plain, [TokenPrune(schedule, score=first.score, keep=first.keep)], example_inputs=example_inputs)
