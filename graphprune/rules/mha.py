"""nn.MultiheadAttention: whole heads prune (self-attention with packed q/k/v projections).

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

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune.labels import none_like
from graphprune.rules.base import OpCall, Rule, register_rule
from graphprune.rules.conv import place
from graphprune.rules.shape import dim_arg

__all__ = ["MultiheadAttentionRule", "PrunedMultiheadAttention"]


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
        labels = [call.input(i) if i < len(call.args) else call.label_kwargs.get(n) for i, n in enumerate(("query", "key", "value"))]
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
        return place(out, first.ndim - 1, first.shape), none_like(weights.shape) if isinstance(weights, torch.Tensor) else None

    def update_module(self, module: nn.Module) -> None:
        module.num_heads = module.in_proj_weight.shape[0] // (3 * module.head_dim)
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
        module.__class__ = PrunedMultiheadAttention


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with `num_heads` heads of `head_dim` each, which need not make up
    `embed_dim` (the width of the inputs and outputs).  Same tensors, same call."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        (tgt, batch, _), src = query.shape, key.shape[0]
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)

        def heads(x, i, length):
            return F.linear(x, w[i], b[i]).reshape(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(query, 0, tgt), heads(key, 1, src), heads(value, 2, src)
        bias = torch.zeros(batch, 1, tgt, src, dtype=q.dtype, device=q.device)
        if attn_mask is not None:  # MultiheadAttention's masks: True (or -inf) = not attended
            bias = bias + (torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn_mask)
        if key_padding_mask is not None:
            pad = key_padding_mask.reshape(batch, 1, 1, src)
            bias = bias + (torch.zeros_like(pad, dtype=q.dtype).masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else pad)
        if is_causal and attn_mask is None:
            bias = bias + torch.full((tgt, src), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5 + bias, dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        out = (weights @ v).permute(2, 0, 1, 3).reshape(tgt, batch, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights


register_rule(nn.MultiheadAttention, MultiheadAttentionRule())
register_rule(PrunedMultiheadAttention, MultiheadAttentionRule())
