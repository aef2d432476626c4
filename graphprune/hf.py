"""Hugging Face configs that describe a pruned model, so that save_pretrained / from_pretrained work.

compile() returns a pruned Hugging Face model in its own class (see graphprune.writeback); its
config still holds the sizes before pruning.  `express_config` (run by compile) finds config values
under which the class has exactly the pruned shapes, by trying them on the meta device: it changes
integers of the config to values the pruned shapes suggest and keeps the changes after which more
tensors fit.  When every layer was pruned alike this usually works (a uniform FFN width is
`intermediate_size`, fewer kv groups are `num_key_value_heads`); when it cannot (widths that differ
per layer, BERT's heads whose size the config derives from the hidden size), save_pretrained is
refused on that instance with a message pointing to graphprune.save.  `as_hf_model` does the same
for a graph module, building the class anew and checking its outputs numerically (shapes alone can
mislead: fewer heads or a smaller head_dim give the same q projection).
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn
from torch.nn.utils import parametrize

from graphprune.errors import GraphPruneError
from graphprune.ir.inputs import call_with, check_example_inputs, eval_mode
from graphprune.ir.modules import SkippedBlock

__all__ = ["HEAD_CONFIG", "as_hf_model", "express_config", "with_heads"]


# Per-head sizes that attention modules keep as attributes: shapes alone cannot tell fewer heads from
# smaller heads (the q projection has heads x head_dim rows either way), these can.
_HEAD_SIZES = ("head_dim", "attention_head_size", "num_key_value_groups")


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, and the per-head sizes of the modules that hold them (as 'path#attr')."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    sizes = {
        f"{path}#{attr}": (value,)
        for path, m in model.named_modules()
        for attr in _HEAD_SIZES
        if type(value := getattr(m, attr, None)) is int
    }
    return {k: tuple(v.shape) for k, v in named} | sizes


def _build(cls, config) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return cls(config)
    except Exception:  # a config value the class rejects: not a candidate
        return None


def _misfits(cls, config, target: dict[str, tuple[int, ...]], kept: frozenset[str] = frozenset()) -> list[str] | None:
    """What of `cls(config)` differs from `target` (`_diff`; None: the class rejects the config)."""
    model = _build(cls, config)
    return None if model is None else _diff(_shapes(model), target, kept)


def _diff(shapes: dict, target: dict, kept: frozenset[str]) -> list[str]:
    """Tensors of other shapes than in `target` or not in it, head sizes held otherwise, and the
    tensors of `kept` that `shapes` lacks."""
    return sorted(
        {k for k in shapes if target.get(k) != shapes[k] and ("#" not in k or k in target)} | (kept - shapes.keys())
    )


_BEAM = 4  # configs kept per step of the search (each step changes one more value)


def _search(cls, config, target: dict[str, tuple[int, ...]], accept) -> tuple[object | None, list[str]]:
    """Config values under which `cls` has exactly the shapes of `target`: integers of the config are
    changed to values the pruned shapes suggest, keeping changes after which more tensors fit; a
    config with every shape right is offered to `accept` (which may verify more).  Returns the
    config (None if none fits) and the tensors that fit least badly.  Every trial builds the class
    on the meta device: each step also tries every value that helped at once (the common case:
    FFN width, heads and kv heads all changed), keeps the `_BEAM` trials that fit best, and the
    search stops at the first config that fits."""
    base = _build(cls, config)
    if base is None:
        return None, []
    before = _shapes(base)
    kept = frozenset(before.keys() & target.keys())  # (a config with fewer layers fits no better)
    changes = {
        (before[k][d], target[k][d])
        for k in before
        if k in target and len(before[k]) == len(target[k])
        for d in range(len(before[k]))
        if before[k][d] != target[k][d]
    }

    held = {attr: {size[0] for k, size in target.items() if k.endswith(f"#{attr}")} for attr in _HEAD_SIZES}

    groups = held["num_key_value_groups"]  # query heads per kv head, as the pruned layers hold them

    def moves(cfg) -> list[list[tuple[str, int]]]:
        out = []
        values = cfg.to_dict()
        for attr, value in values.items():
            if held.get(attr):  # a head size is what the pruned modules hold
                candidates = held[attr] if len(held[attr]) == 1 else set()
            elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
                candidates = {new for old, new in changes if old == value} | {
                    value * new // old  # a count that divides a width (heads of the hidden size)
                    for old, new in changes
                    if old % value == 0 and value * new % old == 0
                }
            else:
                continue
            for c in sorted(candidates - {value, 0}):
                move = [(attr, c)]
                if attr == "num_attention_heads" and len(groups) == 1 and "num_key_value_heads" in values:
                    g = next(iter(groups))  # (fewer query heads with as many per kv head: fewer kv heads)
                    move += [("num_key_value_heads", c // g)] if c % g == 0 else []
                out.append(move)
        return out

    seen: set[str] = set()

    def tried(cfg) -> list[str] | None:
        """`cfg`'s misfits, the first time it is tried (None after, or if the class rejects it)."""
        key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        if key in seen:
            return None
        seen.add(key)
        return _misfits(cls, cfg, target, kept)

    best = _diff(before, target, kept)
    if not best and accept(config):
        return config, []
    frontier = [(config, best)]
    for _ in range(4):  # up to four config values change (heads, kv heads, FFN width, hidden size)
        if not frontier:
            break
        trials = []
        for cfg, misfits in frontier:
            for move in moves(cfg):
                trial = _changed(cfg, move)
                fits = tried(trial)
                if fits == [] and accept(trial):
                    return trial, []
                if fits is not None and len(fits) < len(misfits):
                    trials.append((move, trial, fits))
                    best = min(best, fits, key=len)
        trials.sort(key=lambda t: len(t[2]))
        if trials:  # the best config so far, with every value that helped changed at once
            joint = _changed(frontier[0][0], [change for move, _, _ in reversed(trials) for change in move])
            if tried(joint) == [] and accept(joint):
                return joint, []
        frontier = [(trial, fits) for _, trial, fits in trials[:_BEAM]]
    return None, best


