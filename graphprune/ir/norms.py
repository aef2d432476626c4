"""Normalisations and reductions over pruned channels, exactly.

A LayerNorm normalises over its channels (and RMSNorm takes a mean over them),
so a model with some of them masked computes something else than the same
model with them removed, unless the masked model reduces over the kept
channels only.  `sync_masked_ops` (run by the mask passes) rewrites them:

- a LayerNorm (module, `F.layer_norm` or `aten.layer_norm`) whose weight has
  masked channels becomes `masked_layer_norm`, with statistics over the
  channels that the weight's mask keeps;
- a mean or sum over one dim of channels of which some are masked becomes
  `masked_reduce`, reading a `graphprune_keep_*` buffer of the kept channels.

`Shrink` turns both back into the plain op over the channels that are left
(`revert_masked_ops`).  The original form is kept in the call (`original=`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune.ir.masking import KEEP_PREFIX, ChannelMaskParametrization, channel_mask, resolve, unit_mask_state
from graphprune.ir.trace import ROOT_HOLDER, root_holder
from graphprune.ir.weight_ops import node_arg, swap_node

__all__ = ["masked_layer_norm", "masked_reduce", "sync_masked_ops", "revert_masked_ops"]

aten = torch.ops.aten
LAYER_NORMS = {F.layer_norm: "functional", aten.layer_norm.default: "aten"}
# a reduction's original form: (op, target, whether its dim is a list)
REDUCTIONS = {
    "aten_mean": ("call_function", aten.mean.dim, True),
    "aten_sum": ("call_function", aten.sum.dim_IntList, True),
    "torch_mean": ("call_function", torch.mean, False),
    "torch_sum": ("call_function", torch.sum, False),
    "method_mean": ("call_method", "mean", False),
    "method_sum": ("call_method", "sum", False),
}


def masked_layer_norm(
    x: torch.Tensor,
    keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    original: str = "functional",
) -> torch.Tensor:
    """LayerNorm over the last dim, with mean and variance taken over the channels `keep` marks."""
    k = keep.to(x.dtype)
    centered = (x - (x * k).sum(-1, keepdim=True) / k.sum()) * k
    y = centered * torch.rsqrt(centered.pow(2).sum(-1, keepdim=True) / k.sum() + eps) * weight
    return y if bias is None else y + bias


def masked_reduce(
    x: torch.Tensor, keep: torch.Tensor, dim: int, keepdim: bool, op: str = "mean", original: str = "torch_mean"
) -> torch.Tensor:
    """Mean or sum over `dim` of the entries `keep` marks."""
    shape = [1] * x.ndim
    shape[dim] = -1
    total = (x * keep.to(x.dtype).reshape(shape)).sum(dim, keepdim=keepdim)
    return total / keep.sum() if op == "mean" else total


def _layer_norm_call(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(input, weight name, bias name, eps, original) of a LayerNorm over one dim with a weight."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if (
            not isinstance(m, nn.LayerNorm)
            or type(m).forward is not nn.LayerNorm.forward
            or len(m.normalized_shape) != 1
            or m.weight is None
        ):
            return None
        return (
            node.args[0],
            f"{node.target}.weight",
            f"{node.target}.bias" if m.bias is not None else None,
            m.eps,
            f"module:{node.target}",
        )
    if node.op != "call_function" or node.target not in LAYER_NORMS:
        return None
    shape, weight, bias = node_arg(node, 1, "normalized_shape"), node_arg(node, 2, "weight"), node_arg(node, 3, "bias")
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 1
        or isinstance(shape[0], fx.Node)
        or not (isinstance(weight, fx.Node) and weight.op == "get_attr")
        or (bias is not None and bias.op != "get_attr")
    ):
        return None
    return (
        node_arg(node, 0, "input"),
        weight.target,
        bias.target if bias is not None else None,
        node_arg(node, 4, "eps", 1e-5),
        LAYER_NORMS[node.target],
    )


def sync_masked_ops(gm: fx.GraphModule, deps) -> None:
    """Bring LayerNorms and channel reductions in line with the masks (after masks changed)."""
    _sync_norms(gm)
    _sync_reductions(gm, deps)
    gm.recompile()


def _masked_roots(gm: fx.GraphModule, deps) -> torch.Tensor:
    roots = [g.roots[u] for g in deps.groups for u in torch.nonzero(unit_mask_state(gm, g)[0]).reshape(-1).tolist()]
    return torch.tensor(roots, dtype=torch.int64)


def _reduction_key(node: fx.Node) -> str | None:
    for key, (op, target, _) in REDUCTIONS.items():
        if node.op == op and node.target == target:
            return key
    return None


def _sync_reductions(gm: fx.GraphModule, deps) -> None:
    if not deps.reductions:
        return
    pruned = _masked_roots(gm, deps)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, (dim, roots) in deps.reductions.items():
        node = nodes.get(name)
        if node is None:
            continue
        keep = ~torch.isin(roots, pruned)
        if node.target is masked_reduce:  # already rewritten: only the kept channels change
            owner, attr = resolve(gm, node.args[1].target)
            owner.register_buffer(attr, keep.clone())
            continue
        key = _reduction_key(node)
        if key is None or bool(keep.all()):
            continue
        holder = root_holder(gm)
        buffer = f"{KEEP_PREFIX}{name}"
        holder.register_buffer(buffer, keep.clone())
        buffer = f"{ROOT_HOLDER}.{buffer}"
        keepdim = node_arg(node, 2, "keepdim", False)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                masked_reduce,
                (node.args[0], gm.graph.get_attr(buffer), dim, bool(keepdim)),
                {"op": key.rpartition("_")[2], "original": key},
            )
        swap_node(gm, node, new)


def _sync_norms(gm: fx.GraphModule) -> None:
    """Rewrite every LayerNorm whose weight has masked channels into `masked_layer_norm`."""
    for node in list(gm.graph.nodes):
        call = _layer_norm_call(gm, node)
        if call is None:
            continue
        x, weight, bias, eps, original = call
        owner, attr = resolve(gm, weight)
        mask = channel_mask(owner, attr)
        if mask is None or not hasattr(mask, "keep_0") or bool(mask.keep_0.all()):
            continue
        index = next(i for i, p in enumerate(owner.parametrizations[attr]) if isinstance(p, ChannelMaskParametrization))
        owner_path = weight.rpartition(".")[0]
        with gm.graph.inserting_before(node), warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Attempted to insert a get_attr Node with no underlying reference"
            )
            # (fx does not see parametrized tensors, which are class properties, as attributes)
            keep = gm.graph.get_attr(
                ".".join(p for p in (owner_path, "parametrizations", attr, str(index), "keep_0") if p)
            )
            w = gm.graph.get_attr(weight)
            b = gm.graph.get_attr(bias) if bias is not None else None
            new = gm.graph.call_function(masked_layer_norm, (x, keep, w, b, eps), {"original": original})
        swap_node(gm, node, new)


def revert_masked_ops(gm: fx.GraphModule) -> None:
    """After Shrink sliced the weights: plain LayerNorms and reductions over the channels left."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is masked_reduce:
            _revert_reduction(gm, node)
        elif node.op == "call_function" and node.target is masked_layer_norm:
            _revert_norm(gm, node)


def _revert_reduction(gm: fx.GraphModule, node: fx.Node) -> None:
    x, keep, dim, keepdim = node.args
    op, target, as_list = REDUCTIONS[node.kwargs["original"]]
    with gm.graph.inserting_before(node):
        new = gm.graph.create_node(op, target, (x, [dim] if as_list else dim, keepdim))
    if keep.target in swap_node(gm, node, new):  # the keep buffer goes with the last reduction reading it
        delattr(*resolve(gm, keep.target))


def _revert_norm(gm: fx.GraphModule, node: fx.Node) -> None:
    x, keep, w, b, eps = node.args
    original = node.kwargs.get("original", "functional")
    width = getattr(*resolve(gm, w.target)).shape[0]
    with gm.graph.inserting_before(node):
        if original.startswith("module:"):
            path = original.partition(":")[2]
            gm.get_submodule(path).normalized_shape = (width,)
            new = gm.graph.call_module(path, (x,))
        elif original == "aten":
            new = gm.graph.call_function(aten.layer_norm.default, (x, [width], w, b, eps))
        else:
            new = gm.graph.call_function(F.layer_norm, (x, (width,), w, b, eps))
    swap_node(gm, node, new)
