"""Running a model on example inputs: checked once, copied before every run so the caller's
tensors never change, in eval mode and back to the mode the model was in."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

__all__ = ["check_example_inputs", "clone_inputs", "positional_inputs", "call_with", "eval_mode", "batch_of", "batched", "with_batch"]


def check_example_inputs(example_inputs: Any) -> tuple | dict:
    if example_inputs is None:
        raise ValueError(
            "example_inputs is required: a tuple of positional arguments, e.g. example_inputs=(torch.randn(1, 3, 224, 224),), "
            "or a dict of keyword arguments, e.g. example_inputs={'input_ids': ids}"
        )
    if isinstance(example_inputs, torch.Tensor):
        raise ValueError("example_inputs must be a tuple or a dict: wrap a single tensor as (x,)")
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, (tuple, dict)):
        raise ValueError(f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, got {type(example_inputs).__name__}")
    return example_inputs


def clone_inputs(inputs: Any) -> Any:
    """A copy of the example inputs, so that in-place ops in the model never change the caller's."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def positional_inputs(gm: fx.GraphModule, example_inputs: tuple | dict) -> tuple:
    """Arguments in placeholder order; keyword inputs are matched by name, defaults filled in."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.target in example_inputs:
            out.append(example_inputs[node.target])
        elif node.args:
            out.append(node.args[0])
        else:
            raise ValueError(f"example_inputs has no value for the model's argument {node.target!r}")
    return tuple(out)




def call_with(model: torch.nn.Module, inputs: tuple | dict) -> Any:
    """Call `model` on a copy of `inputs` (a tuple of positional or a dict of keyword arguments)."""
    inputs = clone_inputs(inputs)
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode for the duration (BatchNorm statistics must not move while analysing), then the
    previous mode.  A module exported with torch.export has no modes to switch: used as it is."""
    training = model.training
    try:
        model.eval()
        switched = True
    except NotImplementedError:
        switched = False
    try:
        yield model
    finally:
        if switched:
            model.train(training)


def batched(t: Any, batch: int | None) -> bool:
    """Inputs whose dim 0 is the batch (a (T, T) mask or a lookup table is not)."""
    return isinstance(t, torch.Tensor) and t.ndim > 0 and batch is not None and t.shape[0] == batch


def with_batch(inputs: tuple | dict, batch: int) -> tuple | dict:
    """Repeat (or cut) every batched tensor input to `batch` rows along dim 0."""
    current = batch_of(inputs)

    def resize(t: Any) -> Any:
        if not batched(t, current):
            return t
        reps = -(-batch // t.shape[0])
        return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch]

    return pytree.tree_map(resize, inputs)


def batch_of(inputs: tuple | dict) -> int | None:
    """The batch size: dim 0 of the first tensor input."""
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    return tensors[0].shape[0] if tensors and tensors[0].ndim else None
