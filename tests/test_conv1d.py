"""GPT-2's Conv1D (`addmm(bias, x, W)` with W stored (in, out)) is a weight op like nn.Linear: the
data-driven criteria read its inputs, the fine-grained masks keep their patterns per output, and
SparseGPT and CompensateBias work on it."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.compile import graph_of
from graphprune.ir.weight_ops import weight_ops
from graphprune.passes import (
    ChannelMask,
    CompensateBias,
    FLAPScore,
    NMMask,
    Shrink,
    SparseGPTMask,
    UnstructuredMask,
    WandaScore,
)
from tests.helpers import assert_exact, run
from tests.test_criteria import scores_of

transformers = pytest.importorskip("transformers")


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, use_cache=False)
    return transformers.GPT2Model(config).eval(), (torch.randint(0, 64, (2, 8)),)


def calibration(n=3):
    g = torch.Generator().manual_seed(1)
    return [((torch.randint(0, 64, (2, 8), generator=g),), None) for _ in range(n)]


def inputs_of(model, path, batches):
    """What the Conv1D at `path` reads, over the batches, as (positions, in) rows."""
    seen = []
    hook = model.get_submodule(path).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    for inputs, _ in batches:
        run(model, inputs)
    hook.remove()
    return torch.cat(seen).double()


def test_gpt2_projections_are_weight_ops_stored_in_by_out():
    model, x = gpt2()
    ops = weight_ops(graph_of(model, x))
    names = {f"h.{i}.{p}.weight" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert names <= set(ops)
    for name in names:
        assert ops[name].transposed and ops[name].in_dim == 0 and ops[name].bias == name.replace("weight", "bias")


def test_wanda_sp_on_gpt2_equals_a_hand_computation():
    model, x = gpt2()
    data = calibration()
    scores = scores_of(model, WandaScore(data), x)
    key = next(k for k in scores if "c_fc" in k and "h.0" in k)
    xin = inputs_of(model, "h.0.mlp.c_proj", data)  # the FFN neurons, where c_proj reads them
    rms = xin.pow(2).mean(0).sqrt()
    w = model.h[0].mlp.c_proj.weight.detach().double()  # (in = neurons, out)
    torch.testing.assert_close(scores[key], w.pow(2).sum(1).sqrt() * rms)


@pytest.mark.parametrize("score", [WandaScore, FLAPScore])
def test_data_driven_channel_pruning_of_gpt2_is_exact(score):
    model, x = gpt2()
    masked = gp.compile(model, [score(calibration()), ChannelMask({"ffn": 0.5, "head": 0.5})], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert type(shrunk) is type(model) and shrunk.h[0].mlp.c_fc.weight.shape == (32, 64)
    assert_exact(masked, shrunk, x)


def test_compensate_bias_on_gpt2_adds_the_pruned_neurons_mean_contribution():
    model, x = gpt2()
    data = calibration()
    masked = gp.compile(model, [WandaScore(data), ChannelMask({"ffn": 0.5})], example_inputs=x)
    pruned = ~masked.h[0].mlp.c_fc.parametrizations.weight[0].keep_1  # c_fc's outputs: dim 1 of (in, out)
    compensated = gp.compile(masked, [CompensateBias(data)], example_inputs=x)
    mean = inputs_of(model, "h.0.mlp.c_proj", data).mean(0)
    w = model.h[0].mlp.c_proj.weight.detach().double()
    expected = model.h[0].mlp.c_proj.bias.detach().double() + w[pruned].T @ mean[pruned]
    torch.testing.assert_close(compensated.h[0].mlp.c_proj.bias.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_fine_grained_patterns_run_along_each_output_of_a_conv1d():
    model, x = gpt2()
    rows = gp.compile(model, [UnstructuredMask(0.5, scope="row")], example_inputs=x, output="graph")
    w = rows.get_submodule("h.0.mlp.c_fc").weight  # (in, out): an output's weights are a column
    assert torch.all((w == 0).sum(0) == w.shape[0] // 2)
    nm = gp.compile(model, [NMMask(2, 4)], example_inputs=x)
    w = nm.h[0].mlp.c_fc.weight
    assert type(nm) is type(model) and torch.all((w != 0).reshape(w.shape[0] // 4, 4, -1).sum(1) == 2)


def test_sparsegpt_prunes_conv1d_and_lowers_its_output_error_below_magnitude():
    model, x = gpt2()
    data = calibration(4)
    sparse = gp.compile(model, [SparseGPTMask(0.5, calibration=data, sequential=False)], example_inputs=x)
    magnitude = gp.compile(model, [UnstructuredMask(0.5, scope="row")], example_inputs=x, output="graph")
    xin = inputs_of(model, "h.0.mlp.c_fc", data)  # the same inputs for both: the first layer
    dense = model.h[0].mlp.c_fc.weight.detach().double()
    err = {}
    for name, pruned in (("sparsegpt", sparse), ("magnitude", magnitude)):
        w = pruned.get_submodule("h.0.mlp.c_fc").weight.detach().double()
        assert float((w == 0).double().mean()) == pytest.approx(0.5)
        err[name] = float((xin @ w - xin @ dense).pow(2).sum())
    assert err["sparsegpt"] < 0.8 * err["magnitude"]  # (0.69 here: random-init inputs are near isotropic)


def test_a_tied_lm_head_is_left_dense_and_the_model_comes_back_as_its_own_class():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    x = (torch.randint(0, 64, (2, 8)),)
    pruned = gp.compile(model, [UnstructuredMask(0.5, scope="row")], example_inputs=x)
    assert type(pruned) is type(model) and pruned.lm_head.weight is pruned.transformer.wte.weight
    assert not torch.any(pruned.lm_head.weight == 0) and torch.any(pruned.transformer.h[0].mlp.c_fc.weight == 0)
    record = next(r for r in pruned.graphprune_report if r.name == "UnstructuredMask")
    assert record.details["tied_left_dense"] == ["lm_head.weight"]
