"""Turning a model into a torch.fx graph, or saying exactly why it can't be."""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import warnings
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from graphprune.errors import ArgumentError, TraceError
from graphprune.ir.inputs import batch_of, batched, call_with, with_batch
from graphprune.ir.partial import UNTRACED, trace_regions, untraced_why
from graphprune.ir.tracer import Tracer, broke_in, user_frame

logger = logging.getLogger(__name__)

__all__ = ["trace", "no_cache", "TRACE_LOCK", "TRACED_BY"]

# torch.fx patches nn.Module.__call__ while it traces, and torch.export patches more: two traces
# at once in two threads would leave them patched for good.  One trace at a time per process.
TRACE_LOCK = threading.RLock()
TRACED_BY = "graphprune_traced_by"  # gm.meta key: "fx", "export" or "export-static"


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


def _runs(gm: fx.GraphModule, example_inputs: tuple | dict) -> bool:
    try:
        with torch.no_grad():
            call_with(gm, example_inputs)
        return True
    except Exception as exc:
        logger.info("the exported graph does not run on the example inputs: %s", exc)
        return False


@contextlib.contextmanager
def no_cache(model: nn.Module):
    """Hugging Face models return their key/value cache when `config.use_cache` is on (the default of
    most decoders), which torch.export cannot put in a graph's outputs: off while exporting."""
    configs = {
        id(c): c
        for m in model.modules()
        if (c := getattr(m, "config", None)) is not None and getattr(c, "use_cache", False)
    }
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


def _dynamic_dims(t: torch.Tensor, batch: int | None) -> dict | None:
    """Dims that stay dynamic in an exported graph: the batch, and the sequence length of integer
    (token id, mask) inputs.  Image sizes stay static: symbolic reasoning over window partitions
    (Swin) takes minutes, and a pruned model runs at the size it was pruned at anyway."""
    if not batched(t, batch):
        return None
    dims = {0: torch.export.Dim.AUTO}
    if t.ndim == 2 and not t.is_floating_point():
        dims[1] = torch.export.Dim.AUTO
    return dims


def _export(model: nn.Module, example_inputs: tuple | dict, dynamic: bool = True) -> tuple[fx.GraphModule | None, str]:
    """torch.export's (ATen-level) graph, for models symbolic tracing cannot follow (Hugging Face
    transformers): the batch and sequence length stay dynamic where torch.export can keep them so.
    When the dynamic graph does not run on the example inputs themselves (a size torch.export
    specialised), or `dynamic` is false (an analysis only, at twice the speed), the shapes are
    static.  Returns the graph (None when export fails) and what went wrong."""
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, tuple) else ((), dict(example_inputs))
    with no_cache(model):
        if dynamic:
            gm, failure = _export_dynamic(model, example_inputs)
            if gm is not None:
                return gm, ""
            if _data_dependent(failure):  # a branch on tensor values: static shapes cannot help
                return None, _first_line(failure)
        try:  # the shapes of the example inputs, and only those
            gm = torch.export.export(model, args, kwargs, strict=False).module()
            gm.meta[TRACED_BY] = "export-static"
            if dynamic:
                logger.warning(
                    "%s was exported with static shapes: the pruned graph runs on inputs shaped like the "
                    "example inputs only",
                    type(model).__name__,
                )
            return gm, ""
        except Exception as exc:
            logger.info("torch.export failed: %s", exc)
            return None, _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _data_dependent(exc: BaseException | None) -> bool:
    """torch.export met Python control flow on tensor values (`if x.sum() > 0`, NMS output sizes)."""
    return exc is not None and ("DataDependent" in type(exc).__name__ or "data-dependent" in str(exc))


def _export_dynamic(model: nn.Module, example_inputs: tuple | dict) -> tuple[fx.GraphModule | None, Exception | None]:
    """The export with a dynamic batch and sequence length, if it runs on the example inputs
    themselves; else None, and the exception torch.export raised if it did."""
    try:
        traced = (
            with_batch(example_inputs, 2) if batch_of(example_inputs) == 1 else example_inputs
        )  # batch 1 would specialise
        t_args, t_kwargs = (traced, {}) if isinstance(traced, tuple) else ((), dict(traced))
        batch = batch_of(traced)
        shapes = pytree.tree_map(
            lambda t: _dynamic_dims(t, batch) if isinstance(t, torch.Tensor) else None,
            t_args if t_args else t_kwargs,
        )
        gm = torch.export.export(model, t_args, t_kwargs, dynamic_shapes=shapes, strict=False).module()
    except Exception as exc:
        logger.info("torch.export with dynamic shapes failed: %s", exc)
        return None, exc
    if not _runs(gm, example_inputs):
        return None, None
    gm.meta[TRACED_BY] = "export"
    return gm, None


# Ops whose behaviour depends on the mode: torch.export records the mode it ran in as a constant.
_MODE_ARGS = {
    torch.ops.aten.dropout.default: 2,
    torch.ops.aten.feature_dropout.default: 2,
    torch.ops.aten.alpha_dropout.default: 2,
    torch.ops.aten.feature_alpha_dropout.default: 2,
    torch.ops.aten.batch_norm.default: 5,
}


