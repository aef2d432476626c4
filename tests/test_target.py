"""Pruning to a target cost: ChannelMask(target={"macs": r} | {"params": n}) finds the ratio whose
shrunk model meets it, measured afterwards on the real model."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.analysis.cost import count_macs, count_params
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests.helpers import assert_exact

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")


def _bert():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    return transformers.BertModel(config).eval(), (torch.randint(0, 100, (1, 16)),)


def _vision(name):
    return lambda: (getattr(torchvision.models, name)().eval(), (torch.randn(1, 3, 64, 64),))


MODELS = {
    "resnet18": _vision("resnet18"),
    "mobilenet_v3_small": _vision("mobilenet_v3_small"),
    "squeezenet1_0": _vision("squeezenet1_0"),
    "shufflenet_v2_x0_5": _vision("shufflenet_v2_x0_5"),
    "regnet_x_400mf": _vision("regnet_x_400mf"),
    "bert": _bert,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_macs_target_is_met_within_two_hundredths(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    masked = gp.compile(model, [L2Score(), ChannelMask(target={"macs": 0.5}, scope="global")], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    reached = count_macs(shrunk, x) / count_macs(model, x)
    assert abs(reached - 0.5) <= 0.02, reached
    record = next(r for r in masked.graphprune_report if r.name == "ChannelMask")
    assert record.details["target"]["reached"] == pytest.approx(reached, abs=1e-6)  # the search counted the same


def test_a_params_target_takes_a_count_or_a_share():
    torch.manual_seed(0)
    model, x = _vision("resnet18")()
    dense = count_params(model)
    by_count = gp.compile(model, [L2Score(), ChannelMask(target={"params": dense // 3}), Shrink()], example_inputs=x)
    assert abs(count_params(by_count) / dense - 1 / 3) <= 0.01
    by_share = gp.compile(model, [L2Score(), ChannelMask(target={"params": 1 / 3}), Shrink()], example_inputs=x)
    assert count_params(by_share) == count_params(by_count)


def test_a_target_result_is_exact():
    torch.manual_seed(0)
    model, x = _vision("squeezenet1_0")()
    masked = gp.compile(model, [L2Score(), ChannelMask(target={"macs": 0.6})], example_inputs=x)
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=x), x)


def test_an_unreachable_target_warns_with_the_closest():
    torch.manual_seed(0)
    model, x = _vision("resnet18")()
    with pytest.warns(gp.GraphPruneWarning, match="out of reach"):
        only_layer4 = ["conv1", "layer1", "layer2", "layer3"]
        gp.compile(model, [L2Score(), ChannelMask(target={"macs": 0.2}, exclude=only_layer4)], example_inputs=x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=0.5, target={"macs": 0.5}), "not both"),
        (dict(target={"flops": 0.5}), "one of"),
        (dict(target={"macs": -1}), "positive number"),
        (dict(target={"macs": 0.5, "params": 0.5}), "one of"),
        (dict(), "needs a ratio"),
    ],
)
def test_bad_targets_say_what_to_give(kwargs, message):
    with pytest.raises(gp.ArgumentError, match=message):
        ChannelMask(**kwargs)


def test_a_target_on_a_model_with_nothing_prunable_says_why():
    model, x = torch.nn.Linear(8, 3), (torch.randn(2, 8),)  # its only channels reach the output
    with pytest.warns(gp.GraphPruneWarning, match="no channel group can be pruned"):
        out = gp.compile(model, [L2Score(), ChannelMask(target={"macs": 0.5})], example_inputs=x)
    torch.testing.assert_close(out(*x), model(*x))


def test_a_ratio_on_a_model_with_nothing_prunable_says_why_in_the_warning_and_the_summary():
    class HeadOnly(torch.nn.Module):  # a detection head's last conv alone: its channels are outputs
        def __init__(self) -> None:
            super().__init__()
            self.box = torch.nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.box(x).flatten(2)

    model, x = HeadOnly(), (torch.randn(1, 3, 4, 4),)
    with pytest.warns(gp.GraphPruneWarning, match="no channel group can be pruned.*reaches a model output"):
        out = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    report = gp.summary(model, out, x)
    assert report.state == "dense" and not report.groups
    assert "nothing pruned:" in str(report) and "reaches a model output" in str(report)
