"""Cost of a model: parameter count and multiply-accumulates on given inputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from graphprune.inputs import call_with, eval_mode

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module) -> int:
    """Parameters as the model computes with them (a tied weight counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_macs(model: nn.Module, example_inputs: tuple | dict) -> int:
    """MACs of one forward pass (convolutions, matmuls, attention), counted by torch's FlopCounterMode."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_with(model, example_inputs)
    return counter.get_total_flops() // 2
