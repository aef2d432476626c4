"""Recovery after a one-shot prune: a small training loop, optionally distilling from the dense model.

    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=(x,))
    gp.finetune(masked, loader, F.cross_entropy, epochs=2)            # task loss
    gp.finetune(masked, loader, distill_from=model, epochs=2)          # match the dense model's logits
    pruned = gp.compile(masked, [Shrink()], example_inputs=(x,))

`loader` yields `(inputs, targets)` (inputs as the model takes them: a tensor, a tuple or a dict;
`targets` may be None when distilling only).  `callbacks` get the hooks a training loop calls
(`on_train_begin()`, `on_step_end(step)` after each optimizer step, counted from 0 across
epochs, `on_epoch_end(epoch)`, `on_train_end()`; each optional), so a `gp.Pruner` prunes
gradually while the model trains:

    pruner = gp.Pruner(model, example_inputs=(x,), target_sparsity=0.5, end_step=200,
                       score=L2Score(), mask=lambda s: ChannelMask(s))
    gp.finetune(pruner.model, loader, F.cross_entropy, epochs=3, callbacks=[pruner])
    pruned = pruner.finalize()

Masks stay on while training (masked weights get no update and stay zero), so the model can be
shrunk after.  With a teacher, the loss adds the KL divergence between the softened logits
(Hinton et al.), scaled by `temperature`².
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from graphprune.errors import ArgumentError
from graphprune.ir.inputs import call_with, eval_mode

__all__ = ["finetune", "logits_of"]


def logits_of(output: Any) -> torch.Tensor:
    """The tensor a classifier's loss reads: the output itself, `.logits`, or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ArgumentError(f"finetune cannot find the logits in a {type(output).__name__}: return a tensor first")


def finetune(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    distill_from: nn.Module | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    temperature: float = 2.0,
    alpha: float = 0.5,
    penalty: Callable[[], torch.Tensor] | None = None,
    callbacks: Iterable[Any] = (),
) -> list[float]:
    """Train `model` in place with Adam; the mean loss of each epoch.  With both a task loss and a
    teacher, the loss is `(1 - alpha) * task + alpha * distillation`; `penalty()` (a regulariser:
    GroupLasso, BNScaleL1, TokenSparsity) is added every step; `callbacks` (e.g. a Pruner) are
    called at the start, after every step and epoch, and at the end."""
    if loss_fn is None and distill_from is None:
        raise ArgumentError("finetune needs a loss_fn(output, targets), a teacher (distill_from=dense_model), or both")
    if not (isinstance(epochs, int) and epochs > 0) or not lr > 0 or not temperature > 0 or not 0 <= alpha <= 1:
        raise ArgumentError("finetune needs epochs >= 1, lr > 0, temperature > 0 and 0 <= alpha <= 1")
    callbacks = list(callbacks)
    weight = 1.0 if loss_fn is None else alpha if distill_from is not None else 0.0
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    history: list[float] = []
    steps = itertools.count()
    _call(callbacks, "on_train_begin")
    model.train()
    with eval_mode(distill_from) if distill_from is not None else contextlib.nullcontext():
        for epoch in tqdm(range(epochs), desc="finetune", unit="epoch", disable=None):
            history.append(
                _epoch(model, loader, loss_fn, distill_from, opt, weight, temperature, penalty, callbacks, steps)
            )
            _call(callbacks, "on_epoch_end", epoch)
    _call(callbacks, "on_train_end")
    model.eval()
    return history


def _call(callbacks: list, hook: str, *args: int) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)


def _epoch(
    model, loader, loss_fn, teacher_model, opt, weight: float, temperature: float, penalty, callbacks, steps
) -> float:
    total, batches = 0.0, 0
    for inputs, targets in loader:
        inputs = inputs if isinstance(inputs, (tuple, dict)) else (inputs,)
        opt.zero_grad()
        output = call_with(model, inputs)
        loss = torch.zeros(())
        if loss_fn is not None:
            loss = loss + (1 - weight) * loss_fn(output, targets)
        if teacher_model is not None:
            with torch.no_grad():
                teacher = logits_of(call_with(teacher_model, inputs))
            student = logits_of(output)
            kl = F.kl_div(
                F.log_softmax(student / temperature, -1),
                F.log_softmax(teacher / temperature, -1),
                reduction="batchmean",
                log_target=True,
            )
            loss = loss + weight * kl * temperature**2
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()
        total, batches = total + float(loss.detach()), batches + 1
        _call(callbacks, "on_step_end", next(steps))
    if batches == 0:
        raise ArgumentError("finetune: the loader gave no batches")
    return total / batches
