"""Shape ops: executed on the label tensors themselves.

Running `view`, `permute`, `cat`, `flatten`, ... on the labels gives the
index maps for free.  What execution alone does not give is the constraint
some ops put on *which* channels may go together:

* a reshape that splits pruned channels over several dims (a channel
  shuffle's `view(b, g, c // g, h, w)`, heads × head_dim) stays valid only if
  pruning removes whole slices along one of them: the one whose size the
  graph computes (or -1) is the one that shrinks; a literal there is
  rewritten by Shrink;
* `chunk`/`split` into equal parts needs every part to lose the same channels;
* a slice of a pruned dim at literal bounds keeps the channels between them (Shrink moves the
  bounds); any other index of a pruned dim with constants would read the wrong channels after
  pruning, so those channels are frozen.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphprune.ir.labels import labeled_dims, none_like, varies_along
from graphprune.rules.base import OpCall, ParamView, Rule, aten, overloads, param_view

__all__ = [
    "Execute",
    "Reshape",
    "Concat",
    "SplitChunk",
    "GetItem",
    "Slice",
    "FreezeAlongDim",
    "Squeeze",
    "NewTensor",
    "dim_arg",
    "follow_param",
    "index_dims",
    "node_arg",
    "RULES",
]


def _label_args(labels: Any, values: Any) -> Any:
    """Replace tensors by their labels in an argument structure (parameters read as NONE)."""
    if isinstance(values, torch.Tensor):
        return labels if isinstance(labels, torch.Tensor) else none_like(values.shape)
    if isinstance(values, (list, tuple)):
        labels = labels if isinstance(labels, (list, tuple)) else [None] * len(values)
        return type(values)(_label_args(l, v) for l, v in zip(labels, values))
    return values


def execute(call: OpCall) -> Any:
    args = _label_args(list(call.labels), list(call.args))
    kwargs = {k: _label_args(call.label_kwargs.get(k), v) for k, v in call.kwargs.items()}
    node = call.node
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        # Labels are often broadcast views: view() would refuse what reshape() does alike.
        method = {"view": "reshape", "view_as": "reshape_as"}.get(node.target, node.target)
        return getattr(args[0], method)(*args[1:], **kwargs)
    return call.module(*args, **kwargs)


def node_arg(node: fx.Node, pos: int, *names: str) -> Any:
    """Argument `pos` of a call node as the graph holds it (a node where it is computed)."""
    if len(node.args) > pos:
        return node.args[pos]
    return next((node.kwargs[n] for n in names if n in node.kwargs), None)


def dim_arg(call: OpCall, pos: int, name: str = "dim", default: Any = None) -> Any:
    """An argument after the input tensor, by position or keyword."""
    if name in call.kwargs:
        return call.kwargs[name]
    rest = call.args[1:]
    return rest[pos] if len(rest) > pos else default


_PROBE_LIMIT = 1 << 22  # parameters seen through larger views are read as unprunable data


def follow_param(call: OpCall, view: ParamView, rule: Rule) -> ParamView | None:
    """Where the dims of a (viewed) parameter go through this shape op: each dim is probed with its
    own indices and found again in the output (None when the op reorders or mixes it, or when a
    literal size in a reshape would keep the old width after Shrink)."""
    x, out = call.args[0], call.out
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or out.numel() > _PROBE_LIMIT:
        return None
    if x.shape == out.shape and call.node.target is not operator.getitem and not isinstance(rule, (Execute, Reshape)):
        return view  # an element-wise op: every element stays where it was
    kinds = _size_kinds(call, out.ndim) if isinstance(rule, Reshape) else None
    dims: list[int | None] = [None] * out.ndim
    for j, pd in enumerate(view.dims):
        if pd is None or x.shape[j] <= 1:
            continue
        shape = [1] * x.ndim
        shape[j] = -1
        index = torch.arange(1, x.shape[j] + 1)
        probe = index.reshape(shape).expand(x.shape)
        got = (
            probe[call.args[1]]
            if call.node.target is operator.getitem
            else execute(replace(call, labels=(probe, *call.labels[1:])))
        )
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(out.shape):
            return None
        varying = labeled_dims(got)
        if len(varying) != 1:
            continue
        jo = varying[0]
        line = got.movedim(jo, 0).reshape(got.shape[jo], -1)[:, 0]
        if got.shape[jo] == x.shape[j] and torch.equal(line.long(), index):
            if kinds is not None and kinds[jo] == "literal":
                return None
            dims[jo] = pd
    return ParamView(view.ref, tuple(dims))


class Execute(Rule):
    """Ops whose effect on channels is a re-indexing that commutes with removing channels."""

    follows_params = True

    def propagate(self, call: OpCall):
        return execute(call)


def _dim_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Group the dims of a reshape: each group of source dims becomes one group of target dims."""
    groups, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        while pi != pj:
            if pi < pj and i + 1 < len(src):
                i += 1
                gi.append(i)
                pi *= src[i]
            elif j + 1 < len(dst):
                j += 1
                gj.append(j)
                pj *= dst[j]
            else:
                break
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    return groups


