"""compile(): decide on a graph, land the result on the user's own model.

The model is never touched while passes run: they work on a graph traced from
a shadow of it (`graphprune.ir.shadow`: the same tensors, module objects of its
own).  Only when every pass succeeded and the graph still runs is the result
written back onto the model (or its copy) and verified (`graphprune.writeback`).
So a failure leaves the model as it was, with or without `inplace=True`.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch.fx as fx
from torch import nn

from graphprune.analysis.dependency import Dependencies, analyze_dependencies
from graphprune.errors import (
    ArgumentError,
    GraphPruneError,
    GraphPruneWarning,
    InputError,
    PassError,
    UnsupportedOpError,
)
from graphprune.hf import express_config
from graphprune.ir.inputs import check_example_inputs, check_fits, on_meta, to_meta
from graphprune.ir.masking import attach_masks, channel_masked, detach_masks, masks_of
from graphprune.ir.norms import sync_masked_ops
from graphprune.ir.partial import UNTRACED, untraced_note
from graphprune.ir.shadow import deepcopy_model, shadow
from graphprune.ir.spill import SPILL_BYTES, Spill, return_freed_memory, tensor_bytes
from graphprune.ir.trace import ROOT_HOLDER, TRACED_BY, trace
from graphprune.ir.verify import check_runs, run_outputs
from graphprune.memo import forget, known_outputs, recall, remember
from graphprune.pipeline import PassContext, PassRecord, Pipeline
from graphprune.rules.attention import GQA_QUERY_HEADS
from graphprune.writeback import land

logger = logging.getLogger(__name__)

__all__ = ["compile", "analyze", "graph_of", "OUTPUTS"]

REPORT_ATTR = "graphprune_report"
LEAF_ATTR = "graphprune_leaf_modules"  # the leaf modules a model was traced with, used again when it is compiled again
ORIGIN_ATTR = "graphprune_origin"  # a graph result keeps the model it came from, to land a later result on
OUTPUTS = ("auto", "module", "graph")


def refuse_meta(model: nn.Module) -> None:
    """A model without weights (on the meta device) is analysed, not pruned: say so."""
    if on_meta(model):
        raise ArgumentError(
            f"model: {type(model).__name__} has tensors on the meta device (no weights) and cannot be pruned; "
            "graphprune.analyze(model, example_inputs) finds its groups, and MaskUnits applies masks chosen "
            "from them to a real instance"
        )


def compile(
    model: nn.Module,
    passes: Sequence[Any],
    *,
    example_inputs: tuple | dict | None = None,
    inplace: bool = False,
    leaf_modules: Iterable[type] = (),
    verify: bool = True,
    verify_each: bool = False,
    output: str = "auto",
) -> nn.Module:
    """Run `passes` over `model` and return the result, called exactly like `model`.

    output="auto" returns the user's own model (its class, methods and module objects) holding
    the result when that model's forward computes what the pruned graph computes (checked on the
    example inputs and another batch size), else the graph module, with the reason in the
    summary; "module" raises instead of returning a graph; "graph" always returns the graph.
    The caller's model is never changed unless `inplace=True`, and then only if everything
    succeeded.  Passes that claim to keep the outputs (Shrink, ...) are verified unless
    `verify=False`.  A model returned by an earlier compile() can be compiled again.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"compile expects an nn.Module, got {type(model).__name__}")
    if isinstance(passes, (str, bytes)) or not isinstance(passes, Iterable):
        raise ArgumentError("passes must be a list of passes, e.g. [L2Score(), ChannelMask(0.5), Shrink()]")
    if output not in OUTPUTS:
        raise ArgumentError(f"output must be one of {OUTPUTS}, got {output!r}")
    refuse_meta(model)
    example_inputs = check_example_inputs(example_inputs)
    check_fits(model, example_inputs)
    leaf_modules = tuple(dict.fromkeys((*getattr(model, LEAF_ATTR, ()), *leaf_modules)))
    passes, run = list(passes), dict(inplace=inplace, verify=verify, verify_each=verify_each, output=output)
    recall_graph = output != "graph" or isinstance(model, fx.GraphModule)  # (a graph returned is not checked)
    first = None
    try:
        result = _compile(model, passes, example_inputs, leaf_modules, recall_graph=recall_graph, **run)
    except _FailedOnRecalled as failed:
        result, first = None, failed.__cause__
        logger.debug(
            "a pass failed on the remembered graph of %s: tracing afresh", type(model).__name__, exc_info=first
        )
    if result is None:  # built on a remembered graph that did not land or that a pass failed on: trace afresh
        forget(model)
        try:
            result = _compile(model, passes, example_inputs, leaf_modules, recall_graph=False, **run)
        except GraphPruneError as exc:  # (a pass that read one-shot data the first time may fail otherwise now)
            if first is not None and str(first) != str(exc) and hasattr(exc, "add_note"):
                exc.add_note(f"on the graph remembered from an earlier compile it failed first with: {first}")
            raise
    return result


