"""Verification: passes that claim to keep what the model computes are checked, by default.

Before such a pass runs, the graph's outputs on the example inputs are taken
(or re-used, when the graph ran since it last changed) and the graph is
recorded as it was (a copy of the graph, the tables of its modules: no
tensors).  After the pass, the model runs again and its outputs must match.
When they do not (or the model no longer runs), the old graph is put back for
a moment and every node's output fingerprinted (shape, sum, sum of
magnitudes), then the new graph is run node by node and the first node whose
output has the shape it had but other values, or that raises, is named with its
module path, together with the channel groups that touch it.  A passing check
costs at most two forwards and never a second analysis.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphprune.errors import GraphPruneWarning, VerificationError
from graphprune.ir.inputs import call_with, clone_inputs, eval_mode, positional_inputs
from graphprune.ir.interpret import Interpreter
from graphprune.ir.shadow import Snapshot

__all__ = [
    "module_of",
    "Before",
    "Reference",
    "reference",
    "run_outputs",
    "mismatch",
    "check_keeps_outputs",
    "check_runs",
]

# allowed error relative to the largest magnitude of each output, by dtype (summation order
# changes when channels go; half precision rounds every partial sum)
_RTOL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Reference:
    """What a graph computed on the example inputs: its outputs, and the graph as it was
    (`Before`), whose nodes are fingerprinted only if a check fails."""

    outputs: Any
    before: Before


class Before:
    """A graph module as it was before a pass (its graph copied, its modules' tables recorded: no
    tensor is copied), so that the node fingerprints of that graph are taken only when the pass
    fails its check.  A tensor the pass changed in place makes them unknowable (None)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.graph = copy.deepcopy(gm.graph)
        self.snapshot = Snapshot(gm)
        self.versions = [(t, t._version) for t in [*gm.parameters(), *gm.buffers()]]

    def fingerprints(self, gm: fx.GraphModule, example_inputs: tuple | dict) -> dict | None:
        if any(t._version != v for t, v in self.versions):
            return None
        after_graph, after = gm.graph, Snapshot(gm)
        self.snapshot.restore()
        gm.graph = self.graph
        try:
            return _fingerprints(gm, example_inputs)
        finally:
            after.restore()
            gm.graph = after_graph


def _fingerprint(t: torch.Tensor) -> tuple[tuple[int, ...], float, float]:
    t = t.detach()  # (accumulated in float64 without a float64 copy of the activation)
    return tuple(t.shape), float(t.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(t, 1, dtype=torch.float64))