def _size_kinds(call: OpCall, ndim_out: int) -> list[str] | None:
    """For each output dim of a reshape: 'literal' (an int in the graph) or 'free' (-1 or computed);
    None when the sizes cannot be read (the caller then refuses to prune through)."""
    target = call.node.target
    name = getattr(target, "_opname", target)  # aten.view.default -> "view"
    if name in ("view", "reshape", "expand", "_unsafe_view") or target is torch.reshape:
        sizes = list(call.node.args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
        if "shape" in call.node.kwargs:
            sizes = list(call.node.kwargs["shape"])
        if len(sizes) != ndim_out:
            return None
        return ["free" if (isinstance(s, fx.Node) or s == -1) else "literal" for s in sizes]
    if name == "unflatten" or name is torch.unflatten:
        rest = list(call.node.args[1:])
        dim = call.node.kwargs.get("dim", rest[0] if rest else None)
        sizes = call.node.kwargs.get("sizes", rest[1] if len(rest) > 1 else None)
        if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)):
            return None
        dim = dim % (ndim_out - len(sizes) + 1)
        kinds = ["same"] * ndim_out
        for i, sz in enumerate(sizes):
            # literals inside unflatten are not rewritten: only a -1 or computed size may shrink
            kinds[dim + i] = "free" if (isinstance(sz, fx.Node) or sz == -1) else "fixed"
        return kinds
    return None


def _size_args(call: OpCall, ndim_out: int) -> list:
    """The size labels of a view/reshape/expand's size arguments, one per output dim ([] if unknown)."""
    if call.size_labels is None:
        return []
    args, kwargs = call.size_labels
    if "shape" in kwargs:
        sizes = list(kwargs["shape"])
    elif "size" in kwargs:
        sizes = list(kwargs["size"])
    else:
        sizes = list(args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
    return sizes if len(sizes) == ndim_out else []


_PASS_THROUGH = {"contiguous", "clone", "to", torch.ops.aten.clone.default, torch.ops.aten.contiguous.default}
_PERMUTES = {"permute", torch.permute, torch.ops.aten.permute.default}
_TRANSPOSES = {"transpose", torch.transpose, torch.ops.aten.transpose.int}
_UNBINDS = {"unbind", torch.unbind, torch.ops.aten.unbind.int}


def _split_apart(node: fx.Node, ndim: int) -> set[int]:
    """Output dims of a reshape that later ops take apart (`qkv.reshape(B, N, 3, H, hd).permute(...)`
    then `unbind(0)` or `qkv[0], qkv[1], qkv[2]`): the parts are q, k and v, not channels to prune."""
    dims, n = list(range(ndim)), node
    for _ in range(8):
        users = list(n.users)
        if users and all(
            u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in users
        ):
            return {dims[0]}
        if len(users) != 1:
            return set()
        u = users[0]
        if u.target in _PERMUTES:
            order = u.args[1:] if len(u.args) > 2 else u.args[1] if len(u.args) > 1 else u.kwargs.get("dims")
            dims = [dims[int(i)] for i in order]
        elif u.target in _TRANSPOSES:
            a, b = (int(i) % len(dims) for i in u.args[1:3])
            dims[a], dims[b] = dims[b], dims[a]
        elif u.target in _UNBINDS:
            return {dims[int(u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)) % len(dims)]}
        elif u.target not in _PASS_THROUGH:
            return set()
        n = u
    return set()


