"""Tracing in regions: a model whose own forward cannot be traced, analysed through the parts that can.

Detectors loop over a list of images, generate anchors from feature sizes and run NMS in their own
forward; neither torch.fx nor torch.export can put that in a graph.  Their backbone, FPN and heads
trace fine.  So the model is run once on the example inputs with every module call recorded, and:

* a call whose forward traces (with the containers of its arguments fixed as they were) is a
  **region**: its graph goes into one graph for the whole model;
* a call that does not is split into the calls it makes, the same way; its own code (the **glue**)
  stays out of the graph.  A call that makes no calls is an **untraced leaf**: a call in the graph
  when its arguments are tensors and plain values, else glue too;
* a tensor the glue hands from one call to another unchanged connects the two in the graph; a tensor
  the glue computes with (reads other than its shape) is an output of the graph, so its channels
  stay; a tensor the glue makes is a value captured on the example inputs.

The graph computes the **boundary** tensors (the heads' outputs before post-processing, say) on the
example inputs; where it holds captured values it runs on those inputs only.  It is never handed to
the user: compile() lands its result on the user's model and compares the same boundary tensors
there (`boundary_values`).
"""

from __future__ import annotations

import inspect
import linecache
import operator
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from graphprune.errors import TraceError
from graphprune.ir.inputs import call_with, clone_inputs
from graphprune.ir.shadow import Snapshot
from graphprune.ir.tracer import REGION_ROOT, Tracer, broke_in, short_path, user_frame
from graphprune.ir.verify import mismatch, run_outputs

__all__ = ["trace_regions", "boundary_values", "untraced_why", "BOUNDARY", "UNTRACED", "CAPTURED"]

BOUNDARY = "graphprune_boundary"  # gm.meta: per graph output, (module path, call index, leaf index, why)
UNTRACED = "graphprune_untraced"  # gm.meta: module path -> why its own forward is not in the graph
CAPTURED = "graphprune_captured"  # the child module holding values captured on the example inputs

# Reads of a tensor that do not use its values: sizes, dtype, device ...
_METADATA_METHODS = {"size", "dim", "ndimension", "numel", "__len__", "is_floating_point", "get_device", "stride"}
_METADATA_PROPERTIES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_meta"}


def untraced_why(exc: BaseException) -> str:
    """What broke tracing, and the line of user code it broke at."""
    text = str(exc).strip().split(". ")[0].splitlines()
    return f"{type(exc).__name__}: {text[0][:120] if text else ''} (at {user_frame(exc)})"


@dataclass(eq=False)
class _Call:
    path: str
    module: nn.Module
    args: tuple
    kwargs: dict
    index: int  # the how-many-th call of this module
    parent: _Call | None
    children: list[_Call] = field(default_factory=list)
    output: Any = None
    end: int = 0  # the tick at which it returned
    kind: str = ""  # "region", "node" (an untraced leaf called in the graph), "glue", "opaque"

    def within(self, kinds: tuple[str, ...]) -> bool:
        call = self
        while call is not None:
            if call.kind in kinds:
                return True
            call = call.parent
        return False


def _metadata(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "") in _METADATA_PROPERTIES
    return name in _METADATA_METHODS


def _caller() -> tuple[str, int]:
    frame = sys._getframe(2)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or "/graphprune/" in frame.f_code.co_filename):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)