class _FailedOnRecalled(Exception):
    """A pass failed on a remembered graph (the error is the cause): compile() traces afresh."""


def _compile(
    model: nn.Module,
    passes: Sequence[Any],
    example_inputs: tuple | dict,
    leaf_modules: tuple[type, ...],
    *,
    recall_graph: bool,
    inplace: bool,
    verify: bool,
    verify_each: bool,
    output: str,
) -> nn.Module | None:
    """compile() once; None when a remembered graph was used and a pass failed on it or the result does not land."""
    source = getattr(model, ORIGIN_ATTR, None)  # the user's model, if `model` is a graph returned earlier
    work = model if inplace else deepcopy_model(model, share=(source,))
    ctx = PassContext(example_inputs, verify=verify)
    with _spilling(ctx, work if inplace else None):
        return _passes_and_landing(
            model, work, source, ctx, passes, example_inputs, leaf_modules, recall_graph, verify_each, output
        )


@contextmanager
def _spilling(ctx: PassContext, model: nn.Module | None) -> Iterator[None]:
    """A big model pruned in place never holds two copies of a weight: the tensors Shrink and
    SparseGPT replace go to disk (`graphprune.ir.spill`), mapped back into the model, which keeps
    them so if the compile fails."""
    if model is None or tensor_bytes(model) < SPILL_BYTES:
        yield
        return
    return_freed_memory()
    spill = ctx.spill = Spill()
    try:
        yield
    finally:
        spill.close()


def _passes_and_landing(
    model, work, source, ctx, passes, example_inputs, leaf_modules, recall_graph, verify_each, output
) -> nn.Module | None:
    pipeline = Pipeline(list(passes), verify_each=verify_each)
    ahead, origin = shadow(work)
    recalled, deps = (recall(model, ahead, leaf_modules, example_inputs) if recall_graph else None) or (None, None)
    gm, outputs = _trace(ahead, leaf_modules, example_inputs, recalled=recalled)
    partial = gm.meta.get(TRACED_BY) == "partial"
    if partial and output == "graph":
        raise ArgumentError(
            f"output='graph': {type(model).__name__} was traced in regions (its own forward is not traceable), and "
            "that graph computes the regions' outputs on the example inputs only; use output='auto' or 'module'"
        )
    note = untraced_note(gm) if gm.meta.get(UNTRACED) else None
    if note and all(r.details.get("note") != note for r in getattr(model, REPORT_ATTR, [])):
        ctx.records.append(PassRecord("tracing", details={"note": note, "untraced": dict(gm.meta[UNTRACED])}))
    if deps is not None:
        deps.mark_shapes(gm)
        ctx.put(deps)
    if any(masks_of(m) for m in gm.modules()):  # masks from an earlier compile: LayerNorms and means over
        sync_masked_ops(gm, ctx.get(Dependencies, gm))  # masked channels reduce over the kept ones, as they did
    elif outputs is not None:
        ctx.outputs = (0, outputs)
    if recalled is not None and (known := known_outputs(model, example_inputs)) is not None:
        ctx.outputs = (0, known)  # what the model computed when its graph was remembered: it still does
    memo = remember(model, gm, leaf_modules, example_inputs) if recalled is None and gm is not ahead else None
    try:
        gm = pipeline.call(gm, ctx).gm
    except (PassError, UnsupportedOpError) as exc:  # what a graph the model no longer computes (a change out
        if recalled is None:  # of the key's sight) can make a pass meet: believe it from a fresh trace only
            raise
        raise _FailedOnRecalled() from exc
    if memo is not None:  # the analysis of the graph as traced, if a pass made it before changing the graph
        memo.dependencies = ctx.initial.get(Dependencies)
    gm.graph.lint()
    gm.recompile()
    if ctx.version != ctx.checked_version or ctx.outputs is None or ctx.outputs[0] != ctx.version:
        ctx.outputs = (ctx.version, check_runs(ctx.records[-1].name if ctx.records else "tracing", gm, example_inputs))
    records = list(getattr(model, REPORT_ATTR, [])) + ctx.records
    _warn_masks_after_shrink(ctx.records, gm)
    gm.__dict__[REPORT_ATTR], gm.__dict__[LEAF_ATTR] = records, leaf_modules
    gm.__dict__[ORIGIN_ATTR] = source if source is not None else work  # (plain attribute, not a submodule)
    if output == "graph":
        remember(gm, gm, leaf_modules, example_inputs, ctx.cached(Dependencies))
        return gm
    if source is not None:  # a graph compiled again: its result lands on a copy of the model it came from
        landing = land(deepcopy_model(source), gm, {}, example_inputs, ctx.outputs[1])
    else:
        landing = land(work, gm, origin, example_inputs, ctx.outputs[1])
    if landing.model is None:
        if recalled is not None and landing.compared:  # perhaps the forward changed since it was traced
            return None
        if output == "module" or partial:  # (a graph of regions is no model to return)
            raise GraphPruneError(
                f"the result cannot be written back into {type(source or model).__name__}: {landing.reason}"
            )
        records.append(PassRecord("write-back", details={"note": f"returned as a graph module: {landing.reason}"}))
        logger.info("returning the graph module: %s", landing.reason)
        remember(gm, gm, leaf_modules, example_inputs, ctx.cached(Dependencies))
        return gm
    del gm.__dict__[ORIGIN_ATTR]
    if not any(masks_of(m) for m in landing.model.modules()):
        gm.meta.pop(GQA_QUERY_HEADS, None)  # (a choice the next compile keeps only to shrink masks it made)
        reason = express_config(landing.model)  # Hugging Face: sizes into the config, or save_pretrained refused
        if reason is not None:
            records.append(PassRecord("write-back", details={"note": f"{reason}: save with graphprune.save"}))
    landing.model.__dict__[REPORT_ATTR], landing.model.__dict__[LEAF_ATTR] = records, leaf_modules
    remember(landing.model, gm, leaf_modules, example_inputs, ctx.cached(Dependencies), ctx.outputs[1])
    return landing.model


