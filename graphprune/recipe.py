"""Recipes: a pipeline written as data, in YAML or TOML (one schema), for the command line and for
people who keep their pruning settings beside their training config.

    passes:                                   # required: the passes in order
      - L2Score: {}                           # PassName: {argument: value, ...}
      - ChannelMask: {ratio: {"layer1.*": 0.2, "*": 0.35}, round_to: 4, exclude: ["fc", "layer4.*"]}
      - Shrink                                # no arguments: the name alone
    inputs: {shape: [1, 3, 224, 224]}         # optional, for the CLI: example input shape
                                              #   (or {seq_len: 128} for a token model)
    calibration: data.py:calibration          # optional: a function returning calibration batches,
                                              #   given to every pass that takes `calibration=`
    finetune: {data: data.py:train, epochs: 2, lr: 0.001, distill: false}
                                              # optional: train between the masks and Shrink
    schedule: {target_sparsity: 0.5, end_step: 200, frequency: 50}
                                              # optional: prune gradually while fine-tuning (gp.Pruner)

The same in TOML: `passes = [{L2Score = {}}, {ChannelMask = {ratio = 0.35}}, "Shrink"]`, then
`calibration = "data.py:calibration"`, `[finetune]` and `[schedule]` tables.  A pass is a built-in
one by name (`graphprune.passes`) or any other by import path (`mypackage.passes:MyPass`); a single
value that is not a mapping is the pass's one positional argument (`- ChannelMask: 0.5`).
ChannelMask's ratio keys and `exclude` take shell-style globs (see graphprune.passes.mask).

Functions are `FILE.py:FUNCTION` (the file relative to the recipe's folder; a recipe given as a
dict: to the working directory) or `package.module:FUNCTION`; `read_recipe` makes file paths
absolute, so the recipe `graphprune prune` writes beside its result runs from anywhere.

- `calibration`: a function taking no arguments and returning an iterable of batches (what a
  DataLoader yields: `x` or `(x, y)`), called once; every pass whose signature has a
  `calibration` argument the recipe does not set gets it (TaylorScore, WandaScore, SparseGPTMask,
  DropBlocks, ...).  A recipe whose passes take none is refused.
- `finetune`: `data` (required) returns batches `(inputs, targets)`; `epochs` (1), `lr` (1e-3,
  Adam), `distill` (false: cross-entropy on the targets; true: the dense model's logits).  The
  passes but the last (which must be Shrink) run, the masked model trains with `gp.finetune`,
  then Shrink runs.  The CLI's `--finetune`, `--epochs`, `--lr`, `--distill` override these keys.
- `schedule`: the arguments of `gp.Pruner` (`target_sparsity` and `end_step` required;
  `start_step`, `frequency`, `initial_sparsity`, `schedule`: cubic|linear, `per`: step|epoch).  The
  passes are then `[Score, Mask]` or `[Mask]`, optionally ending with Shrink, and the mask is
  written without its ratio (the schedule sets it, rising to `target_sparsity`): the Pruner prunes
  during the fine-tune (which `finetune.data` must give) and shrinks at the end.

From Python: `gp.compile(model, gp.recipe("r.yaml"), example_inputs=...)` runs the passes (with
the recipe's calibration); `gp.apply_recipe(model, "r.yaml", example_inputs=...)` does all the
recipe says (passes, fine-tune, schedule), as `graphprune prune --recipe` does;
`recipe_calibration` gives the calibration batches and `recipe_pruner` the Pruner of a schedule.
Every mistake (an unknown key, pass or argument, a bad value) is an `ArgumentError` that names
the key, with its line in a YAML file.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import graphprune.passes as builtin
from graphprune.arguments import choice, fraction, function_spec, load_function, positive_int
from graphprune.compile import compile
from graphprune.errors import ArgumentError, GraphPruneError
from graphprune.finetune import finetune, logits_of
from graphprune.schedule import SCHEDULES, Pruner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "recipe",
    "apply_recipe",
    "recipe_calibration",
    "recipe_pruner",
    "Recipe",
    "RecipeResult",
    "read_recipe",
    "write_recipe",
    "RECIPE_KEYS",
    "INPUT_KEYS",
    "FINETUNE_KEYS",
    "SCHEDULE_KEYS",
]

RECIPE_KEYS = ("passes", "inputs", "calibration", "finetune", "schedule")
INPUT_KEYS = ("shape", "seq_len")
FINETUNE_KEYS = ("data", "epochs", "lr", "distill")
SCHEDULE_KEYS = ("target_sparsity", "end_step", "start_step", "frequency", "initial_sparsity", "schedule", "per")


def read_recipe(source: str | os.PathLike | dict) -> tuple[dict, dict[tuple, int]]:
    """The recipe as data (checked for its keys and values; function files made absolute) and the
    YAML line of each key path (none for TOML)."""
    if isinstance(source, dict):
        data, lines, where, base = source, {}, "recipe", Path.cwd()
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ArgumentError(f"recipe {path} cannot be read: {exc}") from exc
        where, base = f"recipe {path}", path.resolve().parent
        if path.suffix == ".toml":
            try:
                data, lines = tomllib.loads(text), {}
            except tomllib.TOMLDecodeError as exc:
                raise ArgumentError(f"{where} is not valid TOML: {exc}") from exc
        elif path.suffix in (".yaml", ".yml"):
            try:
                data, lines = yaml.safe_load(text), _yaml_lines(yaml.compose(text))
            except yaml.YAMLError as exc:
                raise ArgumentError(f"{where} is not valid YAML: {exc}") from exc
        else:
            raise ArgumentError(f"{where}: a recipe is a .yaml, .yml or .toml file")
    return _Checker(where, lines).top(data, base), lines


def recipe(source: str | os.PathLike | dict, *, calibration: Iterable | None = None) -> list:
    """The passes a recipe file (YAML or TOML) or mapping describes, ready for `graphprune.compile`;
    `calibration` (else the recipe's) goes to every pass that takes it."""
    return Recipe(source).passes(calibration)


def recipe_calibration(source: str | os.PathLike | dict) -> Iterable | None:
    """The calibration batches the recipe's `calibration` function returns (None without one)."""
    return Recipe(source).calibration()


def recipe_pruner(
    source: str | os.PathLike | dict, model: nn.Module, *, example_inputs, calibration: Iterable | None = None
) -> Pruner:
    """The `gp.Pruner` of the recipe's `schedule`, with its score and mask passes, on `model`."""
    return Recipe(source).pruner(model, example_inputs, calibration)


def apply_recipe(
    model: nn.Module,
    source: str | os.PathLike | dict,
    *,
    example_inputs,
    finetune: dict | None = None,
    calibration: Iterable | None = None,
) -> RecipeResult:
    """All the recipe says, as `graphprune prune --recipe` does it: the passes; with `finetune`, the
    masks, a fine-tune and Shrink; with `schedule`, a Pruner pruning during the fine-tune.  `finetune`
    overrides keys of the recipe's (e.g. `{"epochs": 3}`).  `model` is not changed."""
    return Recipe(source, finetune=finetune).apply(model, example_inputs, calibration)


def write_recipe(data: dict, path: str | os.PathLike) -> None:
    """Write a recipe (the data `read_recipe` returns) as a YAML file."""
    path = Path(path)
    if path.suffix == ".toml":
        raise ArgumentError("write_recipe writes YAML (.yaml or .yml); TOML is read only")
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@dataclass(frozen=True)
class RecipeResult:
    model: nn.Module  # the pruned model
    losses: tuple[float, ...] = ()  # the fine-tune's mean loss per epoch (none without one)


class Recipe:
    """A recipe read and checked: its data (what to write beside a result), and what it builds."""

    def __init__(self, source: str | os.PathLike | dict, *, finetune: dict | None = None) -> None:
        self.data, lines = read_recipe(source)
        where = "recipe" if isinstance(source, dict) else f"recipe {source}"
        self._check = _Checker(where, lines)
        given = {k: v for k, v in (finetune or {}).items() if v is not None}
        if given:
            merged = {**self.data.get("finetune", {}), **given}
            self.data = self._check.top({**self.data, "finetune": merged}, Path.cwd())
        self._calibration: list | Iterable | None = None

    def calibration(self) -> Iterable | None:
        if self._calibration is None and "calibration" in self.data:
            self._calibration = _batches(load_function(self.data["calibration"])(), "calibration", self._check)
        return self._calibration

    def passes(self, calibration: Iterable | None = None) -> list:
        if "schedule" in self.data:
            raise self._check.fail(
                ("schedule",),
                "this recipe prunes during fine-tuning: run it with gp.apply_recipe (or take its Pruner from "
                "recipe_pruner), not as a list of passes",
            )
        return [self._build(item, i, calibration) for i, item in enumerate(self.data["passes"])]

    def _build(self, item: Any, i: int, calibration: Iterable | None, ratio: float | None = None) -> Any:
        cls, name, positional, keywords = _parse(item, i, self._check)
        path = ("passes", i, name)
        if "calibration" in inspect.signature(cls).parameters and "calibration" not in keywords:
            given = calibration if calibration is not None else self.calibration()
            if given is not None:
                keywords = {**keywords, "calibration": given}
        if ratio is not None:
            if positional:
                raise self._check.fail(path, "the schedule sets the ratio (schedule.target_sparsity): leave it out")
            first = next(iter(inspect.signature(cls).parameters), None)
            if first is None or first in keywords:
                raise self._check.fail(
                    (*path, first) if first else path,
                    "the schedule sets the ratio (schedule.target_sparsity): leave it out"
                    if first
                    else f"{name} takes no ratio, so a schedule cannot drive it",
                )
            positional = (ratio,)
        return _construct(cls, name, positional, keywords, path, self._check)

    def check(self, calibration: Iterable | None = None) -> None:
        """Build what can be built without a model (the passes; with a schedule, its score and mask),
        so that a bad argument is found before anything runs."""
        if "schedule" in self.data:
            self._scheduled(calibration)
        else:
            self.passes(calibration)

    def _scheduled(self, calibration: Iterable | None) -> tuple[Any, Callable[[float], Any]]:
        """A schedule's score pass (or None) and its mask as a function of the ratio."""
        items = list(enumerate(self.data["passes"]))
        if items and _parse(items[-1][1], items[-1][0], self._check)[0] is builtin.Shrink:
            items = items[:-1]  # (the Pruner shrinks when it finishes)
        if len(items) not in (1, 2):
            raise self._check.fail(
                ("passes",),
                "with a schedule, the passes are [Score, Mask] or [Mask], optionally ending with Shrink: the "
                "Pruner re-scores, masks at the scheduled ratio and shrinks at the end",
            )
        score = self._build(items[0][1], items[0][0], calibration) if len(items) == 2 else None
        i, item = items[-1]
        self._build(item, i, calibration, ratio=self.data["schedule"]["target_sparsity"])  # (checks it now)
        return score, lambda ratio: self._build(item, i, calibration, ratio=ratio)

    def pruner(self, model: nn.Module, example_inputs, calibration: Iterable | None = None) -> Pruner:
        if "schedule" not in self.data:
            raise self._check.fail(
                ("schedule",), "the recipe has no schedule: add schedule: {target_sparsity: ..., end_step: ...}"
            )
        score, mask = self._scheduled(calibration)
        return Pruner(model, example_inputs=example_inputs, score=score, mask=mask, **self.data["schedule"])

    def apply(self, model: nn.Module, example_inputs, calibration: Iterable | None = None) -> RecipeResult:
        settings = self.data.get("finetune")
        if "schedule" in self.data and settings is None:
            raise self._check.fail(
                ("schedule",),
                "prunes during a fine-tune: add finetune: {data: FILE.py:FUNCTION} (or give --finetune)",
            )
        if settings is None:
            return RecipeResult(compile(model, self.passes(calibration), example_inputs=example_inputs))
        if "schedule" in self.data:
            pruner = self.pruner(model, example_inputs, calibration)
            losses = self._finetune(pruner.model, model, settings, [pruner])
            return RecipeResult(pruner.finalize(), tuple(losses))
        passes = self.passes(calibration)
        if type(passes[-1]) is not builtin.Shrink:
            raise self._check.fail(("finetune",), "trains between the masks and Shrink: end the passes with Shrink")
        masked = compile(model, passes[:-1], example_inputs=example_inputs)
        losses = self._finetune(masked, model, settings, [])
        return RecipeResult(compile(masked, passes[-1:], example_inputs=example_inputs), tuple(losses))

    def _finetune(self, student: nn.Module, dense: nn.Module, settings: dict, callbacks: list) -> list[float]:
        loader = _batches(load_function(settings["data"])(), "finetune.data", self._check)
        teacher = {"distill_from": dense} if settings.get("distill", False) else {"loss_fn": cross_entropy}
        return finetune(
            student,
            loader,
            epochs=settings.get("epochs", 1),
            lr=settings.get("lr", 1e-3),
            callbacks=callbacks,
            **teacher,
        )


def cross_entropy(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """The fine-tune's task loss: cross-entropy of the model's logits (`logits_of`) on the targets."""
    return F.cross_entropy(logits_of(output), targets)


def _batches(value: Any, key: str, check: _Checker) -> Iterable:
    """Batches a function returned: an iterator is read into a list (it is gone after one pass)."""
    if isinstance(value, (torch.Tensor, dict, str)) or not isinstance(value, Iterable):
        raise check.fail(
            (key.split(".")[0], *key.split(".")[1:]), f"must return an iterable of batches, got {type(value).__name__}"
        )
    return list(value) if isinstance(value, Iterator) else value


class _Checker:
    """Raises errors that name the key path (and its YAML line)."""

    def __init__(self, where: str, lines: dict[tuple, int]) -> None:
        self.where, self.lines = where, lines

    def fail(self, path: tuple, message: str) -> ArgumentError:
        key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
        line = next((self.lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in self.lines), None)
        at = f", line {line}" if line is not None else ""
        return ArgumentError(f"{self.where}{at}: {key}: {message}")

    def top(self, data: Any, base: Path) -> dict:
        """The recipe checked, with its function files made absolute (a new dict)."""
        if not isinstance(data, dict):
            raise ArgumentError(f"{self.where}: a recipe is a mapping with a 'passes' list, got {type(data).__name__}")
        for key in data:
            if key not in RECIPE_KEYS:
                raise self.fail((key,), f"unknown key; a recipe has {list(RECIPE_KEYS)}")
        if not isinstance(data.get("passes"), list) or not data["passes"]:
            raise self.fail(("passes",), "must be a non-empty list of passes, e.g. [{L2Score: {}}, ...]")
        data = dict(data)
        self._inputs(data.get("inputs", {}))
        if "calibration" in data:
            data["calibration"] = self._function(data["calibration"], ("calibration",), base)
            if not any(
                "calibration" in inspect.signature(_parse(p, i, self)[0]).parameters
                for i, p in enumerate(data["passes"])
            ):
                raise self.fail(
                    ("calibration",),
                    "no pass takes calibration data (e.g. TaylorScore, WandaScore, SparseGPTMask): remove it",
                )
        if "finetune" in data:
            data["finetune"] = self._finetune(data["finetune"], base)
        if "schedule" in data:
            self._schedule(data["schedule"])
        return data

    def _inputs(self, inputs: Any) -> None:
        if not isinstance(inputs, dict):
            raise self.fail(("inputs",), "must be a mapping, e.g. {shape: [1, 3, 224, 224]} or {seq_len: 128}")
        for key, value in inputs.items():
            if key not in INPUT_KEYS:
                raise self.fail(("inputs", key), f"unknown key; inputs has {list(INPUT_KEYS)}")
            ok = (
                isinstance(value, list) and value and all(isinstance(v, int) and v > 0 for v in value)
                if key == "shape"
                else isinstance(value, int) and not isinstance(value, bool) and value > 0
            )
            if not ok:
                raise self.fail(
                    ("inputs", key),
                    f"must be {'a list of positive ints' if key == 'shape' else 'a positive int'}, got {value!r}",
                )

    def _function(self, value: Any, path: tuple, base: Path) -> str:
        try:
            return function_spec(value, "it", base)
        except ArgumentError as exc:
            raise self.fail(path, str(exc).removeprefix("it: ").replace("it names", "names")) from None

    def _finetune(self, section: Any, base: Path) -> dict:
        if not isinstance(section, dict):
            raise self.fail(("finetune",), "must be a mapping, e.g. {data: data.py:batches, epochs: 2, lr: 0.001}")
        for key in section:
            if key not in FINETUNE_KEYS:
                raise self.fail(("finetune", key), f"unknown key; finetune has {list(FINETUNE_KEYS)}")
        if "data" not in section:
            raise self.fail(
                ("finetune",), "needs data: FILE.py:FUNCTION (a function returning (inputs, targets) batches)"
            )
        section = {**section, "data": self._function(section["data"], ("finetune", "data"), base)}
        with self._naming(("finetune", "epochs")):
            positive_int(section.get("epochs", 1), "epochs")
        lr = section.get("lr", 1e-3)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise self.fail(("finetune", "lr"), f"must be a positive number, got {lr!r}")
        if not isinstance(section.get("distill", False), bool):
            raise self.fail(("finetune", "distill"), f"must be true or false, got {section['distill']!r}")
        return section

    def _schedule(self, section: Any) -> None:
        if not isinstance(section, dict):
            raise self.fail(
                ("schedule",), "must be a mapping of Pruner arguments, e.g. {target_sparsity: 0.5, end_step: 200}"
            )
        for key in section:
            if key not in SCHEDULE_KEYS:
                raise self.fail(("schedule", key), f"unknown key; schedule has {list(SCHEDULE_KEYS)}")
        for key in ("target_sparsity", "end_step"):
            if key not in section:
                raise self.fail(
                    ("schedule",), f"needs {key} (and target_sparsity, end_step: the Pruner's required arguments)"
                )
        checks = {
            "target_sparsity": lambda v: fraction(v, "it"),
            "initial_sparsity": lambda v: fraction(v, "it"),
            "frequency": lambda v: positive_int(v, "it"),
            "end_step": lambda v: positive_int(v, "it"),
            "schedule": lambda v: choice(v, "it", SCHEDULES),
            "per": lambda v: choice(v, "it", ("step", "epoch")),
        }
        for key, value in section.items():
            with self._naming(("schedule", key)):
                if key == "start_step":
                    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                        raise ArgumentError(f"it must be an int >= 0, got {value!r}")
                else:
                    checks[key](value)
        if section.get("start_step", 0) >= section["end_step"]:
            raise self.fail(("schedule", "start_step"), "must be below end_step")
        if section.get("initial_sparsity", 0.0) > section["target_sparsity"]:
            raise self.fail(("schedule", "initial_sparsity"), "must not exceed target_sparsity")

    def _naming(self, path: tuple):
        return _Renamed(self, path)


class _Renamed:
    """Turns an ArgumentError about "it" into one that names the key path."""

    def __init__(self, check: _Checker, path: tuple) -> None:
        self.check, self.path = check, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, ArgumentError):
            message = str(exc)
            for prefix in ("it ", "epochs "):
                message = message.removeprefix(prefix)
            raise self.check.fail(self.path, message) from None
        return False


def _parse(item: Any, i: int, check: _Checker) -> tuple[type, str, tuple, dict]:
    """A pass item's class, name and arguments, the argument names checked against its signature."""
    if isinstance(item, str):
        name, args = item, None
    elif isinstance(item, dict) and len(item) == 1:
        ((name, args),) = item.items()
    else:
        raise check.fail(("passes", i), "each pass is a name or a one-key mapping {PassName: {argument: value}}")
    cls = _pass_class(name, ("passes", i), check)
    positional, keywords = ((), dict(args or {})) if args is None or isinstance(args, dict) else ((args,), {})
    signature = inspect.signature(cls)
    accepted = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        for key in keywords:
            if key not in accepted:
                raise check.fail(("passes", i, name, key), f"unknown argument; {name} takes {accepted}")
    return cls, name, positional, keywords


def _construct(cls: type, name: str, positional: tuple, keywords: dict, path: tuple, check: _Checker) -> Any:
    signature = inspect.signature(cls)
    accepted = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    try:
        signature.bind(*positional, **keywords)
    except TypeError as exc:
        raise check.fail(path, f"{exc} ({name} takes {accepted})") from exc
    try:
        return cls(*positional, **keywords)
    except (GraphPruneError, ValueError, TypeError) as exc:
        raise check.fail(path, str(exc)) from exc


def _pass_class(name: Any, path: tuple, check: _Checker) -> type:
    if not isinstance(name, str):
        raise check.fail(path, f"a pass name must be a string, got {name!r}")
    if name in builtin.__all__:
        return getattr(builtin, name)
    if ":" not in name and "." not in name:
        raise check.fail(
            path,
            f"unknown pass {name!r}; built-in passes: {builtin.__all__}; others by import path 'package.module:Class'",
        )
    module, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise check.fail(path, f"cannot import pass {name!r}: {exc}") from exc
    if not callable(cls):
        raise check.fail(path, f"{name!r} is not a pass class")
    return cls


def _yaml_lines(node: yaml.Node | None, path: tuple = ()) -> dict[tuple, int]:
    """The 1-based line of every mapping key and sequence item under `node`."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            out[sub] = key.start_mark.line + 1
            out.update(_yaml_lines(value, sub))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out[(*path, i)] = value.start_mark.line + 1
            out.update(_yaml_lines(value, (*path, i)))
    return out
