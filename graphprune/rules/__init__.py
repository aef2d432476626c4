"""Per-op channel rules, one registry.

Rules are sorted by what an op does to channels, whatever graph level it comes from (module, torch
function, tensor method or ATen op): each rule file ends with a `RULES` table of
(targets, rule) rows, and importing this package registers every table once.

- `conv`: layers with weights (convolutions, linear, addmm).
- `channelwise`: per-channel ops (norms, embeddings, pools, resampling, PReLU).
- `pointwise`: elementwise math, broadcasting.
- `shape`: views, permutes, concat/split, indexing.
- `reduce`: reductions and softmax.
- `attention`: attention heads (nn.MultiheadAttention, scaled_dot_product_attention) and matrix products (`q @ k^T`).
- `recurrent`: nn.LSTM, nn.GRU and nn.RNN (hidden units).
- `reinsert`: graphprune's own ZeroReinsert.
- `tokens`: TokenPrune's token selection.

A new rule goes into the file of the op family it belongs to, as a row of that file's table; a
user's own rule is registered with `register_rule(target, rule)`.
"""

from graphprune.rules import attention, channelwise, conv, pointwise, recurrent, reduce, reinsert, shape, tokens
from graphprune.rules.base import OpCall, ParamRef, Rule, find_rule, register_rule, register_table
from graphprune.rules.channelwise import ChannelwiseRule

for _table in (
    conv.RULES,
    channelwise.RULES,
    pointwise.RULES,
    shape.RULES,
    reduce.RULES,
    attention.RULES,
    recurrent.RULES,
    reinsert.RULES,
    tokens.RULES,
):
    register_table(_table)

__all__ = ["Rule", "OpCall", "ParamRef", "register_rule", "find_rule", "ChannelwiseRule"]