def _changed(config, moves: list[tuple[str, int]]):
    """A copy of `config` with the moves made in order (a later value of an attribute wins)."""
    changed = copy.deepcopy(config)
    for attr, value in moves:
        setattr(changed, attr, value)
    return changed


def _with_head_dim(config):
    """The config with the head size it derives from its hidden size written out, for classes that
    read `config.head_dim` when it is there (Qwen2): fewer heads keep their size (None otherwise)."""
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if "head_dim" in config.to_dict() or not (isinstance(heads, int) and isinstance(hidden, int) and heads):
        return None
    pinned = copy.deepcopy(config)
    pinned.head_dim = hidden // heads
    return pinned


def _refuse_save_pretrained(reason: str):
    def save_pretrained(*args, **kwargs):
        raise GraphPruneError(
            f"save_pretrained would write a config that does not describe this pruned model ({reason}); "
            "save it with graphprune.save(model, folder) and load it with graphprune.load(original, folder, "
            "example_inputs)"
        )

    return save_pretrained


HEAD_CONFIG = "graphprune_own_head_config"  # set on a module that holds a `with_heads` copy (survives copies)


def with_heads(module: nn.Module, config, heads: int, kv_heads: int):
    """Give `module` `config` with `num_attention_heads` = `heads` and `num_key_value_heads` =
    `kv_heads` (a copy, unless it says them already), for attention that reads its head count from
    the config at run time (Phi-3 cuts its fused qkv there) and lost heads; returns the config."""
    if (config.num_attention_heads, getattr(config, "num_key_value_heads", kv_heads)) != (heads, kv_heads):
        config = copy.copy(config)
        config.num_attention_heads = heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = kv_heads
    module.config = config
    module.__dict__[HEAD_CONFIG] = True
    return config


def _share_config(model: nn.Module) -> None:
    """Modules that hold a `with_heads` copy hold the model's config again where it now says their
    head counts: one config, as from_pretrained builds it."""
    counts = ("num_attention_heads", "num_key_value_heads")
    for m in model.modules():
        if m.__dict__.get(HEAD_CONFIG):
            if all(getattr(m.config, a, None) == getattr(model.config, a, None) for a in counts):
                m.config = model.config
                del m.__dict__[HEAD_CONFIG]


