"""Rules for the ATen ops of torch.export graphs (what Hugging Face models trace to).

The same rule classes serve both graph levels: an exported graph calls
`aten.linear(x, weight, bias)` on parameters read with get_attr where a
symbolically traced one calls an `nn.Linear`, so only the linear rule is new
here; everything else is the module-level rule registered under the ATen name.
Ops not listed (matmul, ...) have no rule yet and freeze the
channels that reach them; scaled_dot_product_attention makes whole heads units.
"""

from __future__ import annotations

import torch

from graphprune.labels import none_like, varies_along
from graphprune.rules.base import OpCall, ParamRef, Rule, register_rule
from graphprune.rules.channelwise import ChannelwiseRule, EmbeddingRule, LayerNormRule
from graphprune.rules.conv import place
from graphprune.rules.pointwise import Clamp, Elementwise, Pow, Unary
from graphprune.rules.reduce import Reduce, Softmax
from graphprune.rules.shape import Concat, Execute, FreezeAlongDim, Reshape, SplitChunk, Squeeze

aten = torch.ops.aten

__all__ = ["FunctionalLinearRule"]


class FunctionalLinearRule(Rule):
    """linear(x, weight, bias) with the weight and bias read as parameters."""

    def propagate(self, call: OpCall):
        x = call.input(0)
        weight = call.labels[1] if len(call.labels) > 1 else None
        bias = call.labels[2] if len(call.labels) > 2 else call.label_kwargs.get("bias")
        if not isinstance(weight, ParamRef) or (call.args[2:3] and call.args[2] is not None and not isinstance(bias, ParamRef)):
            call.freeze_inputs("no_rule", "linear whose weight is not a parameter of the model")
            return call.out_none()
        call.slot_param(weight, 1, call.along(x, -1), consumer=True)
        out_labels = call.space.fresh(call.args[1].shape[0])
        call.slot_param(weight, 0, out_labels)
        if isinstance(bias, ParamRef):
            call.slot_param(bias, 0, out_labels)
        return place(out_labels, call.out.ndim - 1, call.out.shape)


class AddmmRule(Rule):
    """addmm(bias, x, weight) with weight (in, out): Hugging Face's GPT-2 `Conv1D`."""

    def propagate(self, call: OpCall):
        bias, x, weight = call.labels[0], call.input(1), call.labels[2]
        if not (isinstance(weight, ParamRef) and isinstance(bias, ParamRef)) or call.kwargs.get("beta", 1) != 1 or call.kwargs.get("alpha", 1) != 1:
            call.freeze_inputs("no_rule", "addmm whose weight and bias are not parameters of the model")
            return call.out_none()
        call.slot_param(weight, 0, call.along(x, -1), consumer=True)
        out_labels = call.space.fresh(call.args[2].shape[1])
        call.slot_param(weight, 1, out_labels)
        call.slot_param(bias, 0, out_labels)
        return place(out_labels, call.out.ndim - 1, call.out.shape)


class AttentionRule(Rule):
    """scaled_dot_product_attention(q, k, v) on (..., heads, tokens, head_dim): a head is one unit.

    Everything of head h in q, k and v is unified, so pruning removes whole heads: q/k/v rows and
    the output projection's columns of that head.  A masked head is exact: its q and k are zero
    (uniform attention) and its v is zero, so it contributes nothing, as when it is removed.  The
    head dim itself is not pruned (the softmax scale depends on it).
    """

    def propagate(self, call: OpCall):
        q, k, v = (call.input(i) for i in range(3))
        if q.ndim < 3 or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
            call.freeze_inputs("no_rule", "attention with heads that differ between q, k and v (grouped-query attention is not handled yet)")
            return call.out_none()
        hdim = q.ndim - 3
        extra = [(i, a) for i, a in enumerate(call.args) if i >= 3 and isinstance(a, torch.Tensor)]
        extra += [(k, a) for k, a in call.kwargs.items() if isinstance(a, torch.Tensor)]
        biases = []  # a mask broadcast over the heads is fine; one per head (T5's position bias) goes with them
        for key, mask in extra:
            if mask.ndim >= q.ndim - hdim and mask.shape[hdim - q.ndim] != 1:
                labels = call.labels[key] if isinstance(key, int) else call.label_kwargs.get(key)
                labels = labels if isinstance(labels, torch.Tensor) else none_like(mask.shape)
                mdim = mask.ndim + hdim - q.ndim
                if any(varies_along(labels, d) for d in range(mask.ndim) if d != mdim):
                    call.freeze_inputs("no_rule", "attention with a per-head tensor argument that varies along other dims")
                    return call.out_none()
                biases.append(labels.movedim(mdim, 0).reshape(mask.shape[mdim], -1)[:, 0])
        per_head = []
        for t in (q, k, v):
            rows = t.movedim(hdim, 0).reshape(t.shape[hdim], -1)
            call.space.unify(rows[:, :1], rows, call.site("attention", "attention head"))  # NONE beside a head freezes it
            per_head.append(rows[:, 0])
        call.space.tag(per_head[0], "head")
        call.space.unify(per_head[0], per_head[1], call.site("attention", "q and k heads"))
        call.space.unify(per_head[0], per_head[2], call.site("attention", "q and v heads"))
        for bias in biases:  # a bias that is not sliceable per head (a constant) freezes the heads
            call.space.unify(per_head[0], bias, call.site("attention", "a per-head attention bias that cannot be sliced"))
        if any(varies_along(v, d) for d in range(v.ndim - 1) if d != hdim):
            call.freeze_inputs("attention", "attention whose batch or token dims carry channels")
            return call.out_none()
        return v.expand(call.out.shape) if v.shape == call.out.shape else v.narrow(-2, 0, 1).expand(call.out.shape)


