"""The per-op rule contract and the one registry rules live in.

A rule says, for one op family, how channel labels flow from the op's inputs
to its outputs (see `graphprune.ir.labels`), which slices of its
parameters belong to which channel, and how to fix the module's attributes
once its tensors were sliced.  Rules are looked up by module class (through
the class hierarchy, as long as the subclass keeps the parent's forward), by
function or by method name.  An op with no rule is never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from graphprune.errors import ArgumentError
from graphprune.ir.labels import NONE, FreezeSite, LabelSpace, along, labeled_dims, none_like

aten = torch.ops.aten

__all__ = [
    "Rule",
    "OpCall",
    "ParamRef",
    "ParamView",
    "DerivedParams",
    "param_view",
    "param_views",
    "register_rule",
    "register_table",
    "overloads",
    "find_rule",
    "aten",
    "place",
]


@dataclass(frozen=True)
class ParamRef:
    """Label stand-in for a parameter or buffer read with get_attr: it can be sliced, not relabeled."""

    name: str
    shape: tuple[int, ...]
    maskable: bool = True  # a parameter (or a buffer a module declares maskable), not a plain buffer


@dataclass(frozen=True)
class ParamView:
    """A parameter seen through shape ops (expanded, permuted, rows picked by an index tensor, ...):
    `dims[j]` is the parameter dim that dim j of the value runs along, index for index (None: no
    dim of the parameter does).  Rules that slice parameters broadcast against channels (a class
    token concatenated with a sequence, a relative position table added per head) read it;
    every other rule sees unprunable data."""

    ref: ParamRef
    dims: tuple[int | None, ...]


@dataclass(frozen=True)
class DerivedParams:
    """A value computed element by element from parameters and buffers alone (torchvision's
    FrozenBatchNorm2d: `w * (rv + eps).rsqrt()`, then `b - rm * scale`): each of `views` is one of
    them seen from the value's dims (`len(view.dims)` is the value's ndim).  Where the value meets
    channels, every one of them is sliced with the channels; read any other way, all are read whole."""

    views: tuple[ParamView, ...]


def param_view(lab: Any) -> ParamView | None:
    """The view of a parameter a label stands for (a plain parameter is its own identity view)."""
    if isinstance(lab, ParamRef):
        return ParamView(lab, tuple(range(len(lab.shape))))
    return lab if isinstance(lab, ParamView) else None


def param_views(lab: Any) -> tuple[ParamView, ...]:
    """The parameters a label stands for, each seen from the value's dims (none for channel labels)."""
    if isinstance(lab, DerivedParams):
        return lab.views
    view = param_view(lab)
    return () if view is None else (view,)


@dataclass
class OpCall:
    """Everything a rule sees of one executed node."""

    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    labels: tuple  # mirrors args: label tensors, ParamRef, None for non-tensors
    label_kwargs: dict
    out: Any
    space: LabelSpace
    where: str = ""  # node name and source module path, for messages
    extra: dict = field(default_factory=dict)
    size_labels: Any = None  # (args, kwargs) labels with the sizes read off tensors (graphprune.analysis.sizes), for ops that shape with them

    def site(self, kind: str, reason: str, source: str | None = None, dim: int | None = None) -> FreezeSite:
        return FreezeSite(kind, self.node.name, reason, source, dim, self.where)

    def param(self, attr: str) -> str:
        """Qualified name of a tensor of the called module."""
        return f"{self.node.target}.{attr}"

    def slot_param(self, ref: ParamRef, dim: int, labels: torch.Tensor, consumer: bool = False) -> None:
        """Slice a parameter read with get_attr along `dim` with these channels (this use is sliced)."""
        self.space.add_slot(ref.name, dim, labels, consumer=consumer)
        self.extra.setdefault("sliced_params", set()).add(ref.name)

    def input(self, i: int = 0) -> torch.Tensor:
        """Label tensor of positional argument i (parameters read as unprunable data)."""
        return as_labels(self.labels[i], self.args[i])

    def along(self, labels: torch.Tensor, dim: int) -> torch.Tensor:
        return along(self.space, labels, dim, self.site("conflict", "one index mixes several channels"))

    def out_none(self) -> Any:
        return map_tensors(self.out, lambda t: none_like(t.shape))

    def freeze_inputs(self, kind: str, reason: str) -> None:
        args = list(self.node.args) + list(self.node.kwargs.values())
        labels = list(self.labels) + [self.label_kwargs.get(k) for k in self.node.kwargs]
        for arg, lab in zip(args, labels):
            source = arg.name if isinstance(arg, fx.Node) else None
            for t in iter_label_tensors(lab):
                self.space.freeze(t, self.site(kind, reason, source=source, dim=single_dim(t)))


