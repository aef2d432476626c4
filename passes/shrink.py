"""Shrink: physically remove masked channels, exactly.

Every member of a group loses the same channels; module attributes
(in_channels, num_features, groups, ...) are fixed by the op's rule, and
reshape constants that carry a pruned size are rewritten in the graph.
For every model, shrink(mask(m))(x) == mask(m)(x) up to float rounding.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from graphprune.analysis.dependency import Dependencies
from graphprune.errors import PassError
from graphprune.ir.masking import (
    channel_mask,
    raw_tensor,
    refuse_lowered,
    register_mask,
    resolve,
    take_masks,
    unit_mask_state,
)
from graphprune.ir.modules import set_layer_norm_class
from graphprune.ir.norms import revert_masked_ops
from graphprune.pipeline import PassBase, PassContext, PassResult
from graphprune.rules.base import rule_for_module
from graphprune.rules.shape import index_dims, node_arg

__all__ = ["Shrink"]


class Shrink(PassBase):
    keeps_outputs = True
    plan_op = "shrink"

    @classmethod
    def from_plan(cls, step: dict) -> Shrink:
        return cls()  # it recomputes what to remove from the mask state: replaying it is running it

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        refuse_lowered(gm, "Shrink")
        deps = ctx.get(Dependencies, gm)
        removed: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        pruned_roots: set[int] = set()
        report = {}
        for g in deps.groups:
            every, some = unit_mask_state(gm, g)
            partial = torch.nonzero(some & ~every).reshape(-1).tolist()
            if partial:
                raise PassError(
                    f"group {g.key}: units {partial[:8]} are masked in some of their tensors but not in all of "
                    f"{[s.tensor for s in g.slots]}; mask whole channels with a graphprune mask pass before Shrink"
                )
            ids = torch.nonzero(every).reshape(-1).tolist()
            for slot, idx in g.indices(ids).items():
                removed[slot.tensor][slot.dim].update(idx)
            pruned_roots.update(g.roots[i] for i in ids)
            report[g.key] = (g.size, g.size - len(ids))
        touched: dict[int, nn.Module] = {}
        sliced: dict[int, tuple[dict, torch.Tensor]] = {}
        touched_attrs: set[tuple[int, str]] = set()
        for tensor, dims in removed.items():
            dims = {d: sorted(s) for d, s in dims.items() if s}
            if not dims:  # nothing of it goes (its masks, all kept, are stripped below): no copy of it
                continue
            for name in (tensor, *deps.aliases.get(tensor, ())):  # a tied tensor is sliced once, everywhere
                owner, attr = resolve(gm, name)
                if (id(owner), attr) in touched_attrs:  # one module reached under two names (a shared module)
                    continue
                touched_attrs.add((id(owner), attr))
                self._slice(owner, attr, dims, sliced, name, ctx.spill)
                touched[id(owner)] = owner
        revert_masked_ops(gm)  # masked LayerNorms and means become plain ones over the channels left
        self._strip_unused_masks(gm)
        for module in gm.modules():  # masked LayerNorms of the module tree become plain ones
            set_layer_norm_class(module, masked=False)
        for owner in touched.values():
            rule = rule_for_module(owner, for_attributes=True)
            if rule is not None:
                rule.update_module(owner)
        _rewrite_reshapes(gm, deps, pruned_roots)
        if pruned_roots:
            pruned = torch.tensor(sorted(pruned_roots), dtype=torch.int64)
            for node in gm.graph.nodes:
                if node.name in deps.squeezes:  # name the dims, or a width shrunk to 1 would vanish too
                    node.args, node.kwargs = (node.args[0], deps.squeezes[node.name]), {}
                for pos, name, roots in deps.counts.get(node.name, ()):  # a depthwise conv's groups: its channels
                    kept = int((~torch.isin(roots, pruned)).sum())
                    if len(node.args) > pos:
                        node.args = (*node.args[:pos], kept, *node.args[pos + 1 :])
                    else:
                        node.kwargs = {**node.kwargs, name: kept}
        ctx.record(groups=report, plan={"op": "shrink"})
        return PassResult(gm, bool(pruned_roots))

    @staticmethod
    def _slice(owner: nn.Module, attr: str, dims: dict[int, list[int]], sliced: dict, name: str, spill) -> None:
        weight_masks = take_masks(owner, attr, name)
        if hasattr(owner, "graphprune_shrink"):
            owner.graphprune_shrink({attr: {d: torch.tensor(i, dtype=torch.long) for d, i in dims.items()}})
            return
        t = raw_tensor(owner, attr)
        if id(t) in sliced:  # a tied tensor: slice once, share the result
            seen_dims, new = sliced[id(t)]
            if seen_dims != dims:
                raise PassError(f"{name} is shared with another module but would lose different channels there")
        else:
            new = _keep_slices(t.detach(), dims)
            new = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
            sliced[id(t)] = (dims, new)
            if spill is not None:  # compile(inplace=True) of a big model: the old values to disk
                spill(t)
        if isinstance(new, nn.Parameter):
            setattr(owner, attr, new)
        else:
            owner._buffers[attr] = new
        for wm in weight_masks:  # fine-grained masks shrink with the tensor they mask
            wm.mask = _keep_slices(wm.mask, dims)
            register_mask(owner, attr, wm)

    @staticmethod
    def _strip_unused_masks(gm: fx.GraphModule) -> None:
        """Masks left with nothing masked are baked away; a mask with zeros outside every group is an error."""
        for mod_name, module in gm.named_modules():
            if not parametrize.is_parametrized(module):
                continue
            for attr in list(module.parametrizations.keys()):
                mask = channel_mask(module, attr)
                if mask is None:
                    continue
                for d in mask.masked_dims():
                    if not bool(getattr(mask, f"keep_{d}").all()):
                        raise PassError(
                            f"{mod_name}.{attr} masks channels along dim {d} that belong to no prunable group; these masks cannot be removed exactly"
                        )
                for wm in take_masks(module, attr, f"{mod_name}.{attr}"):
                    register_mask(module, attr, wm)


def _keep_slices(t: torch.Tensor, dims: dict[int, list[int]]) -> torch.Tensor:
    """t without the given indices along each dim."""
    for d, idx in dims.items():
        keep = torch.ones(t.shape[d], dtype=torch.bool)
        keep[idx] = False
        t = t.index_select(d, torch.nonzero(keep).reshape(-1))
    return t


def _sizes_of(node: fx.Node) -> tuple[list, str | int]:
    """The size arguments of a view/reshape and where they live."""
    if "shape" in node.kwargs:
        return list(node.kwargs["shape"]), "shape"
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0]), 1
    return rest, "varargs"


_SPLITS = {"split", torch.split, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default}


def _is_split(node: fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and node.target in _SPLITS


def _rewrite_split(node: fx.Node, shape: tuple[int, ...], pruned: torch.Tensor) -> None:
    """split(x, size or sizes, dim): each part's size becomes the number of channels it keeps."""
    sizes = (
        node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size"))
    )
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim %= len(shape)
    if isinstance(sizes, int):
        sizes = [min(sizes, shape[dim] - start) for start in range(0, shape[dim], sizes)]
    kept = (~pruned.expand(shape).movedim(dim, 0).reshape(shape[dim], -1).all(1)).long()
    new = [int(part.sum()) for part in kept.split(list(sizes))]
    if new == list(sizes):
        return
    if len(set(new)) == 1 and len(set(sizes)) == 1:  # split(self.split_size): an attribute write-back can set
        node.meta["graphprune_rewritten"] = [(sizes[0], new[0])]
    if node.target is torch.ops.aten.split.Tensor:
        node.target = torch.ops.aten.split_with_sizes.default  # the ATen split takes a single size
    node.args = (node.args[0], new, dim)
    node.kwargs = {}


