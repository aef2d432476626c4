"""One trace per pipeline: the graph of a model, remembered for the next compile() of that model.

Tracing (torch.export for most Hugging Face models: seconds) and the channel analysis are
the slow part of compile().  A pipeline compiles the same model again and again: mask, then
Shrink; a Pruner's steps; sensitivity() and target searches.  So compile() remembers, per model
object (weakly: the memo goes when the model does), the graph it found for it and its
channel analysis: for the model it was given (the graph as traced) and for the model it returns
(the graph after the passes, which the landing verified that model computes).  The last few
are also kept by structure, for other instances of the same architecture.

A memo is used only while the model still has the structure it was made for: the same
module paths and classes, tensor shapes and dtypes, train/eval modes, the modules' own
attributes (a head count, a list of what to call in which order), Hugging Face config, leaf
modules and example input shapes (`_key`).  Anything else a forward reads that changes later
(a class attribute, a global flag) is caught by compile(): it traces afresh when a result built
on a remembered graph does not land, or when a pass fails on it (see graphprune.compile).
"""

from __future__ import annotations

import copy
import enum
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from graphprune.analysis.dependency import Dependencies
from graphprune.ir.partial import BOUNDARY, UNTRACED, values_of
from graphprune.ir.trace import ROOT_HOLDER, TRACED_BY
from graphprune.rules.attention import GQA_QUERY_HEADS

__all__ = ["remember", "recall", "known_outputs", "forget"]

logger = logging.getLogger(__name__)


@dataclass
class _Memo:
    key: tuple
    graph: fx.Graph | None  # a private copy (every recall hands out a copy); None for a graph module
    class_name: str
    traced_by: str | None
    root_tensors: dict[str, torch.Tensor]  # tensors only the graph holds (hoisted constants)
    root_modules: dict[str, nn.Module]  # modules only the graph holds (torch.export's input guards)
    dependencies: Dependencies | None
    meta: dict = field(default_factory=dict)  # a graph of regions: its boundary and what is not traced


_MEMOS: weakref.WeakKeyDictionary[nn.Module, _Memo] = weakref.WeakKeyDictionary()
# the last graphs remembered, by structure: another instance of the same architecture (a checkpoint
# loaded again, a fresh copy) finds its graph here; what its key cannot see, the landing checks
_BY_STRUCTURE: OrderedDict[tuple, _Memo] = OrderedDict()
_STRUCTURES = 4
# what a model returned by compile() computed on the example inputs, and the tensors it computed it from
_OUTPUTS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # compile() may run in several threads


def _signature(value) -> tuple:
    leaves, spec = pytree.tree_flatten(value)
    return str(spec), tuple(
        (tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else repr(v) for v in leaves
    )


_TORCH_OWN = frozenset(nn.Module().__dict__)  # what nn.Module keeps in every module (hooks, tables, mode)
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size, range)


def _value(v, seen: dict, depth: int = 0):
    """A module attribute as the key holds it (hashable): plain data by type and value, a config by
    its contents, a small tensor by its values, anything else by identity (another instance then
    has other objects, so it is not taken for the same structure)."""
    if isinstance(v, _PLAIN) or isinstance(v, enum.Enum):
        return type(v).__name__, v  # (True and 1 are other values)
    if isinstance(v, slice):  # (not hashable before Python 3.12)
        return "slice", _value(v.start, seen), _value(v.stop, seen), _value(v.step, seen)
    if isinstance(v, (list, tuple, set, frozenset, dict)) and depth < 4:
        items = sorted(v.items(), key=repr) if isinstance(v, dict) else v
        items = sorted(items, key=repr) if isinstance(v, (set, frozenset)) else items
        return type(v).__name__, tuple(_value(x, seen, depth + 1) for x in items)
    if id(v) not in seen:  # (a config is held by many modules: read once)
        seen[id(v)] = _by_contents(v)
    return seen[id(v)]


def _by_contents(v) -> tuple:
    """A tensor or config by what it holds; by identity where that cannot be read."""
    try:
        if isinstance(v, torch.Tensor) and v.layout == torch.strided and (v.is_meta or v.numel() <= 4096):
            data = None if v.is_meta else v.detach().resolve_conj().resolve_neg().reshape(-1).cpu().contiguous()
            values = None if data is None else hash(data.view(torch.uint8).numpy().tobytes())  # (as bytes)
            return "tensor", tuple(v.shape), v.dtype, values
        if hasattr(v, "to_dict") and not isinstance(v, type):
            return type(v).__qualname__, repr(v.to_dict())
    except Exception:  # (a view that cannot be read as bytes, a to_dict that wants arguments)
        pass
    return type(v).__qualname__, id(v)


