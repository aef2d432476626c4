"""Turning a model into a torch.fx graph, or saying exactly why it can't be."""

from __future__ import annotations

import inspect
import logging
import traceback
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from graphprune.errors import TraceError
from graphprune.inputs import batch_of, batched, with_batch

logger = logging.getLogger(__name__)

__all__ = ["trace"]


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_modules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if type(m).__module__.startswith("graphprune."):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_graphprune_module"):
                try:
                    exc._graphprune_module = (self.path_of_module(m), type(m).__name__)
                except Exception:
                    pass
            raise


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the traceback that is not inside torch (the construct that broke)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/graphprune/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}: {frame.line}"
    return "unknown location"


def _concrete_args(model: nn.Module, example_inputs: tuple | dict | None) -> dict | None:
    """Arguments the example inputs leave out are fixed to their defaults (`if mask is None:` then traces)."""
    if example_inputs is None:
        return None
    given = set(example_inputs) if isinstance(example_inputs, dict) else None
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        missing = p.name not in given if given is not None else i >= len(example_inputs)
        if missing:
            concrete[p.name] = p.default
    return concrete or None


def _export(model: nn.Module, example_inputs: tuple | dict) -> fx.GraphModule | None:
    """torch.export's (ATen-level) graph, for models symbolic tracing cannot follow (Hugging Face
    transformers): the dims of batched inputs stay dynamic where torch.export can keep them so
    (batch, sequence length), the others are specialised; the module cannot switch modes."""
    if batch_of(example_inputs) == 1:  # torch.export would specialise a batch of 1 for good
        example_inputs = with_batch(example_inputs, 2)
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, tuple) else ((), dict(example_inputs))
    batch = batch_of(example_inputs)

    def dims(t):  # batched inputs stay dynamic in every dim where torch.export can keep them so
        return {d: torch.export.Dim.AUTO for d in range(t.ndim)} if batched(t, batch) else None

    dynamic = tuple(dims(a) for a in args) if args else {k: dims(v) for k, v in kwargs.items()}
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False).module()
    except Exception as exc:
        logger.info("torch.export failed too: %s", exc)
        return None


def trace(model: nn.Module, leaf_modules: Iterable[type] = (), example_inputs: tuple | dict | None = None) -> fx.GraphModule:
    """symbolic_trace with extra leaf module types; a GraphModule is used as it is.

    Optional arguments that `example_inputs` does not give are traced at their defaults.  When
    symbolic tracing fails and example inputs are given, torch.export (non-strict) is tried.
    """
    if isinstance(model, fx.GraphModule):
        _hoist_root_tensors(model)
        return model
    leaf = tuple(leaf_modules)
    for t in leaf:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"leaf_modules must hold nn.Module classes, got {t!r}")
    tracer = _Tracer(leaf)
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model, example_inputs))
    except Exception as exc:
        exported = _export(model, example_inputs) if example_inputs is not None else None
        if exported is not None:
            logger.info("symbolic tracing failed (%s); using torch.export's graph", exc)
            _hoist_root_tensors(exported)
            return exported
        path, cls = getattr(exc, "_graphprune_module", ("", type(model).__name__))
        inside = f" inside module '{path}' ({cls})" if path else f" in {cls}.forward"
        raise TraceError(
            f"could not trace {type(model).__name__} to a torch.fx graph: {type(exc).__name__}: {exc}\n"
            f"  it broke at {_user_frame(exc)}{inside}.\n"
            f"  Python control flow that depends on tensor values cannot be traced. Mark the module that "
            f"contains it as a leaf: graphprune.compile(..., leaf_modules=[{cls}]). Its channels are then kept "
            f"(register a rule with graphprune.register_rule to prune through it)."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    _hoist_root_tensors(gm)
    return gm


ROOT_HOLDER = "graphprune_root"


def root_holder(gm: fx.GraphModule) -> nn.Module:
    """The child module that holds the tensors graphprune keeps for the graph's root (made once)."""
    holder = getattr(gm, ROOT_HOLDER, None)
    if holder is None:
        holder = nn.Module()
        gm.add_submodule(ROOT_HOLDER, holder)
    return holder


def _hoist_root_tensors(gm: fx.GraphModule) -> None:
    """Move tensors the graph reads straight off the root into a child module.

    A mask is a parametrization, which swaps the owner's class; on the root
    GraphModule that class would be lost by GraphModule's own deepcopy.
    """
    nodes = [n for n in gm.graph.nodes if n.op == "get_attr" and "." not in n.target]
    if not nodes:
        return
    holder = root_holder(gm)
    for n in nodes:
        t = getattr(gm, n.target)
        if isinstance(t, nn.Parameter):
            holder.register_parameter(n.target, t)
        elif isinstance(t, torch.Tensor):
            holder.register_buffer(n.target, t)
        else:
            continue
        delattr(gm, n.target)
        n.target = f"{ROOT_HOLDER}.{n.target}"
    gm.recompile()
