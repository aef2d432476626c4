"""search_ratios: NetAdapt's greedy allocation of per-group ratios to a MACs / params target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L1Score, Shrink


class _TwoHeads(nn.Module):
    """A stem and two equal branches; the metric below reads only the first branch's head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a, self.conv_b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.head_a, self.head_b = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head_a(torch.relu(self.conv_a(x))), self.head_b(torch.relu(self.conv_b(x)))


def _setup():
    torch.manual_seed(0)
    model, x = _TwoHeads().eval(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        reference = model(x)[0]

    def evaluate(m):  # higher is better: how close the first head stays to the dense one
        with torch.no_grad():
            return -float((m(x)[0] - reference).pow(2).mean())

    return model, x, evaluate


def test_greedy_search_meets_the_target_and_spends_it_where_the_metric_does_not_care():
    model, x, evaluate = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = gp.search_ratios(model, evaluate, target={"macs": 0.5}, example_inputs=(x,), step=0.125)
    assert abs(found.reached - 0.5) <= 0.02
    # conv_b's units never reach the metric: they all go (but one) before anything that matters
    steps = [g for g, *_ in found.history]
    assert steps[: steps.index("conv_b") + 1] == ["conv_b"] and steps[:8] == ["conv_b"] * 8
    assert found["conv_b"] == 15 / 16 and found["conv_b"] > found["conv_a"]
    pruned = gp.compile(model, [L1Score(), ChannelMask(found), Shrink()], example_inputs=(x,))
    dense_macs = gp.count_macs(model, (x,))
    assert gp.count_macs(pruned, (x,)) / dense_macs == pytest.approx(found.reached, abs=1e-9)
    assert evaluate(pruned) == pytest.approx(found.metric, abs=1e-6)  # the same units as the search
    assert evaluate(found.model) == pytest.approx(found.metric, abs=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "| 1 | conv_b |" in found.table()


def test_a_params_count_target_and_a_finetune_hook():
    model, x, evaluate = _setup()
    dense = gp.count_params(model)
    tuned = []
    found = gp.search_ratios(
        model,
        evaluate,
        target={"params": dense * 0.7},
        example_inputs=(x,),
        step=0.25,
        groups=["conv_a", "conv_b"],
        finetune=tuned.append,
    )
    assert abs(found.reached - 0.7) <= 0.02 and set(found) == {"conv_a", "conv_b"}
    assert any(m is found.model for m in tuned)  # the search ends on a proposal it fine-tuned
    pruned = gp.compile(model, [L1Score(), ChannelMask(dict(found)), Shrink()], example_inputs=(x,))
    assert gp.count_params(pruned) / dense == pytest.approx(found.reached, abs=1e-9)


def test_search_ratios_names_bad_arguments():
    model, x, evaluate = _setup()
    kw = dict(example_inputs=(x,))
    with pytest.raises(gp.ArgumentError, match="target"):
        gp.search_ratios(model, evaluate, target={"flops": 0.5}, **kw)
    with pytest.raises(gp.ArgumentError, match="target"):
        gp.search_ratios(model, evaluate, target={"macs": -1}, **kw)
    with pytest.raises(gp.ArgumentError, match="step"):
        gp.search_ratios(model, evaluate, target={"macs": 0.5}, step=0, **kw)
    with pytest.raises(gp.ArgumentError, match="evaluate"):
        gp.search_ratios(model, None, target={"macs": 0.5}, **kw)
    with pytest.raises(gp.ArgumentError, match="finetune"):
        gp.search_ratios(model, evaluate, target={"macs": 0.5}, finetune=3, **kw)
    with pytest.raises(gp.ArgumentError, match="no such groups"):
        gp.search_ratios(model, evaluate, target={"macs": 0.5}, groups=["nope"], **kw)
    with pytest.raises(gp.ArgumentError, match="evaluate returned str"):
        gp.search_ratios(model, lambda m: "good", target={"macs": 0.5}, **kw)


def test_an_unreachable_target_warns_and_stops_at_the_floor():
    model, x, evaluate = _setup()
    with pytest.warns(gp.GraphPruneWarning, match="out of reach"):
        found = gp.search_ratios(
            model, evaluate, target={"macs": 0.01}, example_inputs=(x,), step=0.5, groups=["conv_b"]
        )
    assert found == {"conv_b": 15 / 16} and found.reached > 0.5


def test_bayesian_search_meets_the_target_and_beats_the_uniform_ratio_it_starts_from():
    pytest.importorskip("optuna")
    model, x, evaluate = _setup()
    found = gp.search_ratios(model, evaluate, target={"macs": 0.5}, example_inputs=(x,), method="bayes", trials=12)
    assert found.reached <= 0.5 and abs(found.reached - 0.5) <= 0.02
    assert len(found.history) == 12 and found.history[0][0] == "trial 0"
    uniform = found.history[0][3]  # the first trial is every group at one ratio
    assert found.metric == max(h[3] for h in found.history) and found.metric > uniform
    assert found["conv_b"] > found["conv_a"]  # the budget went where the metric does not look
    pruned = gp.compile(model, [L1Score(), ChannelMask(found), Shrink()], example_inputs=(x,))
    assert gp.count_macs(pruned, (x,)) / gp.count_macs(model, (x,)) == pytest.approx(found.reached, abs=1e-9)
    assert evaluate(pruned) == pytest.approx(found.metric, abs=1e-6)


def test_bayesian_search_names_its_bad_arguments():
    model, x, evaluate = _setup()
    with pytest.raises(gp.ArgumentError, match="method"):
        gp.search_ratios(model, evaluate, target={"macs": 0.5}, example_inputs=(x,), method="annealing")
    with pytest.raises(gp.ArgumentError, match="trials"):
        gp.search_ratios(model, evaluate, target={"macs": 0.5}, example_inputs=(x,), method="bayes", trials=0)
    with pytest.raises(gp.ArgumentError, match="method='greedy'"):
        gp.search_ratios(
            model, evaluate, target={"macs": 0.5}, example_inputs=(x,), method="bayes", finetune=lambda m: None
        )


def test_a_latency_target_is_searched_on_the_lookup_table():
    """NetAdapt's own cost: the latency table's estimate (a counting meter here, not timed)."""
    from graphprune.analysis import latency

    class ConvElements(latency.Meter):  # an op costs the products its convolution computes
        def measure_op(self, func, args, kwargs):
            if func is not torch.ops.aten.convolution.default:
                return 0.0
            x, w = args[0], args[1]
            return float(x.shape[2] * x.shape[3] * w.shape[0] * w.shape[1])

        def models(self, a, b, example_inputs):  # pragma: no cover - search_ratios uses the table only
            raise AssertionError("no end-to-end timing in search_ratios")

    model, x, evaluate = _setup()
    meter = ConvElements()
    found = gp.search_ratios(
        model, evaluate, target={"latency": 0.5, "backend": meter}, example_inputs=(x,), step=0.125
    )
    assert found.kind == "latency" and abs(found.reached - 0.5) <= 0.02
    assert found["conv_b"] > found["conv_a"] and meter.table  # the table was filled and read
    pruned = gp.compile(model, [L1Score(), ChannelMask(found), Shrink()], example_inputs=(x,))
    table = [latency.estimate(meter, latency.record_ops(m, (x,), on_meta=False)) for m in (model, pruned)]
    assert table[1] / table[0] == pytest.approx(found.reached, abs=1e-9)
