"""SparseLower: replace sparse Linear layers and 1x1 convolutions by sparse-kernel modules.

Runs after a mask pass (unstructured, N:M, block, or channel masks that were
not shrunk).  Each linear/conv op of the graph (`graphprune.ir.weight_ops`) whose
effective weight is at least `min_sparsity` zeros is a candidate; its weight
and bias move into a `SparseLinear` / `SparseConv1x1` (`graphprune.ir.modules`)
that holds the weight compressed, and the graph calls that module instead.

With `choose="measure"` (the default) every candidate is timed on the input
it sees on the example inputs: dense vs each format, medians, each variant run
over all layers in turn as the model would (so small layers' weights are not
kept warm in cache between their own calls).
The fastest wins, so a layer where sparse kernels are not faster stays dense.
The decision and the timings are recorded and shown in the summary.  CSR fits
any sparsity pattern; BSR is tried only where the zeros come in blocks (the
largest block shape that stores at most 25 % more values than CSR).
Each lowered layer is checked against the dense op on that input.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from functools import partial
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphprune.arguments import choice, fraction, positive_int
from graphprune.errors import ArgumentError, PassError
from graphprune.ir.masking import raw_tensor, resolve
from graphprune.ir.modules import FORMATS, _SparseWeight, compress
from graphprune.ir.weight_ops import WeightOp, node_arg, op_inputs, swap_node, weight_ops
from graphprune.pipeline import PassBase, PassContext, PassResult
from graphprune.timing import interleaved

__all__ = ["SparseLower"]

CHOICES = ("measure", "first")
_BLOCKS = ((32, 32), (16, 16), (8, 8), (4, 4), (8, 1), (4, 1), (1, 8), (1, 4))


def _blocksize(w: torch.Tensor) -> tuple[int, int] | None:
    """The largest block shape whose BSR form stores at most 1.25x the non-zeros (None: no blocks)."""
    nnz = int((w != 0).sum())
    for r, c in _BLOCKS:
        if w.shape[0] % r or w.shape[1] % c:
            continue
        blocks = (w.reshape(w.shape[0] // r, r, w.shape[1] // c, c) != 0).any(3).any(1)
        stored = int(blocks.sum())
        if stored < blocks.numel() and stored * r * c <= 1.25 * max(nnz, 1):  # (no empty block: dense in disguise)
            return (r, c)
    return None


def _runs(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether torch's sparse kernels on this machine take the format (MKL refuses non-square BSR
    blocks in some products, for instance)."""
    try:
        with torch.no_grad():
            module(x)
        return True
    except RuntimeError:
        return False


