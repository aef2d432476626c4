"""compile(): copy (unless inplace), trace, run the passes, return the rewritten module."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch.fx as fx
from torch import nn

from graphprune.inputs import check_example_inputs
from graphprune.masking import deepcopy_model
from graphprune.pipeline import PassContext, Pipeline
from graphprune.trace import trace

__all__ = ["compile"]

REPORT_ATTR = "graphprune_report"


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
