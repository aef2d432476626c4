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
they follow the parameters the optimizer updates.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from graphprune.arguments import fraction
from graphprune.compile import analyze, compile
from graphprune.errors import ArgumentError, GraphPruneError
from graphprune.ir.inputs import calibration_batches, call_with, eval_mode
from graphprune.ir.masking import resolve
from graphprune.ir.tokens import SoftTokenMask
from graphprune.ir.trace import ROOT_HOLDER
from graphprune.passes import TokenPrune
from graphprune.passes.token_prune import SOFT, restore_fused_attention

__all__ = ["GroupLasso", "BNScaleL1", "TokenSparsity", "token_rates", "harden_tokens"]


def _strength(lam, name: str) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ArgumentError(f"{name} lam must be a number >= 0, got {lam!r}")
    return float(lam)


class GroupLasso:
    """`lam * Σ_units ||unit||_2`, where a unit's norm covers its slices in every trainable tensor of
    its channel group (buffers such as BN running statistics are not trained and not counted)."""

    def __init__(
        self, model: nn.Module, lam: float, example_inputs: tuple | dict, *, leaf_modules: Iterable[type] = ()
    ) -> None:
        self.model, self.lam = model, _strength(lam, "GroupLasso")
        trained = {n for n, _ in model.named_parameters()}
        kept = {n for n, _ in model.named_buffers()}
        self.terms = []  # per group: (size, [(owner, attr, dim, index, unit)])
        for g in analyze(model, example_inputs, leaf_modules).groups:
            slots = []
            for slot, (index, unit) in zip(g.slots, g.flat):
                name = slot.tensor.removeprefix(ROOT_HOLDER + ".")
                owner, attr = resolve(model, name)
                plain = f"{name.rpartition('.')[0]}.parametrizations.{attr}.original".lstrip(".")
                if name in trained or plain in trained:
                    slots.append((owner, attr, slot.dim, index, unit))
                elif name not in kept:
                    raise GraphPruneError(f"GroupLasso: {name} of group {g.key} is not a tensor of the model")
            if slots:
                self.terms.append((g.size, slots))
        if not self.terms:
            raise GraphPruneError("GroupLasso: the model has no channel group with trainable tensors to regularise")

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


class BNScaleL1:
    """`lam * Σ |γ|` over the scales of the model's BatchNorm layers (network slimming); prune with
    `BNScaleScore` afterwards."""

    def __init__(self, model: nn.Module, lam: float) -> None:
        self.lam = _strength(lam, "BNScaleL1")
        self.norms = [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        ]
        if not self.norms:
            raise GraphPruneError("BNScaleL1: the model has no BatchNorm layer with a scale")

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
        self.masks, self.lam = _soft_masks(model, "TokenSparsity"), _strength(lam, "TokenSparsity")

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
