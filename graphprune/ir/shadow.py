"""Shadow copies of a module tree: the graph's passes work on them, the user's model stays as it was.

A shadow is a copy of every module object (its own attribute, parameter,
buffer, child and hook tables) that shares the tensors themselves, so it costs
no tensor memory.  Passes slice, mask and swap on the shadow; a failure leaves
the user's model untouched, and the result is landed on it in one step
(`graphprune.writeback`).  `Snapshot` is the other half: it records a module
tree's tables so that a landing that does not verify can be rolled back.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["shadow", "own_class", "deepcopy_model", "Snapshot"]

_TABLES = (
    "_parameters",
    "_buffers",
    "_modules",
    "_non_persistent_buffers_set",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def own_class(module: nn.Module) -> None:
    """Give a module whose class is made per instance a class of its own: torch keeps a parametrized
    tensor as a property on a per-module class, and a GraphModule's forward lives on its class; a
    copy would otherwise share it with the original (and changing one would change the other)."""
    if isinstance(module, fx.GraphModule):  # a subclass: methods of the class may call super()
        module.__class__ = type(type(module).__name__, (type(module),), {})
    elif parametrize.is_parametrized(module):
        cls = type(module)
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def deepcopy_model(model: nn.Module, share: tuple[object, ...] = ()) -> nn.Module:
    """copy.deepcopy, with the classes made per instance (parametrized modules) made the copy's own;
    the objects in `share` are referenced, not copied."""
    clone = copy.deepcopy(model, {id(o): o for o in share})
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            own_class(module)
    return clone


def _copy_tables(module: nn.Module) -> None:
    for name in _TABLES:
        table = module.__dict__.get(name)
        if isinstance(table, (dict, set)):
            module.__dict__[name] = table.copy()  # (dict, OrderedDict and set copy themselves; copy.copy pickles)


def shadow(model: nn.Module) -> tuple[nn.Module, dict[int, nn.Module]]:
    """A copy of `model`'s module tree sharing its tensors, and `origin`: id(copy) -> original."""
    origin: dict[int, nn.Module] = {}
    clones: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in clones:  # a module used at two places stays one module
            return clones[id(m)]
        new = type(m).__new__(type(m))  # not copy.copy: GraphModule's own copy rebuilds the module
        new.__dict__.update(m.__dict__)
        _copy_tables(new)
        own_class(new)
        clones[id(m)] = new
        origin[id(new)] = m
        new._modules = OrderedDict((k, None if c is None else clone(c)) for k, c in m._modules.items())
        if isinstance(m, fx.GraphModule):  # a graph of its own, so that passes do not edit the original's
            new.meta = dict(getattr(m, "meta", {}))
            new.graph = copy.deepcopy(m.graph)
        return new

    return clone(model), origin


class Snapshot:
    """The tables and class of every module of a tree, to put them back after a failed landing
    (or to look at a graph as it was before a pass).  A parametrized module's class is made per
    instance and loses a tensor's property when its parametrization is removed: those are kept too."""

    def __init__(self, root: nn.Module) -> None:
        self.saved = []
        for m in {id(m): m for m in root.modules()}.values():
            tables = {
                name: m.__dict__[name].copy() for name in _TABLES if isinstance(m.__dict__.get(name), (dict, set))
            }
            cls = type(m)
            held = {k: cls.__dict__[k] for k in getattr(m, "parametrizations", {}) if k in cls.__dict__}
            self.saved.append((m, cls, dict(m.__dict__), tables, held))

    def restore(self) -> None:
        for m, cls, attrs, tables, held in self.saved:
            for name, prop in held.items():
                setattr(cls, name, prop)
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for name, table in tables.items():
                m.__dict__[name] = table