class _Recorder(TorchFunctionMode):
    """Records module calls (as a tree) and which tensors each torch function read, in order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.stack: list[_Call] = []
        self.roots: list[_Call] = []
        self.counts: Counter = Counter()
        self.tick = 0
        self.reads: list[tuple[int, _Call, list[int], tuple[str, int]]] = []
        self.written: dict[int, list[int]] = {}  # id(tensor) -> ticks of in-place writes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack and not _metadata(func):
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if tensors:
                self.tick += 1
                self.reads.append((self.tick, self.stack[-1], [id(t) for t in tensors], _caller()))
                name = getattr(func, "__name__", "")
                if name == "__setitem__" or (name.endswith("_") and not name.startswith("_")):
                    self.written.setdefault(id(tensors[0]), []).append(self.tick)
        return func(*args, **kwargs)

    def pre(self, module, args, kwargs):
        path = self.paths.get(id(module))
        if path is None:
            return
        parent = self.stack[-1] if self.stack else None
        call = _Call(path, module, args, kwargs, self.counts[path], parent)
        self.counts[path] += 1
        (parent.children if parent is not None else self.roots).append(call)
        self.stack.append(call)

    def post(self, module, args, kwargs, output):
        if id(module) not in self.paths:
            return
        call = self.stack.pop()
        call.output = output
        self.tick += 1
        call.end = self.tick


def _record(model: nn.Module, example_inputs: tuple | dict) -> tuple[_Call, _Recorder]:
    rec = _Recorder(model)
    handles = []
    for m in {id(m): m for m in model.modules()}.values():
        handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post, with_kwargs=True))
    inputs = clone_inputs(example_inputs)
    try:
        with torch.no_grad(), rec:
            model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return rec.roots[0], rec


def _tensor_leaves(value: Any) -> list[tuple[tuple, torch.Tensor]]:
    """The tensors in a value, with the path to each: containers, and one level into objects
    (torchvision's ImageList holds `tensors`)."""
    found = []
    leaves, _ = pytree.tree_flatten_with_path(value)
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            found.append((tuple(path), leaf))
        elif hasattr(leaf, "__dict__") and not isinstance(leaf, (nn.Module, type)):
            for attr, v in vars(leaf).items():
                for sub, t in pytree.tree_flatten_with_path(v)[0]:
                    if isinstance(t, torch.Tensor):
                        found.append((tuple(path) + (pytree.GetAttrKey(attr),) + tuple(sub), t))
    return found


def _plain(value: Any) -> bool:
    """Can be an argument of a graph node (containers of tensors and plain values)."""
    return all(
        isinstance(v, (torch.Tensor, bool, int, float, str, torch.dtype, torch.device)) or v is None
        for v in pytree.tree_leaves(value)
    )


class CapturedValues(nn.Module):
    """Values the untraced code computed on the example inputs: the graph runs on those inputs only."""

    def __init__(self, inputs: Any) -> None:
        super().__init__()
        self.values: list[torch.Tensor] = []
        self.uses: list[tuple[str, int, int]] = []  # where each is used: (module path, call index, argument)
        self.signature = values_of(inputs)

    def forward(self, key: int, *inputs: Any) -> torch.Tensor:
        if values_of(inputs) != self.signature:
            raise TraceError(
                "this graph was traced in regions: it holds values that untraced code computed from the example "
                "inputs, so it runs on those inputs only (calibrate with the example inputs, or make the model's "
                "forward traceable)"
            )
        return self.values[key]


def values_of(inputs: Any) -> tuple:
    """A fingerprint of the tensors' values in a nested structure of inputs (shape and sum of each)."""
    return tuple(
        (tuple(t.shape), float(t.double().sum())) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)
    )


def _region_class(arity: int) -> type:
    """A module taking `arity` tensors that calls the wrapped module with its recorded arguments."""
    names = [f"t{i}" for i in range(arity)]
    namespace: dict[str, Any] = {}
    source = (
        f"def forward({', '.join(['self', *names])}):\n    return self.call(({''.join(n + ', ' for n in names)}))\n"
    )
    exec(source, namespace)  # noqa: S102
    return type(f"Region{arity}", (_Region,), {"forward": namespace["forward"]})