def place(per_channel: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """Labels of an output whose dim `dim` carries these per-channel labels (broadcast elsewhere)."""
    view = [1] * len(shape)
    view[dim] = -1
    return per_channel.reshape(view).expand(shape)


def single_dim(t: torch.Tensor) -> int | None:
    dims = labeled_dims(t)
    return dims[0] if len(dims) == 1 else None


def as_labels(lab: Any, value: Any) -> torch.Tensor:
    if isinstance(lab, torch.Tensor):
        return lab
    if isinstance(value, torch.Tensor):
        return none_like(value.shape)
    raise TypeError("not a tensor argument")


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        mapped = [map_tensors(v, fn) for v in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else tuple(mapped)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return None


def iter_label_tensors(lab: Any):
    if isinstance(lab, torch.Tensor):
        if lab.numel() and bool((lab != NONE).any()):
            yield lab
    elif isinstance(lab, (tuple, list)):
        for v in lab:
            yield from iter_label_tensors(v)
    elif isinstance(lab, dict):
        for v in lab.values():
            yield from iter_label_tensors(v)


class Rule:
    """One op family. Subclasses implement `propagate`; `update_module` when they own attributes.
    `follows_params`: the op only moves a tensor's elements around (views, permutes, indexing), so a
    parameter going through it stays a sliceable `ParamView` (the analyzer works out the dims)."""

    follows_params = False

    def propagate(self, call: OpCall) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def update_module(self, module: nn.Module) -> None:
        """Fix attributes (in_channels, num_features, ...) after the module's tensors were sliced."""


_by_type: dict[type, Rule] = {}
_by_function: dict[Callable, Rule] = {}
_by_method: dict[str, Rule] = {}
_by_qualname: dict[str, Rule] = {}


def register_rule(target: type | Callable | str, rule: Rule) -> None:
    """Register `rule` for a module class, a function (or aten op), a tensor method name, or the
    qualified name of a function or module class of a package that need not be imported now
    ("torchvision.ops.stochastic_depth.stochastic_depth").

    Registering for your own module class lets graphprune prune through it
    when it is traced as a leaf; see `ChannelwiseRule` for the common case.
    """
    if not isinstance(rule, Rule):
        raise ArgumentError(f"register_rule expects a graphprune Rule instance, got {type(rule).__name__}")
    if isinstance(target, str) and "." in target:  # a function of a package that need not be imported now
        _by_qualname[target] = rule
    elif isinstance(target, str):
        _by_method[target] = rule
    elif isinstance(target, type) and issubclass(target, nn.Module):
        _by_type[target] = rule
    elif callable(target):
        _by_function[target] = rule
    else:
        raise ArgumentError(f"cannot register a rule for {target!r}: give a module class, a function or a method name")


def register_table(table: list[tuple[tuple[Any, ...], Rule]]) -> None:
    """Register a rule file's table: (targets, rule) rows, every target served by that rule."""
    for targets, rule in table:
        for target in targets:
            register_rule(target, rule)


def overloads(*packets) -> list:
    """Every overload of ATen op packets (aten.add -> aten.add.Tensor, aten.add.Scalar, ...)."""
    return [getattr(packet, name) for packet in packets for name in packet.overloads()]


def rule_for_module(module: nn.Module, for_attributes: bool = False) -> Rule | None:
    """The rule of a module's class.  A subclass that rewrites forward computes something else,
    so it gets no rule for propagation; its attributes (in_channels, ...) still follow the base."""
    cls = type(module)
    for base in cls.__mro__:
        rule = _by_type.get(base) or (
            _by_qualname.get(f"{base.__module__}.{base.__qualname__}") if _by_qualname else None
        )
        if rule is not None:
            return rule if (for_attributes or cls.forward is base.forward) else None
    return None


def find_rule(node: fx.Node, module: nn.Module | None = None) -> Rule | None:
    if node.op == "call_module" and module is not None:
        return rule_for_module(module)
    if node.op == "call_function":
        rule = _by_function.get(node.target)
        if rule is None and _by_qualname:
            name = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', '')}"
            rule = _by_qualname.get(name)
        return rule
    if node.op == "call_method":
        return _by_method.get(node.target)
    return None
