"""LayerNorm over pruned channels, exactly.

A LayerNorm normalises over its channels, so a model with some of them masked
computes something else than the same model with them removed, unless the
masked model normalises over the kept channels only.  So once a mask reaches a
LayerNorm's weight, `sync_norms` rewrites that LayerNorm (module, `F.layer_norm`
or `aten.layer_norm`) into `masked_layer_norm`, which takes its statistics over
the channels the weight's mask keeps; `Shrink` turns it back into a plain
LayerNorm over the channels that are left (`revert_norms`).  The original
form is kept in the call (`original=`), so the rewrite needs no side table.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune.masking import ChannelMaskParametrization, channel_mask, resolve

__all__ = ["masked_layer_norm", "sync_norms", "revert_norms", "LAYER_NORMS"]

aten = torch.ops.aten
LAYER_NORMS = {F.layer_norm: "functional", aten.layer_norm.default: "aten"}


def masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, original: str = "functional") -> torch.Tensor:
    """LayerNorm over the last dim, with mean and variance taken over the channels `keep` marks."""
    k = keep.to(x.dtype)
    centered = (x - (x * k).sum(-1, keepdim=True) / k.sum()) * k
    y = centered * torch.rsqrt(centered.pow(2).sum(-1, keepdim=True) / k.sum() + eps) * weight
    return y if bias is None else y + bias


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _layer_norm_call(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(input, weight name, bias name, eps, original) of a LayerNorm over one dim with a weight."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.LayerNorm) or type(m).forward is not nn.LayerNorm.forward or len(m.normalized_shape) != 1 or m.weight is None:
            return None
        return node.args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None, m.eps, f"module:{node.target}"
    if node.op != "call_function" or node.target not in LAYER_NORMS:
        return None
    shape, weight, bias = _arg(node, 1, "normalized_shape"), _arg(node, 2, "weight"), _arg(node, 3, "bias")
    if len(shape) != 1 or not (isinstance(weight, fx.Node) and weight.op == "get_attr") or (bias is not None and bias.op != "get_attr"):
        return None
    return _arg(node, 0, "input"), weight.target, bias.target if bias is not None else None, _arg(node, 4, "eps", 1e-5), LAYER_NORMS[node.target]


def sync_norms(gm: fx.GraphModule) -> int:
    """Rewrite every LayerNorm whose weight has masked channels into `masked_layer_norm`;
    return how many were rewritten."""
    changed = 0
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
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node with no underlying reference")
            # (fx does not see parametrized tensors, which are class properties, as attributes)
            keep = gm.graph.get_attr(".".join(p for p in (owner_path, "parametrizations", attr, str(index), "keep_0") if p))
            w = gm.graph.get_attr(weight)
            b = gm.graph.get_attr(bias) if bias is not None else None
            new = gm.graph.call_function(masked_layer_norm, (x, keep, w, b, eps), {"original": original})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        old_inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        for n in old_inputs:
            if n.op == "get_attr" and not n.users:
                gm.graph.erase_node(n)
        changed += 1
    if changed:
        gm.recompile()
    return changed


def revert_norms(gm: fx.GraphModule) -> None:
    """After Shrink sliced the weights: plain LayerNorms over the channels that are left."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not masked_layer_norm:
            continue
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
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for n in (keep, w, b):
            if isinstance(n, fx.Node) and not n.users:
                gm.graph.erase_node(n)
