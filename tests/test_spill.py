"""A big model pruned in place never holds two copies of a weight: the tensors Shrink and SparseGPT
replace go to disk (graphprune.ir.spill), mapped back; a model that keeps them (a failure, a graph
result) has its values, read from the file."""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.ir.spill import Spill
from graphprune.passes import ChannelMask, L2Score, Shrink, SparseGPTMask
from tests import models
from tests.helpers import assert_same_state, run, state

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose map holds `t`'s data, if any (None: anonymous memory)."""
    address = t.data_ptr()
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            begin, end = (int(a, 16) for a in fields[0].split("-"))
            if begin <= address < end:
                return fields[5].strip() if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.fixture
def spill_everything(monkeypatch):
    """Every model pruned in place counts as big; the spilled tensors are collected."""
    monkeypatch.setattr(sys.modules["graphprune.compile"], "SPILL_BYTES", 0)
    spilled = []
    call = Spill.__call__

    def record(self, t):
        call(self, t)
        if id(t) in self._spilled:
            spilled.append((t, mapped_file(t)))

    monkeypatch.setattr(Spill, "__call__", record)
    return spilled


def test_spilled_tensors_keep_their_values_and_outlive_the_folder():
    model = nn.Linear(64, 32)
    weight, bias = model.weight, model.bias
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spill = Spill()
    spill(weight)
    spill(bias[:8])  # a view does not own its storage: left alone
    assert "graphprune-spill-" in mapped_file(weight) and mapped_file(bias) is None
    folder = spill._dir
    spill.close()
    assert not os.path.exists(folder) and model.weight is weight and "graphprune-spill-" in mapped_file(weight)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    out = model(torch.ones(2, 64))  # still a working model, and trainable (written pages are copied)
    with torch.no_grad():
        model.weight.mul_(2)
    torch.testing.assert_close(model.weight, 2 * before["weight"], rtol=0, atol=0)
    assert out.shape == (2, 32)


def test_pruned_in_place_with_spill_equals_pruned_without(spill_everything):
    x = (torch.randn(3, 10),)
    torch.manual_seed(0)
    reference = gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    torch.manual_seed(0)
    model = models.Mlp()
    old = {name: p for name, p in model.named_parameters()}
    out = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x, inplace=True)
    assert out is model and model.fc1.out_features == 16
    resized = {id(p) for name, p in old.items() if p.shape != model.get_parameter(name).shape}
    assert len(resized) == 5 and {id(t) for t, _ in spill_everything} == resized
    assert all("graphprune-spill-" in where for _, where in spill_everything)  # mapped while the compile ran
    assert all(mapped_file(p) is None for p in model.parameters())
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(run(model, x), run(reference, x), rtol=0, atol=0)


def _llama():
    pytest.importorskip("transformers")
    return models.tiny_decoder("llama", layers=2), (torch.randint(0, 100, (1, 12)),)


def test_exported_llama_pruned_in_place_with_spill(spill_everything):
    model, ids = _llama()
    passes = [L2Score(), ChannelMask({"ffn": 0.5, "head": 0.5}), Shrink()]
    reference = gp.compile(model, passes, example_inputs=ids)
    out = gp.compile(model, passes, example_inputs=ids, inplace=True)
    assert out is model and len(spill_everything) >= 10
    assert all(mapped_file(p) is None for p in model.parameters())
    torch.testing.assert_close(run(model, ids).logits, run(reference, ids).logits, rtol=0, atol=0)


def test_a_failure_after_shrink_leaves_the_model_as_it_was(spill_everything, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the spill folder goes here
    torch.manual_seed(0)
    model = models.Mlp()
    before, reference = state(model), copy.deepcopy(model)

    def boom(gm, ctx):
        raise gp.PassError("kaput")

    with pytest.raises(gp.PassError, match="kaput"):
        gp.compile(
            model, [L2Score(), ChannelMask(0.5), Shrink(), boom], example_inputs=(torch.randn(2, 10),), inplace=True
        )
    assert spill_everything  # Shrink ran and spilled: those tensors are read from the (removed) file now
    assert_same_state(before, model)
    assert model.fc1.out_features == 32 and "graphprune-spill-" in mapped_file(model.fc1.weight)
    assert not list(tmp_path.iterdir())  # no file left on disk
    x = (torch.randn(3, 10),)
    torch.testing.assert_close(run(model, x), run(reference, x), rtol=0, atol=0)


def test_a_graph_result_leaves_the_model_as_it_was(spill_everything):
    torch.manual_seed(0)
    model = models.Mlp()
    before, x = state(model), (torch.randn(2, 10),)
    gm = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x, inplace=True, output="graph")
    assert spill_everything and gm is not model
    assert_same_state(before, model)
    assert gm.fc1.weight.shape[0] == 16 and mapped_file(gm.fc1.weight) is None


def test_sparsegpt_in_place_spills_the_weights_it_rewrites(spill_everything):
    model, ids = _llama()
    calibration = [torch.randint(0, 100, (2, 12)) for _ in range(2)]
    reference = gp.compile(model, [SparseGPTMask(0.5, calibration=calibration)], example_inputs=ids)
    old = {name: p for name, p in model.named_parameters()}
    out = gp.compile(model, [SparseGPTMask(0.5, calibration=calibration)], example_inputs=ids, inplace=True)
    assert out is model
    rewritten = {id(p) for name, p in old.items() if name.startswith("model.layers") and "proj" in name}
    assert len(rewritten) == 14 and rewritten <= {id(t) for t, _ in spill_everything}
    assert all(mapped_file(p) is None for p in model.parameters())
    torch.testing.assert_close(run(model, ids).logits, run(reference, ids).logits, rtol=0, atol=0)


def test_a_plan_lands_in_place_on_a_model_loaded_from_safetensors_shards(spill_everything, tmp_path):
    """The way to a big model: the plan decided on one instance, the big one loaded once from its
    shards (from_pretrained reads them one by one), then pruned in place with its own weights."""
    model, ids = _llama()
    decided = gp.compile(model, [L2Score(), ChannelMask({"ffn": 0.5, "head": 0.5}), Shrink()], example_inputs=ids)
    other = models.tiny_decoder("llama", layers=2, seed=1)  # the same architecture, other weights
    other.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = type(other).from_pretrained(tmp_path).eval()
    expected = gp.apply_plan(other, decided, ids)
    out = gp.apply_plan(loaded, decided, ids, inplace=True)
    assert out is loaded and spill_everything  # pruned in place, the replaced tensors spilled
    assert {k: v.shape for k, v in out.state_dict().items()} == {k: v.shape for k, v in decided.state_dict().items()}
    torch.testing.assert_close(run(out, ids).logits, run(expected, ids).logits, rtol=0, atol=0)
