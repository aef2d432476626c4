"""Sensitivity sweeps, per-group ratios and the global per-group cap."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.passes import ChannelMask, L1Score, L2Score, Shrink
from tests import models


def test_sweep_table_plot_and_derived_ratios(tmp_path):
    torch.manual_seed(0)
    model = models.Mlp()
    x = torch.randn(64, 10)
    reference = model(x).detach()

    def evaluate(m):  # higher is better: negative error to the dense model's outputs
        with torch.no_grad():
            return -float((m(x) - reference).pow(2).mean())

    sens = gp.sensitivity(model, evaluate, example_inputs=(x,), ratios=(0.25, 0.5, 0.75))
    assert sens.baseline == pytest.approx(0.0)
    assert sens.groups == ("fc1", "fc2")
    for g in sens.groups:
        errs = [m for gg, _, m in sens.rows if gg == g]
        assert errs[0] >= errs[-1]  # removing more hurts more
    assert "| fc1 |" in sens.table()
    png = sens.plot(str(tmp_path / "s.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    ratios = sens.ratios_for(max_drop=1e9)
    assert ratios == {"fc1": 0.75, "fc2": 0.75}
    assert sens.ratios_for(max_drop=-1.0) == {"fc1": 0.0, "fc2": 0.0}
    pruned = gp.compile(model, [L1Score(), ChannelMask({"fc1": 0.5}), Shrink()], example_inputs=(x,))
    assert pruned.get_submodule("fc1").out_features == 16 and pruned.get_submodule("fc2").out_features == 16


def test_sensitivity_checks_arguments():
    x = (torch.randn(4, 10),)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        gp.sensitivity(models.Mlp(), lambda m: 0.0, example_inputs=x, ratios=(0.0,))
    with pytest.raises(ValueError, match="no such groups"):
        gp.sensitivity(models.Mlp(), lambda m: 0.0, example_inputs=x, groups=["nope"])
    with pytest.raises(ValueError, match="groups the model does not have"):
        gp.compile(models.Mlp(), [L2Score(), ChannelMask({"nope": 0.5})], example_inputs=x)
    with pytest.raises(ValueError, match="scope='local'"):
        gp.compile(models.Mlp(), [L2Score(), ChannelMask({"fc1": 0.5}, scope="global")], example_inputs=x)


def test_global_scope_respects_max_ratio():
    model = models.Mlp()
    with torch.no_grad():
        model.fc1.weight[4:].mul_(1e-3)  # 28 of fc1's 32 units look useless next to the other four
        model.fc1.bias[4:].mul_(1e-3)
        model.fc2.weight[:, 4:].mul_(1e-3)
    x = (torch.randn(4, 10),)
    uncapped = gp.compile(model, [L1Score(), ChannelMask(0.5, scope="global"), Shrink()], example_inputs=x)
    assert uncapped.get_submodule("fc1").out_features == 32 - 24  # the whole budget (24 of 48) went to fc1
    pruned = gp.compile(model, [L1Score(), ChannelMask(0.5, scope="global", max_ratio=0.6), Shrink()], example_inputs=x)
    assert pruned.get_submodule("fc1").out_features == 32 - int(0.6 * 32)
    with pytest.raises(ValueError, match="max_ratio"):
        ChannelMask(0.5, max_ratio=0.6)
