"""A pruned Hugging Face model back in its own class, where its config can express the pruning.

    pruned = gp.compile(model, [L2Score(), ChannelMask(0.5, ratios={"head": 0.0}), Shrink()], example_inputs=x)
    own = gp.as_hf_model(pruned, model, x)   # a BertModel again: trainable, save_pretrained() works

graphprune's result is a GraphModule (for Hugging Face models, traced by torch.export, which cannot
switch to train mode and keeps the example's sequence length).  When every layer was pruned alike,
the config can often describe the result: a uniform FFN width is `intermediate_size`, fewer heads
with a fixed `head_dim` are `num_attention_heads` / `num_key_value_heads`.  `as_hf_model` finds the
config values by trying them: it changes integers of the config to values the pruned shapes suggest,
keeps the changes after which more tensors have the pruned shapes, and accepts a config whose model
has every pruned shape, holds every weight and computes the pruned model's output on the example
inputs (shapes alone can mislead: fewer heads or a smaller head_dim give the same q projection).  When no config matches (per-layer widths, BERT's heads whose
size is hidden_size / num_attention_heads, zeros reinserted), it says which tensors do not fit.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from graphprune.errors import GraphPruneError

__all__ = ["as_hf_model"]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _build(cls, config) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return cls(config)
    except Exception:  # a config value the class rejects: not a candidate
        return None


def _misfits(cls, config, target: dict[str, tuple[int, ...]]) -> list[str] | None:
    model = _build(cls, config)
    if model is None:
        return None
    shapes = _shapes(model)
    return sorted(k for k in shapes if target.get(k) != shapes[k])


def as_hf_model(pruned: nn.Module, original: nn.Module, example_inputs: tuple | dict) -> nn.Module:
    """An instance of `original`'s class whose config expresses `pruned`'s sizes, holding its weights
    and checked to compute what `pruned` computes on `example_inputs`."""
    from torch.nn.utils import parametrize

    from graphprune.inputs import call_with, check_example_inputs, eval_mode

    if not hasattr(original, "config"):
        raise GraphPruneError(f"as_hf_model needs the original Hugging Face model (with a config), got {type(original).__name__}")
    if any(parametrize.is_parametrized(m) for m in pruned.modules()):
        raise GraphPruneError("the model still holds masks: run Shrink() first, then as_hf_model")
    example_inputs = check_example_inputs(example_inputs)
    cls = type(original)
    weights = pruned.state_dict()
    target = {k: tuple(v.shape) for k, v in weights.items()}
    before = _shapes(original)
    changes = {(before[k][d], target[k][d]) for k in before if k in target and len(before[k]) == len(target[k])
               for d in range(len(before[k])) if before[k][d] != target[k][d]}
    with eval_mode(pruned), torch.no_grad():
        expected = _first(call_with(pruned, example_inputs))

    def verified(config) -> nn.Module | None:
        model = cls(config)
        if model.load_state_dict({k: v for k, v in weights.items() if k in model.state_dict()}, strict=False).missing_keys:
            return None
        with eval_mode(model), torch.no_grad():
            got = _first(call_with(model, example_inputs))
        return model if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5) else None

    def moves(config) -> list[tuple[str, int]]:
        out = []
        for attr, value in config.to_dict().items():
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                candidates = {new for old, new in changes if old == value} | {value * new // old for old, new in changes if value * new % old == 0}
                out += [(attr, c) for c in sorted(candidates - {value, 0})]
        return out

    best = _misfits(cls, original.config, target) or []
    frontier = [(copy.deepcopy(original.config), best)]
    seen = set()
    for changed in range(5):  # up to four config values change (heads, kv heads, FFN width, hidden size)
        next_frontier = []
        for config, misfits in frontier:
            if not misfits and (model := verified(config)) is not None:
                return model.train(original.training)
            for attr, value in moves(config) if changed < 4 else ():
                trial = copy.deepcopy(config)
                setattr(trial, attr, value)
                key = json.dumps(trial.to_dict(), sort_keys=True, default=str)
                if key in seen:
                    continue
                seen.add(key)
                fits = _misfits(cls, trial, target)
                if fits is not None and len(fits) < len(misfits):
                    next_frontier.append((trial, fits))
                    best = min(best, fits, key=len)
        frontier = next_frontier
    raise GraphPruneError(f"{cls.__name__}'s config cannot express this pruning (every layer alike, and sizes the class derives "
                          f"from its config); tensors that do not fit: {best[:6]}{'...' if len(best) > 6 else ''}. "
                          "Keep using the pruned GraphModule, or prune what the config describes (e.g. FFN neurons alike in every layer)")


def _first(out):
    """The first tensor of a model output (a ModelOutput, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    return next(v for v in values if isinstance(v, torch.Tensor))
