"""DropBlocks: depth pruning, whole residual blocks removed (ShortGPT, Men et al. 2024).

A residual block computes out = h + f(h) (or h + f(h) + g(h + f(h)), as a transformer layer
does).  Removing it means out = h: the graph's uses of the block's output are pointed at its
input and the block's nodes die.  Blocks are found in the graph, not by class name: a candidate
is an item of a container (`nn.ModuleList`, `nn.Sequential`; see `graphprune.ir.blocks`) whose
nodes hand exactly one value to the rest of the graph, and that value is reached from the
block's input through additions only (the residual path), with the input's shape and dtype.
Anything else is named, with the reason, when it is asked for.

Which blocks go is decided on calibration data by the block influence 1 - cos(h, out),
averaged over positions (a block whose output points where its input did changes little).
`blocks=[...]` names them instead.

In the user's module tree the block is replaced by a `SkippedBlock`, which returns the hidden
state it is given: the container keeps its length and numbering, so the code that loops over
it, layer indices and checkpoints of the other blocks stay as they were.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from graphprune.arguments import choice
from graphprune.errors import ArgumentError, PreconditionError
from graphprune.ir.blocks import Block, residual_blocks
from graphprune.ir.distributed import sum_over_ranks
from graphprune.ir.inputs import calibration_batches, call_with, eval_mode
from graphprune.ir.modules import SkippedBlock
from graphprune.ir.weight_ops import tapped
from graphprune.pipeline import PassBase, PassContext, PassResult

__all__ = ["DropBlocks"]

SCORES = ("block_influence",)


class DropBlocks(PassBase):
    """Remove `n` residual blocks (an int), or that share of them (a float in (0, 1)), those with the
    lowest block influence on `calibration`; or the blocks named in `blocks`."""

    plan_op = "drop_blocks"

    def __init__(
        self,
        n: int | float | None = None,
        *,
        calibration: Iterable | None = None,
        score: str = "block_influence",
        blocks: Iterable[str] | None = None,
    ) -> None:
        if (n is None) == (blocks is None):
            raise ArgumentError(
                "DropBlocks takes n (how many blocks, or a share of them) or blocks=[paths], one of them"
            )
        if n is not None and (
            isinstance(n, bool)
            or not isinstance(n, (int, float))
            or (isinstance(n, int) and n < 1)
            or (isinstance(n, float) and not 0 < n < 1)
        ):
            raise ArgumentError(f"DropBlocks n must be a count >= 1 or a share in (0, 1), got {n!r}")
        if isinstance(blocks, str):
            raise ArgumentError("DropBlocks blocks must be a list of module paths, e.g. ['model.layers.3']")
        self.n, self.calibration, self.blocks = n, calibration, None if blocks is None else list(blocks)
        self.score = choice(score, "DropBlocks score", SCORES)

    @classmethod
    def from_plan(cls, step: dict) -> DropBlocks:
        return cls(blocks=step["blocks"])

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        candidates, refused = residual_blocks(gm)
        shapes: dict[str, bool] = {}  # output like input, on the example inputs
        same = lambda b, h, out: shapes.setdefault(b, h.shape == out.shape and h.dtype == out.dtype)  # noqa: E731
        _watch(gm, candidates, [(ctx.example_inputs, None)], same)
        for path in [b for b in candidates if not shapes.get(b, False)]:
            refused[path] = "its output does not have its input's shape and dtype"
            del candidates[path]
        influence = None
        if self.blocks is not None:
            unknown = [b for b in self.blocks if b not in candidates]
            if unknown:
                why = "; ".join(f"{b}: {refused.get(b, 'not an item of a module list')}" for b in unknown)
                raise ArgumentError(
                    f"DropBlocks cannot remove {unknown} ({why}); removable blocks: {sorted(candidates)[:20]}"
                )
            chosen = list(dict.fromkeys(self.blocks))
        else:
            if not candidates:
                why = "; ".join(f"{b}: {r}" for b, r in list(refused.items())[:5]) or "the model has no module lists"
                raise PreconditionError(f"DropBlocks found no residual block to remove ({why})")
            count = self.n if isinstance(self.n, int) else round(self.n * len(candidates))
            if count >= len(candidates):
                raise ArgumentError(
                    f"DropBlocks would remove {count} of the model's {len(candidates)} residual blocks; keep at least one"
                )
            influence = self._influence(gm, candidates)
            chosen = sorted(candidates, key=lambda b: (influence[b], b))[:count]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        skip: dict[fx.Node, fx.Node] = {}  # a removed block's output -> the value that replaces it
        for path in sorted(chosen, key=lambda b: order[candidates[b].output]):
            block = candidates[path]
            source = block.input
            while source in skip:  # the block before was removed too
                source = skip[source]
            block.output.replace_all_uses_with(source)
            skip[block.output] = source
        doomed = set().union(*(candidates[b].nodes for b in chosen))
        for node in reversed(list(gm.graph.nodes)):  # the blocks' nodes, their asserts included
            if node in doomed and not node.users:
                gm.graph.erase_node(node)
        for path in chosen:  # the block's modules go with it
            parent, _, name = path.rpartition(".")
            original = gm.get_submodule(path)  # (a stand-in without a forward of its own in exported graphs)
            gm.get_submodule(parent)._modules[name] = SkippedBlock(candidates[path].kind, _first_argument(original))
        gm.recompile()
        details = {
            "dropped": chosen,
            "plan": {"op": self.plan_op, "blocks": chosen},
            "note": f"removed {len(chosen)} residual block(s), a SkippedBlock in each one's place: {chosen}",
        }
        if influence is not None:
            details["influence"] = {b: round(influence[b], 6) for b in sorted(influence)}
        ctx.record(**details)
        return PassResult(gm, bool(chosen))

    def _influence(self, gm: fx.GraphModule, candidates: dict[str, Block]) -> dict[str, float]:
        """Per block: 1 - cos(input, output) over the features of every position, averaged."""
        sums: dict[str, torch.Tensor] = {}

        def add(path: str, h: torch.Tensor, out: torch.Tensor) -> None:
            dim = 1 if out.ndim in (4, 5) else out.ndim - 1  # conv maps: channels; sequences: features
            cos = torch.nn.functional.cosine_similarity(h.double(), out.double(), dim=dim)
            sums[path] = sums.get(path, 0) + torch.stack([(1 - cos).sum(), torch.tensor(float(cos.numel()))])

        _watch(gm, candidates, calibration_batches(self.calibration, self.name), add)
        totals = sum_over_ranks(sums, f"{self.name} block influence")
        return {path: float(t[0] / t[1]) for path, t in totals.items()}


def _watch(gm: fx.GraphModule, blocks: dict[str, Block], batches: list, see: Callable) -> None:
    """Run the batches (eval mode, no gradients), calling see(path, input, output) for every block."""
    inputs: dict[str, torch.Tensor] = {}

    def take_input(path):
        return lambda x: inputs.__setitem__(path, x.detach())

    def take_output(path):
        return lambda x: see(path, inputs.pop(path), x.detach())

    taps = {}  # `tapped` reads a node's first argument: tap a no-op reading each input and output
    for path, b in blocks.items():
        taps[_probe(gm, b.input)] = take_input(path)
        taps[_probe(gm, b.output)] = take_output(path)
    try:
        with tapped(gm, taps), eval_mode(gm), torch.no_grad():
            for batch, _ in batches:
                call_with(gm, batch)
    finally:
        for node in [n for n in gm.graph.nodes if n.name in taps]:
            gm.graph.erase_node(node)
        gm.recompile()


def _probe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A no-op node reading `node`, for `tapped` to tap (it taps a node's first argument)."""
    with gm.graph.inserting_after(node):
        return gm.graph.call_function(_identity, (node,)).name


def _identity(x):
    return x


def _first_argument(module: nn.Module) -> str:
    """The name of the block's first argument, for a SkippedBlock called with it by keyword."""
    if type(module).forward is nn.Module.forward:
        return "hidden_states"  # the stand-in of an exported graph: the name most blocks give it
    return next(iter(inspect.signature(module.forward).parameters), "hidden_states")