def _attributes(m: nn.Module, seen: dict) -> tuple:
    """The module's own attributes (graphprune's records left out: they do not change a forward)."""
    own = (k for k in m.__dict__ if k not in _TORCH_OWN and not k.startswith("graphprune"))
    return tuple((k, _value(m.__dict__[k], seen)) for k in sorted(own))


def _key(model: nn.Module, leaf_modules: Iterable[type], example_inputs: tuple | dict, values: bool = False) -> tuple:
    """`values`: the example inputs' values count too (a graph of regions holds values computed from them)."""
    seen: dict = {}
    structure = tuple(
        (
            path,
            type(m).__module__,
            type(m).__qualname__,
            m.training,
            tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in m._parameters.items()),
            tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in m._buffers.items()),
            _attributes(m, seen),
        )
        for path, m in model.named_modules(remove_duplicate=False)
    )
    config = getattr(model, "config", None)
    config = repr(config.to_dict()) if hasattr(config, "to_dict") else None
    code = model.code if isinstance(model, fx.GraphModule) else None  # a graph module is its graph
    inputs = _signature(example_inputs)
    if values:
        inputs += (values_of(example_inputs),)
    return structure, config, code, tuple(leaf_modules), inputs


def remember(
    model: nn.Module,
    gm: fx.GraphModule,
    leaf_modules: Iterable[type],
    example_inputs: tuple | dict,
    dependencies: Dependencies | None = None,
    outputs=None,
) -> _Memo | None:
    """Remember `gm`'s graph (copied) as the graph of `model`, whose structure it was traced from,
    and its analysis (only the analysis for a graph module: compile() uses its graph as it is), and
    `outputs`, what `model` computes on `example_inputs` as it is now, if given."""
    if isinstance(model, fx.GraphModule):
        memo = _Memo(_key(model, leaf_modules, example_inputs), None, "", None, {}, {}, dependencies)
        with _LOCK:
            _MEMOS[model] = memo
        return memo
    stale = _called_not_traced(model, gm, tuple(leaf_modules))
    if stale is not None:  # a fresh trace would go inside it, so the next compile() traces afresh
        logger.debug("not remembering the graph of %s: it calls %s whole", type(model).__name__, stale)
        forget(model)
        return None
    holder = getattr(gm, ROOT_HOLDER, None)
    root_tensors = {} if holder is None else {k: t for k, t in holder.named_buffers() if "." not in k}
    root_tensors.update({} if holder is None else {k: t for k, t in holder.named_parameters() if "." not in k})
    memo = _Memo(
        _key(model, leaf_modules, example_inputs, values=gm.meta.get(TRACED_BY) == "partial"),
        copy.deepcopy(gm.graph),
        type(gm).__name__,
        gm.meta.get(TRACED_BY),
        root_tensors,
        {k: m for k, m in gm.named_children() if k not in model._modules and k != ROOT_HOLDER},
        dependencies,
        {k: gm.meta[k] for k in (BOUNDARY, UNTRACED, GQA_QUERY_HEADS) if k in gm.meta},
    )
    with _LOCK:
        _MEMOS[model] = memo
        _OUTPUTS.pop(model, None)
        if outputs is not None:
            _OUTPUTS[model] = (outputs, _contents(model, example_inputs))
        if memo.traced_by != "partial":  # (a graph of regions holds values of the inputs it ran on)
            _BY_STRUCTURE[memo.key] = memo
            _BY_STRUCTURE.move_to_end(memo.key)
            while len(_BY_STRUCTURE) > _STRUCTURES:
                _BY_STRUCTURE.popitem(last=False)
    return memo


def _called_not_traced(model: nn.Module, gm: fx.GraphModule, leaf_modules: tuple[type, ...]) -> str | None:
    """A module the graph calls whole that a trace of `model` would go inside: the graph of a
    masked model calls a masked LayerNorm as a module (graphprune's class mixed into the user's);
    once Shrink takes the mix out, the user's class may be one whose own forward a trace reads
    (timm's LayerNorm), and no rule knows that class as a whole."""
    untraced = gm.meta.get(UNTRACED, {})  # kept as calls on purpose (their forward breaks tracing)
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in untraced:
            continue
        try:
            m = model.get_submodule(node.target)
        except AttributeError:
            continue
        if type(m).__module__.startswith(("torch.nn.", "torch.ao.nn.", "graphprune.")) or isinstance(m, leaf_modules):
            continue
        return f"{node.target} ({type(m).__name__})"
    return None


