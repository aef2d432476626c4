"""Reductions and softmax: fine over spatial dims.  Over pruned channels, a mean or a sum
is rewritten once masked to reduce over the kept channels (exact); anything else (softmax,
max, var, ...) freezes them rather than pruning approximately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.ir.labels import varies_along
from graphprune.ir.norms import masked_reduce
from graphprune.rules.base import OpCall, Rule, aten, map_tensors, overloads
from graphprune.rules.pointwise import Elementwise, Unary
from graphprune.rules.shape import dim_arg

__all__ = ["Reduce", "Norm", "Softmax", "RULES"]


def _dims(dim, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        return [dim % ndim]
    return sorted(d % ndim for d in dim)


class Reduce(Rule):
    """A reduction over dims that carry no channels passes the channels through.  A mean or sum
    over the one dim that carries them is recorded (`reduce_labels`): once some of those channels
    are masked it is rewritten to reduce over the kept ones only (graphprune.ir.norms), which is what
    the shrunk model computes; RMSNorm's mean of squares prunes this way.  Other reductions over
    channels (max, var, several dims, a dtype) freeze them."""

    def __init__(self, maskable: bool = False) -> None:
        self.maskable = maskable

    def propagate(self, call: OpCall):
        masked = call.node.target is masked_reduce
        if not masked and len(call.args) > 1 and isinstance(call.args[1], torch.Tensor):  # torch.max(a, b)
            return Elementwise().propagate(call)
        x = call.input(0)
        dims = [call.args[2] % x.ndim] if masked else _dims(dim_arg(call, 0, "dim", None), x.ndim)
        keepdim = bool(call.args[3]) if masked else bool(dim_arg(call, 1, "keepdim", False))
        if any(varies_along(x, d) for d in dims):
            labeled = [d for d in range(x.ndim) if varies_along(x, d)]
            if (self.maskable or masked) and len(dims) == 1 and labeled == dims and "dtype" not in call.kwargs:
                call.extra["reduce_labels"] = (dims[0], call.along(x, dims[0]))
                return call.out_none()
            call.space.freeze(
                x,
                call.site(
                    "reduction",
                    f"{getattr(call.node.target, '__name__', call.node.target)} over pruned channels",
                    source=call.node.args[0].name,
                ),
            )
            return call.out_none()
        res = x
        for d in reversed(dims):
            res = res.narrow(d, 0, 1) if keepdim else res.select(d, 0)
        return map_tensors(call.out, lambda t: res.expand(t.shape))


class Norm(Rule):
    """p-norms (p > 0, inf included) and `F.normalize`: a masked channel is zero and adds nothing
    to a norm, so the channels a norm runs over drop out of its result and a normalised tensor keeps
    its channels, exactly as after Shrink (SSD's L2Norm, normalised embeddings).  A norm with
    p <= 0 counts zeros, and one over some labelled dims but not others is not followed: both
    freeze the channels."""

    def __init__(self, p_at: int, p_name: str, dim_at: int, keepdim_at: int | None) -> None:
        self.p_at, self.p_name, self.dim_at, self.keepdim_at = p_at, p_name, dim_at, keepdim_at

    def propagate(self, call: OpCall):
        x = call.input(0)
        p = dim_arg(call, self.p_at - 1, self.p_name, 2.0)  # dim_arg counts the arguments after x
        p = 2.0 if p in ("fro", None) else p  # torch.norm's Frobenius norm is the 2-norm of the elements
        dims = _dims(dim_arg(call, self.dim_at - 1, "dim", 1 if self.keepdim_at is None else None), x.ndim)
        labelled = [d for d in range(x.ndim) if varies_along(x, d)]
        over = [d for d in labelled if d in dims]
        zero_blind = isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0
        if over and (not zero_blind or len(over) != len(labelled)):
            why = f"a norm with p={p} counts zeros" if not zero_blind else "a norm over some channel dims but not all"
            call.space.freeze(x, call.site("reduction", why, source=call.node.args[0].name))
            return call.out_none()
        if self.keepdim_at is None:  # F.normalize: x / ||x||, with x's shape and channels
            return Unary().propagate(call)
        if over:  # every channel is reduced over: none left in the result
            return call.out_none()
        keepdim = bool(dim_arg(call, self.keepdim_at - 1, "keepdim", False))
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


RULES = [
    ((F.normalize,), Norm(p_at=1, p_name="p", dim_at=2, keepdim_at=None)),
    (
        (torch.linalg.vector_norm, aten.linalg_vector_norm.default),
        Norm(p_at=1, p_name="ord", dim_at=2, keepdim_at=3),
    ),
    ((torch.norm, "norm"), Norm(p_at=1, p_name="p", dim_at=2, keepdim_at=3)),
    ((torch.mean, "mean", torch.sum, "sum", masked_reduce, aten.mean.dim, aten.sum.dim_IntList), Reduce(maskable=True)),
    (
        (
            torch.amax,
            "amax",
            torch.amin,
            "amin",
            torch.std,
            "std",
            torch.var,
            "var",
            torch.logsumexp,
            "logsumexp",
            torch.max,
            "max",
            torch.min,
            "min",
            *overloads(aten.amax, aten.amin),
            *[o for o in overloads(aten.mean, aten.sum) if o not in (aten.mean.dim, aten.sum.dim_IntList)],
        ),
        Reduce(),
    ),
    (
        (
            F.softmax,
            F.log_softmax,
            torch.softmax,
            torch.log_softmax,
            "softmax",
            "log_softmax",
            nn.Softmax,
            nn.LogSoftmax,
            nn.Softmin,
            *overloads(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax),
        ),
        Softmax(),
    ),
]