class Reshape(Rule):
    """view/reshape/unflatten: execution plus the split constraint (see the module docstring)."""

    follows_params = True

    def propagate(self, call: OpCall):
        out = execute(call)
        x = call.input(0)
        counted = tuple(
            j for j, size in enumerate(_size_args(call, out.ndim)) if getattr(size, "labels", None) is not None
        )
        if counted:  # sizes computed from channel counts: Shrink writes what each of those dims keeps
            call.extra["reshape_labels"] = out
            call.extra["counted_dims"] = counted
        if not labeled_dims(x):
            return out
        kinds = _size_kinds(call, out.ndim)
        if kinds is None:
            call.space.freeze(x, call.site("reshape", "reshape sizes that graphprune cannot read"))
            return out
        for gin, gout in _dim_groups(tuple(x.shape), tuple(out.shape)):
            varied = [d for d in gout if varies_along(out, d)]
            if any(kinds[d] == "fixed" for d in varied) and not any(kinds[d] == "free" for d in varied):
                call.space.freeze(out, call.site("reshape", "unflatten with constant sizes over pruned channels"))
                return out
            if len(varied) < 2:
                continue
            others = [d for d in labeled_dims(out) if d not in gout]
            free = [d for d in varied if kinds[d] == "free"]
            if len(gin) > 1 or others or len(free) > 1:
                call.space.freeze(
                    out, call.site("reshape", "reshape mixes pruned channels in a way that cannot shrink")
                )
                return out
            split = _split_apart(call.node, out.ndim)  # q, k and v of a fused projection: not where channels go
            keep = ([d for d in free if d not in split] or free or [d for d in varied if d not in split] or varied)[0]
            sub = out
            for d in sorted(set(range(out.ndim)) - set(gout), reverse=True):
                sub = sub.select(d, 0)
            pos = gout.index(keep)
            sub = sub.movedim(pos, 0).reshape(sub.shape[pos], -1)
            call.space.unify(sub[:, :1], sub, call.site("reshape", "reshape of pruned channels"))
            # One label per slice from here on, so that later ops see channels only along `keep`
            # (RoPE slicing a head's dims must not look like slicing channels).
            for d in gout:
                if d != keep:
                    out = out.narrow(d, 0, 1).expand(out.shape)
        if "literal" in kinds:
            call.extra["reshape_labels"] = out
        return out


class Concat(Rule):
    """cat/stack: labels are concatenated; the other dims must match, so they are coupled."""

    def propagate(self, call: OpCall):
        tensors_lab = call.labels[0] if call.labels else call.label_kwargs.get("tensors")
        tensors_val = call.args[0] if call.args else call.kwargs["tensors"]
        dim = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else 0)
        stacking = call.node.target in (torch.stack, torch.ops.aten.stack.default)
        labs = [l if isinstance(l, torch.Tensor) else none_like(v.shape) for l, v in zip(tensors_lab, tensors_val)]
        views = [param_view(l) for l in tensors_lab]
        ndim = labs[0].ndim
        dim = dim % (ndim + 1 if stacking else ndim)
        vary = sorted({d for t in labs for d in labeled_dims(t) if stacking or d != dim})
        site = call.site("conflict", "concatenated with channels that cannot be pruned")
        for d in vary:
            # a parameter concatenated with channels (a class token) is sliced with them
            sliceable = [
                v is not None and v.dims[d] is not None and v.ref.shape[v.dims[d]] == t.shape[d]
                for v, t in zip(views, labs)
            ]
            # (an empty part, like Phi-3's pass-through of a full rotary embedding, holds no channels)
            channels = [call.along(t, d) for t, s in zip(labs, sliceable) if not s and t.numel()]
            for c in channels[1:]:
                call.space.unify(channels[0], c, site)
            for i, (v, s) in enumerate(zip(views, sliceable)):
                if s and channels:
                    call.slot_param(v.ref, v.dims[d], channels[0])
                    shape = [1] * labs[i].ndim
                    shape[d] = -1
                    labs[i] = channels[0].reshape(shape).expand(labs[i].shape)  # its elements are those channels now
        if any(v is not None for v in views):
            return execute(replace(call, labels=(labs, *call.labels[1:])) if call.labels else call)
        return execute(call)


class SplitChunk(Rule):
    """split/chunk along a pruned dim.  chunk(n): the equal parts must each lose the same channels.
    split with sizes: any channels may go, Shrink rewrites the sizes to what each part keeps."""

    def propagate(self, call: OpCall):
        parts = execute(call)
        x = call.input(0)
        is_chunk = call.node.target in ("chunk", torch.chunk, torch.ops.aten.chunk.default)
        dim = dim_arg(call, 1, "dim", 0) % x.ndim
        if not varies_along(x, dim):
            return parts
        size_arg = dim_arg(call, 0, "chunks" if is_chunk else "split_size_or_sections", None)
        if size_arg is None:
            size_arg = call.kwargs.get("split_size")
        sizes = {p.shape[dim] for p in parts}
        if not is_chunk:  # split(4) / split([a, b]) hold sizes: Shrink recounts each part's kept channels
            literal = isinstance(size_arg, int) or (
                isinstance(size_arg, (list, tuple)) and all(isinstance(v, int) for v in size_arg)
            )
            computed = node_arg(call.node, 1, "split_size_or_sections", "split_size")
            if (
                not literal
                or isinstance(computed, fx.Node)
                or (isinstance(computed, (list, tuple)) and any(isinstance(v, fx.Node) for v in computed))
            ):
                call.space.freeze(
                    x,
                    call.site(
                        "indexing",
                        "split over pruned channels with sizes computed at run time",
                        source=call.node.args[0].name,
                        dim=dim,
                    ),
                )
                return parts
            call.extra["reshape_labels"] = x
            return parts
        if len(sizes) > 1:
            call.space.freeze(x, call.site("indexing", "chunk into unequal parts over pruned channels"))
            return parts
        first = call.along(parts[0], dim)
        for p in parts[1:]:
            call.space.unify(
                first, call.along(p, dim), call.site("conflict", "split parts must lose the same channels")
            )
        return parts


