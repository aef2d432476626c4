"""Tracing in parts: a module that cannot be traced stays a call in the middle of a CNN, and models
whose own forward cannot be traced (detectors) are pruned whole through the parts that can."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests.helpers import assert_same_state, run, state


def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class Gate(nn.Module):
    """Branches on a value: neither torch.fx nor torch.export can trace it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.mean() > 0 else -y


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv2 = block(3, 16), block(16, 32)
        self.gate = Gate(32)
        self.conv3, self.conv4 = block(32, 32), block(32, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.conv4(self.conv3(self.gate(self.conv2(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def _bn_stats(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_data_dependent_block_in_a_cnn_stays_a_call_and_the_rest_prunes():
    model = _bn_stats(GatedNet())
    x = (torch.randn(2, 3, 16, 16),)
    before = state(model)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    out = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_same_state(before, model)
    assert type(out) is GatedNet
    assert out.stem[0].out_channels == 8 and out.conv3[0].out_channels == 16 and out.fc.in_features == 16
    assert out.conv2[0].out_channels == 32 and out.gate.conv.out_channels == 32  # the call's boundary stays
    torch.testing.assert_close(run(out, x), run(masked, x))
    text = str(gp.summary(model, out, x))
    assert "gate" in text and "y.mean() > 0" in text and "runs untraced" in text


class ToyDetector(nn.Module):
    """A detector's shape: a list of images in, a loop and value-dependent selection out."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(block(3, 16, 2), block(16, 32, 2))
        self.head = ToyHead()

    def forward(self, images: list[torch.Tensor]):
        batch = torch.stack([F.interpolate(img[None], size=(32, 32))[0] for img in images])
        scores, boxes = self.head(self.backbone(batch))
        detections = []
        for s, b in zip(scores, boxes):
            s = s.flatten(1).amax(0)
            keep = s > s.median() if float(s.max()) > 0 else s < s.median()  # (torch.export cannot either)
            detections.append({"scores": s[keep], "boxes": b.flatten(1).t()[keep]})
        return detections


class ToyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Sequential(block(32, 32), nn.Conv2d(32, 3, 1))
        self.box = nn.Sequential(block(32, 32), nn.Conv2d(32, 4, 1))

    def forward(self, x):
        return self.cls(x), self.box(x)


def _assert_same_detections(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            torch.testing.assert_close(da[k], db[k], atol=1e-4, rtol=1e-4)


def test_model_whose_forward_does_not_trace_prunes_through_its_regions():
    model = _bn_stats(ToyDetector())
    x = ([torch.rand(3, 40, 48), torch.rand(3, 36, 30)],)
    before = state(model)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    out = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_same_state(before, model)
    assert type(out) is ToyDetector
    # backbone -> head is joined through the glue (it hands the tensor over unchanged): both prune
    assert out.backbone[0][0].out_channels == 8 and out.backbone[1][0].out_channels == 16
    assert out.head.cls[0][0].in_channels == 16 and out.head.box[0][0].out_channels == 16
    assert out.head.cls[1].out_channels == 3 and out.head.box[1].out_channels == 4  # read by the glue
    _assert_same_detections(run(masked, x), run(out, x))
    text = str(gp.summary(model, out, x))
    assert "traced in regions" in text and "for img in images" in text and "zip(scores, boxes)" in text


def test_graph_of_regions_is_not_returned_as_a_graph():
    x = ([torch.rand(3, 32, 32)],)
    with pytest.raises(gp.GraphPruneError, match="traced in regions"):
        gp.compile(_bn_stats(ToyDetector()), [L2Score(), ChannelMask(0.5)], example_inputs=x, output="graph")


# -- torchvision detectors, random init, zero hints ---------------------------------------------


def _resnet18_fpn():
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    return _resnet_fpn_extractor(resnet18(), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))


def _faster_rcnn():
    from torchvision.models import detection

    m = detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=128, box_score_thresh=0.0
    )
    convs = ["backbone.fpn.inner_blocks.1.0", "backbone.fpn.layer_blocks.1.0", "rpn.head.conv.0.0"]
    return m, ["rpn.head", "roi_heads.box_predictor"], convs  # (the FPN's outputs prune through the RoI pooling)


def _retinanet():
    from torchvision.models.detection import RetinaNet

    m = RetinaNet(_resnet18_fpn(), num_classes=5, min_size=128, max_size=128, score_thresh=0.0)
    convs = ["backbone.fpn.layer_blocks.2.0", "head.classification_head.conv.0.0", "head.regression_head.conv.3.0"]
    return m, ["head"], convs


def _fcos():
    from torchvision.models.detection import FCOS

    m = FCOS(_resnet18_fpn(), num_classes=5, min_size=128, max_size=128, score_thresh=0.0)
    return m, ["head"], ["backbone.fpn.layer_blocks.2.0", "head.classification_head.conv.0"]


def _ssdlite():
    from torchvision.models import detection

    m = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5, score_thresh=0.0)
    m.transform.min_size, m.transform.max_size, m.transform.fixed_size = (128,), 128, (128, 128)  # small and fast
    return m, ["head"], ["backbone.extra.0.0.0", "head.classification_head.module_list.4.0.0"]


@pytest.mark.parametrize("build", [_faster_rcnn, _retinanet, _fcos, _ssdlite], ids=lambda b: b.__name__[1:])
def test_torchvision_detector_prunes_whole_with_zero_hints(build):
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, heads, convs = build()
    model = _bn_stats(model).double()  # in float64, near-equal scores of a random model keep their order
    x = ([torch.rand(3, 128, 128, dtype=torch.float64)],)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    out = gp.compile(masked, [Shrink()], example_inputs=x)
    assert type(out) is type(model)
    width = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name in convs:  # FPN and head convolutions lose channels
        assert out.get_submodule(name).out_channels < width[name], name
    assert sum(p.numel() for p in out.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())

    def head_outputs(m):  # the tensors before post-processing
        seen = []
        hooks = [m.get_submodule(h).register_forward_hook(lambda mod, a, o: seen.append(o)) for h in heads]
        detections = run(m, x)
        for h in hooks:
            h.remove()
        return seen, detections

    (head_masked, det_masked), (head_out, det_out) = head_outputs(masked), head_outputs(out)
    torch.testing.assert_close(head_out, head_masked)
    assert sum(len(d["boxes"]) for d in det_out) > 0
    _assert_same_detections(det_masked, det_out)
    assert "traced in regions" in str(gp.summary(model, out, x))


def test_video_resnet_prunes_exactly():
    from torchvision.models.video import mc3_18

    torch.manual_seed(0)
    model = _bn_stats(mc3_18()).double()
    x = (torch.randn(1, 3, 4, 32, 32, dtype=torch.float64),)
    out = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    assert type(out) is type(model)
    assert out.layer1[0].conv1[0].out_channels == 32 and out.layer4[1].conv1[0].out_channels == 256
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    torch.testing.assert_close(run(out, x), run(masked, x))


def test_graph_of_regions_refuses_calibration_on_other_inputs():
    from graphprune.passes import ActivationScore

    model = _bn_stats(ToyDetector())
    x = ([torch.rand(3, 32, 32)],)
    other = [([torch.rand(3, 32, 32)],)]  # the regions' graph holds values of x only
    before = state(model)
    with pytest.raises(gp.GraphPruneError, match="traced in regions"):
        gp.compile(model, [ActivationScore(other), ChannelMask(0.5)], example_inputs=x)
    assert_same_state(before, model)
    out = gp.compile(model, [ActivationScore([x]), ChannelMask(0.5), Shrink()], example_inputs=x)
    assert out.backbone[0][0].out_channels == 8
