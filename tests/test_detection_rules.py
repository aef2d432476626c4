"""Detection, segmentation and video models (issue 16): FrozenBatchNorm2d's buffers, sizes read off
tensors, functions that fill in their list arguments, RAFT through torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from tests.helpers import assert_exact, prune, run

torchvision = pytest.importorskip("torchvision")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def out_channels(model: nn.Module, prefix: str) -> dict[str, int]:
    return {
        name: m.out_channels
        for name, m in model.named_modules()
        if name.startswith(prefix) and isinstance(m, nn.Conv2d)
    }


# -- 1. FrozenBatchNorm2d: its buffers are read in a traced-through forward -------------------------


class FrozenBN(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.c, self.bn, self.d = nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.bn.weight.uniform_(0.5, 1.5)
        self.bn.bias.normal_()
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.d(torch.relu(self.bn(self.c(x))))


def test_frozen_batch_norm_buffers_are_sliced_in_the_module():
    torch.manual_seed(0)
    model, x = FrozenBN().eval(), torch.randn(2, 3, 8, 8)
    masked, shrunk = prune(model, (x,))
    assert type(masked) is FrozenBN and type(shrunk) is FrozenBN
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(shrunk.bn, name).shape == (4,), name
    assert shrunk.c.out_channels == 4 and shrunk.d.in_channels == 4
    torch.testing.assert_close(run(shrunk, (x,)), run(masked, (x,)))
    assert_exact(masked, shrunk, (x,))


class BufferDividesMasked(nn.Module):
    """A parameter (maskable) under rsqrt: a masked entry would be inf, so it is read whole."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.v = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.d(self.c(x) * self.v.reshape(1, -1, 1, 1).rsqrt())


def test_rsqrt_of_a_parameter_freezes_instead_of_dividing_by_a_mask():
    deps = gp.analyze(BufferDividesMasked().eval(), (torch.randn(1, 3, 4, 4),))
    assert not deps.groups  # c's channels meet 1/sqrt(v) read whole, which cannot be sliced with them
    assert any(f.site.node == "mul" and f.site.kind == "conflict" for f in deps.frozen)


def test_resnet_fpn_backbone_lands_in_its_own_class_and_prunes_every_inner_block():
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone

    torch.manual_seed(0)
    model = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5).eval()
    x = torch.randn(1, 3, 32, 32)
    masked, shrunk = prune(model, (x,))
    assert type(masked) is BackboneWithFPN and type(shrunk) is BackboneWithFPN
    assert params(shrunk) < 0.35 * params(model)
    # FrozenBatchNorm2d's buffers went with their convolution's channels
    assert shrunk.body.bn1.weight.shape == shrunk.body.bn1.running_var.shape == (32,)
    assert shrunk.body.layer4[1].bn2.running_mean.shape == (256,)
    # the top-down adds tie the inner blocks together; the shape read for the upsampling freezes none of them
    assert set(out_channels(shrunk, "fpn.inner_blocks").values()) == {128}
    assert set(out_channels(shrunk, "fpn.layer_blocks").values()) == {256}  # the outputs keep their width
    torch.testing.assert_close(run(shrunk, (x,)), run(masked, (x,)))


# -- 2. sizes read off tensors --------------------------------------------------------------------


class PadThenResize(nn.Module):
    """Zero padding makes the rows hold channels and no channels: reading the spatial size of the
    padded map must not freeze its channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.pad(self.c1(x), (1, 1, 1, 1))
        size = y.shape[-2:]
        z = F.avg_pool2d(self.c2(y), 2)
        return self.c3(F.interpolate(z, size=size, mode="nearest"))


def test_reading_spatial_sizes_freezes_no_channels():
    torch.manual_seed(0)
    model, x = PadThenResize().eval(), torch.randn(2, 3, 16, 16)
    deps = gp.analyze(model, (x,))
    assert {g.key for g in deps.groups} == {"c1", "c2"}
    assert deps.frozen_units == 0
    masked, shrunk = prune(model, (x,))
    assert type(shrunk) is PadThenResize
    assert shrunk.c1.out_channels == 4 and shrunk.c2.out_channels == 4
    assert_exact(masked, shrunk, (x,))


class ChannelCountInArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(x)
        return self.d(y) * (1.0 / y.shape[1])  # the channel count enters the result


class ChannelCountInReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8 * 16, 4)

    def forward(self, x):
        y = self.c(x)
        b, c, h, w = y.shape
        return self.fc(y.reshape(b, c * h * w))


def test_reading_the_channel_count_still_freezes_or_is_followed():
    x = torch.randn(2, 3, 4, 4)
    deps = gp.analyze(ChannelCountInArithmetic().eval(), (x,))
    assert not deps.groups
    assert any(f.site.kind == "size" for f in deps.frozen)
    torch.manual_seed(0)
    model = ChannelCountInReshape().eval()
    masked, shrunk = prune(model, (x,))
    assert shrunk.c.out_channels == 4 and shrunk.fc.in_features == 4 * 16
    assert_exact(masked, shrunk, (x,))


def test_deeplabv3_aspp_pooling_and_lraspp_prune():
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    deps = gp.analyze(deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None).eval(), (x,))
    assert deps.frozen_units == 0  # only the 21 classes at the output are kept
    keys = {g.key for g in deps.groups}
    assert {"classifier.0.convs.4.1", "classifier.0.project.0"} <= keys  # ASPP pooling, read with x.shape[-2:]
    deps = gp.analyze(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval(), (x,))
    assert deps.frozen_units == 0
    assert "classifier.cbr.0" in {g.key for g in deps.groups}  # interpolated to the low branch's size


# -- 3. functions that fill in their list arguments -----------------------------------------------


def _clip_window(window: list, size: list) -> list:
    for i in range(len(window)):  # writes into its argument, as torchvision's video Swin does
        if size[i] < window[i]:
            window[i] = size[i]
    return window


fx.wrap("_clip_window")


class MutatesItsList(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        window = _clip_window([4, 4], [x.shape[2], x.shape[3]])
        return self.d(F.avg_pool2d(torch.relu(self.c(x)), window))


def test_functions_that_mutate_their_list_arguments_run_in_the_analysis():
    torch.manual_seed(0)
    model, x = MutatesItsList().eval(), torch.randn(2, 3, 3, 8)
    masked, shrunk = prune(model, (x,))
    assert type(shrunk) is MutatesItsList and shrunk.c.out_channels == 4
    assert_exact(masked, shrunk, (x,))


# -- 4. RAFT: torch.export at batch 2 specialises away from batch 1, the static export is used ------


@pytest.mark.slow  # ~20 s: torch.export twice (the batch-2 dynamic graph is specialised away from batch 1)
def test_raft_small_prunes_exactly():
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    model = raft_small(weights=None).eval()
    # RAFT needs 128x128 at least (its correlation pyramid halves the 1/8 feature map three times)
    inputs = {"image1": torch.randn(1, 3, 128, 128), "image2": torch.randn(1, 3, 128, 128), "num_flow_updates": 1}
    masked, shrunk = prune(model, inputs)
    assert type(masked) is type(model)
    # the shrunk graph may not land: the correlation divides by sqrt(channels), a literal in the export
    assert params(shrunk) < 0.65 * params(model)
    for encoder in ("feature_encoder", "context_encoder"):
        assert shrunk.get_parameter(f"{encoder}.convnormrelu.0.weight").shape[0] == 32 // 2
        assert shrunk.get_parameter(f"{encoder}.layer3.0.convnormrelu3.0.weight").shape[0] == 96 // 2
    torch.testing.assert_close(run(shrunk, inputs), run(masked, inputs))
