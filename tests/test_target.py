"""Pruning to a target cost: ChannelMask(target={"macs": r} | {"params": n} | {"latency": s}) finds
the ratio whose shrunk model meets it, measured afterwards on the real model.  Latency tests check
the search with a meter whose costs are counted, not timed (no timing in unit tests); the real
meters' tables are checked for timing the right ops."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.analysis import latency
from graphprune.analysis.cost import count_macs, count_params
from graphprune.backends.latency import OrtMeter
from graphprune.backends.onnx import session
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
        (dict(target={"params": float("inf")}), "positive number"),
        (dict(target={"macs": 0.5, "params": 0.5}), "one of"),
        (dict(), "needs a ratio"),
        (dict(target={"latency": 1.5}), "between 0 and 1"),
        (dict(target={"latency": 0.5, "backend": "tensorrt"}), "latency backend must be one of"),
        (dict(target={"latency": 0.5, "threads": 0}), "threads"),
        (dict(target={"macs": 0.5, "threads": 2}), "a latency target may add"),
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


class CountingMeter(latency.Meter):
    """A deterministic meter: an op costs its input elements (a stand-in for time), and a model's
    end-to-end time adds a fixed overhead the table does not see (as a runtime's fusions and
    launches would), so the search must correct its table goal with the end-to-end measurement."""

    name = "counting"

    def __init__(self, overhead: float) -> None:
        super().__init__()
        self.overhead, self.checks = overhead, 0

    def measure_op(self, func, args, kwargs):
        if func is not torch.ops.aten.convolution.default:
            return 0.0
        x, w = args[0], args[1]
        return float(x.shape[1] * w.shape[0] * x.shape[2] * x.shape[3])

    def models(self, a, b, example_inputs):
        self.checks += 1
        cost = [latency.estimate(self, latency.record_ops(m, example_inputs, on_meta=False)) for m in (a, b)]
        return cost[0] * (1 + self.overhead), cost[1] + cost[0] * self.overhead


@pytest.mark.parametrize("overhead", [0.0, 0.3])
def test_a_latency_target_is_met_end_to_end_after_correcting_the_table(overhead):
    torch.manual_seed(0)
    model, x = _vision("resnet18")()
    meter = CountingMeter(overhead)
    mask = ChannelMask(target={"latency": 0.6, "backend": meter}, scope="global")
    masked = gp.compile(model, [L2Score(), mask], example_inputs=x)
    target = next(r for r in masked.graphprune_report if r.name == "ChannelMask").details["target"]
    assert target["kind"] == "latency" and target["requested"] == 0.6
    assert abs(target["reached"] - 0.6) <= 0.05 * 0.6, target
    if overhead:  # the table alone would have overshot: the search asked it for less
        assert target["estimated"] < 0.6 - 0.05 and meter.checks >= 2
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    dense_s, pruned_s = CountingMeter(overhead).models(model, shrunk, x)
    assert pruned_s / dense_s == pytest.approx(target["reached"], rel=1e-9)  # what it reported is what it built
    assert_exact(masked, shrunk, x)


@pytest.mark.filterwarnings("ignore:ChannelMask target latency")  # timings on a shared machine vary
def test_a_latency_target_with_the_torch_meter_reports_what_it_timed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 8, 1),
    ).eval()  # fmt: skip
    x = (torch.randn(1, 3, 32, 32),)
    masked = gp.compile(model, [L2Score(), ChannelMask(target={"latency": 0.5, "threads": 1})], example_inputs=x)
    target = next(r for r in masked.graphprune_report if r.name == "ChannelMask").details["target"]
    assert target["backend"] == "torch" and target["threads"] == 1
    assert target["dense_ms"] > 0 and target["pruned_ms"] > 0 and 0 < target["estimated"] < 1
    assert target["reached"] == pytest.approx(target["pruned_ms"] / target["dense_ms"])
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=x), x)


def test_the_latency_table_records_a_forward_on_meta_without_weights():
    torch.manual_seed(0)
    model, x = _vision("resnet18")()
    ops = latency.record_ops(model.to("meta"), x)
    convs = [args for func, args, _ in ops if func is torch.ops.aten.convolution.default]
    assert len(convs) == 20 and convs[0][0] == latency.Tensor(((1, 3, 64, 64), torch.float32))
    assert all(p.is_meta for p in model.parameters())


ATEN = torch.ops.aten


@pytest.mark.parametrize(
    "func, args",
    [
        (ATEN.convolution.default, ((2, 8, 9, 9), (12, 4, 3, 3), (12,), [2], [1], [1], False, [0], 2)),
        (ATEN.convolution.default, ((1, 4, 7, 7), (6, 4, 3, 1), None, [1, 2], [1, 0], [2, 1], False, [0, 0], 1)),
        (ATEN.addmm.default, ((5,), (3, 7), (7, 5))),
        (ATEN.mm.default, ((3, 7), (7, 5))),
        (ATEN.bmm.default, ((2, 3, 7), (2, 7, 5))),
        (ATEN.max_pool2d_with_indices.default, ((1, 3, 9, 9), [3, 3], [2, 2], [1, 1])),
    ],
)
def test_the_onnxruntime_table_times_the_op_that_was_recorded(func, args):
    """Each one-node model computes what the recorded ATen op computes, on the same values."""
    torch.manual_seed(0)
    real = [torch.randn(a) if isinstance(a, tuple) and a and isinstance(a[0], int) else a for a in args]
    recorded = tuple(latency.Tensor((tuple(t.shape), t.dtype)) if isinstance(t, torch.Tensor) else t for t in real)
    proto, feeds = OrtMeter.one_node(func, recorded, values=[t for t in real if isinstance(t, torch.Tensor)])
    got = session(proto.SerializeToString()).run(None, feeds)[0]
    want = func(*real)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:ChannelMask target latency")  # timings on a shared machine vary
def test_a_latency_target_for_onnxruntime_times_the_exported_models():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 16, 3, padding=1),
    ).eval()  # fmt: skip
    x = (torch.randn(1, 3, 32, 32),)
    mask = ChannelMask(target={"latency": 0.6, "backend": "onnxruntime", "threads": 1})
    masked = gp.compile(model, [L2Score(), mask], example_inputs=x)
    target = next(r for r in masked.graphprune_report if r.name == "ChannelMask").details["target"]
    assert target["backend"] == "onnxruntime" and target["pruned_ms"] > 0
    assert isinstance(mask.target.meter, OrtMeter) and any(mask.target.meter.table.values())  # convolutions were timed
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=x), x)


def test_a_latency_target_on_a_model_with_nothing_prunable_says_why_without_timing_anything():
    model, x = torch.nn.Linear(8, 3), (torch.randn(2, 8),)  # its only channels reach the output
    meter = CountingMeter(0.0)
    with pytest.warns(gp.GraphPruneWarning, match="no channel group can be pruned"):
        out = gp.compile(model, [L2Score(), ChannelMask(target={"latency": 0.5, "backend": meter})], example_inputs=x)
    assert meter.checks == 0 and not meter.table
    torch.testing.assert_close(out(*x), model(*x))


class FailingMeter(CountingMeter):
    def models(self, a, b, example_inputs):
        raise RuntimeError("the runtime is gone")


def test_a_latency_search_that_fails_leaves_the_callers_model_as_it_was():
    torch.manual_seed(0)
    model, x = _vision("resnet18")()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = ChannelMask(target={"latency": 0.5, "backend": FailingMeter(0.0)})
    with pytest.raises(gp.PassError, match="ChannelMask failed.*the runtime is gone"):
        gp.compile(model, [L2Score(), mask, Shrink()], example_inputs=x)
    assert type(model) is torchvision.models.ResNet and not any(hasattr(m, "parametrizations") for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
