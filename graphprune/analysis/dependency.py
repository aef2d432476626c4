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
from graphprune.ir.interpret import Interpreter
from graphprune.ir.labels import (
    FreezeSite,
    LabelSpace,
    along,
    compact,
    labeled_dims,
    none_like,
    squeeze_constant,
    unit_dims,
)
from graphprune.ir.masking import is_maskable, resolve
from graphprune.ir.partial import BOUNDARY, UNTRACED
from graphprune.ir.weight_ops import weight_ops
from graphprune.rules import base as rules
from graphprune.rules.base import (
    DerivedParams,
    OpCall,
    ParamRef,
    ParamView,
    iter_label_tensors,
    map_tensors,
    param_view,
)
from graphprune.rules.shape import follow_param

logger = logging.getLogger(__name__)

__all__ = ["Slot", "ChannelGroup", "FrozenChannels", "Dependencies", "analyze_dependencies", "node_location"]


@dataclass(frozen=True)
class Slot:
    """One dim of one parameter or buffer (by qualified name)."""

    tensor: str
    dim: int


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that are pruned alike: `index[s][u]` are the indices of unit u along `slots[s]`
    (every unit of a group has as many indices along each slot; `units[u][s]` is the same as tuples).

    A unit is what one pruning decision removes: one channel, or a whole
    GroupNorm group, or a channel together with its copies across a concat
    and a residual stream.
    """

    key: str
    kind: str
    slots: tuple[Slot, ...]
    index: tuple[torch.Tensor, ...]  # per slot: (units, indices of one unit) int64
    root_ids: torch.Tensor  # the label class of each unit (for rewriting reshape constants)
    consumers: frozenset[Slot] = frozenset()  # slots on the input side of their module

    @property
    def size(self) -> int:
        return int(self.root_ids.numel())

    @cached_property
    def units(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        per_slot = [ix.tolist() for ix in self.index]
        return tuple(tuple(tuple(p[u]) for p in per_slot) for u in range(self.size))

    @cached_property
    def roots(self) -> tuple[int, ...]:
        return tuple(self.root_ids.tolist())

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
        units = torch.arange(self.size)
        return tuple((ix.reshape(-1), units.repeat_interleave(ix.shape[1])) for ix in self.index)

    def indices(self, unit_ids: list[int] | torch.Tensor) -> dict[Slot, list[int]]:
        ids = torch.as_tensor(unit_ids, dtype=torch.long).reshape(-1)
        return {s: ix[ids].reshape(-1).tolist() for s, ix in zip(self.slots, self.index)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChannelGroup):
            return NotImplemented
        return (
            (self.key, self.kind, self.slots, self.consumers) == (other.key, other.kind, other.slots, other.consumers)
            and all(torch.equal(a, b) for a, b in zip(self.index, other.index))
            and torch.equal(self.root_ids, other.root_ids)
        )

    def __hash__(self) -> int:
        return hash((self.key, self.kind, self.slots))


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
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # node -> its output's shape, as analysed

    @classmethod
    def compute(cls, gm: fx.GraphModule, ctx) -> Dependencies:
        """As an analysis of a pipeline: `ctx.get(Dependencies, gm)`."""
        return analyze_dependencies(gm, ctx.example_inputs)

    def mark_shapes(self, gm: fx.GraphModule) -> None:
        """Put the shapes the analysis saw on the nodes of `gm` (a graph it was made for, built again)."""
        for n in gm.graph.nodes:
            if n.name in self.shapes:
                n.meta.setdefault("graphprune_shape", self.shapes[n.name])

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


class _Propagator(Interpreter):
    def __init__(self, gm: fx.GraphModule, space: LabelSpace) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.space = space
        self.labels: dict[fx.Node, Any] = {}
        self.reshapes: dict[str, tuple[tuple[int, ...], torch.Tensor, tuple[int, ...]]] = {}  # shape, labels, counted
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
            boundary = self.module.meta.get(BOUNDARY)  # a graph of regions: why each output is one
            for i, (arg, lab) in enumerate(zip(_flat_nodes(n.args[0]), _flat_nodes(lab_args[0]))):
                for t in iter_label_tensors(lab):
                    dims = labeled_dims(t)
                    self.space.freeze(
                        t,
                        FreezeSite(
                            "output",
                            n.name,
                            boundary[i][3] if boundary else "reaches a model output",
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
            return read_size(
                n,
                lab_args[0] if lab_args else None,
                out,
                lambda t, d: along(self.space, t, d, site),
                lambda t: unit_dims(self.space, t),
            )
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
        first = lab_args[0] if lab_args and rule is not None and rule.follows_params else None
        views = first.views if isinstance(first, DerivedParams) else tuple(v for v in [param_view(first)] if v)
        followed = [follow_param(call, v, rule) for v in views]
        if views and all(f is not None for f in followed):
            call.extra["sliced_params"] = {v.ref.name for v in views}  # its consumers decide whether it is sliced
            result = DerivedParams(tuple(followed)) if isinstance(first, DerivedParams) else followed[0]
        elif rule is None:
            if has_labels:
                untraced = self.module.meta.get(UNTRACED, {}).get(n.target) if n.op == "call_module" else None
                why = f"runs untraced ({untraced})" if untraced else f"no rule for {_target_name(n, module)}"
                call.freeze_inputs("no_rule", why)
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
        for lab in _flat_nodes([lab_args, lab_kwargs]):
            for ref in [v.ref for v in lab.views] if isinstance(lab, DerivedParams) else [lab]:
                ref = ref.ref if isinstance(ref, ParamView) else ref
                if isinstance(ref, ParamRef) and ref.name not in sliced:
                    self.whole_params[ref.name] = where
        if "reshape_labels" in call.extra:
            labels = call.extra["reshape_labels"]
            self.reshapes[n.name] = (tuple(labels.shape), squeeze_constant(labels), call.extra.get("counted_dims", ()))
        for name, labels in call.extra.get("reshape_overrides", {}).items():  # sizes an earlier op set
            counted = self.reshapes[name][2] if name in self.reshapes else ()
            self.reshapes[name] = (tuple(labels.shape), squeeze_constant(labels), counted)
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
    reshapes = {k: (shape, roots[v], counted) for k, (shape, v, counted) in prop.reshapes.items()}
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
        {n.name: n.meta["graphprune_shape"] for n in gm.graph.nodes if "graphprune_shape" in n.meta},
    )


_KIND_ORDER = ("channel", "ffn", "hidden", "head")


def _name_ffn_groups(gm: fx.GraphModule, groups: tuple[ChannelGroup, ...]) -> tuple[ChannelGroup, ...]:
    """Kind "ffn": channels that only linear layers touch (the neurons between the projections of
    a transformer's MLP, gated or not), so that ratios can name them apart from conv channels."""
    linear = {t for op in weight_ops(gm).values() if op.kind == "linear" for t in (op.weight, op.bias) if t}
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
    """Group the units (label roots) that own slices of the same tensors, as many along each: one ChannelGroup
    per (kind, signature).  Vectorised: a Llama-8B has ~1.5 M slot entries."""
    keys = list(slots)
    nk = max(len(keys), 1)
    index = torch.cat([slots[k][0] for k in keys]) if keys else torch.zeros(0, dtype=torch.long)
    root = torch.cat([slots[k][1] for k in keys]) if keys else torch.zeros(0, dtype=torch.long)
    slot = (
        torch.cat([torch.full((slots[k][0].numel(),), j, dtype=torch.long) for j, k in enumerate(keys)])
        if keys
        else root
    )
    frozen_ids = torch.tensor(sorted(frozen), dtype=torch.long)
    owning = set(frozen_ids[torch.isin(frozen_ids, root)].tolist())  # frozen units that own a slice
    present = [r for r in frozen if r in owning]
    counts: dict[FreezeSite, int] = defaultdict(int)
    for r in present:
        for site in frozen[r]:
            counts[site] += 1
    frozen_report = tuple(FrozenChannels(site, c) for site, c in counts.items())
    inner = sum(1 for r in present if any(site.kind != "output" for site in frozen[r]))

    live = ~torch.isin(root, frozen_ids)
    pos = torch.nonzero(live).reshape(-1)  # first appearance orders the groups (as slots were registered)
    root, slot, index = root[live], slot[live], index[live]
    order = torch.argsort(root * nk + slot, stable=True)  # by unit, then slot; indices stay ascending
    root, slot, index, pos = root[order], slot[order], index[order], pos[order]
    pair, pair_count = torch.unique_consecutive(root * nk + slot, return_counts=True)
    units, n_pairs = torch.unique_consecutive(pair // nk, return_counts=True)
    _, n_elems = torch.unique_consecutive(root, return_counts=True)
    elem_start = torch.cumsum(n_elems, 0) - n_elems
    pair_start = torch.cumsum(n_pairs, 0) - n_pairs
    unit_of_elem = torch.repeat_interleave(torch.arange(units.numel()), n_elems)
    first = torch.zeros(units.numel(), dtype=torch.long).scatter_reduce(
        0, unit_of_elem, pos, "amin", include_self=False
    )
    kind_code = torch.zeros(units.numel(), dtype=torch.long)
    if kinds and units.numel():
        kr = torch.tensor(list(kinds), dtype=torch.long)
        kc = torch.tensor([_KIND_ORDER.index(k) for k in kinds.values()], dtype=torch.long)
        at = torch.searchsorted(units, kr).clamp(max=units.numel() - 1)
        hit = units[at] == kr
        kind_code[at[hit]] = kc[hit]
    code = (pair % nk) * (int(pair_count.max()) + 1 if pair_count.numel() else 1) + pair_count

    found = []  # (first appearance, kind, slot ids, counts, member units)
    for n in torch.unique(n_pairs).tolist():
        sel = torch.nonzero(n_pairs == n).reshape(-1)
        cols = pair_start[sel].unsqueeze(1) + torch.arange(n)
        rows = torch.cat([kind_code[sel].unsqueeze(1), code[cols]], dim=1)
        sigs, inverse = torch.unique(rows, dim=0, return_inverse=True)
        for i in range(sigs.shape[0]):
            members = sel[inverse == i]
            c0 = cols[inverse == i][0]
            found.append(
                (int(first[members].min()), int(sigs[i, 0]), (pair[c0] % nk).tolist(), pair_count[c0].tolist(), members)
            )
    groups, used = [], set()
    for _, kind, slot_ids, sizes, members in sorted(found, key=lambda f: f[0]):
        members = members[torch.argsort(index[elem_start[members]])]  # by their first index along the first slot
        names = [keys[j] for j in slot_ids]
        producer = next((k for k in names if k not in consumer_slots), names[0])
        name = producer[0].rsplit(".", 1)[0]
        key, n = name, 2
        while key in used:
            key, n = f"{name}#{n}", n + 1
        used.add(key)
        offsets = torch.cumsum(torch.tensor([0, *sizes[:-1]]), 0).tolist()
        per_slot = tuple(
            index[elem_start[members].unsqueeze(1) + off + torch.arange(c)] for off, c in zip(offsets, sizes)
        )
        consumers = frozenset(Slot(*k) for k in names if k in consumer_slots)
        groups.append(
            ChannelGroup(key, _KIND_ORDER[kind], tuple(Slot(*k) for k in names), per_slot, units[members], consumers)
        )
    return Dependencies(tuple(groups), frozen_report, reshapes, inner)