class _Fingerprinter(Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.prints: dict[str, tuple[tuple[int, ...], float, float]] = {}
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        out = super().run_node(n)
        if n.op == "get_attr":  # a weight, not an activation: the ops reading it are fingerprinted
            return out
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.device.type != "meta":
            self.prints[n.name] = _fingerprint(out)
        return out


def _detach(value: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


def run_outputs(model: torch.nn.Module, example_inputs: tuple | dict) -> Any:
    """The model's outputs on the example inputs, in eval mode, without gradients."""
    with eval_mode(model), torch.no_grad():
        return _detach(call_with(model, example_inputs))


def _fingerprints(gm: fx.GraphModule, example_inputs: tuple | dict) -> dict:
    interp = _Fingerprinter(gm)
    with eval_mode(gm), torch.no_grad():
        interp.run(*positional_inputs(gm, clone_inputs(example_inputs)))
    return interp.prints


def reference(gm: fx.GraphModule, example_inputs: tuple | dict, outputs: Any = None) -> Reference:
    """What `gm` computes now (`outputs`, if the caller has them), with what it takes to find the
    node where a pass that follows changed it."""
    return Reference(run_outputs(gm, example_inputs) if outputs is None else outputs, before=Before(gm))


def mismatch(expected: Any, got: Any) -> str | None:
    """None when `got` matches `expected` (same structure, shapes and values up to rounding),
    else what differs."""
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if len(exp_leaves) != len(got_leaves):
        return f"the model returns {len(got_leaves)} values instead of {len(exp_leaves)}"
    for i, (e, g) in enumerate(zip(exp_leaves, got_leaves)):
        if isinstance(e, torch.Tensor) != isinstance(g, torch.Tensor):
            return f"output {i} is {type(g).__name__} instead of {type(e).__name__}"
        if not isinstance(e, torch.Tensor):
            if e != g and not (isinstance(e, float) and math.isnan(e) and math.isnan(g)):
                return f"output {i} is {g!r} instead of {e!r}"
            continue
        if tuple(e.shape) != tuple(g.shape):
            return f"output {i} has shape {tuple(g.shape)} instead of {tuple(e.shape)}"
        if not e.is_floating_point():
            if not torch.equal(e.cpu(), g.cpu()):
                return f"output {i} ({e.dtype}) differs in {int((e != g).sum())} places"
            continue
        ed, gd = e.detach().double().cpu(), g.detach().double().cpu()
        finite = torch.isfinite(ed)
        if not torch.equal(finite, torch.isfinite(gd)) or not torch.equal(
            ed[~finite].nan_to_num(), gd[~finite].nan_to_num()
        ):
            return f"output {i} has NaN or inf in other places"
        if not finite.any():
            continue
        err = float((ed[finite] - gd[finite]).abs().max())
        scale = float(ed[finite].abs().max())
        allowed = _RTOL.get(e.dtype, 1e-4) * max(scale, 1e-3)
        if err > allowed:
            return f"output {i} differs by up to {err:.3g} (largest magnitude {scale:.3g}, allowed {allowed:.2g})"
    return None


def _location(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"{n.name} [{n.target}]"
    stack = n.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return f"{n.name} [{path}]"
    return n.name


def module_of(n: fx.Node) -> str:
    """The path of the module a node belongs to ('' for the root)."""
    if n.op == "call_module":
        return str(n.target)
    if n.op == "get_attr":
        return str(n.target).rpartition(".")[0]
    stack = n.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return ""


def _divergence(gm: fx.GraphModule, ref: Reference, example_inputs: tuple | dict) -> tuple[fx.Node | None, str]:
    """The first node that raises, or whose output kept its shape but changed its values."""
    prints = ref.before.fingerprints(gm, example_inputs)
    interp = _Fingerprinter(gm)
    try:
        with eval_mode(gm), torch.no_grad():
            interp.run(*positional_inputs(gm, clone_inputs(example_inputs)))
    except Exception as exc:  # the node that raised is the divergence
        return (
            interp.current,
            f"raises {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
        )
    if prints is None:
        return None, "a tensor was changed in place, so the node where the values first differ cannot be named"
    for node in gm.graph.nodes:
        before, after = prints.get(node.name), interp.prints.get(node.name)
        if before is None or after is None or before[0] != after[0]:
            continue
        scale = max(abs(before[2]), 1e-6)
        if abs(before[1] - after[1]) > 1e-3 * scale or abs(before[2] - after[2]) > 1e-3 * scale:
            return node, f"computes other values (sum {after[1]:.6g} instead of {before[1]:.6g})"
    return None, _UNBLAMED


_UNBLAMED = "the outputs differ, but no single node could be blamed"


def _groups_at(node: fx.Node | None, groups: Iterable[Any]) -> list[str]:
    """Channel groups with a tensor in the module of `node` or of the nodes feeding it."""
    if node is None:
        return []
    paths = {p for p in [module_of(node)] + [module_of(a) for a in node.all_input_nodes] if p}
    hits = []
    for g in groups:
        if any(s.tensor.rpartition(".")[0] == p or s.tensor.startswith(p + ".") for s in g.slots for p in paths):
            hits.append(g.key)
    return hits


def check_keeps_outputs(
    name: str,
    gm: fx.GraphModule,
    ref: Reference,
    example_inputs: tuple | dict,
    groups: Iterable[Any] = (),
    history: str = "",
) -> Any:
    """`gm`'s outputs; a VerificationError naming the first diverging node when they are not `ref`'s.
    Half precision through many layers rounds more than the outputs' tolerance allows (a random
    Llama-3-8B in bfloat16: 4 % of the largest logit after Shrink, while the same Shrink agrees to
    3e-6 in float32 and bfloat16 itself is 3 % off float32 at a quarter of the depth): there, when
    no node's fingerprint differs and no output is off by more than 10 %, the result is kept with
    a warning that says so."""
    got = None
    try:
        got = run_outputs(gm, example_inputs)
        problem = mismatch(ref.outputs, got)
    except Exception as exc:
        problem = f"the model no longer runs ({type(exc).__name__}: {str(exc).strip()[:300]})"
    if problem is None:
        return got
    node, what = _divergence(gm, ref, example_inputs)
    if what == _UNBLAMED and got is not None and _half_precision_rounding(ref.outputs, got):
        warnings.warn(
            f"{name}{history}: {problem}, in half precision, with no node whose values changed: taken as rounding "
            "(half precision through many layers rounds this much); to check exactly, verify a float32 copy",
            GraphPruneWarning,
            stacklevel=4,
        )
        return got
    where = f"; first divergence at node {_location(node)}, which {what}" if node is not None else f"; {what}"
    hit = _groups_at(node, groups)
    involved = f"; channel groups there: {hit[:6]}" if hit else ""
    raise VerificationError(
        f"{name}{history} must keep the model's outputs but changed them: {problem}{where}{involved}. "
        "This is a bug in a rule or pass (please report it with the model); the result was not returned. "
        "verify=False skips this check."
    )


def _half_precision_rounding(expected: Any, got: Any) -> bool:
    """Every floating output is float16/bfloat16 and within 10 % of its largest magnitude."""
    pairs = [
        (e, g)
        for e, g in zip(pytree.tree_leaves(expected), pytree.tree_leaves(got))
        if isinstance(e, torch.Tensor) and e.is_floating_point()
    ]
    return bool(pairs) and all(
        e.dtype in (torch.float16, torch.bfloat16)
        and float((e.double() - g.double()).abs().max()) <= 0.1 * float(e.double().abs().max())
        for e, g in pairs
    )


def check_runs(name: str, gm: fx.GraphModule, example_inputs: tuple | dict, history: str = "") -> Any:
    """The model's outputs; a VerificationError naming the pass after which it stopped running."""
    try:
        return run_outputs(gm, example_inputs)
    except Exception as exc:
        raise VerificationError(
            f"after {name}{history} the model no longer runs on the example inputs: {type(exc).__name__}: "
            f"{str(exc).strip()[:400]}"
        ) from exc
