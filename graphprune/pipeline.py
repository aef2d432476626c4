"""The pass contract, the pipeline that runs passes, and the context they share.

A pass is configured in `__init__` and keeps no state between runs:
`call(gm, ctx) -> PassResult(gm, modified)`.  Analyses (the channel
dependencies, the scores) live in the context, are computed on demand and
dropped when a pass modifies the graph unless it declares them preserved.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx as fx

from graphprune.errors import GraphPruneError, PassError, VerificationError
from graphprune.inputs import call_with, eval_mode

logger = logging.getLogger(__name__)

__all__ = ["PassBase", "PassResult", "Pipeline", "PassContext", "PassRecord", "as_pass"]


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    modified: bool


@dataclass
class PassRecord:
    """What one pass did: for timing, the summary and error messages."""

    name: str
    modified: bool = False
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class PassContext:
    """Shared by the passes of one compile(): example inputs, cached analyses, records."""

    def __init__(self, example_inputs: tuple | dict) -> None:
        self.example_inputs = example_inputs
        self.records: list[PassRecord] = []
        self._analyses: dict[str, Any] = {}
        self._current: PassRecord | None = None

    # -- analyses ----------------------------------------------------------------------
    def analysis(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self._analyses:
            start = time.perf_counter()
            self._analyses[name] = compute()
            logger.debug("analysis %s took %.3fs", name, time.perf_counter() - start)
        return self._analyses[name]

    def dependencies(self, gm: fx.GraphModule):
        from graphprune.analysis.dependency import analyze_dependencies

        return self.analysis("dependencies", lambda: analyze_dependencies(gm, self.example_inputs))

    def set_analysis(self, name: str, value: Any) -> None:
        self._analyses[name] = value

    def get_analysis(self, name: str) -> Any:
        return self._analyses.get(name)

    def invalidate(self, preserved: Iterable[str] = ()) -> None:
        keep = set(preserved)
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}

    # -- records -----------------------------------------------------------------------
    def record(self, **details: Any) -> None:
        """Attach details (groups pruned, notes) to the record of the running pass."""
        if self._current is not None:
            self._current.details.update(details)

    @property
    def history(self) -> list[str]:
        return [r.name for r in self.records]


class PassBase(abc.ABC):
    """Subclass and implement `call`.  `preserves` names analyses a modifying pass keeps valid;
    `keeps_outputs` says the pass must not change what the model computes (checked by verify_each)."""

    preserves: ClassVar[frozenset[str]] = frozenset()
    keeps_outputs: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.call(gm, ctx)

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ...

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({fields})"


class _FunctionPass(PassBase):
    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "function_pass")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = self.fn(gm, ctx)
        if isinstance(result, PassResult):
            return result
        if isinstance(result, fx.GraphModule):
            return PassResult(result, True)
        if result is None:
            return PassResult(gm, True)
        raise TypeError(f"pass {self.name} returned {type(result).__name__}; return a PassResult, a GraphModule or None")


def as_pass(p: Any) -> PassBase:
    if isinstance(p, PassBase):
        return p
    if isinstance(p, (list, tuple)):
        return Pipeline(p)
    if callable(p) and not isinstance(p, type):
        return _FunctionPass(p)
    raise TypeError(
        f"{p!r} is not a pass: give a graphprune.PassBase instance (e.g. graphprune.passes.L2Score()) "
        "or a function (gm, ctx) -> PassResult"
    )


def _run_model(gm: fx.GraphModule, example_inputs: tuple | dict) -> Any:
    with eval_mode(gm), torch.no_grad():
        return call_with(gm, example_inputs)


class Pipeline(PassBase):
    """Runs passes in order; itself a pass.  Times each pass; with verify_each checks the graph
    after every modifying pass, and that passes which must keep outputs did."""

    def __init__(self, passes: Iterable[Any], *, verify_each: bool = False) -> None:
        self.passes = [as_pass(p) for p in passes]
        self.verify_each = verify_each

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for p in self.passes:
            if isinstance(p, Pipeline):
                result = p.call(gm, ctx)
            else:
                result = self._run_one(p, gm, ctx)
            gm, modified = result.gm, modified or result.modified
        return PassResult(gm, modified)

    def _run_one(self, p: PassBase, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = _run_model(gm, ctx.example_inputs) if (self.verify_each and p.keeps_outputs) else None
        record = PassRecord(p.name)
        previous, ctx._current = ctx._current, record
        start = time.perf_counter()
        try:
            result = p(gm, ctx)
        except (GraphPruneError, ValueError, TypeError) as exc:
            # Keep the type callers catch (bad arguments stay ValueError), add where it happened.
            try:
                wrapped = type(exc)(f"{p.name} failed{_after(ctx)}: {exc}")
            except Exception:
                wrapped = PassError(f"{p.name} failed{_after(ctx)}: {type(exc).__name__}: {exc}")
            raise wrapped from exc
        except Exception as exc:
            raise PassError(f"{p.name} failed{_after(ctx)}: {type(exc).__name__}: {exc}") from exc
        finally:
            ctx._current = previous
        record.seconds = time.perf_counter() - start
        record.modified = result.modified
        ctx.records.append(record)
        if result.modified:
            ctx.invalidate(p.preserves)
            result.gm.recompile()
            if self.verify_each:
                self._verify(p, result.gm, ctx, before)
        logger.info("%s: %.3fs, modified=%s", p.name, record.seconds, result.modified)
        return result

    @staticmethod
    def _verify(p: PassBase, gm: fx.GraphModule, ctx: PassContext, before: Any) -> None:
        try:
            gm.graph.lint()
            after = _run_model(gm, ctx.example_inputs)
        except Exception as exc:
            raise VerificationError(f"after {p.name}{_after(ctx)} the model no longer runs: {exc}") from exc
        if before is not None:
            try:
                torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
            except AssertionError as exc:
                raise VerificationError(f"{p.name} must keep the model's outputs but changed them: {exc}") from exc


def _after(ctx: PassContext) -> str:
    return f" (after {', '.join(ctx.history)})" if ctx.history else ""
