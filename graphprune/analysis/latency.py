"""Latency of a model on this machine, estimated from a lookup table of its ops (NetAdapt's way)
and measured end to end, for `ChannelMask(target={"latency": ...})`.

A `Meter` answers two questions for one backend and thread count:
- `op(signature)`: the seconds one op takes with those input shapes, measured once on this
  machine and kept in its table (NetAdapt's per-layer lookup table, keyed by the op's shapes, so
  every width a search tries is measured the first time it comes up and looked up afterwards);
- `models(a, b, inputs)`: the seconds each of two models takes end to end, timed interleaved
  (one run of each per round, medians), so that machine noise hits both alike.

`estimate(meter, model, inputs)` records the ATen ops one forward runs, on meta tensors (no weight
copied, nothing computed), and sums their table entries.  The table is a model of the latency, not
the latency: it misses what the runtime fuses or overlaps, so the target search checks its result
end to end and corrects.

Meters: "torch" (eager PyTorch; every ATen op measured as itself) is built in; "onnxruntime"
lives with the ONNX backend (`graphprune.backends.onnx`) and registers itself there.  A custom
meter (a `Meter` subclass, or an object with `op` and `models`) can be passed in place of a name.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from typing import Any, Callable, Hashable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from graphprune.errors import ArgumentError
from graphprune.ir.inputs import call_with, eval_mode, to_meta
from graphprune.timing import interleaved

logger = logging.getLogger(__name__)

__all__ = [
    "Meter",
    "TorchMeter",
    "Tensor",
    "record_ops",
    "estimate",
    "meter",
    "register_meter",
    "torch_threads",
    "METERS",
]


class Tensor(tuple):
    """An op input as the lookup table keys it: (shape, dtype)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self[0]

    @property
    def dtype(self) -> torch.dtype:
        return self[1]


def _hashable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return Tensor((tuple(value.shape), value.dtype))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((func, _hashable(args), _hashable(kwargs)))
        return func(*args, **kwargs)


def record_ops(model: nn.Module, example_inputs: tuple | dict, *, on_meta: bool = True) -> list[tuple]:
    """The ATen ops one forward of `model` runs, each as (op, args, kwargs) with its tensors as
    `Tensor` (shape, dtype).  `on_meta`: the model's tensors are meta tensors (a shadow) and the
    floating-point inputs are moved there too."""
    inputs = to_meta(example_inputs) if on_meta else example_inputs
    with eval_mode(model), torch.no_grad(), _Recorder() as recorder:
        call_with(model, inputs)
    return recorder.ops


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the duration (None: left as they are)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _real(value: Any) -> Any:
    """A real tensor for each recorded `Tensor`: random floats, zeros for integers (valid indices)."""

    def make(v):
        if not isinstance(v, Tensor):
            return v
        return torch.randn(v.shape, dtype=v.dtype) if v.dtype.is_floating_point else torch.zeros(v.shape, dtype=v.dtype)

    return pytree.tree_map(make, value, is_leaf=lambda v: isinstance(v, Tensor))


def median_seconds(call: Callable[[], Any], runs: int) -> float:
    return statistics.median(interleaved({0: call}, runs)[0])


class Meter:
    """The latency lookup table of one backend at a thread count, and end-to-end timing."""

    name = "custom"

    def __init__(self, threads: int | None = None, runs: int = 7) -> None:
        self.threads, self.runs = threads, runs
        self.table: dict[Hashable, float] = {}

    def op(self, signature: tuple) -> float:
        """Seconds for one recorded op; measured the first time, looked up afterwards."""
        if signature not in self.table:
            try:
                self.table[signature] = self.measure_op(*signature)
            except Exception:  # an op that cannot run on made-up values: it has no entry to add
                logger.debug("latency table: cannot time %s", signature[0], exc_info=True)
                self.table[signature] = 0.0
        return self.table[signature]

    def measure_op(self, func, args: tuple, kwargs: tuple) -> float:
        raise NotImplementedError

    def models(self, a: nn.Module, b: nn.Module, example_inputs: tuple | dict) -> tuple[float, float]:
        """Median seconds of one forward of `a` and of `b`, timed interleaved."""
        raise NotImplementedError

    def race(self, a: Callable[[], Any], b: Callable[[], Any]) -> tuple[float, float]:
        """Seconds of the calls `a` and `b`, run interleaved (at least 20 rounds, after 5 untimed: a
        fresh ONNX Runtime session is slow on its first runs): `a`'s median, and `b`'s as that times
        the median of the rounds' b/a ratios, which a machine whose speed drifts during the
        measurement moves less than a ratio of two medians."""
        times = interleaved({"a": a, "b": b}, max(20, 2 * self.runs), warmup=5)
        ratio = statistics.median(tb / ta for ta, tb in zip(times["a"], times["b"]))
        dense = statistics.median(times["a"])
        return dense, dense * ratio


class TorchMeter(Meter):
    """Eager PyTorch on the CPU: every ATen op is timed as itself on made-up values."""

    name = "torch"

    def measure_op(self, func, args, kwargs) -> float:
        args, kwargs = _real(args), dict(_real(kwargs))
        with torch_threads(self.threads), torch.no_grad():
            return median_seconds(lambda: func(*args, **kwargs), self.runs)

    def models(self, a, b, example_inputs):
        with torch_threads(self.threads), torch.no_grad(), eval_mode(a), eval_mode(b):
            return self.race(lambda: call_with(a, example_inputs), lambda: call_with(b, example_inputs))


METERS: dict[str, Callable[..., Meter]] = {"torch": TorchMeter}


def register_meter(name: str, factory: Callable[..., Meter]) -> None:
    """Make `name` a backend that `ChannelMask(target={"latency": ..., "backend": name})` accepts."""
    METERS[name] = factory


def meter(backend: str | Meter, threads: int | None = None) -> Meter:
    """The meter for a backend name (or the meter given)."""
    if not isinstance(backend, str):
        if not (callable(getattr(backend, "op", None)) and callable(getattr(backend, "models", None))):
            raise ArgumentError(
                f"a latency backend is one of {sorted(METERS)} or a Meter (with op() and models()), got {backend!r}"
            )
        return backend
    if backend not in METERS:
        raise ArgumentError(f"latency backend must be one of {sorted(METERS)}, got {backend!r}")
    return METERS[backend](threads)


def estimate(meter: Meter, ops: list[tuple]) -> float:
    """Seconds for a recorded forward: the sum of its ops' table entries."""
    return sum(meter.op(signature) for signature in ops)