def graph_of(
    model: nn.Module, example_inputs: tuple | dict, leaf_modules: Iterable[type] = (), dynamic: bool = True
) -> fx.GraphModule:
    """The graph compile() would work on (the leaf modules the model was compiled with included),
    traced from a shadow: `model` is not changed.  `dynamic=False` exports at the example shapes only."""
    leaf_modules = tuple(dict.fromkeys((*getattr(model, LEAF_ATTR, ()), *leaf_modules)))
    example_inputs, ahead = check_example_inputs(example_inputs), shadow(model)[0]
    recalled = recall(model, ahead, leaf_modules, example_inputs) if dynamic else None  # (compile() remembers)
    return _trace(ahead, leaf_modules, example_inputs, dynamic, recalled=recalled[0] if recalled else None)[0]


def analyze(model: nn.Module, example_inputs: tuple | dict, leaf_modules: Iterable[type] = ()) -> Dependencies:
    """The channel groups of `model` (which channels must go together, and what is frozen and why),
    without changing it.

    Needs no weights: a model built on the meta device (`with torch.device("meta"): model = ...`) is
    analysed on meta tensors, with no memory for weights and no compute, and has the groups of the
    real model; their masks apply to a real instance loaded separately (`MaskUnits`)."""
    example_inputs = check_example_inputs(example_inputs)
    check_fits(model, example_inputs)
    if on_meta(model):
        example_inputs = to_meta(example_inputs)
    return analyze_dependencies(graph_of(model, example_inputs, leaf_modules, dynamic=False), example_inputs)


def _trace(
    ahead: nn.Module,
    leaf_modules: Iterable[type],
    example_inputs: tuple | dict,
    dynamic: bool = True,
    recalled: fx.GraphModule | None = None,
) -> tuple[fx.GraphModule, Any]:
    """The graph of the shadow, traced from its plain tensors (or `recalled`: remembered from an
    earlier compile, built over them) with its masks put back on after, and its outputs on the
    example inputs (None for a recalled graph: it ran on inputs of these shapes when traced)."""
    masks = detach_masks(ahead)
    gm = recalled
    if gm is None:
        try:
            gm = trace(ahead, leaf_modules, example_inputs, dynamic)
        except GraphPruneError:
            _check_runs_eagerly(ahead, example_inputs, masks)
            raise
    holder = getattr(gm, ROOT_HOLDER, None)
    rename = {"": ROOT_HOLDER} if holder is not None and gm is not ahead else {}
    attach_masks(gm, masks, rename)
    if recalled is not None:
        return gm, None
    try:
        return gm, run_outputs(gm, example_inputs)
    except Exception as exc:
        raise InputError(
            f"{type(ahead).__name__} does not run on example_inputs: {type(exc).__name__}: {str(exc).strip()[:400]}"
        ) from exc


def _check_runs_eagerly(model: nn.Module, example_inputs: tuple | dict, masks) -> None:
    """When tracing fails, a model that does not run on the inputs at all is the clearer error."""
    attach_masks(model, masks)
    try:
        run_outputs(model, example_inputs)
    except Exception as exc:
        raise InputError(
            f"{type(model).__name__} does not run on example_inputs: {type(exc).__name__}: {str(exc).strip()[:400]}"
        ) from exc


def _warn_masks_after_shrink(records: list[PassRecord], gm: nn.Module) -> None:
    """[Shrink(), L2Score(), ChannelMask(...)] leaves a masked model: say so, it is not what was meant."""
    names = [r.name for r in records]
    if "Shrink" not in names or not any(channel_masked(m) for m in gm.modules()):
        return
    last_shrink = len(names) - 1 - names[::-1].index("Shrink")
    later = [r.name for r in records[last_shrink + 1 :] if r.modified]
    if later:
        warnings.warn(
            f"Shrink ran before {later}: the result is masked, not shrunk (masked channels are still stored "
            "and computed); put Shrink() after the mask passes",
            GraphPruneWarning,
            stacklevel=3,
        )
