"""Save a pruned model without pickle: weights in safetensors, structure as a replayable plan.

A pruned model is a rewritten graph, which safetensors cannot hold.  So each
pass that changes the model's structure records a *plan step* (JSON: which
units a mask removed, which tensors carry weight masks, that Shrink ran, which
layers were lowered to which sparse format, ...), and owns its replay (see
`graphprune.pipeline`).  `save` writes the state dict (`model.safetensors`) and
the steps (`plan.json`); `load` traces a fresh copy of the original model on the
same example inputs, replays the steps, and loads the weights into it, strictly.
Nothing is unpickled and no code is read from the files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import graphprune.passes  # noqa: F401  (the built-in passes register the plan steps they replay)
from graphprune.compile import REPORT_ATTR, compile, refuse_meta
from graphprune.errors import ArgumentError, CheckpointError, GraphPruneError
from graphprune.pipeline import replay, replayable_ops

__all__ = ["save", "load", "apply_plan", "plan_of", "PLAN_FILE", "WEIGHTS_FILE"]

PLAN_FILE, WEIGHTS_FILE = "plan.json", "model.safetensors"
_VALUE_STEPS = {"weight_mask", "add_bias"}  # steps that only make room for values the weights carry
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
        raise GraphPruneError(
            f"passes {unknown} changed the model but record no plan step, so a saved model could not be "
            "rebuilt; record one with ctx.record(plan={'op': ...}) and register its replay in graphprune.saving.REPLAY"
        )
    return {"format": FORMAT, "version": VERSION, "steps": steps}


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `model.safetensors` (the state dict; a tensor tied under two names is stored once)
    and `plan.json` into `directory`.  Both are written into a new folder beside it, which then
    takes its place: a failure at any point leaves an existing checkpoint there as it was."""
    if not isinstance(model, nn.Module) or not hasattr(model, REPORT_ATTR):
        raise ArgumentError("save() takes a model returned by graphprune.compile (it replays that model's passes)")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ArgumentError(f"save: {directory} is a file; give a folder to write the checkpoint into")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / PLAN_FILE).exists():
        raise ArgumentError(
            f"save: {directory} holds files and is not a graphprune checkpoint; give a new or empty folder"
        )
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
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with open(staging / PLAN_FILE, "w") as f:
            json.dump(plan, f, indent=1)
        save_file(tensors, str(staging / WEIGHTS_FILE))
        for extra in directory.iterdir() if directory.is_dir() else ():  # the user's own files stay
            if extra.name not in (PLAN_FILE, WEIGHTS_FILE):
                (shutil.copytree if extra.is_dir() else shutil.copy2)(extra, staging / extra.name)
        _swap(staging, directory)
    except TypeError as exc:
        raise CheckpointError(f"save: the plan holds a value JSON cannot store ({exc}); nothing was written") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _swap(staging: Path, directory: Path) -> None:
    """Put the staging folder in the checkpoint's place (the old one goes only once the new is there)."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
        os.rmdir(old)
        os.rename(directory, old)
    try:
        os.rename(staging, directory)
    except BaseException:
        if old is not None:
            os.rename(old, directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_plan(directory: Path) -> dict:
    path = directory / PLAN_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a graphprune checkpoint: it has no {PLAN_FILE}")
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged (not JSON: {exc})") from exc
    if not isinstance(plan, dict) or plan.get("format") != FORMAT or plan.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a graphprune plan of version {VERSION}")
    steps, tied = plan.get("steps"), plan.get("tied", {})
    if (
        not isinstance(steps, list)
        or not all(isinstance(s, dict) and isinstance(s.get("op"), str) for s in steps)
        or not isinstance(tied, dict)
    ):
        raise CheckpointError(f"{path} is damaged: 'steps' must be a list of steps, each with an 'op'")
    unknown = sorted({s["op"] for s in steps} - replayable_ops())
    if unknown:
        raise CheckpointError(f"{path} has steps this graphprune cannot replay: {unknown}")
    return plan


def apply_plan(
    model: nn.Module,
    source: nn.Module | dict | str | os.PathLike,
    example_inputs: tuple | dict,
    *,
    inplace: bool = False,
    leaf_modules: Iterable[type] = (),
) -> nn.Module:
    """Prune `model` as `source` was pruned, keeping `model`'s own weights: the plan of a model that
    compile() returned, a plan dict (`plan_of`), or a folder `save` wrote (its weights are not read).

    The decisions travel, not the numbers: the channels, heads and blocks `source` removed are
    removed from `model` (another instance of the same architecture: a full-size model loaded
    separately, another precision, another rank).  What a pass computed into the weights
    (SparseGPT's updated weights, compensated biases, where unstructured masks fell) comes with
    `load`, not here."""
    if isinstance(source, nn.Module):
        plan = plan_of(source)
    elif isinstance(source, dict):
        plan = source
    elif isinstance(source, (str, os.PathLike)):
        plan = _read_plan(Path(source))
    else:
        raise ArgumentError(
            f"apply_plan: source must be a pruned model, a plan dict or a checkpoint folder, got {type(source).__name__}"
        )
    steps = [s for s in plan.get("steps", []) if s.get("op") not in _VALUE_STEPS]
    refuse_meta(model)  # (what is wrong is the model, not the plan)
    try:
        return compile(
            model, [replay(s) for s in steps], example_inputs=example_inputs, inplace=inplace, leaf_modules=leaf_modules
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the plan does not fit {type(model).__name__} ({type(exc).__name__}: {exc}): give an instance of the "
            "architecture that was pruned, and example inputs of the same shapes"
        ) from exc


def load(
    model: nn.Module,
    directory: str | os.PathLike,
    example_inputs: tuple | dict,
    *,
    inplace: bool = False,
    leaf_modules: Iterable[type] = (),
) -> nn.Module:
    """Rebuild what `save` wrote: replay its plan on a copy of the original `model` (not changed),
    traced on the same kind of example inputs, then load the weights; every tensor must fit.

    The weights are read one tensor at a time.  `inplace=True` rebuilds `model` itself, with no
    copy (a big model, held once): if its plan does not replay, the model is left as it was; if
    the weights then do not fit the rebuilt model (a damaged checkpoint), the error says so and the
    model has the plan's structure, its weights partly loaded."""
    directory = Path(directory)
    plan = _read_plan(directory)
    weights = directory / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} cannot be read: {exc}") from exc
    tied = plan.get("tied", {})
    for name, source in tied.items():
        if source not in names:
            raise CheckpointError(f"{directory / PLAN_FILE} ties {name} to {source}, which the weights do not hold")
    advice = "pass the original model and example inputs of the same shapes as when it was pruned"
    try:
        rebuilt = compile(
            model,
            [replay(s) for s in plan["steps"]],
            example_inputs=example_inputs,
            inplace=inplace,
            leaf_modules=leaf_modules,
        )
    except (KeyError, IndexError, TypeError, ValueError, GraphPruneError) as exc:
        raise CheckpointError(f"{directory} does not fit this model ({type(exc).__name__}: {exc}): {advice}") from exc
    expected = set(rebuilt.state_dict())
    missing, unexpected = sorted(expected - names - set(tied)), sorted(names - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory} does not fit the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]}): {advice}"
        )
    with safe_open(str(weights), framework="pt") as f:
        for name in sorted(names):
            tensor = f.get_tensor(name)
            try:
                rebuilt.load_state_dict(
                    {name: tensor, **{t: tensor for t, source in tied.items() if source == name}}, strict=False
                )
            except RuntimeError as exc:
                raise CheckpointError(f"{directory} does not fit the rebuilt model: {advice}\n{exc}") from exc
    return rebuilt
