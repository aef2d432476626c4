"""The pass contract, the pipeline that runs passes, and the context they share.

A pass is configured in `__init__` and keeps no state between runs:
`call(gm, ctx) -> PassResult(gm, modified, preserved)`.  Analyses live in the
context keyed by their type (`ctx.get(Dependencies, gm)`, `ctx.cached(Scores)`):
a type with a `compute(gm, ctx)` classmethod is computed on demand, others
(scores) are put there by the pass that makes them.  When a pass modifies the
graph, the manager drops every analysis the pass did not return as preserved
(its `preserves` class attribute unless the result says otherwise).

A pass that changes the model's structure records a plan step
(`ctx.record(plan={"op": ..., ...})`, JSON) and owns its replay: a class with
`plan_op = "..."` and a `from_plan(step)` classmethod is registered here when it
is defined, and `replay(step)` rebuilds the pass that re-applies a step
(`graphprune.saving.load`).
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import torch.fx as fx

from graphprune.analysis.dependency import Dependencies
from graphprune.errors import ArgumentError, GraphPruneError, PassError
from graphprune.ir.verify import Reference, check_keeps_outputs, check_runs, reference

logger = logging.getLogger(__name__)

__all__ = ["PassBase", "PassResult", "Pipeline", "PassContext", "PassRecord", "as_pass", "replay", "replayable_ops"]

T = TypeVar("T")


@dataclass(frozen=True)
class PassResult:
    """What a pass returns.  `preserved`: the analysis types still valid after a modifying pass
    (None: the pass's declared `preserves`)."""

    gm: fx.GraphModule
    modified: bool
    preserved: frozenset[type] | None = None


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
        self._analyses: dict[type, Any] = {}
        self.initial: dict[type, Any] = {}  # analyses made before any pass changed the graph
        self._current: PassRecord | None = None
        self.version = 0  # bumped whenever a pass modifies the graph
        self._reference: tuple[int, Reference] | None = None
        self.checked_version = 0  # the last version known to run (verified or checked)
        self.outputs: tuple[int, Any] | None = None  # (version, the graph's outputs on the example inputs)
        self.spill: Callable[[Any], None] | None = None  # takes a tensor a pass replaced out of memory (Spill)

    def reference(self, gm: fx.GraphModule) -> Reference:
        """What the graph computes now on the example inputs (cached until a pass modifies it)."""
        if self._reference is None or self._reference[0] != self.version:
            known = self.outputs[1] if self.outputs is not None and self.outputs[0] == self.version else None
            self._reference = (self.version, reference(gm, self.example_inputs, known))
        return self._reference[1]

    # -- analyses ----------------------------------------------------------------------
    def get(self, kind: type[T], gm: fx.GraphModule) -> T:
        """The analysis of this type on `gm`: cached, or computed with `kind.compute(gm, ctx)`."""
        if kind not in self._analyses:
            compute = getattr(kind, "compute", None)
            if compute is None:
                raise PassError(f"no {kind.__name__} in this pipeline: run the pass that produces it first")
            start = time.perf_counter()
            self._analyses[kind] = compute(gm, self)
            if self.version == 0:
                self.initial[kind] = self._analyses[kind]
            logger.debug("analysis %s took %.3fs", kind.__name__, time.perf_counter() - start)
        return self._analyses[kind]

    def cached(self, kind: type[T]) -> T | None:
        """The analysis of this type if one is held (never computed here)."""
        return self._analyses.get(kind)

    def put(self, value: Any) -> None:
        """Hold an analysis result (keyed by its type), e.g. the scores a score pass made."""
        self._analyses[type(value)] = value

    def invalidate(self, preserved: Iterable[type] = ()) -> None:
        """Drop every analysis except the preserved types (the pipeline does this after a modifying pass)."""
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


_REPLAY: dict[str, type] = {}


class PassBase(abc.ABC):
    """Subclass and implement `call`.  `preserves`: the analysis types a modifying pass keeps valid;
    `keeps_outputs` says the pass must not change what the model computes: the pipeline then
    checks it on the example inputs (unless compile(verify=False) or the pass's `verify` is False).
    `plan_op`: the plan step this class replays with `from_plan(step)` (see the module docstring)."""

    preserves: ClassVar[frozenset[type]] = frozenset()
    keeps_outputs: ClassVar[bool] = False
    plan_op: ClassVar[str | None] = None
    verify: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        op = cls.__dict__.get("plan_op")
        if op is not None:
            if op in _REPLAY and _REPLAY[op].__qualname__ != cls.__qualname__:
                raise ArgumentError(
                    f"plan step {op!r} is replayed by {_REPLAY[op].__qualname__} already; give {cls.__qualname__} its own plan_op"
                )
            _REPLAY[op] = cls

    @classmethod
    def from_plan(cls, step: dict) -> PassBase:
        """The pass that re-applies a recorded plan step (classes with a `plan_op` implement it)."""
        raise NotImplementedError(f"{cls.__name__} replays no plan step")

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.call(gm, ctx)

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult: ...

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
        raise ArgumentError(
            f"pass {self.name} returned {type(result).__name__}; return a PassResult, a GraphModule or None"
        )


def _state_key(gm: fx.GraphModule) -> tuple:
    """Changes when the graph, a tensor's identity, shape or contents (version counter) change."""
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return gm.graph.python_code("self").src, tuple((n, id(t), tuple(t.shape), t._version) for n, t in tensors)


def replayable_ops() -> frozenset[str]:
    """The plan steps the passes defined so far can replay."""
    return frozenset(_REPLAY)


def replay(step: dict) -> PassBase:
    """The pass that re-applies one recorded plan step (its `op` names the pass class that owns it)."""
    if step.get("op") not in _REPLAY:
        raise ArgumentError(f"no pass replays plan steps {step.get('op')!r}: import the module that defines it")
    return _REPLAY[step["op"]].from_plan(step)


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
            ctx.invalidate(p.preserves if result.preserved is None else result.preserved)
            ctx.version += 1
            result.gm.recompile()
            if ref is not None:
                got = check_keeps_outputs(
                    p.name, result.gm, ref, ctx.example_inputs, groups, _after(ctx, skip_last=True)
                )
                ctx.checked_version, ctx.outputs = ctx.version, (ctx.version, got)
            elif self.verify_each:
                result.gm.graph.lint()
                got = check_runs(p.name, result.gm, ctx.example_inputs, _after(ctx, skip_last=True))
                ctx.checked_version, ctx.outputs = ctx.version, (ctx.version, got)
        logger.info("%s: %.3fs, modified=%s", p.name, record.seconds, result.modified)
        return result


def _cached_groups(ctx: PassContext) -> tuple:
    """The channel groups, if an analysis is cached (to name them in a verification error)."""
    deps = ctx.cached(Dependencies)
    return deps.groups if deps is not None else ()


def _after(ctx: PassContext, skip_last: bool = False) -> str:
    names = ctx.history[:-1] if skip_last else ctx.history
    return f" (after {', '.join(names)})" if names else ""
