"""Where a graph multiplies by a weight, and what reaches those ops on calibration data.

Both graph levels are covered by one scan: a symbolically traced graph calls
`nn.Linear` / `nn.ConvNd` modules, an exported one calls `aten.linear` /
`aten.conv2d` (or `F.linear`) on parameters read with get_attr, and
`addmm(bias, x, W)` with W stored (in, out) (Hugging Face's `Conv1D`: GPT-2).  Each such op
becomes a `WeightOp` named by its weight tensor, so data-driven scores,
CompensateBias and SparseLower read activations the same way on both.

Statistics are read by tapping the graph: a call is inserted in front of each
op for the duration of the calibration run, then removed.  Ops inside leaf
modules are not in the graph and are not seen.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from graphprune.ir.distributed import sum_over_ranks
from graphprune.ir.inputs import call_with, eval_mode

__all__ = [
    "WeightOp",
    "weight_ops",
    "node_arg",
    "swap_node",
    "tapped",
    "input_channel_stats",
    "input_hessians",
    "outer_product",
    "RunningMeans",
    "op_inputs",
    "op_input",
    "input_sq_norms",
    "per_index_sums",
]

aten = torch.ops.aten
_LINEAR = {F.linear, aten.linear.default}
_CONV = {F.conv1d, F.conv2d, F.conv3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADDMM = {torch.addmm, aten.addmm.default}  # addmm(bias, x, W): W stored (in, out)


@dataclass(frozen=True)
class WeightOp:
    """One op computing x @ W^T (+ b) over its input's channel dim (last for linear, 1 for conv)."""

    nodes: tuple[str, ...]  # the graph nodes calling it (a module called twice has two)
    weight: str  # qualified name of the weight tensor
    bias: str | None
    kind: str  # "linear" or "conv"
    groups: int = 1
    module: str | None = None  # the nn.Linear / nn.ConvNd that the graph calls, if any
    transposed: bool = False  # the weight is stored (in, out): addmm(bias, x, W), Hugging Face's Conv1D

    @property
    def in_dim(self) -> int:
        """The weight's dim that runs over the op's input channels."""
        return 0 if self.transposed else 1

    def channel_dim(self, x: torch.Tensor) -> int:
        return x.ndim - 1 if self.kind == "linear" else (1 if x.ndim > 2 else 0)


def op_input(node: fx.Node):
    """The argument of a linear/conv node that carries its input activations."""
    return node_arg(node, 1, "mat1") if node.target in _ADDMM else node_arg(node, 0, "input")


