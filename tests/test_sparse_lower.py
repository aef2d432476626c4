"""SparseLower and the sparse backend: exact lowering, measured choices, saving without pickle."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.backends import sparse
from graphprune.passes import BlockMask, ChannelMask, L2Score, NMMask, Shrink, SparseLower, UnstructuredMask


def _lowered(gm) -> dict[str, str]:
    return {n: m.format for n, m in gm.named_modules() if isinstance(m, (sparse.SparseLinear, sparse.SparseConv1x1))}


class PointwiseNet(nn.Module):
    """1x1 convs (lowered), a 3x3 and a strided 1x1 (both stay dense), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(16, 64, 1)
        self.spatial = nn.Conv2d(64, 64, 3, padding=1)
        self.project = nn.Conv2d(64, 32, 1, bias=False)
        self.strided = nn.Conv2d(32, 32, 1, stride=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.strided(self.project(torch.relu(self.spatial(torch.relu(self.expand(x))))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_lowering_linear_layers_is_exact_for_every_batch_shape(sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 24)).eval()
    x = (torch.randn(2, 7, 48),)
    masked = gp.compile(model, [UnstructuredMask(sparsity)], example_inputs=x)
    lowered = gp.compile(masked, [SparseLower(min_sparsity=0.4, choose="first")], example_inputs=x)
    assert _lowered(lowered) == {"0": "csr", "2": "csr"}
    for shape in [(2, 7, 48), (1, 48), (48,), (3, 1, 1, 48)]:  # tokens, one row (matrix-vector), no batch dim
        inp = torch.randn(*shape)
        torch.testing.assert_close(lowered(inp), masked(inp), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(p, nn.Parameter) and p.ndim == 2 for p in lowered.parameters())  # no dense weight left
    assert gp.count_params(lowered) < (1 - sparsity + 0.05) * gp.count_params(model)


def test_lowering_pointwise_convolutions_is_exact_and_skips_the_others():
    torch.manual_seed(0)
    model = PointwiseNet().eval()
    x = (torch.randn(2, 16, 8, 8),)
    masked = gp.compile(model, [UnstructuredMask(0.9)], example_inputs=x)
    lowered = gp.compile(masked, [SparseLower(choose="first")], example_inputs=x)
    assert _lowered(lowered) == {"expand": "csr", "project": "csr", "head": "csr"}
    for batch in (1, 3):
        inp = torch.randn(batch, 16, 8, 8)
        torch.testing.assert_close(lowered(inp), masked(inp), rtol=1e-5, atol=1e-5)
    rows = {name: (fmt, why) for name, fmt, why in gp.summary(model, lowered, x).lowered}
    assert rows["spatial.weight"][0] == "dense" and "(3, 3) convolution" in rows["spatial.weight"][1]
    assert rows["strided.weight"][0] == "dense" and "stride" in rows["strided.weight"][1]


def test_block_and_n_m_masks_lower_to_the_formats_that_fit_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = (torch.randn(4, 64),)
    blocks = gp.compile(model, [BlockMask(0.75, block=(8, 8))], example_inputs=x)
    lowered = gp.compile(blocks, [SparseLower(formats=("bsr", "csr"), choose="first")], example_inputs=x)
    assert _lowered(lowered) == {"0": "bsr", "2": "bsr"}
    assert lowered.get_submodule("0").blocksize == (8, 8)
    torch.testing.assert_close(lowered(*x), blocks(*x), rtol=1e-5, atol=1e-5)
    nm = gp.compile(model, [NMMask(2, 4)], example_inputs=x)  # 2:4 has no blocks: BSR does not apply, CSR does
    lowered = gp.compile(nm, [SparseLower(formats=("bsr", "csr"), choose="first")], example_inputs=x)
    assert _lowered(lowered) == {"0": "csr", "2": "csr"}
    torch.testing.assert_close(lowered(*x), nm(*x), rtol=1e-5, atol=1e-5)


def test_measuring_keeps_a_barely_sparse_layer_dense_and_reports_the_timings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256)).eval()
    x = (torch.randn(32, 256),)
    masked = gp.compile(model, [UnstructuredMask(0.1)], example_inputs=x)
    out = gp.compile(masked, [SparseLower(min_sparsity=0.0, runs=5)], example_inputs=x)
    assert _lowered(out) == {}
    ((name, fmt, why),) = gp.summary(model, out, x).lowered
    assert (name, fmt) == ("0.weight", "dense") and "dense was fastest" in why and "csr" in why and "ms" in why
    torch.testing.assert_close(out(*x), masked(*x))


def test_a_model_without_masks_is_left_alone_and_the_summary_says_why():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = (torch.randn(3, 8),)
    out = gp.compile(model, [SparseLower()], example_inputs=x)
    assert _lowered(out) == {}
    assert not out.graphprune_report[-1].modified
    assert all(fmt == "dense" and "below min_sparsity" in why for _, fmt, why in gp.summary(model, out, x).lowered)


def test_a_tied_weight_is_skipped_and_named():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied().eval()
    x = (torch.randn(2, 8),)
    masked = gp.compile(model, [UnstructuredMask(0.9)], example_inputs=x)
    out = gp.compile(masked, [SparseLower(choose="first")], example_inputs=x)
    assert _lowered(out) == {}
    assert all("tied" in why for _, _, why in gp.summary(model, out, x).lowered)
    torch.testing.assert_close(out(*x), masked(*x))


