"""SparseGPT: OBS reconstruction equals a direct computation, beats magnitude on the layer's output
error, keeps its patterns, and leaves the caller's model alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import NMMask, Shrink, SparseGPTMask, UnstructuredMask
from graphprune.passes.sparsegpt import sparsegpt_prune
from tests import models


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs like activations: correlated channels of very different scales (outlier features),
    which is where the Hessian tells more than the weights' magnitude."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) @ mix) * torch.exp(torch.randn(d, generator=g))


def _direct_obs(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Column by column, with the inverse Hessian of the columns not yet processed computed afresh:
    a removed weight w_q is zeroed and the remaining columns move by -w_q / [H^-1]_qq [H^-1]_q,:."""
    w = w.double().clone()
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(h[i:, i:])
        for r in range(w.shape[0]):
            if not keep[r, i]:
                w[r, i:] -= w[r, i] / hinv[0, 0] * hinv[0]
    return w


def test_reconstruction_equals_a_direct_obs_computation_on_a_tiny_layer():
    x = _correlated_inputs(64, 12).double()
    w = torch.randn(5, 12, dtype=torch.float64)
    h = x.T @ x / len(x)
    new, keep = sparsegpt_prune(w, h, sparsity=0.5, blocksize=128, percdamp=0.01)
    damped = h + torch.eye(12, dtype=h.dtype) * 0.01 * torch.diagonal(h).mean()
    expected = _direct_obs(w, damped, keep)
    torch.testing.assert_close(new, expected * keep, rtol=1e-9, atol=1e-9)
    assert int((~keep).sum()) == 30 and bool((new[~keep] == 0).all())


def test_blocks_and_nm_keep_their_pattern():
    x = _correlated_inputs(128, 32).double()
    h = x.T @ x / len(x)
    w = torch.randn(6, 32, dtype=torch.float64)
    _, keep = sparsegpt_prune(w, h, sparsity=0.25, blocksize=8)
    assert [int((~keep[:, s : s + 8]).sum()) for s in range(0, 32, 8)] == [12] * 4  # the share per block
    new, keep = sparsegpt_prune(w, h, nm=(2, 4), blocksize=8)
    assert bool((keep.reshape(6, 8, 4).sum(-1) == 2).all()) and bool((new[~keep] == 0).all())


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_lower_layer_output_error_than_magnitude_at_equal_sparsity(sparsity):
    torch.manual_seed(0)
    layer = nn.Linear(24, 48)
    x = _correlated_inputs(256, 24)
    calibration = [x[i : i + 64] for i in range(0, 256, 64)]
    magnitude = UnstructuredMask(sparsity) if isinstance(sparsity, float) else NMMask(2, 4)
    by_magnitude = gp.compile(layer, [magnitude], example_inputs=(x[:4],))
    by_obs = gp.compile(layer, [SparseGPTMask(sparsity, calibration=calibration)], example_inputs=(x[:4],))
    zeros = [int((m.weight == 0).sum()) for m in (by_magnitude, by_obs)]
    assert zeros[0] == zeros[1] == 24 * 48 // 2
    with torch.no_grad():
        dense = layer(x)
        err_magnitude = (by_magnitude(x) - dense).pow(2).mean()
        err_obs = (by_obs(x) - dense).pow(2).mean()
    assert err_obs < 0.5 * err_magnitude


def test_keeps_the_callers_model_and_an_earlier_mask_and_shrinks_exactly():
    torch.manual_seed(0)
    model = models.Mlp()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(32, 10)
    once = gp.compile(model, [UnstructuredMask(0.3)], example_inputs=(x[:4],))
    twice = gp.compile(once, [SparseGPTMask(0.6, calibration=[x])], example_inputs=(x[:4],))
    for name in ("fc1", "fc2", "fc3"):
        a, b = once.get_submodule(name).weight == 0, twice.get_submodule(name).weight == 0
        assert bool((b | ~a).all())  # zeros stay zeros
        assert int(b.sum()) == round(0.6 * b.numel())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shrunk = gp.compile(twice, [Shrink()], example_inputs=(x[:4],))
    torch.testing.assert_close(shrunk(x), twice(x))


def test_bad_arguments_say_what_is_expected():
    with pytest.raises(gp.ArgumentError, match="N:M"):
        SparseGPTMask("4:2")
    with pytest.raises(gp.ArgumentError, match="multiple of m"):
        SparseGPTMask("2:4", blocksize=6)
    with pytest.raises(gp.ArgumentError, match="percdamp"):
        SparseGPTMask(0.5, percdamp=0)
    with pytest.raises(gp.ArgumentError, match="calibration"):
        gp.compile(models.Mlp(), [SparseGPTMask(0.5)], example_inputs=(torch.randn(2, 10),))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([models.ResidualMlpBlock(), models.ResidualMlpBlock()])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_block_by_block_each_block_sees_the_pruned_blocks_before_it():
    torch.manual_seed(0)
    model = Residual()
    batches = [torch.randn(16, 4) for _ in range(3)]
    pruned = gp.compile(
        model, [SparseGPTMask(0.5, calibration=batches, exclude=["stem"])], example_inputs=(batches[0],)
    )
    reference = copy.deepcopy(model)  # by hand: block 0 on the dense stem's outputs, block 1 on pruned block 0's
    with torch.no_grad():
        hidden = [reference.stem(x) for x in batches]
        for block in reference.blocks:
            inner = [torch.relu(block.fc1(h)) for h in hidden]
            for layer, seen in ((block.fc1, hidden), (block.fc2, inner)):
                flat = torch.cat(seen).double()
                new, keep = sparsegpt_prune(layer.weight, flat.T @ flat / len(flat), sparsity=0.5)
                layer.weight.copy_(new * keep)
            hidden = [block(h) for h in hidden]
    for name in ("blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"):
        torch.testing.assert_close(pruned.get_submodule(name).weight, reference.get_submodule(name).weight)
    one_shot = gp.compile(
        model,
        [SparseGPTMask(0.5, calibration=batches, exclude=["stem"], sequential=False)],
        example_inputs=(batches[0],),
    )
    torch.testing.assert_close(one_shot.blocks[0].fc1.weight, pruned.blocks[0].fc1.weight)  # the first block: same
    assert not torch.allclose(one_shot.blocks[1].fc1.weight, pruned.blocks[1].fc1.weight)  # later ones: not


def test_tied_weights_stay_tied_and_a_model_with_nothing_to_prune_is_told():
    pytest.importorskip("transformers")
    model = models.tiny_decoder("qwen2", layers=1, tie_word_embeddings=True)
    ids = torch.randint(0, 100, (1, 8))
    pruned = gp.compile(model, [SparseGPTMask(0.5, calibration=[torch.randint(0, 100, (2, 8))])], example_inputs=(ids,))
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # the LM head is the embedding: left dense
    assert pruned.graphprune_report[0].details["tied_left_dense"] == ["lm_head.weight"]
    assert float((pruned.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5
    with pytest.warns(gp.GraphPruneWarning, match="pruned no layer"):
        gp.compile(model, [SparseGPTMask(0.5, calibration=[ids], exclude=["model"])], example_inputs=(ids,))
