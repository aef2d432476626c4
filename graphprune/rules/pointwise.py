"""Pointwise ops: activations (unary) and broadcasting arithmetic (n-ary).

Arithmetic couples channels element by element (a residual add makes the
two branches' channels one unit).  A parameter broadcast against pruned
channels (ConvNeXt's layer scale) is sliced with them.  A tensor that is
neither labeled nor a parameter but varies along a pruned dim (a model input
added to a feature map) cannot be sliced, so it freezes those channels.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.ir.labels import NONE, channel_dims, compact_together, labeled_dims, none_like
from graphprune.rules.base import DerivedParams, OpCall, ParamView, Rule, aten, overloads, param_views

__all__ = ["Unary", "Inverse", "Elementwise", "Pow", "Clamp", "RULES"]


class Unary(Rule):
    """The output has the channels of the first argument, element for element."""

    follows_params = True

    def propagate(self, call: OpCall):
        if not isinstance(call.out, torch.Tensor):
            return call.out_none()
        x = call.input(0)
        if tuple(x.shape) != tuple(call.out.shape):
            call.freeze_inputs("conflict", "the op changes its input's shape")
            return call.out_none()
        return x


class Inverse(Rule):
    """rsqrt/reciprocal: 1/0 is inf, so a masked channel (or masked parameter) going in would make
    the masked model compute inf * 0 = nan downstream.  Buffers and parameters that are never masked
    (FrozenBatchNorm2d's running_var) go through as the parameters they are."""

    def propagate(self, call: OpCall):
        lab = call.labels[0] if call.labels else None
        views = param_views(lab)
        if views and isinstance(call.out, torch.Tensor) and tuple(call.out.shape) == tuple(call.args[0].shape):
            if any(v.ref.maskable for v in views):
                return call.out_none()  # read whole: it cannot be sliced elsewhere either
            _pass_on(call, views)
            return lab
        x = call.input(0)
        if bool((x != NONE).any()):
            if _at_least_a_constant(call.node.args[0]) and tuple(x.shape) == tuple(call.out.shape):
                return x  # rsqrt(mean(h²) + eps) per unit (Qwen3's per-head q/k norms): never 1/0
            call.freeze_inputs("conflict", "divides by pruned channels (a masked channel would give 1/0)")
        return call.out_none()


_ADDS = (operator.add, torch.add, "add", *overloads(aten.add))
_SQUARE_MEANS = (torch.mean, torch.sum, "mean", "sum", *overloads(aten.mean, aten.sum))
_POWS = (operator.pow, torch.pow, "pow", *overloads(aten.pow))
_MULS = (operator.mul, torch.mul, "mul", *overloads(aten.mul))


def _at_least_a_constant(node) -> bool:
    """Whether `node` is `t + c` with a number c > 0 and t a mean or sum of squares: a value no
    mask can bring to 0 (a masked unit's is c), so 1/sqrt of it stays finite, unit by unit."""
    if not (isinstance(node, torch.fx.Node) and node.target in _ADDS and len(node.args) == 2 and not node.kwargs):
        return False
    t, c = node.args if isinstance(node.args[1], (int, float)) else node.args[::-1]
    if isinstance(c, bool) or not (isinstance(c, (int, float)) and c > 0):
        return False
    if not (isinstance(t, torch.fx.Node) and t.target in _SQUARE_MEANS and t.args):
        return False
    square = t.args[0]
    return isinstance(square, torch.fx.Node) and (
        (square.target in _POWS and len(square.args) == 2 and square.args[1] == 2)
        or (square.target in _MULS and square.args[0] is square.args[1])
    )


def _pass_on(call: OpCall, views: tuple[ParamView, ...]) -> None:
    """The parameters go on in this op's output: its consumers decide whether they are sliced."""
    call.extra.setdefault("sliced_params", set()).update(v.ref.name for v in views)


def _aligned(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return (1,) * (ndim - len(shape)) + tuple(shape)


def _derived(call: OpCall, params: list, plain: list, shape: tuple[int, ...]):
    """Arithmetic on parameters alone: a `DerivedParams` whose every parameter is sliced where the
    value meets channels, unless a constant that cannot be sliced varies along a dim they vary along."""
    views = []
    for view, pshape in params:
        offset = len(shape) - len(pshape)
        dims = tuple(
            pd if pd is not None and pshape[j] == shape[offset + j] else None for j, pd in enumerate(view.dims)
        )
        views.append(ParamView(view.ref, (None,) * offset + dims))
    varying = {d for v in views for d, pd in enumerate(v.dims) if pd is not None and shape[d] > 1}
    if any(_aligned(other, len(shape))[d] > 1 for other in plain for d in varying):
        return none_like(shape)  # read whole (the analyzer notes it)
    _pass_on(call, tuple(views))
    return DerivedParams(tuple(views))


class Elementwise(Rule):
    """Broadcasting arithmetic: every tensor operand's channels are coupled element by element.

    `divisor`: the positional operand that divides (or is the exponent): a masked channel there
    would be 0/0 in the masked model, so channels reaching it are frozen instead.
    """

    def __init__(self, divisor: int | None = None) -> None:
        self.divisor = divisor

    def propagate(self, call: OpCall):
        out = call.out
        if not isinstance(out, torch.Tensor):
            return call.out_none()
        shape = tuple(out.shape)
        labeled, plain, params = [], [], []
        pairs = list(zip(call.labels, call.args)) + [(call.label_kwargs.get(k), v) for k, v in call.kwargs.items()]
        for i, (lab, val) in enumerate(pairs):
            if not isinstance(val, torch.Tensor):
                continue
            views = param_views(lab)
            if i == self.divisor and (views or (isinstance(lab, torch.Tensor) and bool((lab != NONE).any()))):
                call.freeze_inputs("conflict", "divides by pruned channels (a masked channel would give 0/0)")
                return none_like(shape)
            if views:
                params.extend((view, tuple(val.shape)) for view in views)
            elif isinstance(lab, torch.Tensor) and bool((lab != NONE).any()):
                labeled.append(lab.expand(shape))
            else:
                plain.append(tuple(val.shape))
        if not labeled:
            return _derived(call, params, plain, shape) if params else none_like(shape)
        space = call.space
        vary = sorted({d for t in labeled for d in channel_dims(t)})
        if not vary:  # channels, but along no dim one per index: nothing could be sliced alongside
            if plain or params:
                for t in labeled:
                    space.freeze(t, call.site("conflict", "combined element-wise with a tensor that cannot be sliced"))
            vary = sorted({d for t in labeled for d in labeled_dims(t)})
        for other in plain:
            other = _aligned(other, len(shape))
            if any(other[d] > 1 for d in vary):
                for t in labeled:
                    space.freeze(t, call.site("conflict", "combined element-wise with a tensor that cannot be sliced"))
        labeled = compact_together(*labeled)  # work per channel, not per activation element
        result = labeled[0]
        for t in labeled[1:]:
            space.unify(result, t, call.site("conflict", "combined element-wise with channels that cannot be pruned"))
            result = torch.where(result == NONE, t, result)
        result = result.expand(shape)
        for view, pshape in params:  # a parameter broadcast against channels is sliced with them
            offset = len(shape) - len(pshape)
            for d in vary:
                if d < offset or pshape[d - offset] == 1:
                    continue
                pd = view.dims[d - offset]
                if pd is None or view.ref.shape[pd] != shape[d]:
                    space.freeze(
                        result, call.site("conflict", "combined element-wise with a tensor that cannot be sliced")
                    )
                    continue
                call.slot_param(view.ref, pd, call.along(result, d))
        return result


class Pow(Rule):
    """x ** c with a constant c >= 0 is pointwise (0 ** c is finite); anything else may divide by 0."""

    def propagate(self, call: OpCall):
        exponent = call.kwargs.get("exponent", call.args[1] if len(call.args) > 1 else None)
        if isinstance(exponent, (int, float)) and exponent >= 0:
            return Elementwise().propagate(call)
        return Elementwise(divisor=0 if isinstance(exponent, (int, float)) else 1).propagate(call)


class Clamp(Rule):
    """clamp/clip: pointwise with scalar bounds; tensor bounds are operands like any other."""

    def propagate(self, call: OpCall):
        if any(isinstance(v, torch.Tensor) for v in list(call.args[1:]) + list(call.kwargs.values())):
            return Elementwise().propagate(call)
        return Unary().propagate(call)


_UNARY = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.RReLU,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.Identity,
    F.relu,
    F.relu_,
    F.relu6,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    F.elu,
    F.selu,
    F.celu,
    F.leaky_relu,
    F.hardtanh,
    F.softplus,
    F.softsign,
    F.logsigmoid,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.threshold,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.sqrt,
    torch.sin,
    torch.cos,
    torch.erf,
    torch.square,
    torch.sign,
    torch.nn.functional.hardshrink,
    operator.neg,
    operator.pos,
    torch.Tensor.contiguous,
    torch.clone,
    torch.detach,
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "abs",
    "neg",
    "sqrt",
    "sin",
    "cos",
    "erf",
    "square",
    "sign",
    "contiguous",
    "clone",
    "detach",
    "float",
    "half",
    "double",
    "bfloat16",
    "to",
    "type_as",
    "type",
    "cpu",
    "cuda",
    "requires_grad_",
    # stochastic depth scales whole samples (identity in eval): channels pass through
    "torchvision.ops.stochastic_depth.stochastic_depth",
    *overloads(
        aten.gelu,
        aten.gelu_,
        aten.relu,
        aten.relu_,
        aten.tanh,
        aten.sigmoid,
        aten.sigmoid_,
        aten.silu,
        aten.silu_,
        aten.dropout,
        aten.feature_dropout,
        aten.clone,
        aten._to_copy,
        aten.to,
        aten.type_as,  # the second argument gives only its dtype
        aten.contiguous,
        aten.alias,
        aten.detach,
        aten.neg,
        aten.abs,
        aten.exp,
        aten.erf,
        aten.sqrt,
        aten.hardswish,
        aten.hardswish_,
        aten.hardsigmoid,
        aten.hardsigmoid_,
        aten.relu6,
        aten.leaky_relu,
        aten.leaky_relu_,
        aten.elu,
        aten.elu_,
        aten.mish,
        aten.mish_,
        aten.hardtanh,
        aten.hardtanh_,
        aten.sin,
        aten.cos,
        aten.square,
        aten.log_sigmoid,
        aten.softplus,
    ),
)
_ELEMENTWISE = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.iadd,
    operator.isub,
    operator.imul,
    torch.add,
    torch.sub,
    torch.subtract,
    torch.mul,
    torch.multiply,
    torch.maximum,
    torch.minimum,
    torch.where,
    torch.lerp,
    torch.addcmul,
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "maximum",
    "minimum",
    "masked_fill",
    "masked_fill_",
    "lerp",
    "addcmul",
    "where",
    *overloads(aten.add, aten.sub, aten.mul, aten.where, aten.maximum, aten.minimum),
)
_DIVISION = (
    operator.truediv,
    operator.itruediv,
    torch.div,
    torch.true_divide,
    "div",
    "div_",
    "true_divide",
    *overloads(aten.div),
)

RULES = [
    (_UNARY, Unary()),
    ((torch.rsqrt, torch.reciprocal, "rsqrt", "reciprocal", *overloads(aten.rsqrt, aten.reciprocal)), Inverse()),
    (_ELEMENTWISE, Elementwise()),
    (_DIVISION, Elementwise(divisor=1)),
    ((operator.pow, torch.pow, "pow", *overloads(aten.pow)), Pow()),
    (
        (
            torch.clamp,
            torch.clip,
            "clamp",
            "clamp_",
            "clamp_min",
            "clamp_max",
            "clip",
            *overloads(aten.clamp, aten.clamp_, aten.clamp_min, aten.clamp_max, aten.clip),
        ),
        Clamp(),
    ),
]
