"""ONNX backend: pruned models export, match torch in ONNX Runtime, and fail loudly when they can't."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests import models

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
gox = pytest.importorskip("graphprune.backends.onnx")
torchvision = pytest.importorskip("torchvision")


def pruned(model, x):
    return gp.compile(model.eval(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "seed_cnn"])
def test_pruned_model_exports_and_matches_in_ort(name, tmp_path):
    torch.manual_seed(0)
    if name == "seed_cnn":
        model, x = models.randomize_bn(models.SeedCNN()), (torch.randn(1, 3, 32, 32),)
    else:
        model, x = models.randomize_bn(getattr(torchvision.models, name)()), (torch.randn(1, 3, 64, 64),)
    small = pruned(model, x)
    result = gox.export(small, tmp_path / f"{name}.onnx", example_inputs=x)
    assert result.exporter in ("dynamo", "torchscript")
    assert result.max_abs_error is not None and result.max_rel_error < 1e-4
    assert result.ir_version <= gox.MAX_IR_VERSION
    # dynamic batch: batch 1 and 4 through the same file
    sess = gox.session(result.path)
    for batch in (1, 4):
        xb = torch.randn(batch, *x[0].shape[1:])
        got = sess.run(None, {result.input_names[0]: xb.numpy()})[0]
        with torch.no_grad():
            want = small(xb).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    # the pruned file is smaller than the dense one
    dense = gox.export(model.eval(), tmp_path / "dense.onnx", example_inputs=x, verify=False)
    assert result.file_bytes < 0.6 * dense.file_bytes


def test_keyword_inputs_and_several_outputs(tmp_path):
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x, y):
            h = torch.relu(self.a(x + y))
            return self.b(h), h.sum(1)

    x = {"y": torch.randn(2, 4), "x": torch.randn(2, 4)}  # not in signature order
    result = gox.export(TwoOut(), tmp_path / "two.onnx", example_inputs=x)
    assert result.input_names == ("x", "y") and result.output_names == ("output_0", "output_1")
    assert os.listdir(tmp_path) == ["two.onnx"]  # no temporary or external-data files left behind


def test_sparse_initializers_shrink_the_file_and_still_match(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.mul_((torch.rand_like(lin.weight) > 0.9).float())  # 90 % zeros
    x = (torch.randn(3, 256),)
    dense = gox.export(model, tmp_path / "dense.onnx", example_inputs=x)
    sparse = gox.export(model, tmp_path / "sparse.onnx", example_inputs=x, sparse_initializers=0.5)
    assert sparse.sparse_initializers == 2
    assert sparse.file_bytes < 0.35 * dense.file_bytes
    assert len(onnx.load(sparse.path).graph.sparse_initializer) == 2
    assert sparse.max_abs_error < 1e-4


def test_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(gox.ExportError, match="does not exist"):
        gox.export(models.Mlp(), blocker / "m.onnx", example_inputs=(torch.randn(2, 10),))
    with pytest.raises(gox.ExportError, match="does not exist"):
        gox.export(models.Mlp(), tmp_path / "missing" / "m.onnx", example_inputs=(torch.randn(2, 10),))


@torch.library.custom_op("graphprune_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


def test_op_that_ort_lacks_is_a_clear_error_and_leaves_no_file(tmp_path):
    torch.onnx.register_custom_op_symbolic("graphprune_test::twice", lambda g, x: g.op("graphprune.test::Twice", x), 18)

    class UsesCustomOp(nn.Module):
        def forward(self, x):
            return torch.ops.graphprune_test.twice(x) + 1

    target = tmp_path / "custom.onnx"
    with pytest.raises(gox.ExportError, match="Twice"):
        gox.export(UsesCustomOp(), target, example_inputs=(torch.randn(2, 3),))
    assert os.listdir(tmp_path) == []


def test_failed_verification_never_leaves_a_file(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    target = tmp_path / "r.onnx"
    with pytest.raises(gp.VerificationError, match="disagrees"):
        gox.export(
            model, target, example_inputs=(torch.randn(1, 3, 32, 32),), rtol=0.0, atol=0.0, exporter="torchscript"
        )
    assert os.listdir(tmp_path) == []


def test_fallback_exporter_is_reported(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo cannot do this")

    monkeypatch.setattr(gox, "_export_dynamo", broken)
    result = gox.export(models.Mlp(), tmp_path / "m.onnx", example_inputs=(torch.randn(2, 10),))
    assert result.exporter == "torchscript"
    assert "dynamo cannot do this" in result.notes[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="exporter"):
        gox.export(models.Mlp(), "m.onnx", example_inputs=(torch.randn(2, 10),), exporter="tvm")
    with pytest.raises(ValueError, match="sparse_initializers"):
        gox.export(models.Mlp(), "m.onnx", example_inputs=(torch.randn(2, 10),), sparse_initializers=0.0)
    with pytest.raises(ValueError, match="example_inputs"):
        gox.export(models.Mlp(), "m.onnx", example_inputs=None)


def test_benchmark_reports_interleaved_medians(tmp_path):
    x = (torch.randn(2, 10),)
    a = gox.export(models.Mlp(), tmp_path / "a.onnx", example_inputs=x).path
    b = gox.export(pruned(models.Mlp(), x), tmp_path / "b.onnx", example_inputs=x).path
    rows = gox.benchmark({"dense": a, "pruned": b}, x, threads=1, warmup=1, repeats=5)
    assert [r.name for r in rows] == ["dense", "pruned"]
    assert all(r.median_ms > 0 and r.throughput > 0 and r.p90_ms >= r.median_ms for r in rows)
    assert rows[1].file_bytes < rows[0].file_bytes


def test_pruned_bert_exports_and_matches_in_ort(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8))}
    small = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=inputs)  # FFN neurons
    result = gox.export(small, tmp_path / "bert.onnx", example_inputs=inputs)
    assert result.input_names == ("input_ids",) and len(result.output_names) == 2
    assert result.max_rel_error < 1e-4  # verified at batch 2 and batch 5 through the same file