def express_config(model: nn.Module) -> str | None:
    """After a Hugging Face model was pruned in place: write the sizes into its config where the config
    can express them (every layer alike: intermediate_size, num_key_value_heads, ...), so that
    save_pretrained / from_pretrained round-trip.  Where it cannot (widths that differ per layer, BERT's
    heads, whose size the config derives from the hidden size), save_pretrained is refused on this
    instance with a message saying to use graphprune.save; the reason is returned."""
    if not (hasattr(model, "config") and hasattr(model, "save_pretrained")):
        return None
    model.__dict__.pop("save_pretrained", None)
    cls = type(model)
    skipped = [path for path, m in model.named_modules() if isinstance(m, SkippedBlock)]
    if skipped:
        reason = (
            f"{cls.__name__}'s config cannot express removed blocks ({skipped[:4]} are SkippedBlocks: "
            "from_pretrained would build them again, with random weights)"
        )
    else:
        target = _shapes(model)
        if _misfits(cls, model.config, target) == []:
            return None
        found, misfits = _search(cls, model.config, target, accept=lambda cfg: True)
        pinned = _with_head_dim(model.config)
        if found is None and pinned is not None:  # fewer heads of the same size
            found, _ = _search(cls, pinned, target, accept=lambda cfg: True)
        if found is not None:
            for attr, value in found.to_dict().items():
                if getattr(model.config, attr, None) != value and not isinstance(value, dict):
                    setattr(model.config, attr, value)
            _share_config(model)
            return None
        reason = (
            f"{cls.__name__}'s config cannot express these sizes (tensors that do not fit: "
            f"{misfits[:4]}{'...' if len(misfits) > 4 else ''})"
        )
    model.__dict__["save_pretrained"] = _refuse_save_pretrained(reason)
    return reason


def as_hf_model(pruned: nn.Module, original: nn.Module, example_inputs: tuple | dict) -> nn.Module:
    """An instance of `original`'s class whose config expresses `pruned`'s sizes, holding its weights
    and checked to compute what `pruned` computes on `example_inputs`.  compile() returns the model's
    own class already where its forward computes the result; this is for graph modules (and checks
    that the config of an own-class result describes it)."""
    if not hasattr(original, "config"):
        raise GraphPruneError(
            f"as_hf_model needs the original Hugging Face model (with a config), got {type(original).__name__}"
        )
    if any(parametrize.is_parametrized(m) for m in pruned.modules()):
        raise GraphPruneError("the model still holds masks: run Shrink() first, then as_hf_model")
    example_inputs = check_example_inputs(example_inputs)
    cls = type(original)
    if type(pruned) is cls:
        reason = express_config(pruned)
        if reason is not None:
            raise GraphPruneError(
                f"{reason}. Keep using the pruned model (it is a {cls.__name__}) and save it with graphprune.save"
            )
        return pruned
    weights = pruned.state_dict()
    with eval_mode(pruned), torch.no_grad():
        expected = _first(call_with(pruned, example_inputs))

    def verified(config) -> bool:
        model = cls(config)
        if model.load_state_dict(
            {k: v for k, v in weights.items() if k in model.state_dict()}, strict=False
        ).missing_keys:
            return False
        with eval_mode(model), torch.no_grad():
            got = _first(call_with(model, example_inputs))
        if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            found.append(model)
            return True
        return False

    found: list[nn.Module] = []
    target = {k: tuple(v.shape) for k, v in list(pruned.named_parameters()) + list(pruned.named_buffers())}
    config, misfits = _search(cls, original.config, target, verified)
    if config is None:
        raise GraphPruneError(
            f"{cls.__name__}'s config cannot express this pruning (every layer alike, and sizes the class derives "
            f"from its config); tensors that do not fit: {misfits[:6]}{'...' if len(misfits) > 6 else ''}. "
            "Keep using the pruned GraphModule, or prune what the config describes (e.g. FFN neurons alike in every layer)"
        )
    return found[-1].train(original.training)


def _first(out):
    """The first tensor of a model output (a ModelOutput, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    return next(v for v in values if isinstance(v, torch.Tensor))
