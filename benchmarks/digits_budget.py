"""Pruning to a MACs budget on a CNN really trained on scikit-learn's digits: how the units are
spread matters more as the budget tightens.

The training images are split once: 1,097 to train on, 300 for validation (what the allocating
ways measure); accuracy is reported on the 400 held-out test images, which nothing chooses on.
For each budget (MACs of the pruned model / dense), the same trained DigitsCNN is pruned these
ways (L2 scores), each meeting the budget:
  uniform      one ratio for every group: ChannelMask(target={"macs": b})
  uniform+3ep  uniform's masks, then 3 epochs of plain training: the extra training the two
               regularised ways below get, without a regulariser (their control)
  global       units ranked across groups by their normalised scores (scope="global")
  sensitivity  per-group ratios from gp.sensitivity (validation accuracy drop of each group alone),
               scaled by bisection over the allowed drop until the budget is met
  netadapt     gp.search_ratios: NetAdapt's greedy allocation, validation accuracy lost per MAC
               saved, one chunk (5 % of a group) at a time, no fine-tune inside the search
  bayes        gp.search_ratios(method="bayes"): 20 trials of Bayesian optimisation (optuna's GP
               sampler) of per-group weights, validation accuracy, the uniform ratio its first trial
  lasso+global the dense model trained 3 more epochs with gp.GroupLasso, then "global"
  growing-reg  a gp.Pruner with gp.GrowingReg: the units "uniform" would remove are selected and
               get an L2 penalty growing by 0.02 a step to 1 (or until their norms are all < 1e-3)
               for 3 epochs (the lasso's budget), then exactly those are masked
then fine-tuned 1 epoch with the masks on and shrunk.  Everything is repeated for each seed (the
dense model's initialisation and data order); the table gives means and [min-max].  One torch thread.

    python benchmarks/digits_budget.py [--budgets 0.3,0.15,0.08] [--seeds 0,1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.compile import REPORT_ATTR  # noqa: E402
from graphprune.passes import ChannelMask, L2Score, Shrink  # noqa: E402
from tests import digits  # noqa: E402

VALIDATION = 300
EPOCHS_REG = 3


def _lasso_trained(dense, tx, ty, x, lam: float = 2e-3, epochs: int = EPOCHS_REG):
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


def _uniform_ratio(masked) -> float:
    """The one ratio ChannelMask(target=...) found (its record)."""
    record = next(r for r in getattr(masked, REPORT_ATTR) if r.details.get("target"))
    return record.details["target"]["ratio"]


def _growing(dense, ratio: float, tx, ty, x, epochs: int = EPOCHS_REG):
    """3 epochs of a Pruner training with GrowingReg (Adam 1e-3, as the lasso), one prune at the end."""
    steps = epochs * -(-len(ty) // 64)
    reg = gp.GrowingReg(dense, ratio, example_inputs=x, delta=0.02, every=1, ceiling=1.0, threshold=1e-3)
    pruner = gp.Pruner(
        dense,
        example_inputs=x,
        target_sparsity=ratio,
        end_step=steps,
        frequency=steps,
        score=L2Score(),
        mask=lambda s: ChannelMask(s),
        regularizer=reg,
    )
    model = digits.train(
        pruner.model, tx, ty, epochs=epochs, lr=1e-3, seed=1, penalty=pruner.penalty, on_step=pruner.on_step_end
    )
    pruner.on_train_end()
    model.eval()
    bound = pruner.regularizer
    with torch.no_grad():
        largest = max(float(n.max()) for n in bound.selected_norms() if n.numel())
    masked_units = {
        k: (model.get_submodule(k).weight.flatten(1).abs().sum(1) == 0).nonzero().reshape(-1).tolist()
        for k in bound.selected
    }
    info = {
        "lam": bound.lam,
        "stopped_at": bound.history[-1][0],
        "largest_selected_norm": largest,
        "pruned_are_selected": masked_units == bound.selected,
    }
    return model, info


def _one_seed(seed: int, budgets: list[float], data) -> tuple[list[dict], dict]:
    train_x, train_y, test_x, test_y = data
    tx, ty, vx, vy = train_x[:-VALIDATION], train_y[:-VALIDATION], train_x[-VALIDATION:], train_y[-VALIDATION:]
    torch.manual_seed(seed)
    dense = digits.train(digits.DigitsCNN(), tx, ty, epochs=8, seed=seed)
    x = (vx[:8],)

    def val(m):
        return digits.accuracy(m, vx, vy)

    lasso = _lasso_trained(dense, tx, ty, x)
    facts = {
        "dense_test": digits.accuracy(dense, test_x, test_y),
        "dense_validation": val(dense),
        "lasso_test": digits.accuracy(lasso, test_x, test_y),
    }
    sens = gp.sensitivity(dense, val, example_inputs=x, ratios=(0.2, 0.4, 0.6, 0.8, 0.9), score=L2Score())
    dense_macs = gp.count_macs(dense, x)
    rows = []
    for budget in budgets:
        uniform = gp.compile(dense, [L2Score(), ChannelMask(target={"macs": budget})], example_inputs=x)
        ratio = _uniform_ratio(uniform)

        def netadapt():
            found = gp.search_ratios(dense, val, target={"macs": budget}, example_inputs=x, step=0.05, score=L2Score())
            facts[f"netadapt {budget:g}"] = {"ratios": dict(found), "validation": found.metric}
            return found.model

        def bayes():
            found = gp.search_ratios(
                dense, val, target={"macs": budget}, example_inputs=x, score=L2Score(), method="bayes", trials=20
            )
            facts[f"bayes {budget:g}"] = {"ratios": dict(found), "validation": found.metric}
            return found.model

        def growing():
            model, info = _growing(dense, ratio, tx, ty, x)
            facts[f"growing-reg {budget:g}"] = info
            return model

        def uniform_trained():  # the regularised ways' 3 epochs, spent on training the masked model
            model = copy.deepcopy(uniform)
            return digits.train(model, tx, ty, epochs=EPOCHS_REG, lr=1e-3, seed=1)

        ways = {
            "uniform": lambda: copy.deepcopy(uniform),
            "uniform+3ep": uniform_trained,
            "global": lambda: gp.compile(
                dense, [L2Score(), ChannelMask(target={"macs": budget}, scope="global")], example_inputs=x
            ),
            "sensitivity": lambda: _by_sensitivity(dense, sens, budget, x),
            "netadapt": netadapt,
            "bayes": bayes,
            "lasso+global": lambda: gp.compile(
                lasso, [L2Score(), ChannelMask(target={"macs": budget}, scope="global")], example_inputs=x
            ),
            "growing-reg": growing,
        }
        for name, make in ways.items():
            t0 = time.perf_counter()
            masked = make()
            seconds = time.perf_counter() - t0
            if masked is None:
                rows.append({"seed": seed, "budget": budget, "way": name, "error": "budget not reached"})
                continue
            one_shot = digits.accuracy(masked, test_x, test_y)
            digits.train(masked, tx, ty, epochs=1, lr=1e-3)
            pruned = gp.compile(masked, [Shrink()], example_inputs=x)
            rows.append(
                {
                    "seed": seed,
                    "budget": budget,
                    "way": name,
                    "macs": gp.count_macs(pruned, x) / dense_macs,
                    "params": gp.count_params(pruned) / gp.count_params(dense),
                    "one_shot": one_shot,
                    "fine_tuned": digits.accuracy(pruned, test_x, test_y),
                    "seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    return rows, facts


def _mean(values) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", default="0.3,0.15,0.08")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the dense model's initialisation and data order")
    parser.add_argument("--json")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(1)  # tiny batches: more threads only contend (and the machine's cores are shared)
    data = digits.load()
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, facts = [], {}
    for seed in seeds:
        seed_rows, facts[seed] = _one_seed(seed, budgets, data)
        rows += seed_rows
    dense_test = [f["dense_test"] for f in facts.values()]
    print(
        f"\nDigitsCNN trained 8 epochs on 1,097 scikit-learn digits; 300 validation images (what sensitivity, "
        f"netadapt and bayes measure), 400 test images (the accuracies below); seeds {seeds} (the dense model's init and data "
        f"order), mean over seeds [min-max]; dense test accuracy {_mean(dense_test):.3f} "
        f"[{min(dense_test):.3f}-{max(dense_test):.3f}]; GroupLasso model: {EPOCHS_REG} more epochs with lam 2e-3; "
        f"growing-reg: {EPOCHS_REG} epochs of a Pruner with GrowingReg; uniform+3ep: uniform's masks trained "
        f"{EPOCHS_REG} epochs (the same extra training, no regulariser); fine-tune: 1 epoch Adam 1e-3 with masks on, "
        "then Shrink; seconds: choosing the masks (with the regularised ways' training)\n"
    )
    print(
        "| MACs budget | way | MACs ratio | params ratio | accuracy before the fine-tune | accuracy fine-tuned | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    ways = list(dict.fromkeys(r["way"] for r in rows))
    for budget in budgets:
        for way in ways:
            done = [r for r in rows if r["budget"] == budget and r["way"] == way and "error" not in r]
            if len(done) < len(seeds):
                print(f"| {budget:g} | {way} | - | - | - | budget not reached ({len(seeds) - len(done)} seeds) | - |")
                continue
            macs, tuned = [r["macs"] for r in done], [r["fine_tuned"] for r in done]
            print(
                f"| {budget:g} | {way} | {_mean(macs):.3f} [{min(macs):.3f}-{max(macs):.3f}] | "
                f"{_mean([r['params'] for r in done]):.3f} | {_mean([r['one_shot'] for r in done]):.3f} | "
                f"{_mean(tuned):.3f} [{min(tuned):.3f}-{max(tuned):.3f}] | {_mean([r['seconds'] for r in done]):.1f} |"
            )
    print()
    for seed, f in facts.items():
        for name, note in f.items():
            if isinstance(note, dict):
                print(f"- seed {seed}, {name}: {json.dumps(note, default=str)}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": seeds, "facts": facts, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
