"""Criterion x ratio on a CNN really trained on scikit-learn's digits: accuracy after one-shot
pruning, after 3 epochs of fine-tuning (masks on), params and MACs.  Prints a markdown table.

    python benchmarks/digits_criteria.py [--ratios 0.3,0.5,0.7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.passes import (  # noqa: E402
    ActivationScore,
    APoZScore,
    BNScaleScore,
    ChannelMask,
    FPGMScore,
    L1Score,
    L2Score,
    RandomScore,
    Shrink,
    TaylorScore,
    WandaScore,
)
from tests import digits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    tx, ty, vx, vy = digits.load()
    dense = digits.train(digits.DigitsCNN(), tx, ty, epochs=8)
    dense_acc = digits.accuracy(dense, vx, vy)
    x = (vx[:8],)
    calib = digits.calibration(tx, ty)
    criteria = {
        "random": lambda: RandomScore(0),
        "l1": L1Score,
        "l2": L2Score,
        "bn_scale": BNScaleScore,
        "fpgm": FPGMScore,
        "taylor": lambda: TaylorScore(calib, F.cross_entropy),
        "activation": lambda: ActivationScore(calib),
        "apoz": lambda: APoZScore(calib),
        "wanda": lambda: WandaScore(calib),
    }
    rows = []
    for name, make in criteria.items():
        for ratio in (float(r) for r in args.ratios.split(",")):
            start = time.perf_counter()
            masked = gp.compile(dense, [make(), ChannelMask(ratio)], example_inputs=x)
            one_shot = digits.accuracy(masked, vx, vy)
            digits.train(masked, tx, ty, epochs=3, lr=1e-3)
            pruned = gp.compile(masked, [Shrink()], example_inputs=x)
            rows.append(
                {
                    "criterion": name,
                    "ratio": ratio,
                    "one_shot": one_shot,
                    "fine_tuned": digits.accuracy(pruned, vx, vy),
                    "params": gp.count_params(pruned) / gp.count_params(dense),
                    "macs": gp.count_macs(pruned, x) / gp.count_macs(dense, x),
                    "seconds": time.perf_counter() - start,
                }
            )
    print(
        f"DigitsCNN trained 8 epochs on scikit-learn digits (1,397 train / 400 test images); dense accuracy {dense_acc:.3f}; "
        "fine-tune: 3 epochs Adam 1e-3 with masks on, then Shrink\n"
    )
    print("| criterion | ratio | accuracy one-shot | accuracy fine-tuned | params ratio | MACs ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['criterion']} | {r['ratio']:g} | {r['one_shot']:.3f} | {r['fine_tuned']:.3f} | {r['params']:.3f} | {r['macs']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_accuracy": dense_acc, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
