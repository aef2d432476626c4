"""Recurrent layers: nn.LSTM, nn.GRU and nn.RNN prune whole hidden units.

nn.LSTM/GRU/RNN have one `hidden_size` for every layer and direction, so hidden unit k is one
label shared by all of them: removing it removes, in every layer and direction, its row in each
gate block of `weight_ih`, `weight_hh`, `bias_ih` and `bias_hh` (gate blocks of H rows: LSTM
[i, f, g, o], GRU [r, z, n], RNN one), its column of `weight_hh`, and its column in each direction
block of the next layer's `weight_ih`.  The module stays the user's class with a smaller
`hidden_size`.  The first layer's `weight_ih` columns are the input's features (last dim).

Masked, unit k is exact: its gate pre-activations are zero, so an LSTM's cell decays from its
initial value (c = f c + i g with f = 1/2, g = 0) and its output is o tanh(c); a GRU's h' = h / 2;
an RNN's h' = tanh(0) or relu(0) = 0.  With a zero initial state the unit's h (and c) stay zero,
as when it is removed; so an initial state given by the caller is unified with the hidden units
(a model input, which cannot shrink, freezes them).  Projections (LSTM `proj_size`) and packed
sequences are frozen, with the reason.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from graphprune.ir.labels import varies_along
from graphprune.ir.masking import sync_recurrent
from graphprune.rules.base import OpCall, Rule, param_view, place

__all__ = ["RecurrentRule", "RULES"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _arg(call: OpCall, pos: int, name: str) -> tuple:
    """(value, labels) of an argument given by position or keyword."""
    if len(call.args) > pos:
        return call.args[pos], call.labels[pos]
    return call.kwargs.get(name), call.label_kwargs.get(name)


class RecurrentRule(Rule):
    def propagate(self, call: OpCall):
        m: nn.RNNBase = call.module
        x, hx = call.args[0] if call.args else call.kwargs.get("input"), _arg(call, 1, "hx")
        reason = None
        if isinstance(x, PackedSequence):
            reason = "a PackedSequence input"
        elif m.proj_size > 0:
            reason = "proj_size > 0 (the hidden state is projected)"
        if reason is not None:
            call.freeze_inputs("no_rule", f"{type(m).__name__} with {reason}")
            return call.out_none()
        labels = call.input(0) if call.args else call.label_kwargs["input"]
        if any(varies_along(labels, d) for d in range(labels.ndim - 1)):  # time steps or samples as channels
            call.freeze_inputs("no_rule", f"{type(m).__name__} input whose time or batch dim carries channels")
            return call.out_none()
        per_in = call.along(labels, -1)
        directions = 2 if m.bidirectional else 1
        hidden = call.space.fresh(m.hidden_size)
        rows = hidden.repeat(_GATES[m.mode])
        for layer in range(m.num_layers):
            for d in range(directions):
                sfx = f"_l{layer}{'_reverse' if d else ''}"
                cols = per_in if layer == 0 else hidden.repeat(directions)
                call.space.add_slot(call.param(f"weight_ih{sfx}"), 1, cols, consumer=True)
                call.space.add_slot(call.param(f"weight_ih{sfx}"), 0, rows)
                call.space.add_slot(call.param(f"weight_hh{sfx}"), 1, hidden, consumer=True)
                call.space.add_slot(call.param(f"weight_hh{sfx}"), 0, rows)
                if m.bias:
                    call.space.add_slot(call.param(f"bias_ih{sfx}"), 0, rows)
                    call.space.add_slot(call.param(f"bias_hh{sfx}"), 0, rows)
        states = hx[0] if isinstance(hx[0], (tuple, list)) else (hx[0],)
        state_labels = hx[1] if isinstance(hx[0], (tuple, list)) else (hx[1],)
        for value, lab in zip(states, state_labels):
            if isinstance(value, torch.Tensor):
                self._initial_state(call, value, lab, hidden)
        output, state = call.out
        state_out = tuple(place(hidden, s.ndim - 1, s.shape) for s in state) if isinstance(state, tuple) else None
        return (
            place(hidden.repeat(directions), output.ndim - 1, output.shape),
            state_out if state_out is not None else place(hidden, state.ndim - 1, state.shape),
        )

    @staticmethod
    def _initial_state(call: OpCall, value: torch.Tensor, lab, hidden: torch.Tensor) -> None:
        """h0 (or c0) [..., k] must be zero wherever unit k is masked: its labels are the hidden units'."""
        view = param_view(lab)
        if view is not None:  # a learned initial state: its hidden dim is sliced with the units
            if view.dims[-1] is None:  # broadcast along the hidden units: masked, it would not be zero
                call.space.freeze(hidden, call.site("no_rule", "an initial state shared by every hidden unit"))
            else:
                call.slot_param(view.ref, view.dims[-1], hidden)
            return
        if not isinstance(lab, torch.Tensor):  # a constant: cannot be sliced
            call.space.freeze(hidden, call.site("no_rule", "an initial state that cannot be sliced"))
            return
        call.space.unify(lab, place(hidden, value.ndim - 1, value.shape), call.site("recurrent", "initial state"))

    def update_module(self, module: nn.Module) -> None:
        module.hidden_size = module.weight_hh_l0.shape[1]
        module.input_size = module.weight_ih_l0.shape[1]
        sync_recurrent(module)  # on a GPU, cuDNN's flat weight layout again


RULES = [
    ((nn.LSTM, nn.GRU, nn.RNN), RecurrentRule()),
]