def _contents(model: nn.Module, example_inputs: tuple | dict) -> list[tuple[weakref.ref, int]]:
    """Every tensor of the model and of the inputs, weakly, with its version counter: the same objects
    at the same versions hold the same values (an optimizer step or an in-place edit bumps them)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    tensors = [t for _, t in named]
    tensors += [t for t in pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor)]
    return [(weakref.ref(t), t._version) for t in tensors]


def known_outputs(model: nn.Module, example_inputs: tuple | dict):
    """What `model` computed on these very inputs when it was remembered, if neither its tensors nor
    the inputs changed since (None otherwise); call after `recall` found its graph valid."""
    with _LOCK:
        known = _OUTPUTS.get(model)
    if known is None:
        return None
    outputs, then = known
    now = _contents(model, example_inputs)
    same = len(now) == len(then) and all(a() is b() and va == vb for (a, va), (b, vb) in zip(then, now))
    return outputs if same else None


def forget(model: nn.Module | None = None) -> None:
    """Drop what compile() remembers about `model` (its next compile() traces it afresh), also for
    other instances of its structure; with no model, everything it remembers."""
    with _LOCK:
        if model is None:
            _MEMOS.clear()
            _OUTPUTS.clear()
            _BY_STRUCTURE.clear()
            return
        memo = _MEMOS.pop(model, None)
        _OUTPUTS.pop(model, None)
        if memo is not None and _BY_STRUCTURE.get(memo.key) is memo:
            del _BY_STRUCTURE[memo.key]


def recall(
    model: nn.Module, shadow: nn.Module, leaf_modules: Iterable[type], example_inputs: tuple | dict
) -> tuple[fx.GraphModule | None, Dependencies | None] | None:
    """The remembered graph of `model` built over `shadow` (its shadow or copy: the same module
    paths; None for a graph module) and its analysis, or None when nothing valid is remembered."""
    with _LOCK:
        memo = _MEMOS.get(model)
    if memo is not None:
        if memo.key != _key(model, leaf_modules, example_inputs, values=memo.traced_by == "partial"):
            forget(model)
            return None
    elif isinstance(model, fx.GraphModule):
        return None
    else:  # another instance of the same structure was compiled (kept by structure: found by its key)
        key = _key(model, leaf_modules, example_inputs)
        with _LOCK:
            memo = _BY_STRUCTURE.get(key)
            if memo is None:
                return None
            _MEMOS[model] = memo
    if memo.graph is None:
        return None, memo.dependencies
    source = nn.Module()  # the shadow's children, and the graph's own tensors where the model has none
    source._modules.update(memo.root_modules)
    source._modules.update(shadow._modules)
    holder = nn.Module()
    # the root's tensors the graph reads: the model's own (a model returned by compile() holds them
    # itself, so only their names are in the graph), else the ones only the graph held
    prefix = ROOT_HOLDER + "."
    read = [n.target[len(prefix) :] for n in memo.graph.nodes if n.op == "get_attr" and n.target.startswith(prefix)]
    read = [name for name in read if "." not in name]  # (a mask's own tensors come with the masks)
    masked = getattr(shadow, "parametrizations", {})
    for name in dict.fromkeys([*memo.root_tensors, *read]):
        own = masked[name].original if name in masked else getattr(shadow, name, None)  # (the stored tensor)
        t = own if isinstance(own, torch.Tensor) else memo.root_tensors.get(name)
        if isinstance(t, nn.Parameter):
            holder.register_parameter(name, t)
        elif isinstance(t, torch.Tensor):
            holder.register_buffer(name, t)
    source._modules[ROOT_HOLDER] = holder
    try:
        gm = fx.GraphModule(source, copy.deepcopy(memo.graph), class_name=memo.class_name)
    except Exception:  # a target the model no longer has: trace afresh
        logger.debug("the remembered graph does not fit %s", type(model).__name__, exc_info=True)
        forget(model)
        return None
    for name, child in shadow.named_children():  # the whole tree, as a fresh trace holds it
        setattr(gm, name, child)
    for name, child in memo.root_modules.items():
        setattr(gm, name, child)
    if holder._parameters or holder._buffers:
        setattr(gm, ROOT_HOLDER, holder)
    gm.meta[TRACED_BY] = memo.traced_by
    gm.meta.update(memo.meta)
    gm.training = shadow.training
    return gm, memo.dependencies
