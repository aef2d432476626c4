"""CompensateBias: one-shot pruning keeps more of the model's function, and Shrink stays exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, CompensateBias, L2Score, Shrink
from tests import models
from tests.helpers import assert_exact, run


def error_to(reference, model, x):
    return float((run(model, (x,)) - reference).pow(2).mean())


@pytest.mark.parametrize("factory,shape", [(models.Mlp, (64, 10)), (models.ConvBnConv, (8, 3, 8, 8))])
def test_compensation_reduces_the_error_of_one_shot_pruning(factory, shape):
    torch.manual_seed(0)
    model = models.randomize_bn(factory()).eval()
    x = torch.randn(*shape) + 1.0  # inputs with a mean: pruned channels carry an average signal
    calibration = [((torch.randn(*shape) + 1.0,), None) for _ in range(8)]
    dense = run(model, (x,))
    plain = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=(x,))
    fixed = gp.compile(model, [L2Score(), ChannelMask(0.5), CompensateBias(calibration)], example_inputs=(x,))
    assert error_to(dense, fixed, x) < 0.9 * error_to(dense, plain, x)
    shrunk = gp.compile(fixed, [Shrink()], example_inputs=(x,))
    assert_exact(fixed, shrunk, (x,))
    assert fixed.graphprune_report[-1].details["compensated"]


def test_compensation_needs_calibration_and_skips_unmasked_models():
    x = (torch.randn(4, 10),)
    with pytest.raises(ValueError, match="calibration"):
        gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.5), CompensateBias()], example_inputs=x)
    out = gp.compile(models.Mlp(), [CompensateBias([(x, None)])], example_inputs=x)
    assert out.graphprune_report[-1].modified is False


def test_compensating_a_layer_without_bias_whose_outputs_are_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 4)
    ).eval()
    x = (torch.randn(64, 8),)
    calib = [(x, None)]
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5), CompensateBias(calib)], example_inputs=x)
    assert masked.get_submodule("2").bias.shape == (16,)
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=x), x)
    one_call = gp.compile(model, [L2Score(), ChannelMask(0.5), CompensateBias(calib), Shrink()], example_inputs=x)
    torch.testing.assert_close(one_call(*x), masked(*x))


def test_an_exported_decoder_gets_biases_its_functional_calls_read():
    pytest.importorskip("transformers")
    model = models.tiny_decoder(layers=1)
    ids, calibration = torch.randint(0, 100, (1, 8)), [torch.randint(0, 100, (2, 8)) for _ in range(2)]
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    hook.remove()
    means = torch.cat([s.reshape(-1, 64) for s in seen]).double().mean(0)
    masked = gp.compile(
        model, [L2Score(), ChannelMask({"ffn": 0.5}), CompensateBias(calibration)], example_inputs=(ids,)
    )
    down = masked.model.layers[0].mlp.down_proj
    pruned = torch.nonzero((down.weight == 0).all(0)).reshape(-1)
    assert len(pruned) == 32 and model.model.layers[0].mlp.down_proj.bias is None  # the caller's model as it was
    expected = model.model.layers[0].mlp.down_proj.weight.double()[:, pruned] @ means[pruned]
    torch.testing.assert_close(down.bias.double(), expected, rtol=1e-5, atol=1e-6)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=(ids,))
    assert type(shrunk) is type(model) and shrunk.model.layers[0].mlp.down_proj.bias is not None
    assert_exact(masked, shrunk, (ids,))
