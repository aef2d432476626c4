"""Real architectures, no hints: mask -> shrink is exact, shapes stay, MACs drop."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests import models
from tests.helpers import assert_exact, prune, run

torchvision = pytest.importorskip("torchvision")

# name -> input side (small where the architecture allows it)
TORCHVISION = {
    "resnet18": 64,
    "resnet50": 64,
    "mobilenet_v2": 64,
    "mobilenet_v3_small": 64,
    "densenet121": 64,
    "efficientnet_b0": 64,
    "regnet_x_400mf": 64,
    "shufflenet_v2_x0_5": 64,
    "squeezenet1_0": 64,
    "googlenet": 64,
    "inception_v3": 80,
    "vgg11_bn": 32,
    "convnext_tiny": 64,
    "alexnet": 64,
    "mnasnet0_5": 64,
}


def build(name: str):
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return models.randomize_bn(getattr(torchvision.models, name)(**kwargs)).eval()


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_mask_shrink_exact(name):
    torch.manual_seed(0)
    model = build(name)
    x = (torch.randn(2, 3, TORCHVISION[name], TORCHVISION[name]),)
    masked, shrunk = prune(model, x, 0.5)
    assert_exact(masked, shrunk, x)
    assert run(shrunk, x).shape == run(model, x).shape
    macs = gp.count_macs(shrunk, x) / gp.count_macs(model, x)
    assert macs <= 0.60, f"{name}: MACs at ratio 0.5 are {macs:.2f} of dense"


def test_seed_cnn():
    torch.manual_seed(0)
    model = models.randomize_bn(models.SeedCNN()).eval()
    x = (torch.randn(2, 3, 32, 32),)
    masked, shrunk = prune(model, x, 0.5)
    assert_exact(masked, shrunk, x)
    assert gp.count_macs(shrunk, x) / gp.count_macs(model, x) <= 0.60
    assert shrunk.get_submodule("fc1").in_features == 512 * 4


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_global_scope_and_round_to_on_real_models(name):
    torch.manual_seed(0)
    model = build(name)
    x = (torch.randn(1, 3, 64, 64),)
    masked, shrunk = prune(model, x, 0.5, scope="global", round_to=8)
    assert_exact(masked, shrunk, x)
    for m in shrunk.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.out_channels not in (1000,):
            assert m.out_channels % 8 == 0 or m.out_channels < 8


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["resnet18d", "efficientnet_b0", "mobilevitv2_050"])
def test_timm_mask_shrink_exact(name):
    torch.manual_seed(0)
    model = models.randomize_bn(timm.create_model(name, pretrained=False)).eval()
    x = (torch.randn(2, 3, 64, 64),)
    leaf = []
    if name.startswith("mobilevit"):  # shape-dependent Python control flow: traced as an opaque leaf
        from timm.models.mobilevit import MobileVitV2Block

        leaf = [MobileVitV2Block]
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x, leaf_modules=leaf)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    assert gp.count_params(shrunk) < gp.count_params(model)
    if leaf:
        assert any(
            f.site.kind == "no_rule" and "MobileVitV2Block" in f.site.reason
            for f in gp.summary(model, shrunk, x).frozen
        )
