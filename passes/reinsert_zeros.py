"""ReinsertZeros: let channels that reach a model output (or an op with no rule) be pruned,
keeping the width there by scattering the kept channels back into zeros.

Place it before the score and mask passes; it inserts a `ZeroReinsert`
module in front of each such consumer.
"""

from __future__ import annotations

import torch.fx as fx

from graphprune.analysis import Dependencies
from graphprune.ir.modules import ZeroReinsert
from graphprune.pipeline import PassBase, PassContext, PassResult

__all__ = ["ReinsertZeros"]

KINDS = ("output", "no_rule")


class ReinsertZeros(PassBase):
    keeps_outputs = True
    plan_op = "reinsert_zeros"

    def __init__(self, outputs: bool = True, unsupported_ops: bool = True) -> None:
        self.outputs, self.unsupported_ops = outputs, unsupported_ops

    @classmethod
    def from_plan(cls, step: dict) -> ReinsertZeros:
        return cls(outputs=step["outputs"], unsupported_ops=step["unsupported_ops"])

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        deps = ctx.get(Dependencies, gm)
        kinds = {k for k, on in zip(KINDS, (self.outputs, self.unsupported_ops)) if on}
        nodes = {n.name: n for n in gm.graph.nodes}
        inserted = []
        for frozen in deps.frozen:
            site = frozen.site
            if site.kind not in kinds or site.source is None or site.dim is None:
                continue
            src, consumer = nodes.get(site.source), nodes.get(site.node)
            if src is None or consumer is None or src not in consumer.all_input_nodes:
                continue
            if src.op == "call_module" and isinstance(gm.get_submodule(src.target), ZeroReinsert):
                continue
            width = src.meta["graphprune_shape"][site.dim]
            name = f"graphprune_reinsert_{len(inserted)}"
            while hasattr(gm, name):
                name += "_"
            gm.add_submodule(name, ZeroReinsert(width, site.dim))
            with gm.graph.inserting_after(src):
                new = gm.graph.call_module(name, (src,))
            consumer.replace_input_with(src, new)
            inserted.append(f"{site.source} -> {site.node}")
        ctx.record(
            inserted=inserted,
            plan={"op": "reinsert_zeros", "outputs": self.outputs, "unsupported_ops": self.unsupported_ops},
        )
        return PassResult(gm, bool(inserted))
