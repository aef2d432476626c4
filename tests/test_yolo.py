"""Ultralytics YOLOv8n and YOLO11n, built from their yaml (random weights, nothing downloaded), prune
whole with no hints: backbone, neck and the Detect head's hidden convs lose channels, the head's
box-distribution and class convs keep theirs, the result lands in the user's DetectionModel, and
masked and shrunk models compute the same detections.

Ultralytics (AGPL) is only a test dependency (the `test` and `yolo` extras); the library never
imports it."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")  # no DNS probe at import
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="graphprune-yolo-"))  # settings.json goes here

pytest.importorskip("ultralytics")
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.passes import ChannelMask, L2Score, Shrink  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module", params=["yolov8n.yaml", "yolo11n.yaml"])
def yolo(request):
    torch.manual_seed(0)
    model = DetectionModel(request.param, verbose=False).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=(x,))
    shrunk = gp.compile(masked, [Shrink()], example_inputs=(x,))
    return model, masked, shrunk, x


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _detections(out):
    """Eval output of Detect: (decoded boxes+classes, {"boxes", "scores", "feats"})."""
    y, raw = out
    return y, raw["boxes"], raw["scores"]


def test_lands_in_the_users_class_and_the_caller_is_untouched(yolo):
    model, masked, shrunk, x = yolo
    assert type(masked) is DetectionModel and type(shrunk) is DetectionModel
    assert shrunk is not model and model.model[0].conv.out_channels == 16
    assert shrunk.model[0].conv.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(shrunk.predict(x)[0], shrunk(x)[0])  # its own methods work


def test_head_keeps_its_outputs_and_loses_hidden_channels(yolo):
    model, _, shrunk, _ = yolo
    dense, head = model.model[-1], shrunk.model[-1]
    for i in range(head.nl):
        assert head.cv2[i][-1].out_channels == 4 * head.reg_max  # box distribution
        assert head.cv3[i][-1].out_channels == head.nc  # classes
        for branch in ("cv2", "cv3"):
            before, after = _convs(getattr(dense, branch)[i][0]), _convs(getattr(head, branch)[i][0])
            assert after[-1].out_channels == before[-1].out_channels // 2, (branch, i)
    assert head.dfl.conv.in_channels == head.reg_max


def test_backbone_and_neck_lose_channels(yolo):
    model, _, shrunk, _ = yolo
    detect_index = len(model.model) - 1
    feeds = set(model.model[-1].f)  # the neck outputs Detect returns as preds["feats"]: model outputs
    for index in range(detect_index):
        outputs = model.model[index].cv2.conv if index in feeds else None  # C2f / C3k2's last conv
        for a, b in zip(_convs(model.model[index]), _convs(shrunk.model[index])):
            if a is outputs:
                assert b.out_channels == a.out_channels  # returned by the model: kept
            else:
                assert b.out_channels == a.out_channels // 2, (index, b)


def test_masked_and_shrunk_detect_the_same(yolo):
    _, masked, shrunk, x = yolo
    other = torch.randn(2, 3, 2 * SIZE, 2 * SIZE)  # another batch and image size
    with torch.no_grad():
        for inputs in (x, other):
            for a, b in zip(_detections(masked(inputs)), _detections(shrunk(inputs))):
                torch.testing.assert_close(b, a)
        torch.testing.assert_close(shrunk(x)[0], shrunk(x)[0], rtol=0, atol=0)  # deterministic


def test_training_mode_heads_agree(yolo):
    _, masked, shrunk, _ = yolo
    masked, shrunk = copy.deepcopy(masked).train(), copy.deepcopy(shrunk).train()  # BN updates its statistics
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = masked(x), shrunk(x)
    assert set(a) == {"boxes", "scores", "feats"}
    for key in ("boxes", "scores"):  # batch statistics: float rounding differs by reduction order
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)


def test_summary_reports_pruning_and_only_output_freezes(yolo):
    model, _, shrunk, x = yolo
    report = gp.summary(model, shrunk, (x,))
    assert report.state == "shrunk"
    assert report.params[1] < 0.35 * report.params[0] and report.macs[1] < 0.35 * report.macs[0]
    assert report.groups and all(kept == n // 2 for _, n, kept in report.groups)
    kinds = {f.site.kind for f in report.frozen}
    assert "no_rule" not in kinds, [f.site for f in report.frozen if f.site.kind == "no_rule"]


def test_where_yolo11s_source_cannot_hold_the_result_the_summary_says_which_line():
    """YOLO11's attention reads its width off its input and C2PSA splits with (self.c, self.c): an
    exported graph records neither, so with global ranking (widths that differ there) the result
    is the graph (Shrink verified it against the masked graph) and the note names the line."""
    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", verbose=False).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    shrunk = gp.compile(model, [L2Score(), ChannelMask(0.5, scope="global"), Shrink()], example_inputs=(x,))
    assert isinstance(shrunk, torch.fx.GraphModule)
    note = " ".join(gp.summary(model, shrunk, (x,)).notes)
    assert "DetectionModel's own forward does not compute the pruned graph's result" in note
    assert "ultralytics/nn/modules/block.py:" in note
