"""The rule of the zero-reinsertion module: its input may shrink, its output keeps its width."""

from __future__ import annotations

from graphprune.ir.labels import none_like
from graphprune.ir.modules import ZeroReinsert
from graphprune.rules.base import OpCall, Rule


class ZeroReinsertRule(Rule):
    def propagate(self, call: OpCall):
        per = call.along(call.input(0), call.module.dim)
        call.space.add_slot(call.param("keep"), 0, per, consumer=True)
        return none_like(call.out.shape)


RULES = [((ZeroReinsert,), ZeroReinsertRule())]