class AssertMetadata(Rule):
    """torch.export's dtype/device checks: nothing to prune, unless they pin a size or strides."""

    def propagate(self, call: OpCall):
        if call.kwargs.get("size") is not None or call.kwargs.get("stride") is not None:
            call.freeze_inputs("no_rule", "a metadata assertion that pins the size")
        return call.out_none()


def _overloads(*packets) -> list:
    out = []
    for packet in packets:
        for name in packet.overloads():
            out.append(getattr(packet, name))
    return out


register_rule(aten.linear.default, FunctionalLinearRule())
register_rule(aten._assert_tensor_metadata.default, AssertMetadata())
register_rule(aten.addmm.default, AddmmRule())
for _op in _overloads(aten.split, aten.split_with_sizes, aten.chunk):
    register_rule(_op, SplitChunk())
for _op in _overloads(aten.scaled_dot_product_attention) + [torch.nn.functional.scaled_dot_product_attention]:
    register_rule(_op, AttentionRule())
for _op in _overloads(aten.gelu, aten.gelu_, aten.relu, aten.relu_, aten.tanh, aten.sigmoid, aten.sigmoid_, aten.silu,
                      aten.silu_, aten.dropout, aten.feature_dropout, aten.clone, aten._to_copy, aten.to, aten.contiguous,
                      aten.alias, aten.detach, aten.neg, aten.abs, aten.exp, aten.erf, aten.sqrt, aten.rsqrt, aten.hardswish,
                      aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_, aten.relu6, aten.leaky_relu, aten.leaky_relu_,
                      aten.elu, aten.elu_, aten.mish, aten.mish_, aten.hardtanh, aten.hardtanh_, aten.sin, aten.cos,
                      aten.square, aten.log_sigmoid, aten.softplus):
    register_rule(_op, Unary())
for _op in _overloads(aten.clamp, aten.clamp_, aten.clamp_min, aten.clamp_max, aten.clip):
    register_rule(_op, Clamp())
for _k, _ops in {1: (aten.max_pool1d, aten.avg_pool1d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d),
                 2: (aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d, aten.adaptive_max_pool2d,
                     aten.max_pool2d_with_indices),
                 3: (aten.max_pool3d, aten.avg_pool3d, aten.adaptive_avg_pool3d, aten.adaptive_max_pool3d)}.items():
    for _op in _overloads(*_ops):
        register_rule(_op, ChannelwiseRule(-_k - 1))
for _op in _overloads(aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten.upsample_linear1d,
                      aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d):
    register_rule(_op, ChannelwiseRule(1))
for _op in _overloads(aten.add, aten.sub, aten.mul, aten.where, aten.maximum, aten.minimum):
    register_rule(_op, Elementwise())
for _op in _overloads(aten.div):
    register_rule(_op, Elementwise(divisor=1))
for _op in _overloads(aten.pow):
    register_rule(_op, Pow())
for _op in _overloads(aten.permute, aten.transpose, aten.unsqueeze, aten.t, aten.flatten, aten.flip, aten.expand_as,
                      aten.constant_pad_nd, aten.pad):
    register_rule(_op, Execute())
for _op in _overloads(aten.cat, aten.concat, aten.stack):
    register_rule(_op, Concat())
for _op in _overloads(aten.squeeze):
    register_rule(_op, Squeeze())
for _op in _overloads(aten.view, aten.reshape, aten._unsafe_view, aten.expand):
    register_rule(_op, Reshape())
for _op in _overloads(aten.slice, aten.select, aten.narrow, aten.index_select):
    register_rule(_op, FreezeAlongDim(0, "dim"))
register_rule(aten.layer_norm.default, LayerNormRule())
register_rule(aten.embedding.default, EmbeddingRule(0))
for _op in _overloads(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax):
    register_rule(_op, Softmax())
for _op in (aten.mean.dim, aten.sum.dim_IntList):
    register_rule(_op, Reduce(maskable=True))
for _op in [o for o in _overloads(aten.mean, aten.sum) if o not in (aten.mean.dim, aten.sum.dim_IntList)] + _overloads(aten.amax, aten.amin):
    register_rule(_op, Reduce())
