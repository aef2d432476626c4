"""GQAQueryHeads: under grouped-query attention, prune query heads within their kv groups.

By default a kv group is one unit under grouped-query attention (Llama 3, Qwen 2.5, Mistral): its
k and v heads and the query heads that read them go together.  After this pass, the analysis
of the graph keeps every kv head and makes the query heads the units instead, the same number
from every kv group (`repeat_kv` repeats each kv head R times, and R must stay one number):
unit j is the j-th query head of every group.  A ChannelMask that follows prunes them like any
heads (`ChannelMask({"head": 0.25})` takes one of every four query heads of each group), and
Shrink removes their rows of the q projection and columns of the output projection and writes
the new repeat count into the graph (and into the model's `num_key_value_groups` and
`config.num_attention_heads`, both checked on the example inputs by the write-back).

    gp.compile(model, [GQAQueryHeads(), WandaScore(calib, structured=True), ChannelMask({"head": 0.25}), Shrink()], ...)

Whole kv groups and query heads within them are two passes over the model, not one: prune the
groups in one compile (without this pass), then the query heads in another.  Attention that
repeats its kv heads some other way (or not at all: `scaled_dot_product_attention(...,
enable_gqa=True)`) has its heads frozen, with the reason.  The choice holds for every later pass
of the compile, and for the next compile of the model it returns (Shrink in a second call).
"""

from __future__ import annotations

import torch.fx as fx

from graphprune.pipeline import PassBase, PassContext, PassResult
from graphprune.rules.attention import GQA_QUERY_HEADS

__all__ = ["GQAQueryHeads"]


class GQAQueryHeads(PassBase):
    """The channel analysis from here on makes query heads within kv groups the units (see module)."""

    plan_op = "gqa_query_heads"

    @classmethod
    def from_plan(cls, step: dict) -> GQAQueryHeads:
        return cls()

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if gm.meta.get(GQA_QUERY_HEADS):
            return PassResult(gm, False)
        gm.meta[GQA_QUERY_HEADS] = True
        ctx.record(plan={"op": self.plan_op}, note="query heads within kv groups are the units of attention")
        # another analysis of the same graph: nothing computed before this pass holds
        return PassResult(gm, True, preserved=frozenset())
