"""nn.LSTM, nn.GRU and nn.RNN prune whole hidden units: masked and shrunk agree, the masked forward
really sees its masks (and still trains), the shrunk module is the user's class with a smaller
hidden_size, and what the rule cannot handle (projections, an initial state given as an input) is
frozen and named."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests.helpers import assert_exact, assert_same_state, prune, run, state

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


@pytest.fixture(autouse=True)
def _native_lstm(monkeypatch):
    """oneDNN's float32 LSTM costs ~40 ms a call on a small CPU (the exactness checks run in float64,
    on torch's own kernels, either way)."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


class Classifier(nn.Module):
    """Linear embed -> recurrent layer -> (last step or mean of the output) + last hidden state -> heads."""

    def __init__(self, cls, layers=1, bidirectional=False, batch_first=True, hidden=8, **kwargs):
        super().__init__()
        self.batch_first, self.lstm = batch_first, cls is nn.LSTM
        self.embed = nn.Linear(5, 6)
        self.rnn = cls(6, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **kwargs)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 3)
        self.head_h = nn.Linear(hidden, 3)

    def forward(self, x):
        out, state = self.rnn(self.embed(x))
        h = state[0] if self.lstm else state  # (h_n, c_n) or h_n
        last = out[:, -1] if self.batch_first else out.mean(0)
        return self.head(last) + self.head_h(h[-1])


def inputs(batch_first: bool) -> tuple[torch.Tensor]:
    torch.manual_seed(0)
    return (torch.randn(2, 4, 5) if batch_first else torch.randn(4, 2, 5),)


def masked_units(masked: nn.Module) -> torch.Tensor:
    """Hidden units whose rows of weight_hh_l0 are masked (the first gate block's keep vector)."""
    keep = masked.rnn.parametrizations.weight_hh_l0[0].keep_0
    return torch.nonzero(~keep[: masked.rnn.hidden_size]).reshape(-1)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize(
    "layers,bidirectional,batch_first", [(1, False, True), (1, True, False), (2, False, False), (2, True, True)]
)
def test_mask_equals_shrink(cls, layers, bidirectional, batch_first):
    torch.manual_seed(0)
    model = Classifier(cls, layers, bidirectional, batch_first)
    x = inputs(batch_first)
    before = state(model)
    masked, shrunk = prune(model, x, ratio=0.5)
    assert_same_state(before, model)  # the user's model is left alone

    # the masked forward sees the masks: masked units output exactly zero, in every direction
    gone = masked_units(masked)
    assert gone.numel() == 4
    out = run(masked.rnn, (run(masked.embed, x),))[0]
    directions = 2 if bidirectional else 1
    assert torch.all(out.unflatten(-1, (directions, 8))[..., gone] == 0)
    dense = run(model.rnn, (run(model.embed, x),))[0]
    assert not torch.allclose(out, dense)

    assert type(shrunk) is Classifier and type(shrunk.rnn) is cls  # the user's classes, plain modules again
    assert shrunk.rnn.hidden_size == 4 and shrunk.rnn.input_size == shrunk.embed.out_features
    for name, w in shrunk.rnn.named_parameters():
        assert w.shape[0] == GATES[cls] * 4, name
        if name.startswith("weight_hh"):
            assert w.shape[1] == 4
        if name.startswith("weight_ih_l1"):
            assert w.shape[1] == 4 * directions
    assert shrunk.head.in_features == 4 * directions and shrunk.head_h.in_features == 4
    assert_exact(masked, shrunk, x)
    shrunk.rnn.flatten_parameters()
    rnn = shrunk.rnn
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names, strict=True))
    assert run(shrunk, x).shape == (2, 3)


class Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Linear(5, 6), nn.GRU(6, 8, bias=False), nn.Linear(8, 3)

    def forward(self, x):  # (time, features)
        return self.head(self.rnn(self.embed(x))[0].sum(0))


def test_unbatched_without_bias():
    torch.manual_seed(0)
    x = (torch.randn(4, 5),)
    masked, shrunk = prune(Unbatched(), x)
    assert shrunk.rnn.hidden_size == 4 and shrunk.rnn.weight_ih_l0.shape == (12, 3)
    assert_exact(masked, shrunk, x)