class _Region(nn.Module):
    def __init__(self, inner: nn.Module, leaves: list, spec, positions: list[int]) -> None:
        super().__init__()
        setattr(self, REGION_ROOT, inner)
        self.leaves, self.spec, self.positions = leaves, spec, positions

    def call(self, tensors: tuple) -> Any:
        leaves = list(self.leaves)
        for i, t in zip(self.positions, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return getattr(self, REGION_ROOT)(*args, **kwargs)


def _access(graph: fx.Graph, node: fx.Node, path: tuple) -> fx.Node:
    for key in path:
        if isinstance(key, pytree.SequenceKey):
            node = graph.call_function(operator.getitem, (node, key.idx))
        elif isinstance(key, pytree.MappingKey):
            node = graph.call_function(operator.getitem, (node, key.key))
        elif isinstance(key, pytree.GetAttrKey):
            node = graph.call_function(getattr, (node, key.name))
        else:
            raise TraceError(f"cannot address {key!r} in a graph")
    return node


@dataclass
class _Source:
    node: fx.Node | None  # None until first used (made from base + path)
    base: fx.Node
    path: tuple
    end: int  # tick its producer returned (-1 for inputs)
    where: tuple[str, int, int] | None  # (module path, call index, leaf index) for outputs of calls


class _Builder:
    def __init__(self, model: nn.Module, leaf_types: tuple[type, ...], untraced: dict[str, str], rec: _Recorder):
        self.model, self.leaf_types, self.untraced, self.rec = model, leaf_types, untraced, rec
        self.graph = fx.Graph()
        self.env: dict[int, _Source] = {}
        self.kept: list[torch.Tensor] = []  # keeps every tensor of env alive (ids stay unique)
        self.attrs: dict[str, Any] = {}  # graph targets -> objects
        self.placeholders: list[fx.Node] = []
        self.inputs: list[torch.Tensor] = []
        self.captured: CapturedValues | None = None
        self.constants = 0

    # -- values ------------------------------------------------------------------------
    def node_of(self, t: torch.Tensor, use: tuple[str, int, int] | None = None) -> fx.Node:
        """The node of a tensor a call receives (`use`: the call and the argument), or a value
        captured on the example inputs when the graph does not compute it."""
        src = self.env.get(id(t))
        if src is not None and not any(tick > src.end for tick in self.rec.written.get(id(t), ())):
            if src.node is None:  # made where it is first used
                src.node = _access(self.graph, src.base, src.path)
            return src.node
        if use is None:
            raise TraceError("a tensor the untraced code changed in place is read after it")
        if self.captured is None:
            self.captured = CapturedValues(self.inputs)
            self.attrs[CAPTURED] = self.captured
        self.captured.values.append(t)
        self.captured.uses.append(use)
        return self.graph.call_module(CAPTURED, (len(self.captured.values) - 1, *self.placeholders))

    def define(self, value: Any, base: fx.Node, end: int, call: _Call | None) -> None:
        for i, (path, t) in enumerate(_tensor_leaves(value)):
            self.env[id(t)] = _Source(None, base, path, end, (call.path, call.index, i) if call is not None else None)
            self.kept.append(t)

    # -- calls -------------------------------------------------------------------------
    def inputs_of(self, root: _Call, example_inputs: tuple | dict) -> None:
        if isinstance(example_inputs, dict):
            named = [(k, root.kwargs[k]) for k in example_inputs]
        else:
            names = list(_parameter_names(self.model))
            named = [(names[i] if i < len(names) else f"arg{i}", v) for i, v in enumerate(root.args)]
        for name, value in named:
            node = self.graph.placeholder(name)
            self.placeholders.append(node)
            self.inputs.extend(t for _, t in _tensor_leaves(value))
            self.define(value, node, -1, None)

    def glue(self, call: _Call) -> None:
        call.kind = "glue"
        for child in call.children:
            self.place(child)

    def place(self, call: _Call) -> None:
        if call.path in self.untraced or (self.leaf_types and isinstance(call.module, self.leaf_types)):
            return self.leaf(call)
        traced = self.trace(call)
        if traced is not None:
            return self.inline(call, *traced)
        if call.children:
            return self.glue(call)
        return self.leaf(call)

    def leaf(self, call: _Call) -> None:
        if not _plain((call.args, call.kwargs)):
            call.kind = "opaque"
            self.untraced.setdefault(call.path, "its arguments are objects a graph cannot hold")
            return
        call.kind = "node"
        self.untraced.setdefault(call.path, "untraced leaf")
        leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
        leaves = [
            self.node_of(v, (call.path, call.index, i)) if isinstance(v, torch.Tensor) else v
            for i, v in enumerate(leaves)
        ]
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        node = self.graph.call_module(call.path, tuple(args), dict(kwargs))
        self.attrs[call.path] = call.module
        self.define(call.output, node, call.end, call)

    def trace(self, call: _Call) -> tuple[fx.Graph, _Region] | None:
        leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
        positions = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        region = _region_class(len(positions))(call.module, leaves, spec, positions)
        while True:
            tracer = Tracer(self.leaf_types, self.untraced, prefix=call.path)
            state = Snapshot(call.module)  # tracing runs the forward on proxies: what it stores goes
            try:
                return tracer.trace(region), region
            except Exception as exc:
                where = broke_in(exc)
                if where.startswith(call.path + ".") and where not in self.untraced:
                    self.untraced[where] = untraced_why(exc)  # that submodule stays a call; try again
                    continue
                self.untraced[call.path] = f"own code not traced: {untraced_why(exc)}"
                return None
            finally:
                state.restore()

    def inline(self, call: _Call, graph: fx.Graph, region: _Region) -> None:
        call.kind = "region"
        tensors = [region.leaves[i] for i in region.positions]
        env: dict[fx.Node, Any] = {}
        placeholders = iter(zip(region.positions, tensors))
        out = None
        for n in graph.nodes:
            if n.op == "placeholder":
                i, t = next(placeholders)
                env[n] = self.node_of(t, (call.path, call.index, i))
            elif n.op == "output":
                out = fx.node.map_arg(n.args[0], lambda a: env[a])
            else:
                new = self.graph.node_copy(n, lambda a: env[a])
                if n.op in ("call_module", "get_attr"):
                    new.target = self._target(call, region, n.target)
                env[n] = new
        nodes, _ = pytree.tree_flatten(out)
        values, _ = pytree.tree_flatten(call.output)
        if len(nodes) != len(values):
            raise TraceError(f"the graph of {call.path} returns {len(nodes)} values, its forward {len(values)}")
        leaf_index = 0
        for node, value in zip(nodes, values):
            if isinstance(value, torch.Tensor):
                if isinstance(node, fx.Node):
                    self.env[id(value)] = _Source(node, node, (), call.end, (call.path, call.index, leaf_index))
                    self.kept.append(value)
                leaf_index += 1

    def _target(self, call: _Call, region: _Region, target: str) -> str:
        if target == REGION_ROOT or target.startswith(REGION_ROOT + "."):
            path = call.path + target[len(REGION_ROOT) :]
            self.attrs[path] = operator.attrgetter(path)(self.model)
            return path
        self.constants += 1  # a constant fx made while tracing the region (a tensor it holds)
        name = f"{CAPTURED}_constants.c{self.constants}"
        self.attrs[name] = operator.attrgetter(target)(region)
        return name

    # -- boundary ----------------------------------------------------------------------
    def boundary(self, root: _Call) -> tuple[list[fx.Node], list[tuple], list[torch.Tensor]]:
        """Tensors of the graph that untraced code reads (or the model returns), in order."""
        chosen: dict[int, tuple[str, torch.Tensor]] = {}
        alive = {id(t): t for t in self.kept}
        for tick, frame, ids, (file, line) in self.rec.reads:
            if frame.within(("region", "node")):
                continue
            for i in ids:
                src = self.env.get(i)
                if src is not None and src.where is not None and tick > src.end and i not in chosen:
                    code = linecache.getline(file, line).strip()
                    chosen[i] = (f"is read by untraced code ({short_path(file)}:{line}: {code})", alive[i])
        for _, t in _tensor_leaves(root.output):
            src = self.env.get(id(t))
            if src is not None and src.where is not None and id(t) not in chosen:
                chosen[id(t)] = ("reaches a model output", t)
        nodes, spec, values = [], [], []
        for i, (why, t) in chosen.items():
            nodes.append(self.node_of(t))
            spec.append((*self.env[i].where, why))
            values.append(t)
        return nodes, spec, values


def _parameter_names(model: nn.Module):
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def trace_regions(
    model: nn.Module, leaf_types: tuple[type, ...], example_inputs: tuple | dict, untraced: dict[str, str]
) -> fx.GraphModule:
    """The graph of `model`'s traceable calls, joined where the glue passes tensors unchanged (see
    the module docstring).  `untraced`: module paths already known not to trace, and why."""
    root, rec = _record(model, example_inputs)
    builder = _Builder(model, leaf_types, dict(untraced), rec)
    builder.inputs_of(root, example_inputs)
    builder.glue(root)
    nodes, spec, expected = builder.boundary(root)
    if not nodes:
        raise TraceError("no traceable part of the model computes anything the model uses")
    builder.graph.output(tuple(nodes))
    gm = fx.GraphModule(builder.attrs, builder.graph, class_name=type(model).__name__)
    for name, child in model.named_children():
        setattr(gm, name, child)
    gm.meta[BOUNDARY] = spec
    gm.meta[UNTRACED] = builder.untraced
    with torch.no_grad():  # in the mode it was recorded in
        got = call_with(gm, example_inputs)
    problem = mismatch(list(expected), list(got))
    if problem is not None:
        raise TraceError(f"the graph of the traced regions does not compute what the model computes: {problem}")
    return gm


def boundary_values(model: nn.Module, gm: fx.GraphModule, inputs: tuple | dict) -> tuple[list, list]:
    """The boundary tensors of a graph of regions on `inputs`, as `model` computes them and as the
    graph computes them from the values `model`'s untraced code hands the regions this time (a
    pruned model's proposals differ from the dense model's: the regions are compared on the same)."""
    spec = gm.meta[BOUNDARY]
    captured = getattr(gm, CAPTURED, None)
    uses = captured.uses if captured is not None else []
    wanted = {(path, index) for path, index, _, _ in spec} | {(path, index) for path, index, _ in uses}
    modules = dict(model.named_modules())
    seen: Counter = Counter()
    outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
    arguments: dict[tuple[str, int], list] = {}

    def hook(path):
        def record(module, args, kwargs, output):
            key = (path, seen[path])
            seen[path] += 1
            if key in wanted:
                outputs[key] = [t.detach() for _, t in _tensor_leaves(output)]
                arguments[key] = pytree.tree_leaves((args, kwargs))

        return record

    handles = [modules[p].register_forward_hook(hook(p), with_kwargs=True) for p in {p for p, _ in wanted}]
    try:
        run_outputs(model, inputs)
    finally:
        for h in handles:
            h.remove()
    got = [outputs[(path, index)][leaf] for path, index, leaf, _ in spec]
    if captured is None:
        return run_outputs(gm, inputs), got
    saved = captured.values
    captured.values = [arguments[(path, index)][i] for path, index, i in uses]
    try:
        return run_outputs(gm, inputs), got
    finally:
        captured.values = saved


def untraced_note(gm: fx.GraphModule) -> str:
    """The summary's account of what is not in the graph, and why."""
    untraced = gm.meta[UNTRACED]
    parts = [f"{path or type(gm).__name__}: {why}" for path, why in untraced.items()]
    if BOUNDARY in gm.meta:
        head = (
            "traced in regions: the model's own code between them runs as it is, and the tensors it reads keep "
            f"their channels ({len(gm.meta[BOUNDARY])} checked on the example inputs after pruning); not traced: "
        )
    else:
        head = "modules kept as calls (their inputs and outputs keep their channels): "
    return head + "; ".join(parts)
