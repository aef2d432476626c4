"""Cost of a model: parameter count and multiply-accumulates on given inputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
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


def _recurrent_macs(module: nn.RNNBase, x) -> int:
    """MACs of an nn.LSTM/GRU/RNN call: every step of every sample multiplies its input and its state
    by each layer's and direction's matrices (4H x (in + H) for an LSTM, 3H for a GRU, H for an RNN;
    with a projection, its P x H too).  Gate nonlinearities and elementwise products are not MACs."""
    data = x.data if isinstance(x, PackedSequence) else x
    steps = data.numel() // data.shape[-1]  # time steps times samples (a packed sequence: its rows)
    return steps * sum(getattr(module, n).numel() for n in module._flat_weights_names if n.startswith("weight"))


def count_macs(model: nn.Module, example_inputs: tuple | dict) -> int:
    """MACs of one forward pass (convolutions, matmuls, attention), counted by torch's FlopCounterMode;
    a module with a compressed weight (which FlopCounterMode does not count) reports its own, and
    recurrent layers are counted from their weights (their fused kernels, aten.lstm on a CPU and
    cuDNN's on a GPU, are not seen by FlopCounterMode, and torch's own decomposition of a GRU is)."""
    extra = [0]
    counter: list[FlopCounterMode] = []
    seen_at: dict[int, int] = {}

    def add(module, args, output) -> None:
        extra[0] += module.graphprune_macs(args[0])

    def before_rnn(module, args) -> None:
        seen_at[id(module)] = counter[0].get_total_flops()

    def after_rnn(module, args, output) -> None:  # what FlopCounterMode saw inside is replaced by the count
        extra[0] += _recurrent_macs(module, args[0]) - (counter[0].get_total_flops() - seen_at.pop(id(module))) // 2

    handles = [m.register_forward_hook(add) for m in model.modules() if hasattr(m, "graphprune_macs")]
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            handles += [m.register_forward_pre_hook(before_rnn), m.register_forward_hook(after_rnn)]
    # nn.MultiheadAttention's inference fast path runs one fused op that FlopCounterMode does not
    # count; with grad enabled it takes the path of plain ops, which it does
    fused = any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in model.modules())
    try:
        with eval_mode(model), torch.set_grad_enabled(fused), FlopCounterMode(display=False) as flops:
            counter.append(flops)
            call_with(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return flops.get_total_flops() // 2 + extra[0]
