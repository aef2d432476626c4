"""compile(): copy (unless inplace), trace, run the passes, return the rewritten module."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from graphprune.masking import deepcopy_model
from graphprune.pipeline import PassContext, Pipeline
from graphprune.trace import trace

__all__ = ["compile", "check_example_inputs"]

REPORT_ATTR = "graphprune_report"


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


def compile(
    model: nn.Module,
    passes: Sequence[Any],
    *,
    example_inputs: tuple | dict | None = None,
    inplace: bool = False,
    leaf_modules: Iterable[type] = (),
    verify_each: bool = False,
) -> fx.GraphModule:
    """Run `passes` over `model` and return a module called exactly like it.

    The caller's model is never changed unless `inplace=True`.  A module
    returned by an earlier compile() can be compiled again: masks, reports and
    the graph carry over, so passes may be split across calls.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile expects an nn.Module, got {type(model).__name__}")
    if isinstance(passes, (str, bytes)) or not isinstance(passes, Iterable):
        raise TypeError("passes must be a list of passes, e.g. [L2Score(), ChannelMask(0.5), Shrink()]")
    example_inputs = check_example_inputs(example_inputs)
    pipeline = Pipeline(list(passes), verify_each=verify_each)
    target = model if inplace else deepcopy_model(model)
    gm = trace(target, leaf_modules, example_inputs)
    ctx = PassContext(example_inputs)
    gm = pipeline.call(gm, ctx).gm
    gm.graph.lint()
    gm.recompile()
    setattr(gm, REPORT_ATTR, list(getattr(model, REPORT_ATTR, [])) + ctx.records)
    return gm
