"""Channel-wise ops: each output channel depends on the same input channel only.

BatchNorm, InstanceNorm, GroupNorm (whole groups), PReLU, pooling and
resampling.  `ChannelwiseRule` is public: a user's leaf module that works
channel by channel registers it with the names of its per-channel tensors.
LayerNorm normalises *across* channels: masked, it is rewritten to normalise
over the kept channels only (graphprune.ir.norms), so it prunes exactly too.
Embedding lookups produce channels (their weight's columns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune.ir.labels import varies_along
from graphprune.ir.masking import is_maskable
from graphprune.ir.modules import MaskedLayerNorm
from graphprune.ir.norms import masked_layer_norm
from graphprune.rules.base import OpCall, ParamRef, Rule, as_labels, aten, overloads, place
from graphprune.rules.pointwise import Unary

__all__ = ["ChannelwiseRule", "EmbeddingRule", "GroupNormRule", "LayerNormRule", "FunctionalNormRule", "RULES"]


class ChannelwiseRule(Rule):
    """Channels pass through along `dim` (negative: counted from the end); `params` maps a
    tensor attribute to the dim of it that is per-channel, e.g. {"weight": 0, "bias": 0}."""

    def __init__(self, dim: int = 1, params: dict[str, int] | None = None, count_attr: str | None = None) -> None:
        self.dim, self.params, self.count_attr = dim, dict(params or {}), count_attr

    def channels(self, call: OpCall) -> tuple[torch.Tensor, int]:
        x = call.input(0)
        dim = self.dim % x.ndim
        return call.along(x, dim), dim

    def propagate(self, call: OpCall):
        per, dim = self.channels(call)
        for attr, pdim in self.params.items():
            t = getattr(call.module, attr, None)
            if isinstance(t, torch.Tensor) and t.ndim > pdim and t.shape[pdim] == per.numel():
                call.space.add_slot(call.param(attr), pdim, per)
        shape = [1] * call.out.ndim
        shape[dim] = -1
        return per.reshape(shape).expand(call.out.shape)

    def update_module(self, module: nn.Module) -> None:
        if self.count_attr is None:
            return
        for attr, pdim in self.params.items():
            t = getattr(module, attr, None)
            if isinstance(t, torch.Tensor):
                setattr(module, self.count_attr, t.shape[pdim])
                return


class MultiScaleRoIAlignRule(Rule):
    """torchvision's MultiScaleRoIAlign (Faster/Mask R-CNN): each box is pooled from one of the
    feature maps, channel by channel, so a channel goes from every level together."""

    def propagate(self, call: OpCall):
        features, labels = call.args[0], call.labels[0]
        per = None
        for name in [k for k in call.module.featmap_names if k in features]:  # (the maps it is given)
            level = call.along(as_labels(labels[name], features[name]), 1)
            if per is None:
                per = level
            else:
                call.space.unify(
                    per, level, call.site("conflict", "feature maps pooled together lose the same channels")
                )
        return place(per, 1, call.out.shape)


class GroupNormRule(ChannelwiseRule):
    """GroupNorm prunes whole groups: the channels of a group are one unit."""

    def __init__(self) -> None:
        super().__init__(1, {"weight": 0, "bias": 0})

    def channels(self, call: OpCall):
        per, dim = super().channels(call)
        if call.module.weight is None:  # nothing to slice, so num_groups could not follow
            call.space.freeze(per, call.site("norm", "GroupNorm without affine parameters"))
            return per, dim
        rows = per.reshape(call.module.num_groups, -1)
        call.space.unify(rows[:, :1], rows, call.site("norm", "GroupNorm normalises over its groups"))
        return per, dim

    def update_module(self, module: nn.Module) -> None:
        per_group = module.num_channels // module.num_groups
        if module.weight is not None:
            module.num_channels = module.weight.shape[0]
            module.num_groups = module.num_channels // per_group


def _computed(value) -> bool:
    """A graph argument that is (or holds) another node's result, known only at run time."""
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, (tuple, list)) and any(_computed(v) for v in value)