class InitialState(nn.Module):
    """An LSTM whose initial state comes from the input through layers, is learned, or is given."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source
        self.embed, self.rnn, self.head = (
            nn.Linear(5, 6),
            nn.LSTM(6, 8, num_layers=2, batch_first=True),
            nn.Linear(8, 3),
        )
        self.to_h, self.to_c = nn.Linear(5, 16), nn.Linear(5, 16)
        self.h0, self.c0 = nn.Parameter(torch.randn(2, 1, 8)), nn.Parameter(torch.randn(2, 1, 8))

    def forward(self, x, h0):
        if self.source == "layers":  # (batch, layers * hidden) -> (layers, batch, hidden)
            h0 = self.to_h(x[:, 0]).unflatten(-1, (2, -1)).transpose(0, 1).contiguous()
            c0 = self.to_c(x[:, 0]).unflatten(-1, (2, -1)).transpose(0, 1).contiguous()
        elif self.source == "learned":
            h0, c0 = self.h0.expand(-1, x.shape[0], -1), self.c0.expand(-1, x.shape[0], -1)
        else:
            c0 = torch.zeros_like(h0)
        out, _ = self.rnn(self.embed(x), (h0, c0))
        return self.head(out[:, -1])


@pytest.mark.parametrize("source,hidden", [("layers", 4), ("learned", 4), ("input", 8)])
def test_initial_state(source, hidden):
    """A nonzero initial state of a masked unit would leak into its output, so the state is pruned
    with the units; a state the caller passes in cannot be, so the units are frozen."""
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 5), torch.randn(2, 2, 8))
    masked, shrunk = prune(InitialState(source), x)
    assert shrunk.rnn.hidden_size == hidden
    assert_exact(masked, shrunk, x)
    if source == "learned":
        assert shrunk.h0.shape == (2, 1, 4)
    if source == "input":
        assert any("initial state" in f.site.reason for f in gp.summary(InitialState(source), shrunk, x).frozen)


def test_projection_is_frozen_and_named():
    torch.manual_seed(0)
    model = Classifier(nn.LSTM, proj_size=3)
    model.head, model.head_h = nn.Linear(3, 3), nn.Linear(3, 3)
    x = inputs(True)
    with pytest.warns(gp.GraphPruneWarning):  # nothing left to prune but the heads' outputs
        pruned = gp.compile(model, [L2Score(), ChannelMask(ratio=0.5), Shrink()], example_inputs=x)
    assert (pruned.rnn.hidden_size, pruned.rnn.proj_size, pruned.embed.out_features) == (8, 3, 6)
    frozen = gp.summary(model, pruned, x).frozen
    assert any("proj_size" in f.site.reason and "rnn" in f.site.location for f in frozen)
    torch.testing.assert_close(run(pruned, x), run(model, x))


def test_masked_model_trains_and_copies():
    """Gradients reach the stored weights (none to masked rows), and a masked RNN that just ran with
    autograd can still be copied (its weight list holds no computed tensors)."""
    torch.manual_seed(0)
    x = inputs(True)
    masked = gp.compile(Classifier(nn.LSTM, 2), [L2Score(), ChannelMask(ratio=0.5)], example_inputs=x)
    masked.train()
    masked(*x).square().sum().backward()
    for name in ("weight_hh_l0", "weight_ih_l1"):
        plist = masked.rnn.parametrizations[name]
        grad, keep = plist.original.grad, plist[0].keep_0
        assert grad[keep].abs().sum() > 0 and torch.all(grad[~keep] == 0), name
    clone = copy.deepcopy(masked.double())
    torch.testing.assert_close(run(clone, (x[0].double(),)), run(masked, (x[0].double(),)))
    shrunk = gp.compile(clone, [Shrink()], example_inputs=(x[0].double(),))
    assert shrunk.rnn.hidden_size == 4


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_macs_count_every_step_of_every_layer(cls):
    """G gate blocks of H rows: per step and sample G*H*(in + H) for each layer and direction, the
    second layer's input being both directions (FlopCounterMode alone sees no LSTM on a CPU)."""
    model = Classifier(cls, layers=2, bidirectional=True)
    x = inputs(True)
    g, steps = GATES[cls], 2 * 4
    rnn = steps * 2 * g * 8 * ((6 + 8) + (16 + 8))
    linear = steps * 5 * 6 + 2 * 16 * 3 + 2 * 8 * 3
    assert gp.count_macs(model, x) == rnn + linear
    pruned = gp.compile(model, [L2Score(), ChannelMask(ratio=0.5), Shrink()], example_inputs=x)
    assert gp.count_macs(pruned, x) == steps * 2 * g * 4 * ((3 + 4) + (8 + 4)) + steps * 5 * 3 + 2 * 8 * 3 + 2 * 4 * 3
