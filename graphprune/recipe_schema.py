"""Reading and checking recipes (graphprune.recipe): YAML or TOML into data, every key and value
checked against the schema, errors that name the key path and its YAML line, and the pass items
parsed against the passes' signatures."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import yaml

import graphprune.passes as builtin
from graphprune.arguments import choice, fraction, function_spec, positive_int
from graphprune.errors import ArgumentError, GraphPruneError
from graphprune.schedule import SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "read_recipe",
    "write_recipe",
    "Checker",
    "parse_pass",
    "construct_pass",
    "batches",
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
    return Checker(where, lines).top(data, base), lines


def write_recipe(data: dict, path: str | os.PathLike) -> None:
    """Write a recipe (the data `read_recipe` returns) as a YAML file."""
    path = Path(path)
    if path.suffix == ".toml":
        raise ArgumentError("write_recipe writes YAML (.yaml or .yml); TOML is read only")
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def batches(value: Any, key: str, check: Checker) -> Iterable:
    """Batches a function returned: an iterator is read into a list (it is gone after one pass)."""
    if isinstance(value, (torch.Tensor, dict, str)) or not isinstance(value, Iterable):
        raise check.fail(
            (key.split(".")[0], *key.split(".")[1:]), f"must return an iterable of batches, got {type(value).__name__}"
        )
    return list(value) if isinstance(value, Iterator) else value


class Checker:
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
                "calibration" in inspect.signature(parse_pass(p, i, self)[0]).parameters
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

    def __init__(self, check: Checker, path: tuple) -> None:
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


def parse_pass(item: Any, i: int, check: Checker) -> tuple[type, str, tuple, dict]:
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


def construct_pass(cls: type, name: str, positional: tuple, keywords: dict, path: tuple, check: Checker) -> Any:
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


def _pass_class(name: Any, path: tuple, check: Checker) -> type:
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