class LayerNormRule(Rule):
    """LayerNorm over the last dim (module, F.layer_norm, aten.layer_norm, or its masked form):
    per channel for its weight and bias, and prunable: once masked it normalises over the kept
    channels only (graphprune.ir.norms), which is what the shrunk LayerNorm computes.  A LayerNorm
    over several dims, or without a weight to carry the mask, freezes the channels."""

    def propagate(self, call: OpCall):
        x = call.input(0)
        masked = call.node.target is masked_layer_norm
        if call.module is not None:
            shape, weight, bias = call.module.normalized_shape, call.module.weight, call.module.bias
            weight = call.param("weight") if weight is not None and is_maskable(call.module, "weight") else weight
            bias = call.param("bias") if bias is not None and is_maskable(call.module, "bias") else bias
        else:
            w_at, b_at = (2, 3)
            shape = (
                None if masked else call.kwargs.get("normalized_shape", call.args[1] if len(call.args) > 1 else None)
            )
            weight = call.label_kwargs.get("weight", call.labels[w_at] if len(call.labels) > w_at else None)
            bias = call.label_kwargs.get("bias", call.labels[b_at] if len(call.labels) > b_at else None)
            weight = weight.name if isinstance(weight, ParamRef) and weight.maskable else weight
            bias = bias.name if isinstance(bias, ParamRef) and bias.maskable else bias
        count = 1 if masked else len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
        if not any(varies_along(x, d) for d in range(x.ndim - count, x.ndim)):
            return Unary().propagate(call)
        site = dict(source=call.node.args[0].name, dim=x.ndim - 1)
        node_shape = call.node.kwargs.get("normalized_shape", call.node.args[1] if len(call.node.args) > 1 else None)
        computed = call.module is None and not masked and _computed(node_shape)
        if count != 1 or computed or not isinstance(weight, str) or (bias is not None and not isinstance(bias, str)):
            why = (
                "normalises over several dims"
                if count != 1
                else "takes a shape computed at run time"
                if computed
                else "has no weight (or bias) parameter to carry a mask"
            )
            call.space.freeze(x, call.site("norm", f"normalises over these channels and {why}", **site))
            return Unary().propagate(call)
        per = call.along(x, -1)
        for name in (weight, bias):
            if name is not None:
                call.space.add_slot(name, 0, per)
                call.extra.setdefault("sliced_params", set()).add(name)
        call.space.tag(per, "hidden")
        return per.reshape([1] * (call.out.ndim - 1) + [-1]).expand(call.out.shape)

    def update_module(self, module: nn.Module) -> None:
        if getattr(module, "weight", None) is not None:
            module.normalized_shape = (module.weight.shape[0],)


class EmbeddingRule(Rule):
    """An embedding lookup: the output's last dim is the weight's columns (a hidden size)."""

    def __init__(self, weight_pos: int) -> None:
        self.weight_pos = weight_pos

    def propagate(self, call: OpCall):
        if call.module is not None:
            name, max_norm, width = call.param("weight"), call.module.max_norm, call.module.embedding_dim
        else:
            ref = call.label_kwargs.get(
                "weight", call.labels[self.weight_pos] if len(call.labels) > self.weight_pos else None
            )
            name, max_norm, width = getattr(ref, "name", None), call.kwargs.get("max_norm"), call.out.shape[-1]
        if name is None or max_norm is not None:  # max_norm renormalises rows over all their columns
            call.freeze_inputs("no_rule", "embedding whose weight is not a parameter, or with max_norm")
            return call.out_none()
        out = call.space.fresh(width)
        call.space.tag(out, "hidden")
        call.space.add_slot(name, 1, out)
        call.extra.setdefault("sliced_params", set()).add(name)
        return out.reshape([1] * (call.out.ndim - 1) + [-1]).expand(call.out.shape)

    def update_module(self, module: nn.Module) -> None:
        module.embedding_dim = module.weight.shape[1]


class FunctionalNormRule(Rule):
    """F.batch_norm / F.instance_norm / F.group_norm: per-channel tensors passed as arguments."""

    def __init__(self, tensor_args: dict[int, str], groups_arg: int | None = None) -> None:
        self.tensor_args, self.groups_arg = tensor_args, groups_arg

    def propagate(self, call: OpCall):
        x = call.input(0)
        per = call.along(x, 1)
        if self.groups_arg is not None:  # whole groups go; Shrink writes the number of groups kept
            groups = (
                call.node.args[self.groups_arg]
                if len(call.node.args) > self.groups_arg
                else call.node.kwargs.get("num_groups")
            )
            if not isinstance(groups, int):
                call.space.freeze(per, call.site("norm", "group_norm with a group count computed at run time"))
            else:
                rows = per.reshape(groups, -1)
                call.space.unify(rows[:, :1], rows, call.site("norm", "group_norm normalises over its groups"))
                call.extra["count_args"] = [(self.groups_arg, "num_groups", rows[:, 0])]
        for pos, name in self.tensor_args.items():
            lab = call.label_kwargs.get(name, call.labels[pos] if len(call.labels) > pos else None)
            if isinstance(lab, ParamRef):
                call.slot_param(lab, 0, per)
            elif isinstance(call.kwargs.get(name, call.args[pos] if len(call.args) > pos else None), torch.Tensor):
                call.freeze_inputs("no_rule", f"{name} of {call.node.target.__name__} is not a parameter of the model")
                return call.out_none()
        shape = [1] * call.out.ndim
        shape[1] = -1
        return per.reshape(shape).expand(call.out.shape)


