"""Checking the arguments people pass: one place, one wording, an ArgumentError that names them.

Numbers are accepted in every form Python and NumPy give them (`np.float32(0.5)` is a ratio);
booleans are not numbers here.
"""

from __future__ import annotations

import importlib
import importlib.util
import numbers
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable

from graphprune.errors import ArgumentError

__all__ = [
    "fraction",
    "positive_int",
    "module_names",
    "choice",
    "mapping",
    "is_glob",
    "glob_specificity",
    "in_modules",
    "unmatched",
    "load_function",
    "function_spec",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def fraction(value: Any, name: str, *, closed: bool = False, open_low: bool = False) -> float:
    """A share in [0, 1) ([0, 1] with closed=True; (0, ...) with open_low=True), as a float."""
    high = "1]" if closed else "1)"
    low = "(0" if open_low else "[0"
    if not _is_number(value) or value != value:
        raise ArgumentError(f"{name} must be a number in {low}, {high}, got {value!r}")
    v = float(value)
    if v < 0 or (open_low and v == 0) or v > 1 or (not closed and v == 1):
        raise ArgumentError(f"{name} must be in {low}, {high}, got {value!r}")
    return v


def positive_int(value: Any, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ArgumentError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def module_names(value: Any, name: str) -> tuple[str, ...]:
    """A module name or a list of them (as model.named_modules() spells them, or shell-style globs
    over those names such as 'layer4.*'; '' is not one)."""
    if isinstance(value, str):
        value = [value]
    if value is None or not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise ArgumentError(f"{name} must be a list of module names from model.named_modules(), got {value!r}")
    value = tuple(value)
    if "" in value:
        raise ArgumentError(f"{name} holds '' (the whole model): name the submodules to leave alone")
    return value


def is_glob(name: str) -> bool:
    """Whether a name is a shell-style pattern (`fnmatch`: `*`, `?`, `[...]`) rather than a name."""
    return any(c in name for c in "*?[")


def glob_specificity(pattern: str) -> int:
    """How much of a name a pattern fixes: its characters other than `*` (`layer1.0.*` beats `layer1.*`,
    which beats `*`), so that the most specific of several matching patterns can win."""
    return len(pattern.replace("*", ""))


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or (is_glob(pattern) and fnmatchcase(name, pattern))


def in_modules(module: str, patterns: Iterable[str]) -> bool:
    """Whether `module` (a path from named_modules()) is one of `patterns` or inside one: a name
    covers its submodules, and so does a glob matching the module or one of its parents."""
    parts = module.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(_matches(p, pattern) for pattern in patterns for p in prefixes)


def unmatched(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The names or globs in `patterns` that match none of `names`."""
    names = set(names)
    return [p for p in patterns if p not in names and not (is_glob(p) and any(fnmatchcase(n, p) for n in names))]


def choice(value: Any, name: str, options: Iterable[Any]) -> Any:
    options = tuple(options)
    if value not in options:
        raise ArgumentError(f"{name} must be one of {options}, got {value!r}")
    return value


def mapping(value: Any, name: str, what: str) -> dict:
    """A dict (or None for an empty one); `what` describes its keys and values for the message."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ArgumentError(f"{name} must be a dict of {what}, got {type(value).__name__}")
    return dict(value)


def function_spec(spec: Any, name: str, base: Path | None = None) -> str:
    """A `FILE.py:FUNCTION` (the file relative to `base`, else to the working directory, made absolute
    and checked to exist) or `package.module:FUNCTION` argument, checked without running it."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rpartition(":")[2].isidentifier():
        raise ArgumentError(f"{name} names a function as FILE.py:FUNCTION or package.module:FUNCTION, got {spec!r}")
    file, _, function = spec.rpartition(":")
    if not file.endswith(".py"):
        return spec
    path = Path(file).expanduser()
    path = (base / path if base is not None and not path.is_absolute() else path).resolve()
    if not path.is_file():
        raise ArgumentError(f"{name}: {path} does not exist")
    return f"{path}:{function}"


def load_function(spec: str) -> Any:
    """The function `FILE.py:FUNCTION` (or `package.module:FUNCTION`) names."""
    file, _, function = spec.rpartition(":")
    if not file or not function:
        raise ArgumentError(f"name a function as FILE.py:FUNCTION, got {spec!r}")
    if file.endswith(".py"):
        if not Path(file).is_file():
            raise ArgumentError(f"{file} does not exist")
        module_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(file)
        except ImportError as exc:
            raise ArgumentError(f"cannot import {file!r} for {spec!r}: {exc}") from exc
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ArgumentError(f"{file} has no function {function!r}")
    return fn