def _switchable_modes(gm: fx.GraphModule) -> None:
    """Give an exported module working train()/eval(): the ops that depend on the mode (dropout,
    batch norm) read the module's `training` flag instead of the constant recorded at export."""
    mode = None
    for node in list(gm.graph.nodes):
        pos = _MODE_ARGS.get(node.target) if node.op == "call_function" else None
        if pos is None or len(node.args) <= pos or not isinstance(node.args[pos], bool):
            continue
        if mode is None:
            with (
                gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder")),
                warnings.catch_warnings(),
            ):
                warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
                mode = gm.graph.get_attr("training")
        node.args = (*node.args[:pos], mode, *node.args[pos + 1 :])
    for name in ("train", "eval"):  # torch.export's module refuses both; nn.Module's own ones work now
        gm.__dict__.pop(name, None)
    gm.recompile()


def _reads_where_used(gm: fx.GraphModule) -> None:
    """torch.export reads every weight at the top of the graph; each read moves to just before the
    op that first uses it.  A masked weight is computed when it is read, so read all at the top,
    the masked copies of every weight would be alive at once (twice an LLM's size)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.users]:
        min(node.users, key=order.__getitem__).prepend(node)
    gm.recompile()


def _with_full_tree(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Make the graph module hold the model's own submodules (not the plain stand-ins fx builds for
    the path to each one used), so a qualified name means the same module in both."""
    for name, child in model.named_children():
        setattr(gm, name, child)
    return gm


def trace(
    model: nn.Module,
    leaf_modules: Iterable[type] = (),
    example_inputs: tuple | dict | None = None,
    dynamic: bool = True,
) -> fx.GraphModule:
    """symbolic_trace with extra leaf module types; a GraphModule is used as it is.

    Optional arguments that `example_inputs` does not give are traced at their defaults.  When
    symbolic tracing fails and example inputs are given, torch.export (non-strict) is tried, with
    the batch and sequence length dynamic unless `dynamic` is false.
    """
    if isinstance(model, fx.GraphModule):
        _hoist_root_tensors(model)
        return model
    leaf = tuple(leaf_modules)
    for t in leaf:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise ArgumentError(f"leaf_modules must hold nn.Module classes, got {t!r}")
    tracer = Tracer(leaf)
    with TRACE_LOCK:
        try:
            graph = tracer.trace(model, concrete_args=_concrete_args(model, example_inputs))
        except Exception as exc:
            exported, why = (
                _export(model, example_inputs, dynamic) if example_inputs is not None else (None, "no example inputs")
            )
            if exported is not None:
                logger.info("symbolic tracing failed (%s); using torch.export's graph", exc)
                _hoist_root_tensors(exported)
                _reads_where_used(exported)
                _switchable_modes(exported)
                exported.train(model.training)
                return exported
            if example_inputs is None:
                raise _trace_error(model, exc, why) from exc
            try:
                gm = _trace_in_parts(model, leaf, example_inputs, exc)
            except Exception as parts:
                logger.debug("tracing in parts failed", exc_info=True)
                raise _trace_error(model, exc, why, parts) from exc
            _hoist_root_tensors(gm)
            return gm
    gm = _graph_module(tracer, graph, model)
    _hoist_root_tensors(gm)
    return gm


def _graph_module(tracer: Tracer, graph: fx.Graph, model: nn.Module) -> fx.GraphModule:
    """The graph symbolic tracing made, holding the model's own submodules."""
    gm = _with_full_tree(fx.GraphModule(tracer.root, graph, class_name=type(model).__name__), model)
    gm.meta[TRACED_BY] = "fx"
    return gm


def _trace_in_parts(
    model: nn.Module, leaf: tuple[type, ...], example_inputs: tuple | dict, exc: Exception
) -> fx.GraphModule:
    """What is left when neither torch.fx nor torch.export can trace the whole model: the modules
    whose forward breaks tracing stay calls (untraced leaves) while the rest is traced; when the
    model's own forward breaks it, the graph is built from the traceable calls it makes
    (graphprune.ir.partial)."""
    untraced: dict[str, str] = {}
    concrete = _concrete_args(model, example_inputs)
    while (where := broke_in(exc)) and where not in untraced:
        untraced[where] = untraced_why(exc)
        tracer = Tracer(leaf, untraced)
        try:
            graph = tracer.trace(model, concrete_args=concrete)
        except Exception as again:
            exc = again
            continue
        gm = _graph_module(tracer, graph, model)
        gm.meta[UNTRACED] = untraced
        return gm
    untraced[""] = f"own code not traced: {untraced_why(exc)}"
    gm = trace_regions(model, leaf, example_inputs, untraced)
    gm.meta[TRACED_BY] = "partial"
    return gm


def _trace_error(model: nn.Module, exc: Exception, export_error: str, parts: Exception | None = None) -> TraceError:
    path, cls = getattr(exc, "_graphprune_module", ("", type(model).__name__))
    head = (
        f"could not trace {type(model).__name__} to a graph: torch.fx failed with {type(exc).__name__}: {exc}\n"
        f"  it broke at {user_frame(exc)}"
    )
    if path:
        advice = (
            f" inside module '{path}' ({cls}).\n  Python control flow that depends on tensor values cannot be "
            f"traced. Mark the module that contains it as a leaf: graphprune.compile(..., leaf_modules=[{cls}]). "
            "Its channels are then kept (register a rule with graphprune.register_rule to prune through it)."
        )
    else:
        advice = (
            f" in {cls}.forward itself, which leaf_modules cannot isolate (it is the model).\n  Move the "
            "data-dependent part into a submodule and mark that submodule's class as a leaf "
            "(graphprune.compile(..., leaf_modules=[ThatClass])), or prune the traceable part on its own "
            "(e.g. model.backbone)."
        )
    also = f"\n  tracing it in parts failed too: {type(parts).__name__}: {parts}" if parts is not None else ""
    return TraceError(head + advice + f"\n  torch.export failed too: {export_error}" + also)


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
