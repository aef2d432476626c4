"""Residual blocks in a graph: the items of a container (an `nn.ModuleList` or `nn.Sequential`, or
a module named by a number where the graph holds stand-ins) whose nodes hand one value to the
rest of the graph, reached from the block's input through additions only (the residual path).
DropBlocks removes them; block-by-block calibration runs them one at a time.  Found from the
nodes' module stacks, so in fx and torch.export graphs alike, by structure, never by class name.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from graphprune.ir.verify import module_of

__all__ = ["Block", "residual_blocks"]

aten = torch.ops.aten
_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
# ops that hand their input on as it is, where the block's dtype is the model's (the check on data
# compares dtypes): a norm's `x.to(float32)` that the residual add reads in exported graphs
_SAME = {aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.clone.default, aten.contiguous.default}
_SAME_METHODS = {"to", "float", "contiguous", "clone"}


@dataclass(frozen=True)
class Block:
    path: str  # the module's path in the model
    kind: str  # its class name
    input: fx.Node  # the hidden state it is given
    output: fx.Node  # the hidden state it hands on
    nodes: frozenset[fx.Node]  # its nodes, the reads of its own tensors included


def _in(node: fx.Node, path: str) -> bool:
    where = module_of(node)
    return where == path or where.startswith(path + ".")


def _residual_input(output: fx.Node, inside: set[fx.Node]) -> fx.Node | None:
    """The one value from outside the block that reaches `output` through additions only (and ops
    that hand a tensor on unchanged)."""
    found, todo, seen = set(), [output], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node not in inside:
            found.add(node)
        elif node.op == "call_function" and node.target in _ADD:
            todo.extend(a for a in node.args if isinstance(a, fx.Node))
        elif (node.op == "call_function" and node.target in _SAME) or (
            node.op == "call_method" and node.target in _SAME_METHODS
        ):
            todo.append(node.args[0])
    return next(iter(found)) if len(found) == 1 else None


def _items(gm: fx.GraphModule) -> dict[str, str]:
    """Module path -> class name of every module the graph runs that is an item of a container,
    from the nodes' module stacks: its parent is an `nn.ModuleList` / `nn.Sequential` (where the
    graph holds the model's own modules), or its name is a number (`layers.3`, `blocks.0`)."""
    items = {}
    for node in gm.graph.nodes:
        for value in (node.meta.get("nn_module_stack") or {}).values():
            path, kind = value if isinstance(value, tuple) else (str(value), "")
            if path in items or not path:
                continue
            parent, _, name = path.rpartition(".")
            try:
                container = isinstance(gm.get_submodule(parent), (nn.ModuleList, nn.Sequential))
            except AttributeError:
                container = False
            if container or name.isdigit():
                items[path] = getattr(kind, "__qualname__", str(kind).rpartition(".")[2])
    return items


def residual_blocks(gm: fx.GraphModule) -> tuple[dict[str, Block], dict[str, str]]:
    """(the residual blocks by path, why each other item of a module list is not one), from the graph's
    structure; that the output has the input's shape is checked on data (`DropBlocks` does)."""
    found, refused = {}, {}
    for path, kind in _items(gm).items():
        inside = {n for n in gm.graph.nodes if n.op != "get_attr" and _in(n, path)}
        own = frozenset(inside | {n for n in gm.graph.nodes if n.op == "get_attr" and _in(n, path)})
        leaving = [n for n in inside if any(u not in inside for u in n.users)]
        if len(leaving) != 1:
            refused[path] = f"it hands {len(leaving)} values to the rest of the graph, not one hidden state"
            continue
        (output,) = leaving
        source = _residual_input(output, inside)
        if source is None:
            refused[path] = "its output is not its input plus a residual branch (no single skip path)"
        else:
            found[path] = Block(path, kind, source, output, own)
    return found, refused