class SparseLower(PassBase):
    """Lower sparse linear / 1x1 conv layers to compressed-weight modules (inference only).

    min_sparsity: lower only layers with at least this share of zero weights (in [0, 1)).
    formats: candidate formats, in order of preference ("csr", "bsr").
    choose: "measure" times dense vs each format per layer and keeps the fastest (dense
        included); "first" takes the first format that applies, without timing.
    """

    plan_op = "sparse_lower"

    def __init__(
        self, min_sparsity: float = 0.5, formats: Iterable[str] = FORMATS, choose: str = "measure", runs: int = 20
    ) -> None:
        min_sparsity = fraction(min_sparsity, "SparseLower min_sparsity")
        formats = (formats,) if isinstance(formats, str) else tuple(formats)
        unknown = [f for f in formats if f not in FORMATS]
        if unknown or not formats:
            raise ArgumentError(f"SparseLower formats must be a non-empty subset of {FORMATS}, got {formats!r}")
        choice(choose, "SparseLower choose", CHOICES)
        self.min_sparsity, self.formats, self.choose = min_sparsity, formats, choose
        self.runs = positive_int(runs, "SparseLower runs")
        self.fixed: dict[str, dict] | None = None  # replaying a saved plan: {weight: {"format", "blocksize"}}

    @classmethod
    def from_plan(cls, step: dict) -> SparseLower:
        lower = cls(choose="first")
        lower.fixed = step["layers"]
        return lower

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ops = weight_ops(gm)
        report: dict[str, dict] = {}
        candidates = {}
        for name, op in ops.items():
            if self.fixed is not None:
                if name in self.fixed:
                    candidates[name] = op
                continue
            why = self._unsupported(gm, op)
            if why is None:
                zeros = float((self._weight(gm, op) == 0).double().mean())
                why = (
                    None
                    if zeros >= self.min_sparsity
                    else f"sparsity {zeros:.3f} below min_sparsity {self.min_sparsity}"
                )
                report[name] = {"sparsity": zeros}
            if why is not None:
                report.setdefault(name, {})["kept_dense"] = why
            else:
                candidates[name] = op
        if self.fixed is not None and set(self.fixed) - set(candidates):
            raise PassError(
                f"the plan lowers layers this model does not have: {sorted(set(self.fixed) - set(candidates))[:5]}"
            )
        inputs = op_inputs(gm, candidates, ctx.example_inputs) if candidates else {}
        for name, op in list(candidates.items()):
            weight_ndim = getattr(*resolve(gm, op.weight)).ndim
            if op.kind == "conv" and inputs[name].ndim != weight_ndim:
                if self.fixed is not None:
                    raise PassError(f"the plan lowers {name}, whose input is not batched here")
                report[name]["kept_dense"] = "an unbatched convolution input"
                del candidates[name]
        chosen = self._fixed(gm, candidates) if self.fixed is not None else self._choose(gm, candidates, inputs, report)
        lowered = {}
        for name, module in chosen.items():
            self._replace(gm, candidates[name], module)
            lowered[name] = {"format": module.format, "blocksize": list(module.blocksize) if module.blocksize else None}
            report.setdefault(name, {})["format"] = module.format
        if lowered:
            gm.graph.lint()
            gm.recompile()
        if not ops:
            ctx.record(note="no linear or conv layers to lower")
        ctx.record(lowered=report, plan={"op": "sparse_lower", "layers": lowered})
        return PassResult(gm, bool(lowered))

    # -- which layers ----------------------------------------------------------------------
    @staticmethod
    def _unsupported(gm: fx.GraphModule, op: WeightOp) -> str | None:
        """Why a layer cannot be lowered, or None."""
        if op.transposed:
            return "its weight is stored (in, out) (addmm, Hugging Face's Conv1D), which no sparse kernel here takes"
        owner_path = op.weight.rpartition(".")[0]
        owner = gm.get_submodule(owner_path)
        own = {n for n, _ in owner.named_parameters(recurse=False)} | {n for n, _ in owner.named_buffers(recurse=False)}
        if (
            own - {"weight", "bias"}
            or (op.bias is not None and op.bias != f"{owner_path}.bias")
            or any(n != "parametrizations" for n, _ in owner.named_children())
        ):
            return "the module holding the weight holds other tensors or modules"
        weight = raw_tensor(owner, "weight")
        if weight.dtype not in (torch.float32, torch.float64):
            return f"{weight.dtype} weights (torch's CPU sparse kernels take float32 and float64)"
        names = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is weight]
        readers = {u.name for n in gm.graph.nodes if n.op == "get_attr" and n.target == op.weight for u in n.users}
        if len(names) > 1 or readers - set(op.nodes):
            return "the weight is shared (tied) with another layer"
        if op.kind == "conv":
            return SparseLower._not_pointwise(gm, op, weight)
        return None

    @staticmethod
    def _not_pointwise(gm: fx.GraphModule, op: WeightOp, weight: torch.Tensor) -> str | None:
        def every(value, want) -> bool:
            return (
                value == want
                if isinstance(value, int)
                else value == "valid"
                if isinstance(value, str)
                else all(v == want for v in value)
            )

        if any(k != 1 for k in weight.shape[2:]):
            return f"a {tuple(weight.shape[2:])} convolution (only 1x1 convolutions are matmuls)"
        for node in gm.graph.nodes:
            if node.name not in op.nodes:
                continue
            if node.op == "call_module":
                m = gm.get_submodule(node.target)
                settings = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}
            else:
                names = ("stride", "padding", "dilation", "groups")
                settings = {k: node_arg(node, 3 + i, k, 0 if k == "padding" else 1) for i, k in enumerate(names)}
            if not all(every(v, 0 if k == "padding" else 1) for k, v in settings.items()):
                return f"a convolution with {settings} (only stride 1, no padding, one group)"
        return None

    @staticmethod
    def _weight(gm: fx.GraphModule, op: WeightOp) -> torch.Tensor:
        w = getattr(*resolve(gm, op.weight)).detach()  # the effective (masked) weight
        return w.reshape(w.shape[0], -1)

    @staticmethod
    def _bias(gm: fx.GraphModule, op: WeightOp) -> torch.Tensor | None:
        return None if op.bias is None else getattr(*resolve(gm, op.bias)).detach()

    # -- choosing --------------------------------------------------------------------------
    def _candidates(self, op: WeightOp, w: torch.Tensor, b: torch.Tensor | None) -> list[_SparseWeight]:
        out = []
        for fmt in self.formats:
            if fmt == "csr":
                out.append(compress(w, b, op.kind, "csr"))
            elif (block := _blocksize(w)) is not None:
                out.append(compress(w, b, op.kind, "bsr", block))
        return out

    @staticmethod
    def _dense(op: WeightOp, w: torch.Tensor, b: torch.Tensor | None):
        """The op as the dense graph computes it, on the 2-D weight."""
        if op.kind == "linear":
            return lambda x: F.linear(x, w, b)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
        return lambda x: conv[x.ndim](x, w.reshape(*w.shape, *([1] * (x.ndim - 2))), b)

    def _fixed(self, gm: fx.GraphModule, ops: dict[str, WeightOp]) -> dict[str, _SparseWeight]:
        """The formats a saved plan names (the values come with the saved weights)."""
        out = {}
        for name, op in ops.items():
            fmt, block = self.fixed[name]["format"], self.fixed[name]["blocksize"]
            out[name] = compress(
                self._weight(gm, op), self._bias(gm, op), op.kind, fmt, tuple(block) if block else None
            )
        return out

    def _choose(
        self, gm: fx.GraphModule, ops: dict[str, WeightOp], inputs: dict, report: dict
    ) -> dict[str, _SparseWeight]:
        options = {}
        for name, op in ops.items():
            options[name] = [
                m for m in self._candidates(op, self._weight(gm, op), self._bias(gm, op)) if _runs(m, inputs[name])
            ]
            if not options[name]:
                report[name]["kept_dense"] = "no format fits (BSR needs the zeros in blocks) or runs here"
        options = {name: modules for name, modules in options.items() if modules}
        if self.choose == "first":
            chosen = {name: modules[0] for name, modules in options.items()}
        else:
            times, chosen = self._measure(gm, ops, options, inputs), {}
            for name, modules in options.items():
                report[name].update(times[name])
                best = min(modules, key=lambda m: times[name][f"{m.format}_ms"])
                if times[name][f"{best.format}_ms"] < times[name]["dense_ms"]:
                    chosen[name] = best
                else:
                    report[name]["kept_dense"] = "dense was fastest"
        for name, module in chosen.items():
            self._check(ops[name], module, self._weight(gm, ops[name]), self._bias(gm, ops[name]), inputs[name], name)
        return chosen

    def _measure(self, gm, ops, options, inputs) -> dict[str, dict[str, float]]:
        """Median ms of dense and of each format, per layer.  Each variant runs over all the layers
        in turn (dense for every layer, then CSR for every layer, ...), as a model runs them, so a
        layer's weights do not stay in cache between its own calls: small layers are not flattered."""
        calls = {}
        for variant in ("dense", *self.formats):
            for name, modules in options.items():
                x = inputs[name]
                if variant == "dense":
                    calls[(name, variant)] = partial(
                        self._dense(ops[name], self._weight(gm, ops[name]), self._bias(gm, ops[name])), x
                    )
                for m in modules:
                    if m.format == variant:
                        calls[(name, variant)] = partial(m, x)
        with torch.no_grad():
            samples = interleaved(calls, self.runs)
        out: dict[str, dict[str, float]] = defaultdict(dict)
        for (name, variant), seconds in samples.items():
            out[name][f"{variant}_ms"] = 1e3 * statistics.median(seconds)
        return out

    def _check(self, op, module, w, b, x, name) -> None:
        with torch.no_grad():
            expected, got = self._dense(op, w, b)(x), module(x)
        try:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        except AssertionError as exc:
            raise PassError(
                f"SparseLower: the {module.format} form of {name} does not compute what the dense layer does: {exc}"
            ) from exc

    # -- rewriting -------------------------------------------------------------------------
    @staticmethod
    def _replace(gm: fx.GraphModule, op: WeightOp, module: nn.Module) -> None:
        path = op.weight.rpartition(".")[0]
        parent_path, _, child = path.rpartition(".")
        setattr(gm.get_submodule(parent_path) if parent_path else gm, child, module)
        for node in list(gm.graph.nodes):
            if node.name in op.nodes:  # the dense weight and bias, no longer read, leave the graph too
                with gm.graph.inserting_before(node):
                    swap_node(gm, node, gm.graph.call_module(path, (node_arg(node, 0, "input"),)))