def test_bad_arguments_are_refused():
    for bad in (1.0, -0.1, "0.5"):
        with pytest.raises(ValueError, match="min_sparsity"):
            SparseLower(min_sparsity=bad)
    with pytest.raises(ValueError, match="formats"):
        SparseLower(formats=("coo",))
    with pytest.raises(ValueError, match="choose"):
        SparseLower(choose="fastest")
    with pytest.raises(ValueError, match="blocksize"):
        sparse.SparseLinear(torch.zeros(6, 6), None, "bsr", (4, 4))


def test_a_lowered_and_shrunk_model_saves_and_loads_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = PointwiseNet().eval()
    x = (torch.randn(2, 16, 8, 8),)
    pruned = gp.compile(
        model,
        [L2Score(), ChannelMask(0.25), Shrink(), UnstructuredMask(0.9), SparseLower(choose="first")],
        example_inputs=x,
    )
    gp.save(pruned, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "plan.json"]
    assert [s["op"] for s in json.loads((tmp_path / "plan.json").read_text())["steps"]] == [
        "channel_mask",
        "shrink",
        "weight_mask",
        "sparse_lower",
    ]
    loaded = gp.load(model, tmp_path, example_inputs=x)
    assert _lowered(loaded) == _lowered(pruned)
    inp = torch.randn(3, 16, 8, 8)
    torch.testing.assert_close(loaded(inp), pruned(inp), rtol=0, atol=0)
    gp.save(loaded, tmp_path / "again")  # a loaded model carries its plan
    torch.testing.assert_close(gp.load(model, tmp_path / "again", example_inputs=x)(inp), pruned(inp), rtol=0, atol=0)


def test_a_lowered_file_is_under_a_third_of_the_dense_one_at_90_percent(tmp_path):
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    x = (torch.randn(4, 256),)
    gp.save(gp.compile(model, [], example_inputs=x), tmp_path / "dense")
    gp.save(
        gp.compile(model, [UnstructuredMask(0.9), SparseLower(choose="first")], example_inputs=x), tmp_path / "sparse"
    )
    ratio = os.path.getsize(tmp_path / "sparse" / "model.safetensors") / os.path.getsize(
        tmp_path / "dense" / "model.safetensors"
    )
    assert ratio < 0.3  # 4-byte values and 4-byte column indices for a tenth of the weights


def test_load_refuses_files_that_do_not_fit(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = (torch.randn(3, 8),)
    gp.save(gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x), tmp_path)
    with pytest.raises(gp.GraphPruneError, match="does not fit|does not have"):
        gp.load(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), tmp_path, example_inputs=x)
    with pytest.raises(gp.GraphPruneError, match="record no plan step"):
        gp.save(gp.compile(model, [lambda gm, ctx: gp.PassResult(gm, True)], example_inputs=x), tmp_path / "x")


def test_latency_helper_interleaves_and_states_threads():
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    x = (torch.randn(4, 64),)
    lowered = gp.compile(model, [UnstructuredMask(0.9), SparseLower(choose="first")], example_inputs=x)
    result = sparse.benchmark(model, lowered, x, runs=3, threads=1)
    assert result.threads == 1 and result.runs == 3 and result.dense_ms > 0 and result.sparse_ms > 0
    assert "speedup" in str(result) and "1 threads" in str(result)


def test_onnx_export_of_a_lowered_model_says_what_to_export_instead(tmp_path):
    from graphprune.backends import onnx

    model = nn.Sequential(nn.Linear(16, 16)).eval()
    x = (torch.randn(2, 16),)
    lowered = gp.compile(model, [UnstructuredMask(0.9), SparseLower(choose="first")], example_inputs=x)
    with pytest.raises(gp.GraphPruneError, match="before SparseLower"):
        onnx.export(lowered, tmp_path / "m.onnx", example_inputs=x)
    assert not (tmp_path / "m.onnx").exists()


def test_a_weight_read_with_and_without_its_bias_stays_dense():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x, y):
            return self.fc(x) + F.linear(y, self.fc.weight)

    torch.manual_seed(0)
    x = (torch.randn(4, 64), torch.randn(4, 64))
    masked = gp.compile(M().eval(), [UnstructuredMask(0.9)], example_inputs=x)
    lowered = gp.compile(masked, [SparseLower(choose="first")], example_inputs=x)
    torch.testing.assert_close(lowered(*x), masked(*x))


def test_sparse_layers_keep_their_dtype_when_loading_and_odd_inputs_stay_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = (torch.randn(4, 64),)
    lowered = gp.compile(model, [UnstructuredMask(0.9), SparseLower(choose="first")], example_inputs=x)
    saved = {k: v.clone() for k, v in lowered.state_dict().items()}
    lowered.double().load_state_dict(saved)
    assert lowered.get_submodule("0").values.dtype == torch.float64
    assert lowered(x[0].double()).dtype == torch.float64
    half = gp.compile(
        model.to(torch.bfloat16),
        [UnstructuredMask(0.9), SparseLower(choose="first")],
        example_inputs=(x[0].to(torch.bfloat16),),
    )
    assert all("bfloat16" in why for _, fmt, why in gp.summary(model, half, (x[0].to(torch.bfloat16),)).lowered)
    convs = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    unbatched = (torch.randn(8, 5, 5),)
    masked = gp.compile(convs, [UnstructuredMask(0.9)], example_inputs=unbatched)
    out = gp.compile(masked, [SparseLower(choose="first")], example_inputs=unbatched)
    torch.testing.assert_close(out(*unbatched), masked(*unbatched))