def per_index_sums(dim: int, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """Per index of `dim`: fn(*tensors), elementwise, summed over every other dim, in float64.
    A block of another dim at a time, so no float64 copy of a whole tensor is made (an LLM's
    output head in float64 is four times its bfloat16 size)."""
    first = tensors[0]
    others = [d for d in range(first.ndim) if d != dim]
    if not others:
        return fn(*(t.detach().double() for t in tensors))
    along = others[0]
    step = max(1, (1 << 22) // max(1, first.numel() // max(1, first.shape[along])))
    out = torch.zeros(first.shape[dim], dtype=torch.float64)
    for blocks in zip(*(t.detach().split(step, along) for t in tensors)):
        out += fn(*(b.double() for b in blocks)).sum(others)
    return out


def input_sq_norms(weight: torch.Tensor, in_dim: int = 1) -> torch.Tensor:
    """Per input index j of a linear/conv weight (its dim `in_dim`): the sum of W[:, j, ...]^2."""
    return per_index_sums(in_dim, torch.square, weight)


def node_arg(node: fx.Node, i: int, name: str, default=None):
    """Argument i of a call node, by position or keyword."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def swap_node(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> list[str]:
    """Put `new` in `node`'s place; drop the get_attr nodes only `node` read, return their targets."""
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    inputs = node.all_input_nodes
    gm.graph.erase_node(node)
    orphans = [n for n in inputs if n.op == "get_attr" and not n.users]
    for n in orphans:
        gm.graph.erase_node(n)
    return [n.target for n in orphans]


def _attr(node) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _weight_op(gm: fx.GraphModule, node: fx.Node) -> WeightOp | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear) or isinstance(m, _CONV_MODULES):
            kind = "linear" if isinstance(m, nn.Linear) else "conv"
            bias = f"{node.target}.bias" if m.bias is not None else None
            return WeightOp((node.name,), f"{node.target}.weight", bias, kind, getattr(m, "groups", 1), node.target)
        return None
    if node.op == "call_function" and node.target in _ADDMM:
        weight, bias = _attr(node_arg(node, 2, "mat2")), _attr(node_arg(node, 0, "input"))
        scaled = any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha"))
        return (
            None
            if weight is None or bias is None or scaled
            else WeightOp((node.name,), weight, bias, "linear", transposed=True)
        )
    if node.op != "call_function" or node.target not in _LINEAR | _CONV:
        return None
    weight, bias = _attr(node_arg(node, 1, "weight")), node_arg(node, 2, "bias")
    if weight is None or (bias is not None and _attr(bias) is None):
        return None
    kind = "linear" if node.target in _LINEAR else "conv"
    groups = node_arg(node, 6, "groups", 1) if kind == "conv" else 1
    return WeightOp((node.name,), weight, _attr(bias), kind, groups if isinstance(groups, int) else 1)


def weight_ops(gm: fx.GraphModule) -> dict[str, WeightOp]:
    """Every linear/conv op of the graph whose weight is a tensor of the model, by weight name.
    A weight used by several ops of the same form (a module called twice) is one entry; a weight
    that ops of different forms read (another bias, a module and a functional call) is left out."""
    out: dict[str, WeightOp] = {}
    mixed = set()
    for node in gm.graph.nodes:
        op = _weight_op(gm, node)
        if op is None:
            continue
        first = out.setdefault(op.weight, op)
        if first is not op:
            mixed |= {op.weight} if replace(first, nodes=op.nodes) != op else set()
            out[op.weight] = replace(first, nodes=first.nodes + op.nodes)
    return {k: v for k, v in out.items() if k not in mixed}


@contextmanager
def tapped(gm: fx.GraphModule, taps: dict[str, Callable[[torch.Tensor], None]]) -> Iterator[fx.GraphModule]:
    """Call `taps[node name](x)` with the input of those nodes while the block runs."""
    inserted = []
    try:
        for node in list(gm.graph.nodes):
            if node.name in taps:
                with gm.graph.inserting_before(node):
                    inserted.append(gm.graph.call_function(taps[node.name], (op_input(node),)))
        gm.recompile()
        yield gm
    finally:
        for n in inserted:
            gm.graph.erase_node(n)
        gm.recompile()


_STATISTICS = {
    "mean": lambda flat: flat.sum(1),
    "mean_abs": lambda flat: flat.abs().sum(1),
    "zero_fraction": lambda flat: (flat == 0).double().sum(1),
    "rms": lambda flat: flat.pow(2).sum(1),
    "variance": lambda flat: torch.stack([flat.sum(1), flat.pow(2).sum(1)]),  # (first, second moment)
}


class RunningMeans:
    """Per op (by weight name): the sum of `measure(op, input)` over every call the op's taps see,
    and the sum of the counts it returns; `means()` divides them.  Under torch.distributed both sums
    are summed over the ranks first, so every rank gets the statistics of all the shards together."""

    def __init__(self, measure: Callable[[WeightOp, torch.Tensor], tuple[torch.Tensor, int]]) -> None:
        self.measure = measure
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def tap(self, op: WeightOp) -> Callable[[torch.Tensor], None]:
        def record(x: torch.Tensor) -> None:
            value, count = self.measure(op, x.detach())
            self.sums[op.weight] = value + self.sums.get(op.weight, 0)
            self.counts[op.weight] += count

        return record

    def means(self, what: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The means of `names` (all so far if None), which are then forgotten."""
        names = sorted(self.sums if names is None else (n for n in names if n in self.sums))
        totals = sum_over_ranks(
            {
                **{f"sum:{k}": self.sums.pop(k) for k in names},
                **{f"count:{k}": torch.tensor(float(self.counts.pop(k))) for k in names},
            },
            what,
        )
        return {k: totals[f"sum:{k}"] / totals[f"count:{k}"] for k in names}


def _mean_over_calibration(
    gm: fx.GraphModule, ops: dict[str, WeightOp], batches: list, means: RunningMeans, what: str
) -> dict[str, torch.Tensor]:
    """`means` of each op's inputs over every calibration batch, run in eval mode."""
    with tapped(gm, {n: means.tap(op) for op in ops.values() for n in op.nodes}), eval_mode(gm), torch.no_grad():
        for inputs, _ in tqdm(batches, desc=what, unit="batch", disable=None, leave=False):
            call_with(gm, inputs)
    return means.means(what)


def input_channel_stats(
    gm: fx.GraphModule, ops: dict[str, WeightOp], batches: list, statistic: str
) -> dict[str, torch.Tensor]:
    """Per input channel of each op (by weight name): a statistic over every position of every
    calibration batch, in eval mode."""
    reduce = _STATISTICS[statistic]

    def measure(op: WeightOp, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        cdim = op.channel_dim(x)
        flat = x.double().movedim(cdim, 0).reshape(x.shape[cdim], -1)
        return reduce(flat), flat.shape[1]

    stats = _mean_over_calibration(gm, ops, batches, RunningMeans(measure), f"calibration statistics ({statistic})")
    if statistic == "rms":
        return {k: v.sqrt() for k, v in stats.items()}
    if statistic == "variance":
        return {k: (v[1] - v[0].pow(2)).clamp(min=0) for k, v in stats.items()}
    return stats


def outer_product(op: WeightOp, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x x^T summed over the positions of a linear op's input, in float64, and how many there were."""
    flat = x.reshape(-1, x.shape[-1]).double()
    return flat.T @ flat, flat.shape[0]


def input_hessians(gm: fx.GraphModule, ops: dict[str, WeightOp], batches: list) -> dict[str, torch.Tensor]:
    """Per linear op (by weight name): the mean over every calibration position of x x^T, its input's
    outer product (the Hessian of the layer's squared output error, up to a factor 2)."""
    linear = {k: op for k, op in ops.items() if op.kind == "linear"}
    return _mean_over_calibration(gm, linear, batches, RunningMeans(outer_product), "calibration Hessians")


def op_inputs(gm: fx.GraphModule, ops: dict[str, WeightOp], inputs: tuple | dict) -> dict[str, torch.Tensor]:
    """The input each op sees on its first call when the model runs on `inputs` (eval mode)."""
    seen: dict[str, torch.Tensor] = {}

    def tap(op: WeightOp):
        return lambda x: seen.setdefault(op.weight, x.detach().clone())

    with tapped(gm, {n: tap(op) for op in ops.values() for n in op.nodes}), eval_mode(gm), torch.no_grad():
        call_with(gm, inputs)
    return seen
