"""Calibration block by block: every batch through one part of the graph, then the next part.

The graph's nodes are cut, in order, into parts: each residual block (`graphprune.ir.blocks`) is
a part, and so is each stretch of nodes between blocks.  All calibration batches go through a
part before any enters the next; between parts only the values that later parts read (the
hidden states, a mask, position embeddings) are kept, for every batch, so only one part's
activations are alive at a time.  A pass can read what a part's ops see (`taps`), change the
part's weights, and run the part again so the next part sees the outputs of the changed block:
that is how SparseGPT and the layer-wise LLM pruning papers calibrate (each block on the inputs
that the already pruned blocks before it give).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphprune.errors import InputError
from graphprune.ir.blocks import residual_blocks
from graphprune.ir.inputs import clone_inputs, eval_mode
from graphprune.ir.interpret import Interpreter
from graphprune.ir.weight_ops import op_input

__all__ = ["Blockwise"]


class Blockwise:
    """Runs `batches` (lists of (inputs, targets), as `calibration_batches` gives) through `gm` one
    part at a time.  Use as a context manager (eval mode, no gradients), then `run(part, taps)`."""

    def __init__(self, gm: fx.GraphModule, batches: list) -> None:
        self.gm = gm
        blocks = residual_blocks(gm)[0]
        owner = {n: path for path, b in blocks.items() for n in b.nodes}
        self.parts: list[list[fx.Node]] = []
        label = object()
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):  # tensors are read afresh where used
                continue
            here = owner.get(node)
            if not self.parts or here != label:
                self.parts.append([])
                label = here
            self.parts[-1].append(node)
        self.blocks = sum(1 for part in self.parts if owner.get(part[0]) is not None)
        where = {n: i for i, part in enumerate(self.parts) for n in part}
        # a value is freed after the last part that reads it (the output node does not count)
        self.last = {n: max((where[u] for u in n.users if u in where), default=-1) for n in gm.graph.nodes}
        self.interpreter = Interpreter(gm)
        self.envs = [self._placeholders(inputs) for inputs, _ in batches]

    def _placeholders(self, inputs: tuple | dict) -> dict[fx.Node, Any]:
        """The values of the graph's placeholders for one batch of inputs, as the graph's forward binds them."""
        inputs = clone_inputs(inputs)
        try:
            bound = inspect.signature(self.gm.forward).bind(
                *(inputs if isinstance(inputs, tuple) else ()), **(inputs if isinstance(inputs, dict) else {})
            )
        except TypeError as exc:
            raise InputError(f"calibration batch does not fit the graph's forward: {exc}") from None
        bound.apply_defaults()
        flat = self.gm.graph._codegen.process_inputs(*bound.args)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(flat) != len(placeholders):
            flat = pytree.arg_tree_leaves(*bound.args)
        return dict(zip(placeholders, flat))

    def __enter__(self) -> Blockwise:
        self._mode = eval_mode(self.gm)
        self._mode.__enter__()
        self._grad = torch.no_grad()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._grad.__exit__(*exc)
        self._mode.__exit__(*exc)

    def ops_in(self, part: int) -> set[str]:
        """Names of the part's nodes."""
        return {n.name for n in self.parts[part]}

    def run(self, part: int, taps: dict[str, Callable[[torch.Tensor], None]] | None = None, last: bool = True) -> None:
        """Every batch through part `part`; `taps[node name](x)` sees the first argument of those
        nodes.  `last=False` keeps the part's inputs, to run it again (after changing its weights)."""
        taps = taps or {}
        for env in self.envs:
            self.interpreter.env = env
            for node in self.parts[part]:
                for tensor in node.all_input_nodes:  # the weights as they are now (a pass may have changed them)
                    if tensor.op == "get_attr":
                        env[tensor] = self.interpreter.fetch_attr(tensor.target)
                if node.name in taps:
                    taps[node.name](env[op_input(node)].detach())
                env[node] = self.interpreter.run_node(node)
            if last:
                for node in [n for n in env if self.last.get(n, -1) <= part]:
                    del env[node]

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.parts)))
