"""Shared test helpers: prune a model and prove shrink(mask(m)) == mask(m)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import graphprune as gp
from graphprune.ir.inputs import call_with, eval_mode
from graphprune.passes import ChannelMask, L2Score, Shrink


def run(model: nn.Module, inputs):
    with eval_mode(model), torch.no_grad():
        return call_with(model, inputs)


def to_double(inputs):
    if isinstance(inputs, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    return tuple(v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in inputs)


def assert_exact(reference: nn.Module, candidate: nn.Module, inputs) -> None:
    """Equal outputs in float64 (so that the check is about structure, not float rounding)."""
    a = run(copy.deepcopy(reference).double(), to_double(inputs))
    b = run(copy.deepcopy(candidate).double(), to_double(inputs))
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def prune(model: nn.Module, inputs, ratio: float = 0.5, score=None, **mask_kwargs):
    """Mask then shrink in two compile() calls; return (masked, shrunk)."""
    masked = gp.compile(model, [score or L2Score(), ChannelMask(ratio, **mask_kwargs)], example_inputs=inputs)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=inputs)
    return masked, shrunk


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
