"""Ultralytics YOLO detectors pruned whole with no hints (issue 16).

For YOLOv8n and YOLO11n built from their yaml (random init, nothing downloaded; needs the `yolo`
extra: Ultralytics is AGPL and only used here and in tests), at one image size:

    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)

per model: params and MACs before/after (graphprune's cost analysis), seconds for masking and for
shrinking, whether the result is still a DetectionModel, the largest |shrunk - masked| over the
decoded detections and the raw box/class tensors (on x and on a batch of 2 at twice the size),
and the frozen channels that do not reach a model output.

    python benchmarks/yolo.py [--size 640] [--models yolov8n,yolo11n]

Writes benchmarks/results/yolo.json and yolo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

import graphprune as gp  # noqa: E402
from graphprune.passes import ChannelMask, L2Score, Shrink  # noqa: E402


def _heads(out) -> list[torch.Tensor]:
    y, raw = out
    return [y, raw["boxes"], raw["scores"]]


def run(name: str, size: int) -> dict:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(f"{name}.yaml", verbose=False).eval()
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=(x,))
        t1 = time.perf_counter()
        shrunk = gp.compile(masked, [Shrink()], example_inputs=(x,))
        t2 = time.perf_counter()
        report = gp.summary(model, shrunk, (x,))
    err = 0.0
    with torch.no_grad():
        for inputs in (x, torch.randn(2, 3, 2 * size, 2 * size)):
            for a, b in zip(_heads(masked(inputs)), _heads(shrunk(inputs))):
                err = max(err, (a - b).abs().max().item())
    inside = sorted(
        {f"{f.site.location or f.site.node}: {f.site.reason}" for f in report.frozen if f.site.kind != "output"}
    )
    return {
        "model": name,
        "size": size,
        "params": list(report.params),
        "macs": list(report.macs),
        "mask_s": round(t1 - t0, 2),
        "shrink_s": round(t2 - t1, 2),
        "class": type(shrunk).__name__,
        "max_abs_diff": err,
        "groups": len(report.groups),
        "frozen_inside": inside,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--models", default="yolov8n,yolo11n")
    args = parser.parse_args()
    rows = [run(name, args.size) for name in args.models.split(",")]
    lines = [
        "| model | size | params before → after | MACs before → after | mask s | shrink s | class | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (p0, p1), (m0, m1) = r["params"], r["macs"]
        lines.append(
            f"| {r['model']} | {r['size']} | {p0:,} → {p1:,} ({p1 / p0:.3f}) | {m0:,} → {m1:,} ({m1 / m0:.3f}) "
            f"| {r['mask_s']} | {r['shrink_s']} | {r['class']} | {r['max_abs_diff']:.2e} |"
        )
    table = "\n".join(lines)
    print(table)
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "yolo.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out, "yolo.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
