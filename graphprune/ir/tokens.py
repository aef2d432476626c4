"""What `TokenPrune` and `TokenThreshold` insert into graphs: token scores, selection, gathering,
ToMe merging, LTP's soft masks.

Every function here runs inside a pruned model's forward (fx emits calls to them), on a batch
of sequences laid out (batch, tokens, ...).  A token's score is -inf where the attention mask
says it is padding, +inf where it must be kept, so a padded position is always dropped before
a real one and kept tokens never are.  Kept tokens stay in their original order.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "key_validity",
    "attention_with_received",
    "probs_received",
    "token_norm",
    "first_token_attention",
    "padding_score",
    "keep_count",
    "merged_away",
    "select_tokens",
    "gather_tokens",
    "token_count",
    "merge_tokens",
    "proportional_mask",
    "RATE_SCALE",
    "dtype_of",
    "add_log_size",
    "mha_size_mask",
    "key_metric",
    "eager_received",
    "custom_score",
    "TokenScore",
    "SoftTokenMask",
]

RATE_SCALE = 1_000_000  # rates travel as integers per million: integer arithmetic on a symbolic length
MASKED = -1e3  # an additive mask entry at or below this hides a key (HF uses finfo.min, old BERT -10000)


def _attended(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > MASKED


def key_validity(
    mask: torch.Tensor | None, batch: int, tokens: int, device: torch.device | None = None
) -> torch.Tensor:
    """(batch, tokens) bool: the keys a padding mask lets the real queries see.

    The mask is anything that broadcasts to (batch, heads, queries, keys) (or (batch, keys)).
    A real key is attended by every real query; a padded one by at most the padded queries,
    whatever a model's mask does with padded rows (attend all, none, or the real keys only).
    So a key is real when as many rows attend to it as to the most attended key.
    """
    if mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    seen = _attended(mask)
    if seen.ndim == 2:
        seen = seen[:, None, None, :]
    seen = seen.expand(batch, seen.shape[1], seen.shape[2], tokens)
    count = seen.sum(dim=(1, 2))
    return count == count.amax(dim=-1, keepdim=True)


def probs_received(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Attention each key receives from the real queries, averaged over heads: (batch, keys),
    -inf at padding.  `probs` is (batch, heads, queries, keys) or head-averaged (batch, queries, keys)."""
    if probs.ndim == 3:
        probs = probs[:, None]
    rows = valid[:, None, None, :].to(probs.dtype)  # (batch, 1, 1, queries): sums over the real queries
    if probs.shape[2] != valid.shape[1]:
        rows = torch.ones(probs.shape[0], 1, 1, probs.shape[2], dtype=probs.dtype, device=probs.device)
    received = (rows @ probs).mean(dim=1)[:, 0].float()
    return received.masked_fill(~valid, -math.inf)


