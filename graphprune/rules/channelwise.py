"""Channel-wise ops: each output channel depends on the same input channel only.

BatchNorm, InstanceNorm, GroupNorm (whole groups), PReLU, pooling and
resampling.  `ChannelwiseRule` is public: a user's leaf module that works
channel by channel registers it with the names of its per-channel tensors.
LayerNorm normalises *across* channels; pruning some would change the
statistics of the rest, so channels it normalises over are frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.labels import varies_along
from graphprune.rules.base import OpCall, ParamRef, Rule, register_rule
from graphprune.rules.pointwise import Unary

__all__ = ["ChannelwiseRule", "GroupNormRule", "LayerNormRule"]


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


class LayerNormRule(Rule):
    """LayerNorm (module or F.layer_norm): frozen where it normalises over pruned channels."""

    def propagate(self, call: OpCall):
        x = call.input(0)
        if call.module is not None:
            shape = call.module.normalized_shape
        else:
            shape = call.kwargs.get("normalized_shape", call.args[1] if len(call.args) > 1 else None)
        count = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
        if any(varies_along(x, d) for d in range(x.ndim - count, x.ndim)):
            call.space.freeze(x, call.site("norm", "normalises over these channels; removing some would change the statistics of the rest", source=call.node.args[0].name, dim=x.ndim - 1))
        return Unary().propagate(call)


class FunctionalNormRule(Rule):
    """F.batch_norm / F.instance_norm / F.group_norm: per-channel tensors passed as arguments."""

    def __init__(self, tensor_args: dict[int, str], groups_arg: int | None = None) -> None:
        self.tensor_args, self.groups_arg = tensor_args, groups_arg

    def propagate(self, call: OpCall):
        x = call.input(0)
        per = call.along(x, 1)
        if self.groups_arg is not None:
            # the group count is a constant in the graph that Shrink does not rewrite: keep these channels
            call.space.freeze(per, call.site("norm", "F.group_norm with a constant group count"))
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


register_rule(F.batch_norm, FunctionalNormRule({1: "running_mean", 2: "running_var", 3: "weight", 4: "bias"}))
register_rule(F.instance_norm, FunctionalNormRule({1: "running_mean", 2: "running_var", 3: "weight", 4: "bias"}))
register_rule(F.group_norm, FunctionalNormRule({2: "weight", 3: "bias"}, groups_arg=1))

_bn = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}
register_rule(nn.BatchNorm1d, ChannelwiseRule(1, _bn, "num_features"))
register_rule(nn.BatchNorm2d, ChannelwiseRule(1, _bn, "num_features"))
register_rule(nn.BatchNorm3d, ChannelwiseRule(1, _bn, "num_features"))
register_rule(nn.SyncBatchNorm, ChannelwiseRule(1, _bn, "num_features"))
for _cls, _k in [(nn.InstanceNorm1d, 1), (nn.InstanceNorm2d, 2), (nn.InstanceNorm3d, 3)]:
    register_rule(_cls, ChannelwiseRule(-_k - 1, _bn, "num_features"))
register_rule(nn.GroupNorm, GroupNormRule())
register_rule(nn.LayerNorm, LayerNormRule())
register_rule(F.layer_norm, LayerNormRule())
register_rule(nn.PReLU, ChannelwiseRule(1, {"weight": 0}, "num_parameters"))

_pools = {
    1: [nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d, nn.ReflectionPad1d,
        nn.ReplicationPad1d, nn.ZeroPad1d, nn.ConstantPad1d, nn.CircularPad1d],
    2: [nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.ReflectionPad2d,
        nn.ReplicationPad2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.CircularPad2d, nn.UpsamplingNearest2d,
        nn.UpsamplingBilinear2d, nn.FractionalMaxPool2d],
    3: [nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.ReflectionPad3d,
        nn.ReplicationPad3d, nn.ConstantPad3d, nn.CircularPad3d, nn.FractionalMaxPool3d],
}
_pool_fns = {
    1: [F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d],
    2: [F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d],
    3: [F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d],
}
for _k, _classes in _pools.items():
    for _cls in _classes:
        register_rule(_cls, ChannelwiseRule(-_k - 1))
    for _fn in _pool_fns[_k]:
        register_rule(_fn, ChannelwiseRule(-_k - 1))


class _ResampleRule(ChannelwiseRule):
    """Upsample / interpolate: channels stay at dim 1 whatever the spatial rank."""

    def __init__(self) -> None:
        super().__init__(1)


register_rule(nn.Upsample, _ResampleRule())
register_rule(F.interpolate, _ResampleRule())
