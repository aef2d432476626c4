"""Running a model on example inputs: checked once, copied before every run so the caller's
tensors never change, in eval mode and back to the mode the model was in."""

from __future__ import annotations

import contextlib
import inspect
import itertools
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphprune.errors import ArgumentError, InputError

__all__ = [
    "check_example_inputs",
    "check_fits",
    "calibration_batches",
    "clone_inputs",
    "on_meta",
    "to_meta",
    "positional_inputs",
    "call_with",
    "eval_mode",
    "batch_of",
    "batched",
    "with_batch",
]


def check_example_inputs(example_inputs: Any) -> tuple | dict:
    if example_inputs is None:
        raise ArgumentError(
            "example_inputs is required: a tuple of positional arguments, e.g. example_inputs=(torch.randn(1, 3, 224, 224),), "
            "or a dict of keyword arguments, e.g. example_inputs={'input_ids': ids}"
        )
    if isinstance(example_inputs, torch.Tensor):
        raise ArgumentError("example_inputs must be a tuple or a dict: wrap a single tensor as (x,)")
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, (tuple, dict)):
        raise ArgumentError(
            f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, got {type(example_inputs).__name__}"
        )
    return example_inputs


def check_fits(model: torch.nn.Module, inputs: tuple | dict, what: str = "example_inputs") -> None:
    """The inputs bind to the model's forward signature (right number of arguments, known names)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a readable signature: nothing to check
        return
    try:
        signature.bind(**inputs) if isinstance(inputs, dict) else signature.bind(*inputs)
    except TypeError as exc:
        names = [p for p in signature.parameters]
        raise InputError(
            f"{what} do not fit {type(model).__name__}.forward{signature}: {exc} (its arguments are {names})"
        ) from None


def _as_batch(item: Any, who: str, i: int) -> tuple[tuple | dict, Any]:
    """(inputs, targets) from one item of a calibration iterable, as a DataLoader yields them."""
    if isinstance(item, torch.Tensor):
        return (item,), None
    if isinstance(item, dict):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) in (1, 2):
        x, y = item[0], item[1] if len(item) == 2 else None
        if isinstance(x, torch.Tensor):
            return (x,), y
        if isinstance(x, (tuple, list)):
            return tuple(x), y
        if isinstance(x, dict):
            return x, y
    raise ArgumentError(
        f"{who}: calibration item {i} is a {type(item).__name__}; give what a DataLoader yields: "
        "x, (x, y) or [x, y], with x a tensor, a tuple of tensors or a dict of keyword inputs"
    )


def calibration_batches(calibration: Iterable | None, who: str) -> list[tuple[tuple | dict, Any]]:
    """Calibration data as a list of (inputs, targets), checked: items may be what a DataLoader yields."""
    if calibration is None:
        raise ArgumentError(
            f"{who} is data-driven: pass calibration=... (a DataLoader, or a list of x or (x, y) "
            "batches, with x shaped like example_inputs)"
        )
    if isinstance(calibration, (torch.Tensor, dict)) or not isinstance(calibration, Iterable):
        raise ArgumentError(
            f"{who}: calibration must be an iterable of batches (e.g. a DataLoader or a list), "
            f"got {type(calibration).__name__}"
        )
    batches = [_as_batch(item, who, i) for i, item in enumerate(calibration)]
    if not batches:
        raise ArgumentError(f"{who}: calibration holds no batches")
    for i, (inputs, _) in enumerate(batches):
        for t in pytree.tree_leaves(inputs):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InputError(f"{who}: calibration batch {i} holds NaN or inf values")
    return batches


def clone_inputs(inputs: Any) -> Any:
    """A copy of the example inputs, so that in-place ops in the model never change the caller's."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def on_meta(model: torch.nn.Module) -> bool:
    """The model was built without weights (`with torch.device("meta"): ...`)."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def to_meta(inputs: Any) -> Any:
    """Floating-point inputs as meta tensors (a meta model computes nothing); integer inputs (token ids,
    masks) stay real, as code may read their values."""
    return pytree.tree_map(
        lambda t: t.to("meta") if isinstance(t, torch.Tensor) and t.is_floating_point() else t, inputs
    )


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
            raise InputError(f"example_inputs has no value for the model's argument {node.target!r}")
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


def with_shorter_sequences(inputs: tuple | dict, by: int | None = None) -> tuple | dict:
    """The inputs with their sequences (dim 1 of batched inputs of two or more dims) `by` tokens
    shorter (a quarter of them when None); sequences that would keep fewer than two stay."""
    current = batch_of(inputs)

    def cut(t: Any) -> Any:
        if not batched(t, current) or t.ndim < 2:
            return t
        drop = t.shape[1] // 4 if by is None else by
        return t[:, : t.shape[1] - drop] if drop > 0 and t.shape[1] - drop >= 2 else t

    return pytree.tree_map(cut, inputs)


def batch_of(inputs: tuple | dict) -> int | None:
    """The batch size: dim 0 of the first tensor input."""
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    return tensors[0].shape[0] if tensors and tensors[0].ndim else None
