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

from graphprune.errors import ArgumentError, GraphPruneError, PassError, VerificationError
from graphprune.ir.verify import Reference, check_keeps_outputs, check_runs, reference

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

    def __init__(self, example_inputs: tuple | dict, *, verify: bool = True) -> None:
        self.example_inputs = example_inputs
        self.verify = verify
        self.records: list[PassRecord] = []
        self._analyses: dict[str, Any] = {}
        self._current: PassRecord | None = None
        self.version = 0  # bumped whenever a pass modifies the graph
        self._reference: tuple[int, Reference] | None = None
        self.checked_version = 0  # the last version known to run (verified or checked)

    def reference(self, gm: fx.GraphModule) -> Reference:
        """What the graph computes now on the example inputs (cached until a pass modifies it)."""
        if self._reference is None or self._reference[0] != self.version:
            self._reference = (self.version, reference(gm, self.example_inputs))
        return self._reference[1]

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
    `keeps_outputs` says the pass must not change what the model computes: the pipeline then
    checks it on the example inputs (unless compile(verify=False) or the pass's `verify` is False)."""

    preserves: ClassVar[frozenset[str]] = frozenset()
    keeps_outputs: ClassVar[bool] = False
    verify: bool = True

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
        before = _state_key(gm)
        result = self.fn(gm, ctx)
        if isinstance(result, PassResult):
            return result
        if isinstance(result, fx.GraphModule):
            return PassResult(result, result is not gm or _state_key(gm) != before)
        if result is None:  # modified only if it changed the graph or a tensor
            return PassResult(gm, _state_key(gm) != before)
        raise ArgumentError(f"pass {self.name} returned {type(result).__name__}; return a PassResult, a GraphModule or None")


def _state_key(gm: fx.GraphModule) -> tuple:
    """Changes when the graph, a tensor's identity, shape or contents (version counter) change."""
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return gm.graph.python_code("self").src, tuple((n, id(t), tuple(t.shape), t._version) for n, t in tensors)


def as_pass(p: Any) -> PassBase:
    if isinstance(p, PassBase):
        return p
    if isinstance(p, (list, tuple)):
        return Pipeline(p)
    if callable(p) and not isinstance(p, type):
        return _FunctionPass(p)
    raise ArgumentError(
        f"{p!r} is not a pass: give a graphprune.PassBase instance (e.g. graphprune.passes.L2Score()) "
        "or a function (gm, ctx) -> PassResult"
    )


class Pipeline(PassBase):
    """Runs passes in order; itself a pass.  Times each pass and checks that passes which must keep
    the outputs did (see graphprune.ir.verify); with verify_each also checks that the graph still runs
    after every other modifying pass."""

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
        check = p.keeps_outputs and ctx.verify and p.verify
        ref = ctx.reference(gm) if check else None
        groups = _cached_groups(ctx) if check else ()
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
            ctx.version += 1
            result.gm.recompile()
            if ref is not None:
                check_keeps_outputs(p.name, result.gm, ref, ctx.example_inputs, groups, _after(ctx, skip_last=True))
                ctx.checked_version = ctx.version
            elif self.verify_each:
                result.gm.graph.lint()
                check_runs(p.name, result.gm, ctx.example_inputs, _after(ctx, skip_last=True))
                ctx.checked_version = ctx.version
        logger.info("%s: %.3fs, modified=%s", p.name, record.seconds, result.modified)
        return result


def _cached_groups(ctx: PassContext) -> tuple:
    """The channel groups, if an analysis is cached (to name them in a verification error)."""
    deps = ctx.get_analysis("dependencies")
    return deps.groups if deps is not None else ()


def _after(ctx: PassContext, skip_last: bool = False) -> str:
    names = ctx.history[:-1] if skip_last else ctx.history
    return f" (after {', '.join(names)})" if names else ""
