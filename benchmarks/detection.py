"""Whole-model pruning of detection, segmentation, video and optical-flow models, zero hints.

For each model (random init, `weights=None`): graphprune's L2 magnitude + ChannelMask(ratio) +
Shrink on the whole model, the params and MACs after, what stayed untraced and why, the time,
how far the masked and the shrunk model's own outputs differ (float32; compile() itself verifies
the tensors before post-processing), and
whether the pruned model exports to ONNX where the dense one does; Torch-Pruning 1.6's MetaPruner
on the same model beside it (no ignored layers: zero hints for both), with what it did to the
output format.

    python benchmarks/detection.py [--ratio 0.5] [--models faster_rcnn_mbv3,...] [--onnx]
        [--json benchmarks/results/detection.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import tempfile
import time
import traceback
import warnings

import torch
import torchvision
from torch import nn
from torch.utils import _pytree as pytree
from torchvision.models import detection as D
from torchvision.models import optical_flow, segmentation, video

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink

SIDE = 256  # detectors resize their inputs to this


def _det(builder, **kw):
    def make():
        m = builder(weights=None, weights_backbone=None, num_classes=5, **kw)
        return m, ([torch.rand(3, SIDE, SIDE)],)

    return make


def _ssd(builder):
    def make():
        m = builder(weights=None, weights_backbone=None, num_classes=5)
        return m, ([torch.rand(3, SIDE, SIDE)],)

    return make


def _seg(builder):
    return lambda: (builder(weights=None, weights_backbone=None, num_classes=5), (torch.randn(1, 3, 224, 224),))


def _video(builder, frames=8, side=112):
    return lambda: (builder(), (torch.randn(1, 3, frames, side, side),))


def _raft():
    m = optical_flow.raft_small(weights=None)
    return m, (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))


def _yolo(cfg):
    def make():
        from ultralytics.nn.tasks import DetectionModel  # AGPL: benchmarks only

        return DetectionModel(cfg, verbose=False), (torch.rand(1, 3, 320, 320),)

    return make


SIZE = {"min_size": SIDE, "max_size": SIDE}
MODELS = {
    "faster_rcnn_mbv3": _det(D.fasterrcnn_mobilenet_v3_large_fpn, **SIZE),
    "faster_rcnn_r50": _det(D.fasterrcnn_resnet50_fpn, **SIZE),
    "retinanet_r50": _det(D.retinanet_resnet50_fpn, **SIZE),
    "fcos_r50": _det(D.fcos_resnet50_fpn, **SIZE),
    "ssd300_vgg16": _ssd(D.ssd300_vgg16),
    "ssdlite320_mbv3": _ssd(D.ssdlite320_mobilenet_v3_large),
    "mask_rcnn_r50": _det(D.maskrcnn_resnet50_fpn, **SIZE),
    "keypoint_rcnn_r50": lambda: (
        D.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SIZE),
        ([torch.rand(3, SIDE, SIDE)],),
    ),
    "deeplabv3_mbv3": _seg(segmentation.deeplabv3_mobilenet_v3_large),
    "lraspp_mbv3": _seg(segmentation.lraspp_mobilenet_v3_large),
    "fcn_r50": _seg(segmentation.fcn_resnet50),
    "r3d_18": _video(video.r3d_18),
    "mc3_18": _video(video.mc3_18),
    "r2plus1d_18": _video(video.r2plus1d_18),
    "s3d": _video(video.s3d, frames=16, side=224),  # (its last pooling needs 224)
    "swin3d_t": _video(video.swin3d_t, frames=8, side=128),
    "mvit_v2_s": _video(video.mvit_v2_s, frames=16, side=224),
    "raft_small": _raft,
    "yolov8n": _yolo("yolov8n.yaml"),
    "yolo11n": _yolo("yolo11n.yaml"),
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _max_diff(a, b) -> float | str:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return "different structure"
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return f"shape {tuple(y.shape)} vs {tuple(x.shape)}"
            if x.numel():
                worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def _untraced(model: nn.Module) -> str:
    for r in getattr(model, "graphprune_report", []):
        if r.details.get("untraced"):
            return "; ".join(
                f"{p or '(root)'}: {why.split(' (at ')[0][:70]}" for p, why in r.details["untraced"].items()
            )
    return ""


def run_graphprune(name: str, ratio: float, onnx: bool) -> dict:
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model = model.eval()
    row = {"model": name, "params": count(model)}
    try:
        start = time.perf_counter()
        masked = gp.compile(model, [L2Score(), ChannelMask(ratio)], example_inputs=x)
        shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
        row["seconds"] = time.perf_counter() - start
        s = gp.summary(model, shrunk, x)
        row.update(
            returned=type(shrunk).__name__,
            params_ratio=s.params[1] / s.params[0],
            macs_ratio=s.macs[1] / s.macs[0] if s.macs[0] else None,
            untraced=_untraced(shrunk),
            frozen_inside=s.frozen_units,
        )
        with torch.no_grad():  # (compile verified the regions' outputs; this is the model's own output)
            row["max_abs_diff"] = _max_diff(masked(*x), shrunk(*x))
        if onnx:
            row["onnx"] = _onnx(model, shrunk, x)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        logging.debug("graphprune failed on %s\n%s", name, traceback.format_exc())
    return row


def _onnx(dense: nn.Module, pruned: nn.Module, x) -> str:
    from graphprune.backends.onnx import export

    x = pytree.tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export(dense.float(), os.path.join(tmp, "dense.onnx"), example_inputs=x, dynamic_batch=False)
        except Exception as exc:
            return f"dense does not export ({type(exc).__name__})"
        try:
            export(pruned.float(), os.path.join(tmp, "pruned.onnx"), example_inputs=x, dynamic_batch=False)
            return "exports, verified in ONNX Runtime"
        except Exception as exc:
            return f"pruned fails: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


class _TimedOut(Exception):
    pass


def _alarm(signum, frame):
    raise _TimedOut


def run_torch_pruning(name: str, ratio: float, limit: int) -> dict:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        return _torch_pruning(name, ratio)
    except _TimedOut:
        return {"tp_error": f"no result within {limit} s"}
    finally:
        signal.alarm(0)


def _torch_pruning(name: str, ratio: float) -> dict:
    import torch_pruning as tp

    torch.manual_seed(0)
    model, x = MODELS[name]()
    model = model.eval()
    row = {}
    try:
        with torch.no_grad():
            before = model(*x)
        dense = count(model)
        start = time.perf_counter()
        inputs = x[0] if len(x) == 1 else list(x)
        pruner = tp.pruner.MetaPruner(
            model, inputs, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio
        )
        pruner.step()
        row["tp_seconds"] = time.perf_counter() - start
        row["tp_params_ratio"] = count(model) / dense
        with torch.no_grad():
            after = model(*x)
        la, lb = pytree.tree_leaves(before), pytree.tree_leaves(after)
        same = len(la) == len(lb) and all(
            (a.shape[1:] == b.shape[1:]) if isinstance(a, torch.Tensor) and a.ndim > 1 else True for a, b in zip(la, lb)
        )
        row["tp_outputs"] = "same format" if same else "output format changed"
    except _TimedOut:
        raise
    except Exception as exc:
        row["tp_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return row


def table(rows: list[dict]) -> str:
    head = "| model | returned | params after | MACs after | time (s) | max abs diff, outputs masked vs shrunk | untraced | ONNX | Torch-Pruning: params after, time, outputs |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            gp_cells = [r["error"], "", "", "", "", "", ""]
        else:
            macs = f"{r['macs_ratio']:.3f}" if r.get("macs_ratio") else "-"
            diff = r["max_abs_diff"]
            gp_cells = [
                r["returned"],
                f"{r['params_ratio']:.3f}",
                macs,
                f"{r['seconds']:.1f}",
                f"{diff:.1e}" if isinstance(diff, float) else diff,
                r["untraced"] or "-",
                r.get("onnx", "not run"),
            ]
        tp_cell = (
            r["tp_error"]
            if "tp_error" in r
            else f"{r['tp_params_ratio']:.3f}, {r['tp_seconds']:.1f} s, {r['tp_outputs']}"
            if "tp_params_ratio" in r
            else "not run"
        )
        lines.append("| " + " | ".join([r["model"], *gp_cells, tp_cell]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--onnx", action="store_true", help="also export dense and pruned to ONNX (slow)")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--tp-limit", type=int, default=120, help="seconds Torch-Pruning gets per model")
    parser.add_argument("--no-gp", action="store_true", help="skip graphprune (Torch-Pruning only)")
    parser.add_argument("--merge", help="a JSON file of rows from an earlier run: its columns are kept")
    parser.add_argument("--json", help="write the rows here (and the table beside it as .md)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    earlier = {r["model"]: r for r in json.load(open(args.merge))} if args.merge else {}
    rows = []
    for name in args.models.split(","):
        try:
            __import__("ultralytics") if name.startswith("yolo") else None
        except ImportError:
            continue
        row = dict(earlier.get(name, {"model": name}))
        if not args.no_gp:  # (graphprune's columns replaced, Torch-Pruning's kept)
            row = {
                **{k: v for k, v in row.items() if k.startswith("tp_")},
                **run_graphprune(name, args.ratio, args.onnx),
            }
        if not args.no_tp:
            row = {k: v for k, v in row.items() if not k.startswith("tp_")}
            row.update(run_torch_pruning(name, args.ratio, args.tp_limit))
        print(json.dumps(row), flush=True)
        rows.append(row)
    text = (
        f"Whole-model pruning, ratio {args.ratio}, L2 magnitude, random init, zero hints "
        f"(torch {torch.__version__}, torchvision {torchvision.__version__}; {platform.machine()}, "
        f"{torch.get_num_threads()} threads, shared VM; times are single runs)\n\n" + table(rows) + "\n"
    )
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
