"""Reductions and softmax: fine over spatial dims, frozen over pruned channels.

A mean (or softmax) over channels changes when channels are removed, so
those channels are frozen rather than pruned approximately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.labels import varies_along
from graphprune.rules.base import OpCall, Rule, map_tensors, register_rule
from graphprune.rules.pointwise import Elementwise, Unary
from graphprune.rules.shape import dim_arg

__all__ = ["Reduce", "Softmax"]


def _dims(dim, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        return [dim % ndim]
    return sorted(d % ndim for d in dim)


class Reduce(Rule):
    def propagate(self, call: OpCall):
        if len(call.args) > 1 and isinstance(call.args[1], torch.Tensor):  # torch.max(a, b)
            return Elementwise().propagate(call)
        x = call.input(0)
        dims = _dims(dim_arg(call, 0, "dim", None), x.ndim)
        keepdim = bool(dim_arg(call, 1, "keepdim", False))
        if any(varies_along(x, d) for d in dims):
            call.space.freeze(x, call.site("reduction", f"{getattr(call.node.target, '__name__', call.node.target)} over pruned channels", source=call.node.args[0].name))
            return call.out_none()
        res = x
        for d in reversed(dims):
            res = res.narrow(d, 0, 1) if keepdim else res.select(d, 0)
        return map_tensors(call.out, lambda t: res.expand(t.shape))


class Softmax(Rule):
    def __init__(self, pos: int = 0) -> None:
        self.pos = pos

    def propagate(self, call: OpCall):
        x = call.input(0)
        dim = call.module.dim if call.module is not None else dim_arg(call, self.pos, "dim", None)
        if dim is None or varies_along(x, dim % x.ndim):
            call.space.freeze(x, call.site("reduction", "softmax over pruned channels", source=call.node.args[0].name))
            return call.out_none()
        return Unary().propagate(call)


_reduce = Reduce()
for _t in [torch.mean, "mean", torch.sum, "sum", torch.amax, "amax", torch.amin, "amin",
           torch.std, "std", torch.var, "var", torch.logsumexp, "logsumexp", torch.max, "max", torch.min, "min"]:
    register_rule(_t, _reduce)
for _t in [F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax",
           nn.Softmax, nn.LogSoftmax, nn.Softmin]:
    register_rule(_t, Softmax())
