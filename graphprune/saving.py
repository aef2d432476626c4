"""Save a pruned model without pickle: weights in safetensors, structure as a replayable plan.

A pruned model is a rewritten graph, which safetensors cannot hold.  So each
pass that changes the model's structure records a *plan step* (JSON: which
units a mask removed, which tensors carry weight masks, that Shrink ran, which
layers were lowered to which sparse format, ...).  `save` writes the state
dict (`model.safetensors`) and the steps (`plan.json`); `load` traces a fresh
copy of the original model on the same example inputs, replays the steps, and
loads the weights into it, strictly.  Nothing is unpickled and no code is
read from the files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

import torch.fx as fx
from torch import nn

from graphprune.compile import REPORT_ATTR
from graphprune.errors import GraphPruneError
from graphprune.pipeline import PassBase, PassContext, PassResult

__all__ = ["save", "load", "plan_of", "PLAN_FILE", "WEIGHTS_FILE"]

PLAN_FILE, WEIGHTS_FILE = "plan.json", "model.safetensors"
FORMAT, VERSION = "graphprune-plan", 1


def plan_of(model: nn.Module) -> dict:
    """The plan steps recorded by the passes that made `model`, in order.  A pass that changed the
    model without recording a step makes the plan unreplayable, which `save` reports."""
    steps, unknown = [], []
    for record in getattr(model, REPORT_ATTR, []):
        step = record.details.get("plan")
        if step is not None:
            steps.append(step)
        elif record.modified:
            unknown.append(record.name)
    if unknown:
        raise GraphPruneError(f"passes {unknown} changed the model but record no plan step, so a saved model could not be "
                              "rebuilt; record one with ctx.record(plan={'op': ...}) and register its replay in graphprune.saving.REPLAY")
    return {"format": FORMAT, "version": VERSION, "steps": steps}


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `model.safetensors` (the state dict; a tensor tied under two names is stored once)
    and `plan.json` into `directory`."""
    from safetensors.torch import save_file

    if not isinstance(model, fx.GraphModule) or not hasattr(model, REPORT_ATTR):
        raise GraphPruneError("save() takes a model returned by graphprune.compile (it replays that model's passes)")
    plan = plan_of(model)
    tensors, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().contiguous()
    plan["tied"] = tied
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
    with open(os.path.join(directory, PLAN_FILE), "w") as f:
        json.dump(plan, f, indent=1)


def load(model: nn.Module, directory: str | os.PathLike, example_inputs: tuple | dict, *, leaf_modules: Iterable[type] = ()) -> fx.GraphModule:
    """Rebuild what `save` wrote: replay its plan on a copy of the original `model` (not changed),
    traced on the same kind of example inputs, then load the weights; every tensor must fit."""
    from safetensors.torch import load_file

    from graphprune.compile import compile

    with open(os.path.join(directory, PLAN_FILE)) as f:
        plan = json.load(f)
    if plan.get("format") != FORMAT or plan.get("version") != VERSION:
        raise GraphPruneError(f"{directory}/{PLAN_FILE} is not a graphprune plan of version {VERSION}")
    unknown = sorted({s.get("op") for s in plan["steps"]} - set(REPLAY))
    if unknown:
        raise GraphPruneError(f"{directory}/{PLAN_FILE} has steps this graphprune cannot replay: {unknown}")
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    for name, source in plan.get("tied", {}).items():
        tensors[name] = tensors[source]
    rebuilt = compile(model, [REPLAY[s["op"]](s) for s in plan["steps"]], example_inputs=example_inputs, leaf_modules=leaf_modules)
    advice = "pass the original model and example inputs of the same shapes as when it was pruned"
    try:
        missing, unexpected = rebuilt.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise GraphPruneError(f"{directory} does not fit the rebuilt model: {advice}\n{exc}") from exc
    if missing or unexpected:
        raise GraphPruneError(f"{directory} does not fit the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]}): {advice}")
    return rebuilt


# -- replay ------------------------------------------------------------------------------------


class _Replay(PassBase):
    """Re-applies one recorded step (and records it again, so a loaded model can be saved again)."""

    def __init__(self, step: dict, apply: Callable[[fx.GraphModule, PassContext, dict], None]) -> None:
        self.step, self.apply = step, apply

    @property
    def name(self) -> str:
        return f"replay:{self.step['op']}"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self.apply(gm, ctx, self.step)
        ctx.record(plan=self.step)
        return PassResult(gm, True)


def _channel_mask(gm: fx.GraphModule, ctx: PassContext, step: dict) -> None:
    from graphprune.masking import mask_units
    from graphprune.norms import sync_masked_ops

    deps = ctx.dependencies(gm)
    groups = {g.key: g for g in deps.groups}
    missing = sorted(set(step["units"]) - set(groups))
    if missing:
        raise GraphPruneError(f"the plan masks groups this model does not have: {missing[:5]}")
    for key, ids in step["units"].items():
        mask_units(gm, groups[key], ids, deps.aliases)
    sync_masked_ops(gm, deps)


def _weight_mask(gm: fx.GraphModule, ctx: PassContext, step: dict) -> None:
    import torch
    from torch.nn.utils import parametrize

    from graphprune.masking import WeightMaskParametrization, raw_tensor, resolve, weight_mask

    for name in step["tensors"]:  # the mask values come with the weights
        owner, attr = resolve(gm, name)
        if weight_mask(owner, attr) is None:
            parametrize.register_parametrization(owner, attr, WeightMaskParametrization(torch.ones_like(raw_tensor(owner, attr), dtype=torch.bool)))


def _add_bias(gm: fx.GraphModule, ctx: PassContext, step: dict) -> None:
    import torch

    for path in step["modules"]:
        module = gm.get_submodule(path)
        module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype))


# Shrink and ReinsertZeros recompute what they do from the mask state: replaying them is running them.
def _shrink(step: dict) -> PassBase:
    from graphprune.passes import Shrink

    return Shrink()


def _reinsert_zeros(step: dict) -> PassBase:
    from graphprune.passes import ReinsertZeros

    return ReinsertZeros(outputs=step["outputs"], unsupported_ops=step["unsupported_ops"])


def _sparse_lower(step: dict) -> PassBase:
    from graphprune.passes.sparse_lower import SparseLower

    return SparseLower.from_plan(step)


REPLAY: dict[str, Callable[[dict], Any]] = {
    "channel_mask": lambda step: _Replay(step, _channel_mask),
    "weight_mask": lambda step: _Replay(step, _weight_mask),
    "add_bias": lambda step: _Replay(step, _add_bias),
    "shrink": _shrink,
    "reinsert_zeros": _reinsert_zeros,
    "sparse_lower": _sparse_lower,
}