def index_dims(index: Any, ndim: int) -> list[tuple[int, int, Any]]:
    """Each component of a tensor index as (its position in the index, the input dim it applies
    to, the component)."""
    index = index if isinstance(index, tuple) else (index,)

    def width(item: Any) -> int:
        return item.ndim if isinstance(item, torch.Tensor) and item.dtype == torch.bool else 1

    consumed = sum(width(i) for i in index if not (i is None or i is Ellipsis))
    out, d = [], 0
    for pos, item in enumerate(index):
        if item is Ellipsis:
            d += ndim - consumed
        elif item is None:
            continue
        else:
            out.extend((pos, d + k, item) for k in range(width(item)))  # a boolean mask covers several dims
            d += width(item)
    return out


def _literal_slice(start: Any, stop: Any, step: Any) -> bool:
    """A slice the graph holds as literals, step 1: Shrink can move its bounds (see `Slice`)."""
    return all(b is None or (type(b) is int) for b in (start, stop)) and step in (None, 1)


def _is_full(item: Any, size: int) -> bool:
    return (
        isinstance(item, slice)
        and item.step in (None, 1)
        and item.start in (None, 0)
        and (item.stop is None or item.stop >= size)
    )


class GetItem(Rule):
    """Indexing: picking from a tuple is free; a literal slice of a pruned dim is a `Slice`; any
    other index of a pruned dim with constants freezes it."""

    follows_params = True

    def propagate(self, call: OpCall):
        src, index = call.labels[0], call.args[1]
        if isinstance(call.args[0], (tuple, list)):
            return src[index] if isinstance(src, (tuple, list)) else None
        if not isinstance(call.args[0], torch.Tensor):
            return None
        x = call.input(0)
        computed: list[fx.Node] = []
        fx.node.map_arg(call.node.args[1], computed.append)  # (bounds the graph computes)
        for _, d, item in index_dims(index, x.ndim):
            if d >= x.ndim or not varies_along(x, d) or _is_full(item, x.shape[d]):
                continue
            if isinstance(item, slice) and not computed and _literal_slice(item.start, item.stop, item.step):
                call.extra["reshape_labels"] = x  # Shrink moves the bounds
                continue
            call.space.freeze(
                x,
                call.site("indexing", "indexes pruned channels with constants", source=call.node.args[0].name, dim=d),
            )
        return x[index]


class Slice(Rule):
    """aten.slice along pruned channels at literal bounds, step 1 (Phi-3's fused qkv cut at
    `[..., :q]` and `[..., q:q + kv]`, GhostNet's `[:, :oup]`): the part holds the channels between
    the bounds, and Shrink moves each bound to the number of channels kept before it.  Bounds the
    graph computes, or a step, freeze the channels."""

    def propagate(self, call: OpCall):
        x = call.input(0)
        dim = dim_arg(call, 0, "dim", 0) % x.ndim
        node = call.node
        bounds = [node_arg(node, pos, name) for pos, name in ((2, "start"), (3, "end"), (4, "step"))]
        if varies_along(x, dim):
            if _literal_slice(*bounds):
                call.extra["reshape_labels"] = x
            else:
                call.space.freeze(
                    x,
                    call.site(
                        "indexing",
                        "slices pruned channels at bounds computed at run time, or with a step",
                        source=node.args[0].name,
                        dim=dim,
                    ),
                )
        return execute(call)