def _moved(bound: int | None, kept: torch.Tensor) -> int | None:
    """A slice bound over channels some of which go: the number of channels kept before it."""
    size = kept.numel()
    if bound is None or bound >= size:  # (to the end, as before)
        return bound
    return int(kept[: max(bound + size if bound < 0 else bound, 0)].sum())


def _rewrite_slice(node: fx.Node, shape: tuple[int, ...], pruned: torch.Tensor) -> None:
    """x[..., a:b] / aten.slice(x, dim, a, b) at literal bounds (see rules.shape.Slice): each bound
    on a dim that loses channels becomes the number of channels kept before it."""

    def kept(dim: int) -> torch.Tensor:
        return ~pruned.expand(shape).movedim(dim, 0).reshape(shape[dim], -1).all(1)

    rewritten = []
    if node.target is torch.ops.aten.slice.Tensor:  # (x, dim=0, start=None, end=None, step=1), kwargs folded in
        dim, start, end, step = (
            node_arg(node, pos, name) for pos, name in enumerate(("dim", "start", "end", "step"), 1)
        )
        dim, step = (dim or 0) % len(shape), 1 if step is None else step
        new = [_moved(b, kept(dim)) for b in (start, end)]
        rewritten = [(b, n) for b, n in zip((start, end), new) if b != n]
        node.args, node.kwargs = (node.args[0], dim, *new, step), {}
    else:  # getitem
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        items = list(index)
        for pos, dim, item in index_dims(index, len(shape)):
            if isinstance(item, slice) and dim < len(shape):
                k = kept(dim)
                items[pos] = slice(_moved(item.start, k), _moved(item.stop, k), item.step)
                rewritten += [
                    (b, n) for b, n in ((item.start, items[pos].start), (item.stop, items[pos].stop)) if b != n
                ]
        node.args = (node.args[0], tuple(items) if isinstance(node.args[1], tuple) else items[0])
    if rewritten:  # literals the user's source may hold in a module attribute (`self.out_chs`)
        node.meta["graphprune_rewritten"] = rewritten


