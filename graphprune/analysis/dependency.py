"""The dependency analyzer: which channels must be removed together.

It runs the graph once on the example inputs with an fx Interpreter, and
beside every value carries its channel labels (see `graphprune.ir.labels`), asking the
per-op rule of every node how labels flow.  The result is a set of immutable
`ChannelGroup`s: every parameter slice that must lose the same channels,
with the channels frozen (and why) left out of them.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
import torch.fx as fx

from graphprune.analysis.sizes import SIZE_ARITH, DimSize, read_size, reads_size, shapes_only, size_arithmetic
from graphprune.ir.inputs import clone_inputs, eval_mode, positional_inputs
from graphprune.ir.labels import FreezeSite, LabelSpace, along, compact, labeled_dims, none_like
from graphprune.ir.masking import is_maskable, resolve
from graphprune.ir.weight_ops import weight_ops
from graphprune.rules import base as rules
from graphprune.rules.base import OpCall, ParamRef, ParamView, iter_label_tensors, map_tensors, param_view
from graphprune.rules.shape import follow_param

logger = logging.getLogger(__name__)

__all__ = ["Slot", "ChannelGroup", "FrozenChannels", "Dependencies", "analyze_dependencies", "node_location"]


@dataclass(frozen=True)
class Slot:
    """One dim of one parameter or buffer (by qualified name)."""

    tensor: str
    dim: int


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are pruned alike: `units[u][s]` are the indices of unit u along `slots[s]`.

    A unit is what one pruning decision removes: one channel, or a whole
    GroupNorm group, or a channel together with its copies across a concat
    and a residual stream.
    """

    key: str
    kind: str
    slots: tuple[Slot, ...]
    units: tuple[tuple[tuple[int, ...], ...], ...]
    roots: tuple[int, ...]  # the label class of each unit (for rewriting reshape constants)
    consumers: frozenset[Slot] = frozenset()  # slots on the input side of their module

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def modules(self) -> tuple[str, ...]:
        """Modules whose own output width this group changes (not those that only consume it)."""
        seen: dict[str, None] = {}
        for s in self.slots:
            if s not in self.consumers:
                seen.setdefault(s.tensor.rpartition(".")[0], None)
        return tuple(seen)

    @cached_property
    def flat(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per slot: (indices of all units, the unit each index belongs to), for vectorised reductions."""
        out = []
        for s in range(len(self.slots)):
            index = torch.tensor([i for u in self.units for i in u[s]], dtype=torch.long)
            unit = torch.tensor([k for k, u in enumerate(self.units) for _ in u[s]], dtype=torch.long)
            out.append((index, unit))
        return tuple(out)

    def indices(self, unit_ids: list[int] | torch.Tensor) -> dict[Slot, list[int]]:
        out: dict[Slot, list[int]] = {s: [] for s in self.slots}
        for u in list(unit_ids):
            for s, idx in zip(self.slots, self.units[int(u)]):
                out[s].extend(idx)
        return out


@dataclass(frozen=True)
class FrozenChannels:
    """Channels that may not be pruned, the op that froze them and why."""

    site: FreezeSite
    channels: int


@dataclass(frozen=True, eq=False)
class Dependencies:
    groups: tuple[ChannelGroup, ...]
    frozen: tuple[FrozenChannels, ...]
    # reshape/split node -> (output shape, label roots, dims whose size argument is a channel count)
    reshapes: dict[str, tuple[tuple[int, ...], torch.Tensor, tuple[int, ...]]] = field(default_factory=dict)
    frozen_units: int = 0  # units kept for a reason other than reaching an output
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tied tensor -> its other names
    squeezes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # squeeze() node -> dims that were 1
    reductions: dict[str, tuple[int, torch.Tensor]] = field(
        default_factory=dict
    )  # mean/sum over channels -> (dim, label roots)
    # arguments that count channels (a depthwise conv's groups) -> [(position, name, label roots)]; Shrink sets the kept count
    counts: dict[str, list[tuple[int, str, torch.Tensor]]] = field(default_factory=dict)

    @classmethod
    def compute(cls, gm: fx.GraphModule, ctx) -> Dependencies:
        """As an analysis of a pipeline: `ctx.get(Dependencies, gm)`."""
        return analyze_dependencies(gm, ctx.example_inputs)

    def group(self, key: str) -> ChannelGroup:
        for g in self.groups:
            if g.key == key:
                return g
        raise KeyError(key)


def node_location(node: fx.Node) -> str:
    """`name [module.path]` for messages."""
    if node.op == "call_module":
        return f"{node.name} [{node.target}]"
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return f"{node.name} [{path}]"
    return node.name


_METADATA = {"dim", "ndim", "dtype", "device"}  # reads that do not


def _reads(n: fx.Node, names: set[str]) -> bool:
    """x.size() / x.dim() as a method, or x.shape / x.ndim as an attribute."""
    if n.op == "call_method":
        return n.target in names
    return n.op == "call_function" and n.target is getattr and n.args[1] in names


class _Propagator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, space: LabelSpace) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.space = space
        self.labels: dict[fx.Node, Any] = {}
        self.reshapes: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
        self.reductions: dict[str, tuple[int, torch.Tensor]] = {}  # mean/sum over one channel dim -> (dim, labels)
        self.whole_params: dict[str, str] = {}  # parameter -> an op that reads it whole
        self.squeezes: dict[str, tuple[int, ...]] = {}  # squeeze() nodes -> the dims that were 1
        self.counts: dict[str, list[tuple[int, str, torch.Tensor]]] = {}  # arguments that count channels

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["graphprune_shape"] = tuple(out.shape)
        self.labels[n] = self._propagate(n, out)
        for m in self.user_to_last_uses.get(n, []):  # labels go when the values go
            self.labels.pop(m, None)
        return out

    def _propagate(self, n: fx.Node, out: Any) -> Any:
        where = node_location(n)
        if n.op == "placeholder":
            return map_tensors(out, lambda t: none_like(t.shape))
        if n.op == "get_attr":
            if not isinstance(out, torch.Tensor):
                return None
            return ParamRef(n.target, tuple(out.shape), is_maskable(*resolve(self.module, n.target)))
        lab_args = fx.node.map_arg(n.args, lambda a: self.labels.get(a))
        lab_kwargs = fx.node.map_arg(n.kwargs, lambda a: self.labels.get(a))
        if n.op == "output":
            for arg, lab in zip(_flat_nodes(n.args[0]), _flat_nodes(lab_args[0])):
                for t in iter_label_tensors(lab):
                    dims = labeled_dims(t)
                    self.space.freeze(
                        t,
                        FreezeSite(
                            "output",
                            n.name,
                            "reaches a model output",
                            arg.name if isinstance(arg, fx.Node) else None,
                            dims[0] if len(dims) == 1 else None,
                            where,
                        ),
                    )
            return None
        has_labels = any(True for _ in iter_label_tensors([lab_args, lab_kwargs]))
        if _reads(n, _METADATA):
            return None
        if reads_size(n):
            site = FreezeSite("conflict", n.name, "one index mixes several channels", location=where)
            return read_size(n, lab_args[0] if lab_args else None, out, lambda t, d: along(self.space, t, d, site))
        sizes = [s for s in _flat_nodes([lab_args, lab_kwargs]) if isinstance(s, DimSize)]
        size_labels = None
        if sizes:
            if n.op == "call_function" and n.target in SIZE_ARITH and not isinstance(out, torch.Tensor):
                return size_arithmetic(sizes)
            if n.target is operator.getitem and isinstance(lab_args[0], tuple):
                pass  # indexing a shape: the rule picks its sizes
            else:
                if shapes_only(n):
                    size_labels = (lab_args, lab_kwargs)
                else:  # a channel count used in a computation would change its result when channels go
                    for s in sizes:
                        if s.labels is not None:
                            self.space.freeze(
                                s.labels,
                                FreezeSite(
                                    "size",
                                    n.name,
                                    "uses the channel count in a computation that pruning would change",
                                    location=where,
                                ),
                            )
                lab_args, lab_kwargs = _without_sizes(lab_args), _without_sizes(lab_kwargs)
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        rule = rules.find_rule(n, module)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        call = OpCall(n, module, args, kwargs, lab_args, lab_kwargs, out, self.space, where, size_labels=size_labels)
        start = len(self.space)
        view = param_view(lab_args[0]) if lab_args and rule is not None and rule.follows_params else None
        if view is not None and (followed := follow_param(call, view, rule)) is not None:
            call.extra["sliced_params"] = {view.ref.name}  # its consumers decide whether it is sliced
            result = followed
        elif rule is None:
            if has_labels:
                call.freeze_inputs("no_rule", f"no rule for {_target_name(n, module)}")
            result = call.out_none()
        else:
            try:
                result = rule.propagate(call)
            except Exception as exc:  # a rule that cannot follow this call freezes, never guesses
                logger.debug("rule %s failed on %s: %s", type(rule).__name__, where, exc)
                reason = f"rule {type(rule).__name__} cannot handle this call ({exc})"
                call.freeze_inputs("no_rule", reason)
                if len(self.space) > start:  # channels it created before failing
                    self.space.freeze(torch.arange(start, len(self.space)), call.site("no_rule", reason))
                result = call.out_none()
        # A parameter this op reads whole cannot also be sliced for another op.
        sliced = call.extra.get("sliced_params", set())
        for ref in _flat_nodes([lab_args, lab_kwargs]):
            ref = ref.ref if isinstance(ref, ParamView) else ref
            if isinstance(ref, ParamRef) and ref.name not in sliced:
                self.whole_params[ref.name] = where
        if "reshape_labels" in call.extra:
            self.reshapes[n.name] = (call.extra["reshape_labels"], call.extra.get("counted_dims", ()))
        if "reduce_labels" in call.extra:
            self.reductions[n.name] = call.extra["reduce_labels"]
        if "squeeze_dims" in call.extra:
            self.squeezes[n.name] = call.extra["squeeze_dims"]
        if "count_args" in call.extra:
            self.counts[n.name] = call.extra["count_args"]
        return result


def _without_sizes(labels: Any) -> Any:
    """Size labels read as plain numbers (None) by rules that do not look at sizes."""
    if isinstance(labels, DimSize):
        return None
    if isinstance(labels, (tuple, list)):
        return type(labels)(_without_sizes(v) for v in labels) if not hasattr(labels, "_fields") else labels
    if isinstance(labels, dict):
        return {k: _without_sizes(v) for k, v in labels.items()}
    return labels


def _target_name(n: fx.Node, module: Any) -> str:
    if module is not None:
        return type(module).__name__
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _flat_nodes(a: Any) -> list:
    """Leaves of a nested args structure (nodes, or the labels that mirror them)."""
    if isinstance(a, (tuple, list)):
        return [x for v in a for x in _flat_nodes(v)]
    if isinstance(a, dict):
        return [x for v in a.values() for x in _flat_nodes(v)]
    return [a]


def analyze_dependencies(gm: fx.GraphModule, example_inputs: tuple | dict) -> Dependencies:
    space = LabelSpace()
    prop = _Propagator(gm, space)
    with eval_mode(gm), torch.no_grad():
        prop.run(*positional_inputs(gm, clone_inputs(example_inputs)))
    for name, where in prop.whole_params.items():
        space.freeze_slots(
            name,
            FreezeSite(
                "conflict", where.split(" ")[0], f"reads {name} whole while another op slices it", location=where
            ),
        )
    aliases = _aliases(gm)
    space.rename_slots({a: c for c, names in aliases.items() for a in names})
    roots, frozen, slots = space.finalize()
    reshapes = {k: (tuple(v.shape), roots[compact(v)], counted) for k, (v, counted) in prop.reshapes.items()}
    kinds: dict[int, str] = {}
    for label, kind in space.kinds.items():  # a unit tagged twice takes the more specific kind
        root = int(roots[label])
        if _KIND_ORDER.index(kind) > _KIND_ORDER.index(kinds.get(root, "channel")):
            kinds[root] = kind
    deps = _build(roots, frozen, slots, reshapes, space.consumer_slots, kinds)
    groups = _name_ffn_groups(gm, deps.groups)
    reductions = {k: (d, roots[compact(v)]) for k, (d, v) in prop.reductions.items()}
    counts = {k: [(pos, name, roots[compact(v)]) for pos, name, v in args] for k, args in prop.counts.items()}
    return Dependencies(
        groups,
        deps.frozen,
        deps.reshapes,
        deps.frozen_units,
        {c: tuple(n) for c, n in aliases.items()},
        prop.squeezes,
        reductions,
        counts,
    )


_KIND_ORDER = ("channel", "ffn", "hidden", "head")


def _name_ffn_groups(gm: fx.GraphModule, groups: tuple[ChannelGroup, ...]) -> tuple[ChannelGroup, ...]:
    """Kind "ffn": channels that only linear layers touch (the neurons between the projections of
    a transformer's MLP, gated or not), so that ratios can name them apart from conv channels."""
    linear = {t for op in weight_ops(gm).values() if op.kind == "linear" for t in (op.weight, op.bias) if t}
    for n in gm.graph.nodes:  # addmm(bias, x, weight): Hugging Face's Conv1D
        if n.op == "call_function" and n.target is torch.ops.aten.addmm.default:
            linear.update(a.target for a in n.args if isinstance(a, fx.Node) and a.op == "get_attr")
    return tuple(
        replace(g, kind="ffn") if g.kind == "channel" and all(s.tensor in linear for s in g.slots) else g
        for g in groups
    )


def _aliases(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Tied tensors: the first qualified name of each shared tensor -> its other names."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in named:
        name = name.replace(".parametrizations.", ".").replace(".original", "")
        key = id(t)
        if key not in first:
            first[key] = name
        elif name != first[key] and name not in out.get(first[key], []):
            out.setdefault(first[key], []).append(name)
    return out


def _build(roots, frozen, slots, reshapes, consumer_slots, kinds) -> Dependencies:
    per_root: dict[int, dict[tuple[str, int], list[int]]] = defaultdict(dict)
    order = {key: i for i, key in enumerate(slots)}
    for key, (index, rvec) in slots.items():
        for i, r in zip(index.tolist(), rvec.tolist()):
            per_root[r].setdefault(key, []).append(i)
    by_signature: dict[tuple, list[int]] = defaultdict(list)
    for r, members in per_root.items():
        if r in frozen:
            continue
        sig = tuple(sorted(((k, len(v)) for k, v in members.items()), key=lambda kv: order[kv[0]]))
        by_signature[(kinds.get(r, "channel"), sig)].append(r)
    groups, used = [], set()
    for (kind, sig), rs in by_signature.items():
        keys = [k for k, _ in sig]
        rs.sort(key=lambda r: min(per_root[r][keys[0]]))
        producer = next((k for k in keys if k not in consumer_slots), keys[0])
        name = producer[0].rsplit(".", 1)[0]
        key = name
        n = 2
        while key in used:
            key, n = f"{name}#{n}", n + 1
        used.add(key)
        units = tuple(tuple(tuple(per_root[r][k]) for k in keys) for r in rs)
        consumers = frozenset(Slot(*k) for k in keys if k in consumer_slots)
        groups.append(ChannelGroup(key, kind, tuple(Slot(*k) for k in keys), units, tuple(rs), consumers))
    counts: dict[FreezeSite, int] = defaultdict(int)
    for r, sites in frozen.items():
        if r in per_root:
            for s in sites:
                counts[s] += 1
    frozen_report = tuple(FrozenChannels(s, c) for s, c in counts.items())
    inner = sum(1 for r, sites in frozen.items() if r in per_root and any(s.kind != "output" for s in sites))
    return Dependencies(tuple(groups), frozen_report, reshapes, inner)