class FreezeAlongDim(Rule):
    """narrow/select/roll/index_select/unbind: fine on other dims, frozen along a pruned one."""

    def __init__(self, pos: int = 0, name: str = "dim", default: int | None = None) -> None:
        self.pos, self.name, self.default = pos, name, default

    def propagate(self, call: OpCall):
        x = call.input(0)
        dim = dim_arg(call, self.pos, self.name, self.default)
        dims = range(x.ndim) if dim is None else [dim % x.ndim] if isinstance(dim, int) else [d % x.ndim for d in dim]
        if any(varies_along(x, d) for d in dims):
            call.space.freeze(x, call.site("indexing", f"{call.node.target} along pruned channels"))
        return execute(call)


class Squeeze(Rule):
    """squeeze() with no dim would also drop a pruned dim that shrinks to 1: Shrink names the dims."""

    follows_params = True

    def propagate(self, call: OpCall):
        out = execute(call)
        x = call.input(0)
        if len(call.args) == 1 and "dim" not in call.kwargs and labeled_dims(x):
            call.extra["squeeze_dims"] = tuple(d for d in range(x.ndim) if x.shape[d] == 1)
        return out


class ChannelShuffleRule(Rule):
    """nn.ChannelShuffle: every group must lose the same channels (as the traced shuffle)."""

    def propagate(self, call: OpCall):
        x = call.input(0)
        g = call.module.groups
        per = call.along(x, 1)
        view = per.reshape(g, -1)
        call.space.unify(view[:1], view, call.site("reshape", "channel shuffle"))
        shuffled = per.reshape(g, -1).t().reshape(-1)
        shape = [1] * x.ndim
        shape[1] = -1
        return shuffled.reshape(shape).expand(call.out.shape)


class AssertMetadata(Rule):
    """torch.export's dtype/device checks: nothing to prune, unless they pin a size or strides."""

    def propagate(self, call: OpCall):
        if call.kwargs.get("size") is not None or call.kwargs.get("stride") is not None:
            call.freeze_inputs("no_rule", "a metadata assertion that pins the size")
        return call.out_none()


class NewTensor(Rule):
    """`x.new_full(size, v)`, `x.new_zeros(size)`, ...: x gives only its dtype and device, so no
    channel of x reaches the result (a size that counts channels is frozen by the analysis)."""

    def propagate(self, call: OpCall):
        return call.out_none()


RULES = [
    (
        (
            torch.flatten,
            "flatten",
            nn.Flatten,
            torch.permute,
            "permute",
            torch.transpose,
            "transpose",
            torch.t,
            "t",
            torch.unsqueeze,
            "unsqueeze",
            "expand_as",
            "repeat",
            torch.movedim,
            "movedim",
            torch.flip,
            "flip",
            "view_as",
            "reshape_as",
            torch.swapaxes,
            "swapaxes",
            F.pad,
            *overloads(
                aten.permute,
                aten.transpose,
                aten.unsqueeze,
                aten.t,
                aten.flatten,
                aten.flip,
                aten.expand_as,
                aten.constant_pad_nd,
                aten.pad,
            ),
        ),
        Execute(),
    ),
    (
        (
            "view",
            "reshape",
            torch.reshape,
            "unflatten",
            torch.unflatten,
            nn.Unflatten,
            "expand",
            *overloads(aten.view, aten.reshape, aten._unsafe_view, aten.expand),
        ),
        Reshape(),
    ),
    ((torch.squeeze, "squeeze", *overloads(aten.squeeze)), Squeeze()),
    (
        (torch.cat, torch.concat, torch.concatenate, torch.stack, *overloads(aten.cat, aten.concat, aten.stack)),
        Concat(),
    ),
    (
        (torch.split, "split", torch.chunk, "chunk", *overloads(aten.split, aten.split_with_sizes, aten.chunk)),
        SplitChunk(),
    ),
    ((operator.getitem,), GetItem()),
    (
        (
            "narrow",
            torch.narrow,
            "select",
            torch.select,
            "index_select",
            torch.index_select,
            *overloads(aten.select, aten.narrow, aten.index_select),
        ),
        FreezeAlongDim(0, "dim"),
    ),
    ((aten.slice.Tensor,), Slice()),
    (("unbind", torch.unbind, *overloads(aten.unbind)), FreezeAlongDim(0, "dim", default=0)),
    (("roll", torch.roll, *overloads(aten.roll)), FreezeAlongDim(1, "dims")),
    ((nn.ChannelShuffle,), ChannelShuffleRule()),
    ((aten._assert_tensor_metadata.default,), AssertMetadata()),
    (
        (
            "new_full",
            "new_zeros",
            "new_ones",
            "new_empty",
            *overloads(aten.new_full, aten.new_zeros, aten.new_ones, aten.new_empty),
        ),
        NewTensor(),
    ),
]
