"""Convolutions, transposed convolutions and linear layers (modules, functional and ATen): where
channels are born.

Each output channel (feature) gets a fresh label; the weight's input slices
join the channels of the input.  Grouped convs keep their group count: the
k-th channel of every group is one unit, so each group loses the same
channels.  Depthwise convs (one input channel per group) pass their input's
channels through, a channel multiplier making each input channel own its
outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.ir.weight_ops import node_arg
from graphprune.rules.base import OpCall, ParamRef, Rule, aten, place

__all__ = [
    "ConvRule",
    "ConvTransposeRule",
    "LinearRule",
    "FunctionalConvRule",
    "FunctionalLinearRule",
    "AddmmRule",
    "RULES",
]


def _coupled_across_groups(call: OpCall, per_in: torch.Tensor, groups: int) -> torch.Tensor:
    """Unify the k-th input channel of every group; return the labels of group 0."""
    view = per_in.reshape(groups, -1)
    if groups > 1:
        call.space.unify(view[:1], view, call.site("conflict", "grouped conv: every group must lose the same channels"))
    return view[0]


def _bias(call: OpCall, module: nn.Module, labels: torch.Tensor) -> None:
    if getattr(module, "bias", None) is not None:
        call.space.add_slot(call.param("bias"), 0, labels)


class ConvRule(Rule):
    def __init__(self, spatial: int) -> None:
        self.spatial = spatial

    def _input(self, call: OpCall) -> tuple[int, torch.Tensor]:
        """(channel dim, one label per input channel) of a batched or unbatched input."""
        x = call.input(0)
        cdim = x.ndim - self.spatial - 1
        return cdim, call.along(x, cdim)

    def propagate(self, call: OpCall):
        m = call.module
        cdim, per_in = self._input(call)
        g, cin, cout = m.groups, m.in_channels, m.out_channels
        if g == cin and g > 1:  # depthwise, maybe with a channel multiplier
            out_labels = per_in.repeat_interleave(cout // cin)
        else:
            call.space.add_slot(call.param("weight"), 1, _coupled_across_groups(call, per_in, g), consumer=True)
            out_labels = call.space.fresh(cout // g).repeat(g)
        call.space.add_slot(call.param("weight"), 0, out_labels)
        _bias(call, m, out_labels)
        return place(out_labels, cdim, call.out.shape)

    def update_module(self, module: nn.Module) -> None:
        w = module.weight
        if module.groups == module.in_channels and module.groups > 1:
            mult = module.out_channels // module.in_channels
            module.out_channels = w.shape[0]
            module.in_channels = module.groups = w.shape[0] // mult
        else:
            module.out_channels = w.shape[0]
            module.in_channels = w.shape[1] * module.groups


class ConvTransposeRule(ConvRule):
    """Transposed conv: the weight is (in, out / groups, ...)."""

    def propagate(self, call: OpCall):
        m = call.module
        cdim, per_in = self._input(call)
        g, cin, cout = m.groups, m.in_channels, m.out_channels
        dw = g == cin and g > 1
        call.space.add_slot(call.param("weight"), 0, per_in, consumer=not dw)
        if dw:
            out_labels = per_in.repeat_interleave(cout // cin)
        else:
            _coupled_across_groups(call, per_in, g)
            fresh = call.space.fresh(cout // g)
            call.space.add_slot(call.param("weight"), 1, fresh)
            out_labels = fresh.repeat(g)
        _bias(call, m, out_labels)
        return place(out_labels, cdim, call.out.shape)

    def update_module(self, module: nn.Module) -> None:
        w = module.weight
        if module.groups == module.in_channels and module.groups > 1:
            mult = module.out_channels // module.in_channels
            module.in_channels = module.groups = w.shape[0]
            module.out_channels = w.shape[0] * mult
        else:
            module.in_channels = w.shape[0]
            module.out_channels = w.shape[1] * module.groups


class LinearRule(Rule):
    def propagate(self, call: OpCall):
        m = call.module
        x = call.input(0)
        call.space.add_slot(call.param("weight"), 1, call.along(x, -1), consumer=True)
        out_labels = call.space.fresh(m.out_features)
        call.space.add_slot(call.param("weight"), 0, out_labels)
        _bias(call, m, out_labels)
        return place(out_labels, call.out.ndim - 1, call.out.shape)

    def update_module(self, module: nn.Module) -> None:
        module.out_features, module.in_features = module.weight.shape


class FunctionalConvRule(Rule):
    """conv(x, weight, bias, stride, padding, dilation, groups) on parameters of the model: F.conv*d,
    and the ATen convolutions of exported graphs.  A depthwise conv's group count is the number of
    its channels, so Shrink rewrites it (`count_args`)."""

    def __init__(self, spatial: int | None, groups_pos: int = 6, transposed_pos: int | None = None) -> None:
        self.spatial, self.groups_pos, self.transposed_pos = spatial, groups_pos, transposed_pos

    def propagate(self, call: OpCall):
        weight = call.labels[1] if len(call.labels) > 1 else call.label_kwargs.get("weight")
        bias = call.labels[2] if len(call.labels) > 2 else call.label_kwargs.get("bias")
        bias_value = call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")
        groups = node_arg(call.node, self.groups_pos, "groups", 1)
        transposed = self.transposed_pos is not None and node_arg(call.node, self.transposed_pos, "transposed", False)
        if (
            not isinstance(weight, ParamRef)
            or (bias_value is not None and not isinstance(bias, ParamRef))
            or not isinstance(groups, int)
            or transposed
        ):
            call.freeze_inputs(
                "no_rule", "convolution whose weight is not a parameter, with a computed group count, or transposed"
            )
            return call.out_none()
        x = call.input(0)
        spatial = self.spatial if self.spatial is not None else call.args[1].ndim - 2
        cdim = x.ndim - spatial - 1
        per_in = call.along(x, cdim)
        cout, cin = call.args[1].shape[0], per_in.numel()
        if groups == cin and groups > 1:  # depthwise, maybe with a channel multiplier: groups counts channels
            out_labels = per_in.repeat_interleave(cout // cin)
            call.extra["count_args"] = [(self.groups_pos, "groups", per_in)]
        else:
            call.slot_param(weight, 1, _coupled_across_groups(call, per_in, groups), consumer=True)
            out_labels = call.space.fresh(cout // groups).repeat(groups)
        call.slot_param(weight, 0, out_labels)
        if isinstance(bias, ParamRef):
            call.slot_param(bias, 0, out_labels)
        return place(out_labels, cdim, call.out.shape)


class FunctionalLinearRule(Rule):
    """linear(x, weight, bias) with the weight and bias read as parameters."""

    def propagate(self, call: OpCall):
        x = call.input(0)
        weight = call.labels[1] if len(call.labels) > 1 else None
        bias = call.labels[2] if len(call.labels) > 2 else call.label_kwargs.get("bias")
        if not isinstance(weight, ParamRef) or (
            call.args[2:3] and call.args[2] is not None and not isinstance(bias, ParamRef)
        ):
            call.freeze_inputs("no_rule", "linear whose weight is not a parameter of the model")
            return call.out_none()
        call.slot_param(weight, 1, call.along(x, -1), consumer=True)
        out_labels = call.space.fresh(call.args[1].shape[0])
        call.slot_param(weight, 0, out_labels)
        if isinstance(bias, ParamRef):
            call.slot_param(bias, 0, out_labels)
        return place(out_labels, call.out.ndim - 1, call.out.shape)


class AddmmRule(Rule):
    """addmm(bias, x, weight) with weight (in, out): Hugging Face's GPT-2 `Conv1D`."""

    def propagate(self, call: OpCall):
        bias, x, weight = call.labels[0], call.input(1), call.labels[2]
        if (
            not (isinstance(weight, ParamRef) and isinstance(bias, ParamRef))
            or call.kwargs.get("beta", 1) != 1
            or call.kwargs.get("alpha", 1) != 1
        ):
            call.freeze_inputs("no_rule", "addmm whose weight and bias are not parameters of the model")
            return call.out_none()
        call.slot_param(weight, 0, call.along(x, -1), consumer=True)
        out_labels = call.space.fresh(call.args[2].shape[1])
        call.slot_param(weight, 1, out_labels)
        call.slot_param(bias, 0, out_labels)
        return place(out_labels, call.out.ndim - 1, call.out.shape)


RULES = [
    ((nn.Conv1d,), ConvRule(1)),
    ((nn.Conv2d,), ConvRule(2)),
    ((nn.Conv3d,), ConvRule(3)),
    ((nn.ConvTranspose1d,), ConvTransposeRule(1)),
    ((nn.ConvTranspose2d,), ConvTransposeRule(2)),
    ((nn.ConvTranspose3d,), ConvTransposeRule(3)),
    ((F.conv1d, aten.conv1d.default), FunctionalConvRule(1)),
    ((F.conv2d, aten.conv2d.default), FunctionalConvRule(2)),
    ((F.conv3d, aten.conv3d.default), FunctionalConvRule(3)),
    ((aten.convolution.default,), FunctionalConvRule(None, groups_pos=8, transposed_pos=6)),
    ((nn.Linear,), LinearRule()),
    ((aten.linear.default,), FunctionalLinearRule()),
    ((aten.addmm.default,), AddmmRule()),  # Hugging Face's Conv1D (GPT-2)
]
