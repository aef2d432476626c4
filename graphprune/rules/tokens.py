"""TokenPrune's token selection (graphprune.ir.tokens): gathering follows channels; the scores and
the merging read whole tokens, so the channels they read are frozen (prune channels first)."""

from __future__ import annotations

from graphprune.ir import tokens
from graphprune.rules.base import OpCall, Rule
from graphprune.rules.shape import Execute


class ReadsSize(Rule):
    """A size or dtype read off a tensor: no channel reaches its result."""

    def propagate(self, call: OpCall):
        return call.out_none()


class ReadsTokens(Rule):
    """A token score or merge: its result depends on every channel of a token."""

    def propagate(self, call: OpCall):
        call.freeze_inputs("no_rule", "TokenPrune's token selection reads whole tokens (prune channels before it)")
        return call.out_none()


RULES = [
    ((tokens.gather_tokens,), Execute()),
    ((tokens.token_count, tokens.dtype_of), ReadsSize()),
    (
        (
            tokens.token_norm,
            tokens.first_token_attention,
            tokens.padding_score,
            tokens.attention_with_received,
            tokens.eager_received,
            tokens.TokenScore,
            tokens.select_tokens,
            tokens.key_metric,
            tokens.merge_tokens,
            tokens.add_log_size,
            tokens.mha_size_mask,
            tokens.proportional_mask,
        ),
        ReadsTokens(),
    ),
]
