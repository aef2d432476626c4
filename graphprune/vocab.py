"""Vocabulary pruning (as TextPruner does): keep the embedding rows of the tokens a corpus uses.

    small, small_tokenizer = graphprune.prune_vocabulary(model, tokenizer, corpus)
    small.save_pretrained("out/"); small_tokenizer.save_pretrained("out/")

The model stays its own Hugging Face class (trainable, `save_pretrained` works):
its input embedding (and an LM head, tied or not) keeps only the rows of the
kept tokens, and `config.vocab_size` and the special token ids follow.  The
tokenizer is rebuilt with the kept tokens renumbered in their old order, so
text made of the corpus's words tokenizes to the same tokens and the pruned
pair computes exactly what the original pair did.  A word the corpus never
used becomes `[UNK]` (or is split into other kept pieces).

WordPiece tokenizers (BERT, MiniLM, DistilBERT, ...) are supported: greedy
longest-match over a smaller vocabulary that still holds every piece the
corpus produced yields the same pieces.  BPE and Unigram vocabularies are
refused, since their merges and scores tie tokens together.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Iterable

import torch
from torch import nn

from graphprune.errors import ArgumentError, GraphPruneError

__all__ = ["prune_vocabulary"]


def prune_vocabulary(
    model: nn.Module, tokenizer: Any, corpus: Iterable[str], *, keep: Iterable[int | str] = ()
) -> tuple[nn.Module, Any]:
    """(pruned model, its tokenizer), both new: `model` and `tokenizer` are not changed.

    Kept: every token id the tokenizer produces on `corpus` (special tokens included), all
    special tokens, and `keep` (ids or token strings)."""
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "config")):
        raise GraphPruneError(
            f"prune_vocabulary takes a Hugging Face model (with get_input_embeddings), got {type(model).__name__}"
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else None
    if state is None or state["model"]["type"] != "WordPiece":
        kind = state["model"]["type"] if state else type(tokenizer).__name__
        raise GraphPruneError(f"prune_vocabulary supports WordPiece tokenizers (BERT family); this one is {kind}")
    texts = [corpus] if isinstance(corpus, str) else list(corpus)
    if not texts:
        raise ArgumentError("prune_vocabulary needs a corpus: the texts whose tokens to keep")
    used = {i for text in texts for i in tokenizer(text)["input_ids"]}
    used |= set(tokenizer.all_special_ids)
    for k in keep:
        token_id = tokenizer.convert_tokens_to_ids(k) if isinstance(k, str) else int(k)
        if (
            token_id is None
            or not 0 <= token_id < len(state["model"]["vocab"])
            or (isinstance(k, str) and token_id == tokenizer.unk_token_id and k != tokenizer.unk_token)
        ):
            raise ArgumentError(f"prune_vocabulary keep={k!r} is not a token of this tokenizer")
        used.add(token_id)
    kept = sorted(used)
    new_id = {old: new for new, old in enumerate(kept)}
    return _prune_model(model, kept, new_id), _prune_tokenizer(tokenizer, state, kept, new_id)


def _prune_model(model: nn.Module, kept: list[int], new_id: dict[int, int]) -> nn.Module:
    model = copy.deepcopy(model)
    rows = torch.tensor(kept)
    old = model.get_input_embeddings()
    if old.weight.shape[0] <= max(kept):
        raise GraphPruneError(
            f"the tokenizer has token ids up to {max(kept)} but the model's embedding has {old.weight.shape[0]} rows"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is old.weight
    new = nn.Embedding(
        len(kept), old.embedding_dim, padding_idx=new_id.get(old.padding_idx) if old.padding_idx is not None else None
    )
    new.weight = nn.Parameter(old.weight.detach()[rows].clone(), requires_grad=old.weight.requires_grad)
    model.set_input_embeddings(new)
    if head is not None:
        _rebind(model, head.weight, new.weight if tied else nn.Parameter(head.weight.detach()[rows].clone()))
        if getattr(head, "bias", None) is not None:  # BERT's LM head shares it with cls.predictions.bias
            _rebind(model, head.bias, nn.Parameter(head.bias.detach()[rows].clone()))
        if hasattr(head, "out_features"):
            head.out_features = len(kept)
    config = model.config
    config.vocab_size = len(kept)
    for name in (
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "cls_token_id",
        "decoder_start_token_id",
    ):
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, new_id.get(value, value))
    return model


def _rebind(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put `new` everywhere the model holds `old` (a tensor tied under several names stays tied)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is old:
                setattr(module, name, new)


def _remap_ids(node: Any, new_id: dict[int, int]) -> Any:
    """Renumber the token ids a tokenizer's JSON holds outside its vocabulary (special tokens in
    the post-processor, the padding id)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list):
                out[k] = [new_id[i] for i in v]
            elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                out[k] = [v[0], new_id[v[1]]]
            elif k == "pad_id" and isinstance(v, int):
                out[k] = new_id.get(v, v)
            else:
                out[k] = _remap_ids(v, new_id)
        return out
    if isinstance(node, list):
        return [_remap_ids(v, new_id) for v in node]
    return node


def _prune_tokenizer(tokenizer: Any, state: dict, kept: list[int], new_id: dict[int, int]) -> Any:
    from tokenizers import Tokenizer

    token_of = {i: t for t, i in state["model"]["vocab"].items()}
    state = _remap_ids(state, new_id)
    state["model"]["vocab"] = {token_of[i]: new_id[i] for i in kept if i in token_of}
    # tokens added to the tokenizer (outside the WordPiece vocabulary) stay if kept, else go
    state["added_tokens"] = [dict(a, id=new_id[a["id"]]) for a in state["added_tokens"] if a["id"] in new_id]
    pruned = copy.deepcopy(tokenizer)
    pruned._tokenizer = Tokenizer.from_str(json.dumps(state))  # the Rust tokenizer the Python one wraps
    return pruned
