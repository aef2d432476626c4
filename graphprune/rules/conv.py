"""Convolutions, transposed convolutions and Linear: where channels are born.

Each output channel (feature) gets a fresh label; the weight's input slices
join the channels of the input.  Grouped convs keep their group count: the
k-th channel of every group is one unit, so each group loses the same
channels.  Depthwise convs (one input channel per group) pass their input's
channels through, a channel multiplier making each input channel own its
outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.rules.base import OpCall, Rule, register_rule

__all__ = ["ConvRule", "ConvTransposeRule", "LinearRule"]


def _place(per_channel: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = -1
    return per_channel.reshape(view).expand(shape)


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
        return _place(out_labels, cdim, call.out.shape)

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
        return _place(out_labels, cdim, call.out.shape)

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
        return _place(out_labels, call.out.ndim - 1, call.out.shape)

    def update_module(self, module: nn.Module) -> None:
        module.out_features, module.in_features = module.weight.shape


for _cls, _k in [(nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)]:
    register_rule(_cls, ConvRule(_k))
for _cls, _k in [(nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3)]:
    register_rule(_cls, ConvTransposeRule(_k))
register_rule(nn.Linear, LinearRule())
