"""Cost of a model: parameter count and multiply-accumulates on given inputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from graphprune.ir.inputs import call_with, eval_mode

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module) -> int:
    """Parameters as the model computes with them (a tied weight counts once; a module holding
    a compressed weight, see `graphprune.backends.sparse`, counts its stored values)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total + sum(m.graphprune_params() for m in model.modules() if hasattr(m, "graphprune_params"))


def count_macs(model: nn.Module, example_inputs: tuple | dict) -> int:
    """MACs of one forward pass (convolutions, matmuls, attention), counted by torch's FlopCounterMode;
    a module with a compressed weight (which FlopCounterMode does not count) reports its own."""
    sparse = [0]

    def add(module, args, output) -> None:
        sparse[0] += module.graphprune_macs(args[0])

    handles = [m.register_forward_hook(add) for m in model.modules() if hasattr(m, "graphprune_macs")]
    # nn.MultiheadAttention's inference fast path runs one fused op that FlopCounterMode does not
    # count; with grad enabled it takes the path of plain ops, which it does
    fused = any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in model.modules())
    try:
        with eval_mode(model), torch.set_grad_enabled(fused), FlopCounterMode(display=False) as counter:
            call_with(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return counter.get_total_flops() // 2 + sparse[0]