def attention_with_received(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scaled_dot_product_attention that also returns PoWER-BERT's significance of each token: the
    attention it receives from the real queries, averaged over heads (batch, tokens), -inf at
    padding.  The probabilities are computed once, for both.  q, k, v: (batch, heads, tokens, dim)."""
    batch, tokens = k.shape[0], k.shape[-2]
    if k.shape[1] != q.shape[1]:  # grouped-query attention: kv heads serve several query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    logits = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    mask = attn_mask
    if is_causal:
        causal = torch.ones(q.shape[-2], tokens, dtype=torch.bool, device=q.device).tril()
        mask = (
            causal
            if mask is None
            else (mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, -math.inf))
        )
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a fully masked row attends to nothing
    received = probs_received(probs, key_validity(attn_mask, batch, tokens, q.device))
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v, received


def first_token_attention(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """EViT's token score: the attention the first token (the class token) pays each token,
    averaged over heads, (batch, tokens), -inf at padding.  One query row: cheap next to the
    attention itself.  q, k: (batch, heads, tokens, head_dim)."""
    batch, tokens = k.shape[0], k.shape[-2]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[:, :, :1] @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        row = mask[..., :1, :] if mask.ndim == 4 else mask[:, None, None, :]
        logits = logits.masked_fill(~row, -math.inf) if row.dtype == torch.bool else logits + row
    probs = torch.softmax(logits.float(), dim=-1).mean(dim=1)[:, 0]
    return probs.masked_fill(~key_validity(mask, batch, tokens, q.device), -math.inf)


def token_norm(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden state's L2 norm per token: (batch, tokens), -inf at padding."""
    valid = key_validity(mask, x.shape[0], x.shape[1], x.device)
    return torch.linalg.vector_norm(x.float(), dim=-1).masked_fill(~valid, -math.inf)


def padding_score(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0 per token, -inf at padding: what merging needs to know (nothing computed without a mask)."""
    if mask is None:
        return torch.zeros(x.shape[0], x.shape[1], device=x.device)
    return torch.zeros(x.shape[0], x.shape[1], device=x.device).masked_fill(
        ~key_validity(mask, x.shape[0], x.shape[1], x.device), -math.inf
    )


def keep_count(tokens: int, rate: int, protected: int) -> int:
    """Tokens kept out of `tokens` at `rate` (per million): at least the protected ones, at least one."""
    return torch.sym_max(tokens - (tokens * rate) // RATE_SCALE, max(protected, 1))  # (symbolic in exports)


def merged_away(tokens: int, rate: int, protected: int) -> int:
    """Tokens a ToMe merge at `rate` (per million) removes: at most half of the unprotected ones."""
    return torch.sym_min((tokens * rate) // RATE_SCALE, (tokens - protected) // 2)


def _protected(tokens: int, keep: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(tokens,) bool: the leading and trailing positions `keep` names."""
    front, back = sum(p >= 0 for p in keep), sum(p < 0 for p in keep)
    pos = torch.arange(tokens, device=device)
    return (pos < front) | (pos >= tokens - back)


def select_tokens(score: torch.Tensor, rate: int, keep: tuple[int, ...] = ()) -> torch.Tensor:
    """(batch, kept) positions of the best tokens by `score`, the `keep` positions first, in order."""
    score = score.float().masked_fill(_protected(score.shape[1], keep, score.device), math.inf)
    kept = keep_count(score.shape[1], rate, len(keep))
    return torch.topk(score, kept, dim=1).indices.sort(dim=1).values


def gather_tokens(
    value: torch.Tensor, idx: torch.Tensor, dims: tuple[int, ...], dest: torch.Tensor | None = None
) -> torch.Tensor:
    """`value` at the kept positions along each of `dims` (its token dims); a value shared by the
    batch (dim 0 of size 1) gets one row per sequence first.  After a merge (`dest`: where each
    token went), a per-token weight (a (batch, tokens) tensor that is not bool: a pooling mask,
    a count) adds up over the merged tokens, so a mean pooled with it is ToMe's size-weighted mean."""
    batch, kept = idx.shape
    if value.shape[0] != batch:
        value = value.expand(batch, *value.shape[1:])
    if dest is not None and value.ndim == 2 and dims == (1,) and value.dtype != torch.bool:
        return torch.zeros_like(value).scatter_add(1, dest, value).gather(1, idx)
    for d in dims:
        view = [batch] + [1] * (value.ndim - 1)
        view[d] = kept
        shape = list(value.shape)
        shape[d] = kept
        value = torch.gather(value, d, idx.reshape(view).expand(shape))
    return value


def token_count(x: torch.Tensor) -> int:
    return x.shape[1]


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor | None,
    score: torch.Tensor,
    rate: int,
    keep: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching (Bolya et al. 2023): (merged x, positions kept, sizes, where
    each token went).

    Tokens alternate into sets A (even positions) and B (odd); each A token's most similar B token
    (cosine of `metric`) is its edge; the r best edges merge their A token into the B token, as
    a size-weighted mean.  `score` only carries padding (-inf): padding merges into padding,
    never into a real token; the `keep` positions are never merged nor merged into.  The kept
    tokens stay in order, so position 0 stays the first token.
    """
    batch, tokens = x.shape[0], x.shape[1]
    if size is None:
        size = torch.ones(batch, tokens, dtype=x.dtype, device=x.device)
    r = merged_away(tokens, rate, len(keep))  # protected tokens never merge
    pos = torch.arange(tokens, device=x.device)
    if r <= 0:
        return x, pos.expand(batch, tokens), size, pos.expand(batch, tokens)
    m = F.normalize(metric.float(), dim=-1)
    sim = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # A tokens (even positions) x B tokens (odd)
    pad = score == -math.inf
    pad_a, pad_b = pad[:, ::2, None], pad[:, None, 1::2]
    protected = _protected(tokens, keep, x.device)
    sim = sim.masked_fill(pad_a != pad_b, -math.inf).masked_fill(pad_a & pad_b, math.inf)
    sim = sim.masked_fill(protected[::2][None, :, None] | protected[1::2][None, None, :], -math.inf)
    best, partner = sim.max(dim=-1)  # per A token: its most similar B token
    src = torch.topk(best, r, dim=-1).indices  # the A tokens merged away ...
    dst = partner.gather(1, src)  # ... into these B tokens
    dest = pos.expand(batch, tokens).scatter(1, 2 * src, 2 * dst + 1)  # where each token's mass goes
    gone = dest != pos
    idx = torch.topk(-(gone.long() * tokens + pos), tokens - r, dim=1).indices  # the rest, in order
    # (batch, kept, tokens): which kept token each token's mass goes to, weighted by its size
    slot = torch.zeros_like(dest).scatter(1, idx, torch.arange(tokens - r, device=x.device).expand_as(idx))
    into = slot.gather(1, dest)
    weights = (into[:, None, :] == torch.arange(tokens - r, device=x.device)[None, :, None]).to(x.dtype)
    weights = weights * size[:, None, :].to(x.dtype)
    sizes = weights.sum(-1)
    return (weights @ x) / sizes[..., None], idx, sizes.to(size.dtype), dest


def proportional_mask(mask: torch.Tensor | None, size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ToMe's proportional attention: log(size) of each key added to an attention mask, as an
    additive (batch, 1, 1|queries, keys) float mask."""
    bias = size.log().to(dtype)[:, None, None, :]
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype) + bias


def dtype_of(x: torch.Tensor) -> torch.dtype:
    return x.dtype


def add_log_size(logits: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    return logits + size.log().to(logits.dtype)[:, None, None, :]


def mha_size_mask(attn_mask: torch.Tensor | None, size: torch.Tensor, heads: int, query: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's float attn_mask (batch * heads, queries, keys) holding log(size)."""
    batch, tokens = size.shape
    bias = size.log().to(query.dtype)[:, None, None, :].expand(batch, heads, query.shape[1], tokens)
    bias = bias.reshape(batch * heads, query.shape[1], tokens)
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype).masked_fill(attn_mask, torch.finfo(query.dtype).min)
    return bias + attn_mask


def key_metric(k: torch.Tensor) -> torch.Tensor:
    """ToMe's similarity metric: the attention keys averaged over heads, (batch, tokens, head_dim)."""
    return k.mean(dim=1)


def eager_received(probs: torch.Tensor) -> torch.Tensor:
    """Attention received, from probabilities (batch, heads?, queries, keys); a key no query can
    see (probability 0 from the most rows) is padding."""
    p = probs if probs.ndim == 4 else probs[:, None]
    seen = (p > 0).sum(dim=(1, 2))
    return probs_received(p, seen == seen.amax(dim=-1, keepdim=True))


def custom_score(fn: Callable, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    score = fn(x)
    if not isinstance(score, torch.Tensor) or tuple(score.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"a TokenPrune score function must return (batch, tokens) = {tuple(x.shape[:2])}, got "
            f"{getattr(score, 'shape', type(score).__name__)}"
        )
    return score.float().masked_fill(~key_validity(mask, x.shape[0], x.shape[1], x.device), -math.inf)


class TokenScore(nn.Module):
    """A user's token score function held by the graph (a function cannot be an argument of a
    graph node): forward(x, mask) = custom_score(fn, x, mask)."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return custom_score(self.fn, x, mask)


class SoftTokenMask(nn.Module):
    """LTP's soft token mask (Kim et al. 2022): each token's hidden state is scaled by
    sigmoid((s - threshold) / temperature), s its score normalised to mean 1 over the real tokens
    of its sequence; the kept positions and padding are scaled by 1.  (TokenThreshold also adds
    the masks' log to later attention logits, so a token masked to 0 is gone as in the hard model.)  The threshold is learned
    with the task loss and a sparsity penalty on `mean` (`graphprune.TokenSparsity`); `counts`
    accumulates (tokens below the threshold, tokens scored) over forwards, for hardening."""

    def __init__(
        self,
        layer: int,
        temperature: float,
        keep: tuple[int, ...],
        init: float = 0.0,
        score: str | Callable = "attention",
    ) -> None:
        super().__init__()
        self.layer, self.temperature, self.keep, self.score = layer, temperature, keep, score
        self.threshold = nn.Parameter(torch.tensor(float(init)))
        self.mean: torch.Tensor | None = None
        self.counts = [0, 0]

    def forward(self, x: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x scaled by the soft mask, the soft mask (batch, tokens))."""
        real = score > -math.inf
        scored = real & ~_protected(score.shape[1], self.keep, score.device)
        score = score.masked_fill(~real, 0.0)
        norm = score / (score.sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1)).clamp_min(1e-12)
        mask = torch.sigmoid((norm - self.threshold) / self.temperature).masked_fill(~scored, 1.0)
        weight = scored.to(mask.dtype)
        self.mean = (mask * weight).sum() / weight.sum().clamp_min(1.0)
        with torch.no_grad():
            self.counts[0] += int(((norm < self.threshold) & scored).sum())
            self.counts[1] += int(scored.sum())
        return x * mask[..., None].to(x.dtype), mask
