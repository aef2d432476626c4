"""Pruning during training: a sparsity schedule driven by hooks from a plain PyTorch loop.

    pruner = graphprune.Pruner(model, example_inputs=(x,), target_sparsity=0.8, end_step=1000, frequency=100)
    model = pruner.model                      # train this one (a masked GraphModule)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.on_train_begin()
    for step, (x, y) in enumerate(loader):
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        pruner.on_step_end(step)
    pruned = pruner.finalize()                # Shrink: a smaller model, same outputs

Masks are parametrizations, so they stay applied while training and the
optimizer's parameters never change identity; every pruning step re-scores
and can only add zeros (pattern lock).  Iterative prune -> fine-tune -> prune
(Han et al.) is the same object with `per="epoch"` and a linear schedule.

Sparse training: with a regulariser, add `pruner.penalty()` to the loss.  The Pruner
trains a masked copy of the model, so the regulariser it is given is bound to that copy
(`reg.bind(pruner.model)`: `pruner.regularizer`; the one passed in is left alone), and
`on_step_end` steps it (growing regularisation raises its strength there; call it every step,
with `per="epoch"` too):

    reg = gp.GrowingReg(model, 0.5, example_inputs=(x,), delta=1e-3, every=10)  # or gp.GroupLasso, gp.BNScaleL1
    pruner = gp.Pruner(model, example_inputs=(x,), target_sparsity=0.5, end_step=1000, frequency=1000,
                       score=L2Score(), mask=lambda s: ChannelMask(s), regularizer=reg)
    model = pruner.model
    for step, (x, y) in enumerate(loader):
        (loss_fn(model(x), y) + pruner.penalty()).backward(); opt.step(); opt.zero_grad()
        pruner.on_step_end(step)              # prunes on schedule (here: once, at step 1000)
    pruned = pruner.finalize()

A plain function works too: `regularizer=lambda m: ...` is called with `pruner.model`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch
from torch import nn

from graphprune.arguments import choice, fraction, positive_int
from graphprune.compile import compile
from graphprune.errors import ArgumentError
from graphprune.passes.shrink import Shrink
from graphprune.passes.sparse_mask import UnstructuredMask
from graphprune.pipeline import PassBase

logger = logging.getLogger(__name__)

__all__ = ["Pruner", "sparsity_at"]

SCHEDULES = ("cubic", "linear")


def sparsity_at(
    step: int, *, start_step: int, end_step: int, initial: float, target: float, schedule: str = "cubic"
) -> float:
    """The scheduled sparsity at `step` (Zhu & Gupta's cubic ramp, or a linear one)."""
    if step <= start_step:
        return initial
    if step >= end_step:
        return target
    progress = (step - start_step) / (end_step - start_step)
    if schedule == "cubic":
        return target + (initial - target) * (1.0 - progress) ** 3
    return initial + (target - initial) * progress


class Pruner:
    """Prunes `model` step by step toward `target_sparsity`.

    `score` is a score pass (or None for masks that rank by magnitude);
    `mask` turns a sparsity into a mask pass: by default
    `lambda s: UnstructuredMask(s)`; `lambda s: ChannelMask(s)` prunes channels
    (with a score such as L1Score()).  `regularizer` (`gp.GroupLasso`, `gp.BNScaleL1`,
    `gp.GrowingReg`, or a function `fn(model) -> scalar tensor`) gives `penalty()`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        example_inputs: tuple | dict,
        target_sparsity: float,
        end_step: int,
        start_step: int = 0,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        schedule: str = "cubic",
        score: PassBase | None = None,
        mask: Callable[[float], PassBase] | None = None,
        per: str = "step",
        leaf_modules=(),
        regularizer: object | None = None,
    ) -> None:
        target_sparsity = fraction(target_sparsity, "Pruner target_sparsity")
        initial_sparsity = fraction(initial_sparsity, "Pruner initial_sparsity")
        if initial_sparsity > target_sparsity:
            raise ArgumentError("Pruner initial_sparsity must not exceed target_sparsity")
        choice(schedule, "Pruner schedule", SCHEDULES)
        choice(per, "Pruner per", ("step", "epoch"))
        frequency = positive_int(frequency, "Pruner frequency")
        if not (isinstance(end_step, int) and isinstance(start_step, int) and end_step > start_step >= 0):
            raise ArgumentError(
                f"Pruner needs ints 0 <= start_step < end_step, got start_step={start_step!r}, end_step={end_step!r}"
            )
        if mask is None:
            mask = UnstructuredMask
        self.example_inputs = example_inputs
        self.target, self.initial = float(target_sparsity), float(initial_sparsity)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.schedule, self.per = schedule, per
        self.score, self.make_mask = score, mask
        self.current = 0.0
        self.history: list[tuple[int, float]] = []
        self._count = -1
        # Every tensor a mask may touch gets its (all-ones) mask now, so that an optimizer built on
        # pruner.model.parameters() keeps working as masks tighten.
        self.model = compile(model, self._passes(0.0), example_inputs=example_inputs, leaf_modules=leaf_modules)
        self.regularizer = _bound(regularizer, self.model)

    def penalty(self) -> torch.Tensor:
        """The regulariser's value on `pruner.model`, to add to the loss (0 without a regulariser)."""
        if self.regularizer is None:
            return torch.zeros(())
        if hasattr(self.regularizer, "bind"):
            return self.regularizer()
        return self.regularizer(self.model)

    def _passes(self, sparsity: float) -> list:
        return ([self.score] if self.score is not None else []) + [self.make_mask(sparsity)]

    def _prune_to(self, sparsity: float, step: int) -> None:
        if sparsity <= self.current:
            return
        training = self.model.training
        compile(self.model, self._passes(sparsity), example_inputs=self.example_inputs, inplace=True)
        self.model.train(training)
        self.current = sparsity
        self.history.append((step, sparsity))
        logger.info("step %d: sparsity %.3f", step, sparsity)

    def _tick(self, step: int | None) -> None:
        self._count = self._count + 1 if step is None else step
        s = self._count
        if s < self.start_step or s > self.end_step:
            return
        if (s - self.start_step) % self.frequency == 0 or s == self.end_step:
            self._prune_to(
                sparsity_at(
                    s,
                    start_step=self.start_step,
                    end_step=self.end_step,
                    initial=self.initial,
                    target=self.target,
                    schedule=self.schedule,
                ),
                s,
            )

    # -- the hooks people already use ----------------------------------------------------
    def on_train_begin(self) -> None:
        if self.initial > 0 and self.start_step == 0:
            self._prune_to(self.initial, 0)

    def on_step_end(self, step: int | None = None) -> None:
        if callable(getattr(self.regularizer, "step", None)):
            self.regularizer.step()
        if self.per == "step":
            self._tick(step)

    def on_epoch_end(self, epoch: int | None = None) -> None:
        if self.per == "epoch":
            self._tick(epoch)

    def on_train_end(self) -> None:
        self._prune_to(self.target, self.end_step)

    def finalize(self) -> nn.Module:
        """Reach the target, then Shrink: structured pruning gets smaller; fine-grained masks stay."""

        self.on_train_end()
        return compile(self.model, [Shrink()], example_inputs=self.example_inputs)


def _bound(regularizer, model: nn.Module):
    """The regulariser on the masked copy the Pruner trains (never on the caller's model)."""
    if regularizer is None:
        return None
    if callable(getattr(regularizer, "bind", None)):
        return regularizer.bind(model)
    if not callable(regularizer):
        raise ArgumentError(
            f"Pruner regularizer must be gp.GroupLasso, gp.BNScaleL1, gp.GrowingReg or a function "
            f"fn(model) -> scalar tensor, got {type(regularizer).__name__}"
        )
    try:
        inspect.signature(regularizer).bind(model)
    except TypeError:
        raise ArgumentError(
            "Pruner regularizer: a function must take the model, fn(model) -> scalar tensor; the Pruner trains "
            "a masked copy (pruner.model), which a penalty closed over the original model would not reach"
        ) from None
    except ValueError:  # no signature to read (a builtin): trust it
        pass
    return regularizer
