"""Params and MACs before/after structured pruning of torchvision classifiers, and the wall time
of analysis + pruning.  Prints a markdown table; writes JSON beside it with --json.

    python benchmarks/prune_torchvision.py [--ratio 0.5] [--size 224] [--models resnet18,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torchvision

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink

sys.path.insert(0, os.path.dirname(__file__))
from zoo import MODELS, build, input_side  # noqa: E402


def run(name: str, ratio: float, size: int) -> dict:
    torch.manual_seed(0)
    model = build(name)
    side = input_side(name, size)
    x = (torch.randn(1, 3, side, side),)
    start = time.perf_counter()
    masked = gp.compile(model, [L2Score(), ChannelMask(ratio)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        err = (masked(*x) - shrunk(*x)).abs().max().item()
    s = gp.summary(model, shrunk, x)
    return {
        "model": name,
        "input": side,
        "params": s.params,
        "macs": s.macs,
        "params_ratio": s.params[1] / s.params[0],
        "macs_ratio": s.macs[1] / s.macs[0],
        "seconds": seconds,
        "max_abs_err_fp32": err,
        "groups": len(s.groups),
        "frozen_channels": s.frozen_units,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [run(n, args.ratio, args.size) for n in args.models.split(",")]
    print(
        f"graphprune {gp.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; ratio {args.ratio}, L2 scores, local scope\n"
    )
    print(
        "| model | input | params before | params after | params ratio | MACs before | MACs after | MACs ratio | frozen ch. | analysis+pruning s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['input']} | {r['params'][0]:,} | {r['params'][1]:,} | {r['params_ratio']:.3f} | "
            f"{r['macs'][0]:,} | {r['macs'][1]:,} | {r['macs_ratio']:.3f} | {r['frozen_channels']} | {r['seconds']:.2f} |"
        )
    ratios = sorted(r["macs_ratio"] for r in rows)
    print(
        f"\nmedian MACs ratio {ratios[len(ratios) // 2]:.3f}; total analysis+pruning {sum(r['seconds'] for r in rows):.1f}s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
