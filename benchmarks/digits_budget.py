"""Pruning to a MACs budget on a CNN really trained on scikit-learn's digits: how the units are
spread matters more as the budget tightens.

For each budget (MACs of the pruned model / dense), the same trained DigitsCNN is pruned with
L2 scores four ways, each meeting the budget with ChannelMask(target={"macs": b}):
  uniform      one ratio for every group (scope="local")
  global       units ranked across groups by their normalised scores (scope="global")
  sensitivity  per-group ratios from gp.sensitivity (accuracy drop of each group alone), scaled
               by bisection over the allowed drop until the budget is met
  lasso+global the dense model trained 3 more epochs with gp.GroupLasso, then "global"
then fine-tuned 1 epoch with the masks on and shrunk.  Accuracy on the 400 held-out images.

    python benchmarks/digits_budget.py [--budgets 0.3,0.15,0.08] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.passes import ChannelMask, L2Score, Shrink  # noqa: E402
from tests import digits  # noqa: E402


def _lasso_trained(dense, tx, ty, x, lam: float = 2e-3, epochs: int = 3):
    model = copy.deepcopy(dense)
    return digits.train(
        model, tx, ty, epochs=epochs, lr=1e-3, seed=1, penalty=gp.GroupLasso(model, lam, example_inputs=x)
    )


def _by_sensitivity(dense, sens, budget: float, x):
    """The per-group ratios of `sens.ratios_for(drop)` for the smallest drop that meets the budget."""
    dense_macs = gp.count_macs(dense, x)
    low, high, best = 0.0, 1.0, None
    for _ in range(12):
        drop = (low + high) / 2
        ratios = sens.ratios_for(drop)
        masked = gp.compile(dense, [L2Score(), ChannelMask(ratios or {"*": 0.0})], example_inputs=x)
        macs = gp.count_macs(gp.compile(masked, [Shrink()], example_inputs=x), x) / dense_macs
        if macs <= budget + 0.01:
            best, high = masked, drop
        else:
            low = drop
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", default="0.3,0.15,0.08")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    tx, ty, vx, vy = digits.load()
    dense = digits.train(digits.DigitsCNN(), tx, ty, epochs=8)
    dense_acc = digits.accuracy(dense, vx, vy)
    x = (vx[:8],)
    lasso = _lasso_trained(dense, tx, ty, x)
    sens = gp.sensitivity(
        dense, lambda m: digits.accuracy(m, vx, vy), example_inputs=x, ratios=(0.2, 0.4, 0.6, 0.8, 0.9)
    )
    dense_macs = gp.count_macs(dense, x)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        ways = {
            "uniform": lambda: gp.compile(dense, [L2Score(), ChannelMask(target={"macs": budget})], example_inputs=x),
            "global": lambda: gp.compile(
                dense, [L2Score(), ChannelMask(target={"macs": budget}, scope="global")], example_inputs=x
            ),
            "sensitivity": lambda: _by_sensitivity(dense, sens, budget, x),
            "lasso+global": lambda: gp.compile(
                lasso, [L2Score(), ChannelMask(target={"macs": budget}, scope="global")], example_inputs=x
            ),
        }
        for name, make in ways.items():
            masked = make()
            if masked is None:
                rows.append({"budget": budget, "way": name, "error": "budget not reached"})
                continue
            one_shot = digits.accuracy(masked, vx, vy)
            digits.train(masked, tx, ty, epochs=1, lr=1e-3)
            pruned = gp.compile(masked, [Shrink()], example_inputs=x)
            rows.append(
                {
                    "budget": budget,
                    "way": name,
                    "macs": gp.count_macs(pruned, x) / dense_macs,
                    "params": gp.count_params(pruned) / gp.count_params(dense),
                    "one_shot": one_shot,
                    "fine_tuned": digits.accuracy(pruned, vx, vy),
                }
            )
            print(rows[-1], flush=True)
    print(
        f"\nDigitsCNN trained 8 epochs on scikit-learn digits (1,397 train / 400 test images); dense accuracy "
        f"{dense_acc:.3f}; GroupLasso model: 3 more epochs with lam 2e-3 (accuracy {digits.accuracy(lasso, vx, vy):.3f}); "
        "fine-tune: 1 epoch Adam 1e-3 with masks on, then Shrink\n"
    )
    print("| MACs budget | way | MACs ratio | params ratio | accuracy one-shot | accuracy fine-tuned |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['budget']:g} | {r['way']} | - | - | - | {r['error']} |")
        else:
            print(
                f"| {r['budget']:g} | {r['way']} | {r['macs']:.3f} | {r['params']:.3f} | {r['one_shot']:.3f} | {r['fine_tuned']:.3f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_accuracy": dense_acc, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
