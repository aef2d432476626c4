"""Evaluating a pruned language model: perplexity over a token stream.

Perplexity is computed the way the LLM-pruning papers report it (WikiText-2 numbers of
SparseGPT, Wanda, FLAP, LLM-Pruner): the stream is cut into windows of `seq_len` tokens that
start every `stride` tokens; each token is predicted once, from the window that scores it,
and the perplexity is exp(mean negative log-likelihood) over all predicted tokens.  With
stride < seq_len every prediction after the first window sees at least seq_len - stride
tokens of context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.errors import ArgumentError
from graphprune.finetune import logits_of
from graphprune.ir.inputs import eval_mode

__all__ = ["perplexity"]


def perplexity(
    model: nn.Module, tokens: torch.Tensor, seq_len: int = 512, stride: int | None = None, batch_size: int = 1
) -> float:
    """exp(mean NLL) of `model` (called as `model(input_ids)`, returning logits or an output with
    `.logits`) on a 1-D stream of token ids, in eval mode and without gradients."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ArgumentError("perplexity: tokens must be a tensor of integer token ids")
    tokens = tokens.reshape(-1) if tokens.ndim == 2 and tokens.shape[0] == 1 else tokens
    if tokens.ndim != 1:
        raise ArgumentError(f"perplexity: tokens must be one stream (1-D, or 1 x N), got shape {tuple(tokens.shape)}")
    stride = seq_len if stride is None else stride
    for name, value in (("seq_len", seq_len), ("stride", stride), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"perplexity: {name} must be a positive integer, got {value!r}")
    if seq_len < 2:
        raise ArgumentError(
            f"perplexity: seq_len must be at least 2 (a token to predict from and one to predict), got {seq_len}"
        )
    if stride > seq_len:
        raise ArgumentError(f"perplexity: stride ({stride}) above seq_len ({seq_len}) would skip tokens")
    if tokens.numel() < 2:
        raise ArgumentError("perplexity: tokens must hold at least 2 ids (one to predict from, one to predict)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # windows [begin, end) and the first position each one scores (the ones before were scored already)
    windows, scored_to = [], 1
    for begin in range(0, tokens.numel() - 1, stride):
        end = min(begin + seq_len, tokens.numel())
        windows.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == tokens.numel():
            break
    total, count = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            width = max(end - begin for begin, end, _ in chunk)
            same = all(end - begin == width for begin, end, _ in chunk)
            parts = [chunk] if same else [[w] for w in chunk]  # a short last window runs alone
            for part in parts:
                ids = torch.stack([tokens[b:e] for b, e, _ in part]).to(device)
                logits = logits_of(model(ids)).float()
                nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
                for row, (begin, _, first) in enumerate(part):
                    total += float(nll[row, first - begin - 1 :].double().sum())
                    count += nll.shape[1] - (first - begin - 1)
    return math.exp(total / count)
