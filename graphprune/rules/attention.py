"""Attention: whole heads prune, in scaled_dot_product_attention and nn.MultiheadAttention; the
matrix products of attention written out (`q @ k.transpose(-2, -1)`, `probs @ v`) carry channels.

scaled_dot_product_attention(q, k, v) makes every head one unit (see AttentionRule).  For
nn.MultiheadAttention (self-attention with packed q/k/v projections):

A head is one unit: its rows of the q, k and v parts of `in_proj_weight` /
`in_proj_bias` and its columns of `out_proj.weight`.  Masked, a head's q and k
are zero (uniform attention) and its v is zero, so it contributes nothing, as
when it is removed.  nn.MultiheadAttention derives its head size from its
width (embed_dim // num_heads), so it cannot hold fewer heads of the same size:
Shrink turns the module into a `PrunedMultiheadAttention` (a subclass with the
same tensors and an explicit head size).  The rule applies where the attention
weights (the second output) are not used and no per-head mask is passed;
elsewhere the heads are frozen, with the reason.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune.ir.labels import none_like, varies_along
from graphprune.ir.modules import PrunedMultiheadAttention
from graphprune.rules.base import OpCall, Rule, aten, overloads, place
from graphprune.rules.shape import dim_arg

__all__ = [
    "MultiheadAttentionRule",
    "AttentionRule",
    "MatMulRule",
    "RULES",
    "GQA_QUERY_HEADS",
    "query_heads_within_groups",
]

GQA_QUERY_HEADS = "graphprune_gqa_query_heads"  # gm.meta: under grouped-query attention, query heads are the units


def _weights_used(node: fx.Node) -> bool:
    """Whether anything reads the second output (the attention weights)."""
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem):
            return True  # the whole tuple goes somewhere
        if user.args[1] != 0 and user.users:
            return True
    return False


class MultiheadAttentionRule(Rule):
    def propagate(self, call: OpCall):
        m = call.module
        mask = dim_arg(call, 4, "attn_mask")  # (query, key, value, key_padding_mask, need_weights, attn_mask)
        reason = None
        if not getattr(m, "_qkv_same_embed_dim", False) or m.bias_k is not None or m.add_zero_attn:
            reason = "separate q/k/v projections, bias_k/bias_v or add_zero_attn"
        elif isinstance(mask, torch.Tensor) and mask.ndim == 3:
            reason = "a per-head attention mask"
        elif dim_arg(call, 3, "need_weights", True) and _weights_used(call.node):
            reason = "the attention weights (averaged over heads) are used"
        if reason is not None:
            call.freeze_inputs("no_rule", f"nn.MultiheadAttention with {reason}")
            return call.out_none()
        labels = [
            call.input(i) if i < len(call.args) else call.label_kwargs.get(n)
            for i, n in enumerate(("query", "key", "value"))
        ]
        per_in = [call.along(lab, -1) for lab in labels]
        for lab in per_in[1:]:  # q, k and v are read with the same weight columns
            call.space.unify(per_in[0], lab, call.site("attention", "q, k and v inputs of one projection"))
        call.space.add_slot(call.param("in_proj_weight"), 1, per_in[0], consumer=True)
        heads = call.space.fresh(m.num_heads)
        call.space.tag(heads, "head")
        rows = heads.repeat_interleave(m.head_dim)
        call.space.add_slot(call.param("in_proj_weight"), 0, torch.cat([rows, rows, rows]))
        if m.in_proj_bias is not None:
            call.space.add_slot(call.param("in_proj_bias"), 0, torch.cat([rows, rows, rows]))
        call.space.add_slot(call.param("out_proj.weight"), 1, rows, consumer=True)
        out = call.space.fresh(m.out_proj.out_features)
        call.space.add_slot(call.param("out_proj.weight"), 0, out)
        if m.out_proj.bias is not None:
            call.space.add_slot(call.param("out_proj.bias"), 0, out)
        first, weights = call.out
        return place(out, first.ndim - 1, first.shape), none_like(weights.shape) if isinstance(
            weights, torch.Tensor
        ) else None

    def update_module(self, module: nn.Module) -> None:
        module.num_heads = module.in_proj_weight.shape[0] // (3 * module.head_dim)
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
        module.__class__ = PrunedMultiheadAttention


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
            call.freeze_inputs(
                "no_rule",
                "attention with heads that differ between q, k and v (grouped-query attention is not handled yet)",
            )
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
                    call.freeze_inputs(
                        "no_rule", "attention with a per-head tensor argument that varies along other dims"
                    )
                    return call.out_none()
                biases.append(labels.movedim(mdim, 0).reshape(mask.shape[mdim], -1)[:, 0])
        per_head = []
        for t in (q, k, v):
            rows = t.movedim(hdim, 0).reshape(t.shape[hdim], -1)
            call.space.unify(
                rows[:, :1], rows, call.site("attention", "attention head")
            )  # NONE beside a head freezes it
            per_head.append(rows[:, 0])
        call.space.tag(per_head[0], "head")
        if query_heads_within_groups(call.node):
            return _query_heads(call, per_head, hdim, biases, v)
        call.space.unify(per_head[0], per_head[1], call.site("attention", "q and k heads"))
        call.space.unify(per_head[0], per_head[2], call.site("attention", "q and v heads"))
        for bias in biases:  # a bias that is not sliceable per head (a constant) freezes the heads
            call.space.unify(
                per_head[0], bias, call.site("attention", "a per-head attention bias that cannot be sliced")
            )
        if any(varies_along(v, d) for d in range(v.ndim - 1) if d != hdim):
            call.freeze_inputs("attention", "attention whose batch or token dims carry channels")
            return call.out_none()
        return v.expand(call.out.shape) if v.shape == call.out.shape else v.narrow(-2, 0, 1).expand(call.out.shape)


def query_heads_within_groups(node: fx.Node) -> bool:
    """Whether the graph asks for query heads within their kv groups as units (GQAQueryHeads)."""
    gm = node.graph.owning_module
    return bool(gm is not None and gm.meta.get(GQA_QUERY_HEADS))


_EXPANDS = (aten.expand.default, "expand")
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default, "reshape", "view")
_PASSING = (aten.slice.Tensor, aten.contiguous.default, aten.clone.default, "contiguous")


def _repeated(node: Any, heads: int) -> tuple[fx.Node, fx.Node, int] | None:
    """(reshape, expand, dim) of `repeat_kv`: kv (b, G, s, d) unsqueezed, expanded along a new dim
    `dim` to (b, G, R, s, d) and reshaped to (b, G * R, s, d) = `heads` heads; else None."""
    if not (isinstance(node, fx.Node) and node.target in _RESHAPES):
        return None
    src = node.args[0]
    while isinstance(src, fx.Node) and src.target in _PASSING and src.args[0] is not None:
        if src.target is aten.slice.Tensor and not (len(src.args) > 3 and src.args[2] == 0):
            return None  # (only the no-op slices export writes)
        src = src.args[0]
    if not (isinstance(src, fx.Node) and src.target in _EXPANDS):
        return None
    shape, out = src.meta.get("graphprune_shape"), node.meta.get("graphprune_shape")  # (the analyzer's run set them)
    if shape is None or out is None or len(shape) != len(out) + 1:
        return None
    for d in range(1, len(shape) - 1):
        if shape[d - 1] * shape[d] == heads and tuple(shape[: d - 1]) + (heads,) + tuple(shape[d + 1 :]) == tuple(out):
            return node, src, d
    return None


def _query_heads(call: OpCall, per_head: list[torch.Tensor], hdim: int, biases: list, v: torch.Tensor):
    """GQAQueryHeads: under grouped-query attention (kv heads repeated R times by `repeat_kv`), the
    kv heads are kept and the query heads are the units, R of them per kv group: unit j is the
    j-th query head of every group (the same number goes from each group, as the repeat needs), so
    removing it removes those q projection rows and output projection columns, and the repeat
    count R (a literal of the expand, and G * R of the reshape) becomes what is kept."""
    q_heads, k_heads, v_heads = per_head
    heads = len(q_heads)
    repeats = [_repeated(call.node.args[i], heads) for i in (1, 2)]
    groups = per_group = 0
    if repeats[0] is not None:  # (b, G, R, s, d): G kv heads, each read by R query heads
        _, expand, d = repeats[0]
        groups, per_group = expand.meta["graphprune_shape"][d - 1 : d + 1]
    reason = None
    if k_heads.unique().numel() == heads:
        reason = "no grouped-query attention here (as many kv heads as query heads)"
    elif None in repeats:
        reason = "kv heads repeated by something other than repeat_kv's expand and reshape"
    elif (k_heads == 0).any() or any(
        not torch.equal(t.view(groups, per_group), t.view(groups, per_group)[:, :1].expand(groups, per_group))
        for t in (k_heads, v_heads)
    ):
        reason = "kv heads that carry no channels or are not repeated in blocks"
    elif biases:
        reason = "a per-head attention bias"
    if reason is not None:
        call.freeze_inputs("attention", f"GQAQueryHeads: {reason}")
        return call.out_none()
    site = call.site("attention", "kv heads kept: GQAQueryHeads prunes the query heads within their groups")
    call.space.freeze(k_heads, site)
    call.space.freeze(v_heads, site)
    slots = q_heads.view(groups, per_group)  # (kv group, query head within it)
    call.space.unify(slots[:1].expand_as(slots), slots, call.site("attention", "query head j of every kv group"))
    overrides = {}
    for reshape, expand, d in repeats:
        shape = tuple(expand.meta["graphprune_shape"])
        view = [1] * len(shape)
        view[d] = per_group
        overrides[expand.name] = slots[0].reshape(view).expand(shape)
        shape = tuple(reshape.meta["graphprune_shape"])
        view = [1] * len(shape)
        view[d - 1] = heads
        overrides[reshape.name] = q_heads.reshape(view).expand(shape)
    call.extra["reshape_overrides"] = overrides
    view = [1] * v.ndim
    view[hdim] = heads
    return q_heads.reshape(view).expand(call.out.shape).contiguous()


class MatMulRule(Rule):
    """a @ b on (..., n, k) x (..., k, m), both at least 2-D: attention written out by hand.

    The channels of the contracted dim k go together in a and b (index j removed from both is
    exact when both are masked: the term is zero), and leave no channel in the result (the
    attention scores of `q @ k^T`).  Rows of a (or columns of b) that are channels stay channels
    of the result (`v @ probs^T`: v's head dim), and channels along the broadcast batch dims
    (heads) go together in a and b.  Anything else (a channel along both rows and k, rows and
    columns both carrying channels) is frozen, never guessed at.
    """

    def propagate(self, call: OpCall):
        a, b = call.input(0), call.input(1)
        out = call.out
        if a.ndim < 2 or b.ndim < 2 or not isinstance(out, torch.Tensor):
            call.freeze_inputs("no_rule", "a matrix product with a 1-D operand")
            return call.out_none()
        batch = tuple(out.shape[:-2])
        a = a.expand(*batch, *a.shape[-2:])
        b = b.expand(*batch, *b.shape[-2:])
        a_rows, a_k, b_k, b_cols = (varies_along(a, -2), varies_along(a, -1), varies_along(b, -2), varies_along(b, -1))
        if a_k or b_k:  # channels contracted: coupled in a and b, none in the result
            if a_rows or b_cols:
                call.freeze_inputs("no_rule", "a matrix product whose contracted dim and rows both carry channels")
                return call.out_none()
            call.space.unify(
                a.select(-2, 0), b.select(-1, 0), call.site("attention", "the contracted dim of a matrix product")
            )
            return call.out_none()
        a_batch, b_batch = a[..., 0, 0], b[..., 0, 0]
        if a_rows and b_cols:
            call.freeze_inputs("no_rule", "a matrix product whose rows and columns both carry channels")
            return call.out_none()
        if a_rows or b_cols:  # the result's rows (columns) are a's rows (b's columns); b (a) adds none
            other = b_batch if a_rows else a_batch
            call.space.freeze(other, call.site("no_rule", "heads of a matrix product beside channels of the other"))
            labels = a[..., :, :1] if a_rows else b[..., :1, :]
            return labels.expand(out.shape).contiguous()  # (a view of it follows: `.view(B, C, H, W)`)
        if query_heads_within_groups(call.node) and a_batch.unique().numel() != b_batch.unique().numel():
            call.freeze_inputs(
                "attention",
                "GQAQueryHeads: grouped-query attention written as matrix products (eager attention) is not "
                "handled; use scaled_dot_product_attention (Hugging Face: attn_implementation='sdpa')",
            )
            return call.out_none()
        call.space.unify(a_batch, b_batch, call.site("attention", "heads of a matrix product"))
        labels = torch.where(a_batch != 0, a_batch, b_batch)
        return labels.reshape(*batch, 1, 1).expand(out.shape).contiguous()


RULES = [
    ((operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm", *overloads(aten.matmul, aten.bmm)), MatMulRule()),
    ((nn.MultiheadAttention, PrunedMultiheadAttention), MultiheadAttentionRule()),
    ((F.scaled_dot_product_attention, *overloads(aten.scaled_dot_product_attention)), AttentionRule()),
]