def _is_slice(node: fx.Node) -> bool:
    return node.target in (torch.ops.aten.slice.Tensor, operator.getitem)


def _rewrite_reshapes(gm: fx.GraphModule, deps: Dependencies, pruned_roots: set[int]) -> None:
    """Sizes in reshapes that count pruned channels become what is kept: literals that carry the old
    width, and sizes the graph computes from a channel count (possibly another tensor's)."""
    if not pruned_roots or not deps.reshapes:
        return
    pruned_set = torch.tensor(sorted(pruned_roots), dtype=torch.int64)
    for node in list(gm.graph.nodes):
        if node.name not in deps.reshapes:
            continue
        shape, roots, counted = deps.reshapes[node.name]
        pruned = torch.isin(roots, pruned_set)
        if _is_split(node):
            _rewrite_split(node, shape, pruned)
            continue
        if _is_slice(node):
            _rewrite_slice(node, shape, pruned)
            continue
        new_shape = []
        for d, size in enumerate(shape):
            if roots.shape[d] == 1:
                new_shape.append(size)
                continue
            gone = pruned.movedim(d, 0).reshape(roots.shape[d], -1).all(1)
            new_shape.append(int((~gone).sum()))
        sizes, where = _sizes_of(node)
        if len(sizes) != len(shape):
            continue
        # a size computed from a channel count (perhaps another tensor's) becomes the width kept here
        fixed = [
            new
            if (isinstance(s, int) and s != -1 and s == old != new) or (d in counted and isinstance(s, fx.Node))
            else s
            for d, (s, old, new) in enumerate(zip(sizes, shape, new_shape))
        ]
        if fixed == sizes:
            continue
        # constants the user's source may hold (in a module attribute): write-back tries them, or names the line
        node.meta["graphprune_rewritten"] = [
            (old, new) for s, old, new in zip(sizes, shape, new_shape) if isinstance(s, int) and s == old != new
        ]
        if where == "shape":
            node.kwargs = {**node.kwargs, "shape": tuple(fixed)}
        elif where == 1:
            node.args = (node.args[0], tuple(fixed))
        else:
            node.args = (node.args[0], *fixed)
