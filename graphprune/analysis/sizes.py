"""Sizes read off tensors (`x.shape`, `x.size(1)`, torch.export's `sym_size`), followed dim by dim.

A size read is labeled like a tensor: each read dim carries the channels along
it (or none, for a batch, token or spatial dim).  Sizes of dims without
channels never change when pruning, so they may go anywhere.  A channel count
changes with pruning, which is fine where it only reshapes a tensor and wrong
where it enters a computation (a scale factor, an index, a new tensor): there
its channels are frozen.  In a reshape the size may be another tensor's width
(maxvit's `out.reshape(B, G, P, D)` with `D` read off the input), so Shrink
writes the width the reshaped dim keeps into the graph (the reshape rule
records which arguments carry channel counts).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from graphprune.ir.labels import varies_along

__all__ = ["DimSize", "read_size", "size_arithmetic", "shapes_only", "reads_size", "SIZE_ARITH"]

aten = torch.ops.aten


class DimSize:
    """The label of an int read off a tensor: the channels along the dim it measures (None: none),
    `derived` once arithmetic mixed it with other numbers.

    A read of a whole shape (`x.shape`, then `[-2:]`) gives one DimSize per dim, and a dim's
    channels are only worked out (freezing channels that one index mixes) when something uses
    that size: the dims nothing reads cost nothing and freeze nothing."""

    __slots__ = ("_labels", "_read", "derived")

    def __init__(
        self,
        labels: torch.Tensor | None = None,
        derived: bool = False,
        read: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        self._labels, self._read, self.derived = labels, read, derived

    @property
    def labels(self) -> torch.Tensor | None:
        if self._read is not None:
            self._labels, self._read = self._read(), None
        return self._labels

    def __repr__(self) -> str:
        return f"DimSize({'unread' if self._read is not None else self._labels}, derived={self.derived})"


_SIZE_METHODS = {"size", "numel", "nelement", "shape"}
_SYM_SIZES = {aten.sym_size.int: "size", aten.sym_numel.default: "numel", aten.sym_size.default: "size"}
SIZE_ARITH = {
    operator.mul,
    operator.floordiv,
    operator.add,
    operator.sub,
    operator.neg,
    operator.truediv,
    operator.mod,
    operator.pow,
    torch.sym_max,
    torch.sym_min,
    torch.sym_int,
    torch.sym_float,
}
# ops whose size arguments only reshape a tensor: Shrink rewrites a channel count there to the width
# the reshaped dim keeps (graphprune.rules.shape.Reshape); anywhere else it freezes its channels
_SHAPING_METHODS = {"view", "reshape", "expand", "unflatten"}
_SHAPING_FUNCTIONS = {
    torch.reshape,
    torch.unflatten,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
}


def reads_size(n: fx.Node) -> str | None:
    """ "size", "numel" or "shape" when the node reads a size off a tensor, else None."""
    if n.op == "call_method" and n.target in _SIZE_METHODS:
        return "numel" if n.target in ("numel", "nelement") else n.target
    if n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
        return "shape"
    if n.op == "call_function" and n.target in _SYM_SIZES:
        return _SYM_SIZES[n.target]
    return None


def _dim_arg(n: fx.Node) -> Any:
    if len(n.args) > 1:
        return n.args[1]
    return n.kwargs.get("dim")


def read_size(n: fx.Node, labels: Any, out: Any, along, unit_dims) -> Any:
    """The size labels of a size read: a tuple of DimSize for a whole shape, one DimSize for one dim.
    `along(labels, dim)` gives one label per index of a dim (the analyzer's, which freezes mixtures);
    `unit_dims(labels)` the dims along which each index holds one unit (those Shrink shortens).

    A dim is measured as channels only if Shrink could shorten it: one that varies because some of
    its indices hold no channel (zero padding around a feature map, a token of zeros before a
    sequence) while the channels run along another dim keeps its size, so reading it (an
    `F.interpolate(size=x.shape[-2:])`) freezes nothing."""
    kind = reads_size(n)
    tensor = labels if isinstance(labels, torch.Tensor) else None
    units: list[int] | None = None

    def measure(d: int) -> torch.Tensor | None:
        nonlocal units
        if units is None:
            units = unit_dims(tensor)
        if d not in units and any(e != d for e in units):
            return None  # the channels run along another dim: this one keeps its size
        return along(tensor, d)

    def dim_size(d: int) -> DimSize:
        if tensor is None or not varies_along(tensor, d):
            return DimSize(None)
        return DimSize(read=lambda: measure(d))

    if kind == "numel":
        parts = [dim_size(d).labels for d in range(tensor.ndim)] if tensor is not None else []  # read now
        parts = [p for p in parts if p is not None]
        return DimSize(torch.cat(parts) if parts else None, derived=True)
    dim = _dim_arg(n) if kind == "size" else None
    if isinstance(dim, int):
        ndim = tensor.ndim if tensor is not None else len(out) if isinstance(out, (tuple, list)) else 0
        return dim_size(dim % ndim) if ndim else DimSize(None)
    if isinstance(out, (tuple, list, torch.Size)):
        return tuple(dim_size(d) for d in range(len(out)))
    return DimSize(None)


def size_arithmetic(sizes: list[DimSize]) -> DimSize:
    """A number computed from sizes: it carries every channel any of them measured."""
    parts = [s.labels for s in sizes if s.labels is not None]
    return DimSize(torch.cat(parts) if parts else None, derived=True)


def shapes_only(n: fx.Node) -> bool:
    """Whether the node only uses its size arguments to shape a tensor."""
    if n.op == "call_method":
        return n.target in _SHAPING_METHODS
    return n.op == "call_function" and n.target in _SHAPING_FUNCTIONS
