"""Recipes: a pipeline written as data, in YAML or TOML (one schema), for the command line and for
people who keep their pruning settings beside their training config.

    passes:                                   # required: the passes in order
      - L2Score: {}                           # PassName: {argument: value, ...}
      - ChannelMask: {ratio: 0.35, round_to: 4, exclude: ["fc"]}
      - Shrink                                # no arguments: the name alone
    inputs: {shape: [1, 3, 224, 224]}         # optional, for the CLI: example input shape
                                              #   (or {seq_len: 128} for a token model)

The same in TOML: `passes = [{L2Score = {}}, {ChannelMask = {ratio = 0.35}}, "Shrink"]`.  A pass
is a built-in one by name (`graphprune.passes`) or any other by import path
(`mypackage.passes:MyPass`); a single value that is not a mapping is the pass's one positional
argument (`- ChannelMask: 0.5`).  `gp.compile(model, gp.recipe("r.yaml"), ...)` runs it from
Python.  Every mistake (an unknown key, pass or argument, a bad value) is an `ArgumentError` that
names the key, with its line in a YAML file.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

import yaml

import graphprune.passes as builtin
from graphprune.errors import ArgumentError, GraphPruneError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["recipe", "read_recipe", "write_recipe", "RECIPE_KEYS", "INPUT_KEYS"]

RECIPE_KEYS = ("passes", "inputs")
INPUT_KEYS = ("shape", "seq_len")


def read_recipe(source: str | os.PathLike | dict) -> tuple[dict, dict[tuple, int]]:
    """The recipe as data (checked for its keys) and the YAML line of each key path (none for TOML)."""
    if isinstance(source, dict):
        data, lines, where = source, {}, "recipe"
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ArgumentError(f"recipe {path} cannot be read: {exc}") from exc
        where = f"recipe {path}"
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
    _Checker(where, lines).top(data)
    return data, lines


def recipe(source: str | os.PathLike | dict) -> list:
    """The passes a recipe file (YAML or TOML) or mapping describes, ready for `graphprune.compile`."""
    data, lines = read_recipe(source)
    where = "recipe" if isinstance(source, dict) else f"recipe {source}"
    return [_build(item, i, _Checker(where, lines)) for i, item in enumerate(data["passes"])]


def write_recipe(data: dict, path: str | os.PathLike) -> None:
    """Write a recipe (the data `read_recipe` returns) as a YAML file."""
    path = Path(path)
    if path.suffix == ".toml":
        raise ArgumentError("write_recipe writes YAML (.yaml or .yml); TOML is read only")
    path.write_text(yaml.safe_dump(data, sort_keys=False))


class _Checker:
    """Raises errors that name the key path (and its YAML line)."""

    def __init__(self, where: str, lines: dict[tuple, int]) -> None:
        self.where, self.lines = where, lines

    def fail(self, path: tuple, message: str) -> ArgumentError:
        key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
        line = next((self.lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in self.lines), None)
        at = f", line {line}" if line is not None else ""
        return ArgumentError(f"{self.where}{at}: {key}: {message}")

    def top(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise ArgumentError(f"{self.where}: a recipe is a mapping with a 'passes' list, got {type(data).__name__}")
        for key in data:
            if key not in RECIPE_KEYS:
                raise self.fail((key,), f"unknown key; a recipe has {list(RECIPE_KEYS)}")
        if not isinstance(data.get("passes"), list) or not data["passes"]:
            raise self.fail(("passes",), "must be a non-empty list of passes, e.g. [{L2Score: {}}, ...]")
        inputs = data.get("inputs", {})
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


def _build(item: Any, i: int, check: _Checker) -> Any:
    if isinstance(item, str):
        name, args = item, None
    elif isinstance(item, dict) and len(item) == 1:
        ((name, args),) = item.items()
    else:
        raise check.fail(("passes", i), "each pass is a name or a one-key mapping {PassName: {argument: value}}")
    cls = _pass_class(name, ("passes", i), check)
    path = ("passes", i, name)
    positional, keywords = ((), args or {}) if args is None or isinstance(args, dict) else ((args,), {})
    signature = inspect.signature(cls)
    accepted = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        for key in keywords:
            if key not in accepted:
                raise check.fail((*path, key), f"unknown argument; {name} takes {accepted}")
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
