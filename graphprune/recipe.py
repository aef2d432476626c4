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

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import graphprune.passes as builtin
from graphprune.arguments import load_function
from graphprune.compile import compile
from graphprune.finetune import finetune, logits_of
from graphprune.recipe_schema import (
    FINETUNE_KEYS,
    INPUT_KEYS,
    RECIPE_KEYS,
    SCHEDULE_KEYS,
    Checker,
    batches,
    construct_pass,
    parse_pass,
    read_recipe,
    write_recipe,
)
from graphprune.schedule import Pruner

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


@dataclass(frozen=True)
class RecipeResult:
    model: nn.Module  # the pruned model
    losses: tuple[float, ...] = ()  # the fine-tune's mean loss per epoch (none without one)


class Recipe:
    """A recipe read and checked: its data (what to write beside a result), and what it builds."""

    def __init__(self, source: str | os.PathLike | dict, *, finetune: dict | None = None) -> None:
        self.data, lines = read_recipe(source)
        where = "recipe" if isinstance(source, dict) else f"recipe {source}"
        self._check = Checker(where, lines)
        given = {k: v for k, v in (finetune or {}).items() if v is not None}
        if given:
            merged = {**self.data.get("finetune", {}), **given}
            self.data = self._check.top({**self.data, "finetune": merged}, Path.cwd())
        self._calibration: list | Iterable | None = None

    def calibration(self) -> Iterable | None:
        if self._calibration is None and "calibration" in self.data:
            self._calibration = batches(load_function(self.data["calibration"])(), "calibration", self._check)
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
        cls, name, positional, keywords = parse_pass(item, i, self._check)
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
        return construct_pass(cls, name, positional, keywords, path, self._check)

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
        if items and parse_pass(items[-1][1], items[-1][0], self._check)[0] is builtin.Shrink:
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
        loader = batches(load_function(settings["data"])(), "finetune.data", self._check)
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