_BN = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}
_F_NORM = {1: "running_mean", 2: "running_var", 3: "weight", 4: "bias"}  # F.batch_norm / F.instance_norm
_ATEN_NORM = {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}  # their ATen forms
_POOLS = {
    1: (
        nn.MaxPool1d,
        nn.AvgPool1d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveMaxPool1d,
        nn.LPPool1d,
        nn.ReflectionPad1d,
        nn.ReplicationPad1d,
        nn.ZeroPad1d,
        nn.ConstantPad1d,
        nn.CircularPad1d,
        F.max_pool1d,
        F.avg_pool1d,
        F.adaptive_avg_pool1d,
        F.adaptive_max_pool1d,
        *overloads(aten.max_pool1d, aten.avg_pool1d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d),
    ),
    2: (
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.LPPool2d,
        nn.ReflectionPad2d,
        nn.ReplicationPad2d,
        nn.ZeroPad2d,
        nn.ConstantPad2d,
        nn.CircularPad2d,
        nn.UpsamplingNearest2d,
        nn.UpsamplingBilinear2d,
        nn.FractionalMaxPool2d,
        F.max_pool2d,
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
        *overloads(
            aten.max_pool2d,
            aten.avg_pool2d,
            aten.adaptive_avg_pool2d,
            aten.adaptive_max_pool2d,
            aten.max_pool2d_with_indices,
        ),
    ),
    3: (
        nn.MaxPool3d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool3d,
        nn.ReflectionPad3d,
        nn.ReplicationPad3d,
        nn.ConstantPad3d,
        nn.CircularPad3d,
        nn.FractionalMaxPool3d,
        F.max_pool3d,
        F.avg_pool3d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool3d,
        *overloads(aten.max_pool3d, aten.avg_pool3d, aten.adaptive_avg_pool3d, aten.adaptive_max_pool3d),
    ),
}

RULES = [
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), ChannelwiseRule(1, _BN, "num_features")),
    ((nn.InstanceNorm1d,), ChannelwiseRule(-2, _BN, "num_features")),
    ((nn.InstanceNorm2d,), ChannelwiseRule(-3, _BN, "num_features")),
    ((nn.InstanceNorm3d,), ChannelwiseRule(-4, _BN, "num_features")),
    ((F.batch_norm, F.instance_norm), FunctionalNormRule(_F_NORM)),
    ((aten.batch_norm.default, aten.instance_norm.default), FunctionalNormRule(_ATEN_NORM)),
    ((nn.GroupNorm,), GroupNormRule()),
    ((F.group_norm, aten.group_norm.default), FunctionalNormRule({2: "weight", 3: "bias"}, groups_arg=1)),
    ((nn.LayerNorm, MaskedLayerNorm, F.layer_norm, masked_layer_norm, aten.layer_norm.default), LayerNormRule()),
    ((nn.Embedding, aten.embedding.default), EmbeddingRule(0)),  # (aten.embedding takes the weight first)
    ((F.embedding,), EmbeddingRule(1)),
    ((nn.PReLU,), ChannelwiseRule(1, {"weight": 0}, "num_parameters")),
    # region pooling (torchvision detectors): per channel, boxes carry none
    (("torchvision.ops.roi_align.roi_align", "torchvision.ops.roi_align.RoIAlign"), ChannelwiseRule(1)),
    (("torchvision.ops.roi_pool.roi_pool", "torchvision.ops.roi_pool.RoIPool"), ChannelwiseRule(1)),
    (("torchvision.ops.poolers.MultiScaleRoIAlign",), MultiScaleRoIAlignRule()),
    (_POOLS[1], ChannelwiseRule(-2)),
    (_POOLS[2], ChannelwiseRule(-3)),
    (_POOLS[3], ChannelwiseRule(-4)),
    # resampling: channels stay at dim 1 whatever the spatial rank
    (
        (
            nn.Upsample,
            F.interpolate,
            *overloads(
                aten.upsample_nearest1d,
                aten.upsample_nearest2d,
                aten.upsample_nearest3d,
                aten.upsample_linear1d,
                aten.upsample_bilinear2d,
                aten.upsample_bicubic2d,
                aten.upsample_trilinear3d,
            ),
        ),
        ChannelwiseRule(1),
    ),
]
