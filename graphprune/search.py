"""Per-group ratios for a cost target, found greedily (NetAdapt, Yang et al., ECCV 2018) or by
Bayesian optimisation (Condensa's way).

    ratios = gp.search_ratios(model, evaluate, target={"macs": 0.3}, example_inputs=(x,))
    pruned = gp.compile(model, [L1Score(), ChannelMask(ratios), Shrink()], example_inputs=(x,))

One ratio for every group spends the budget where it is cheap to count, not where it is cheap
to lose.  NetAdapt asks the model instead: starting dense, each iteration proposes, for every
group, removing a further chunk of its units (the lowest-scored first, `step` of its width), masks
that proposal, measures `evaluate(model) -> float` (higher is better) and the cost the shrunk model
saves, and keeps the proposal that loses the least metric per cost saved (a tie: the one saving
more).  The last proposal is trimmed to the fewest units that reach the target, so the result lands
just under it (or just over, within `tolerance`, where one more unit would land further off).  NetAdapt fine-tunes each proposal briefly before measuring it; `finetune(masked)`
does that when given (in place, and the chosen proposal's weights carry on), else proposals are
measured as masked.

`method="bayes"` searches instead in Condensa's spirit (Joseph et al. 2020: Bayesian optimisation
of sparsity against an accuracy objective): each trial gives every group a weight w in [-1, 1],
keeps `scale * exp(w)` of its units with the one `scale` that lands just under the target (found
by bisection on the counted cost, so every trial meets the budget), and a Gaussian-process
sampler (optuna's `GPSampler`, `pip install "graphprune[search]"`) picks the next weights to
maximise `evaluate`.  The first trial is the uniform ratio (all weights 0), so the result is never
worse than uniform on `evaluate`; `trials` bounds the evaluations.

Scores are computed once, on the dense model, so `ChannelMask(ratios)` after the same score pass
masks exactly the units the search masked.  Every proposal is a `MaskUnits` pass on one traced
model (compile() re-uses its graph and analysis); costs are counted on the shrunk model.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from graphprune.analysis import Dependencies, Scores, count_macs, count_params, latency
from graphprune.arguments import choice, fraction, positive_int
from graphprune.compile import compile
from graphprune.errors import ArgumentError, GraphPruneWarning
from graphprune.passes.mask import MaskUnits
from graphprune.passes.scores.magnitude import L1Score
from graphprune.passes.shrink import Shrink
from graphprune.passes.target import TargetSearch
from graphprune.pipeline import PassBase, PassResult
from graphprune.sensitivity import measure

logger = logging.getLogger(__name__)

__all__ = ["RatioSearch", "search_ratios"]

METHODS = ("greedy", "bayes")


class RatioSearch(dict):
    """Group key -> share of its units removed (a mapping `ChannelMask` takes as it is), with how the
    search got there: `kind`, `requested` and `reached` (cost / dense cost), `baseline` and `metric`
    (evaluate on the dense and on the found model), `history` (per iteration: group, units removed
    from it so far, cost, metric) and `model`, the masked model the search ended on."""

    def __init__(self, ratios: dict[str, float], **facts) -> None:
        super().__init__(ratios)
        self.kind: str = facts["kind"]
        self.requested: float = facts["requested"]
        self.reached: float = facts["reached"]
        self.baseline: float = facts["baseline"]
        self.metric: float = facts["metric"]
        self.history: tuple[tuple[str, int, float, float], ...] = facts["history"]
        self.model: nn.Module = facts["model"]

    def table(self) -> str:
        """Markdown: each iteration's choice, the cost after it and the metric."""
        lines = [
            f"{self.kind} x{self.requested:.3f} requested, x{self.reached:.3f} reached; "
            f"metric {self.baseline:.4g} -> {self.metric:.4g}",
            "",
            "| iteration | group | removed | cost | metric |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {i} | {g} | {n} | {c:.3f} | {m:.4g} |" for i, (g, n, c, m) in enumerate(self.history, 1)]
        return "\n".join(lines)


def search_ratios(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    target: Mapping[str, float],
    example_inputs: tuple | dict,
    step: float = 0.05,
    score: PassBase | None = None,
    tolerance: float = 0.02,
    finetune: Callable[[nn.Module], object] | None = None,
    groups: Iterable[str] | None = None,
    min_channels: int = 1,
    leaf_modules=(),
    method: str = "greedy",
    trials: int = 30,
    seed: int = 0,
) -> RatioSearch:
    """Per-group ratios whose shrunk model meets `target` (`{"macs": 0.3}`: MACs x0.3 on the example
    inputs; `{"params": 5e6}`: up to 1 a share, above 1 a count; `{"latency": 0.5, "backend":
    "onnxruntime" | "torch", "threads": n}`: the latency lookup table's estimate, as NetAdapt counts
    it (see `ChannelMask`'s target; no end-to-end check here)) within `tolerance`, chosen greedily
    by `evaluate` (see the module's docstring).  `score` ranks the units inside each group (L1
    magnitude by default); `groups` limits the search to these group keys; every group keeps at
    least `min_channels` units.  `method="bayes"` runs `trials` trials of Bayesian optimisation
    (seeded by `seed`) instead of the greedy steps.  The caller's model is not changed."""

    cost_of = TargetSearch(target, "search_ratios")
    kind, value = cost_of.kind, cost_of.value
    step = fraction(step, "search_ratios step (the share of a group's units one proposal removes)", open_low=True)
    tolerance = fraction(tolerance, "search_ratios tolerance")
    min_channels = positive_int(min_channels, "search_ratios min_channels")
    method = choice(method, "search_ratios method", METHODS)
    trials = positive_int(trials, "search_ratios trials")
    if method == "bayes" and finetune is not None:
        raise ArgumentError("search_ratios finetune fine-tunes greedy proposals: use it with method='greedy'")
    if not callable(evaluate):
        raise ArgumentError(f"search_ratios evaluate must be a function model -> float, got {type(evaluate).__name__}")
    if finetune is not None and not callable(finetune):
        raise ArgumentError(
            f"search_ratios finetune must be a function that trains a masked model in place, got {type(finetune).__name__}"
        )
    seen: dict = {}

    def grab(gm, ctx):
        seen["scores"] = ctx.cached(Scores)
        seen["groups"] = ctx.get(Dependencies, gm).groups
        return PassResult(gm, False)

    base = compile(model, [score or L1Score(), grab], example_inputs=example_inputs, leaf_modules=leaf_modules)
    sizes = {g.key: g.size for g in seen["groups"]}
    keys = list(sizes) if groups is None else list(groups)
    unknown = sorted(set(keys) - set(sizes))
    if unknown:
        raise ArgumentError(f"search_ratios groups: no such groups {unknown[:5]}; the model has {list(sizes)[:10]}")
    if not keys:
        raise ArgumentError("search_ratios found no channel group to search (groups is empty or nothing is prunable)")
    scores = seen["scores"]
    order = {k: torch.argsort(scores[k], stable=True).tolist() for k in keys}  # as ChannelMask picks them
    floor = {k: min(min_channels, sizes[k]) for k in keys}

    def units(removed: dict[str, int]) -> dict[str, list[int]]:
        return {k: sorted(order[k][:n]) for k, n in removed.items() if n}

    costs: dict[tuple, float] = {}

    def count(m: nn.Module) -> float:
        if kind == "latency":  # the lookup table's estimate (NetAdapt's own cost)
            return latency.estimate(cost_of.meter, latency.record_ops(m, example_inputs, on_meta=False))
        return count_macs(m, example_inputs) if kind == "macs" else count_params(m)

    dense = count(base) or 1
    goal = value if value <= 1 else value / dense

    try:  # costs are counted on graph modules: no landing on the model's class to check each time
        counted, output = compile(base, [], example_inputs=example_inputs, output="graph"), "graph"
    except ArgumentError:  # a graph of regions runs on the example inputs only: land as usual
        counted, output = base, "auto"

    def cost(removed: dict[str, int]) -> float:
        """The shrunk model's cost / dense (it depends on the widths only, so it is remembered)."""
        key = tuple(sorted(removed.items()))
        if key not in costs:
            passes = [MaskUnits(units(removed)), Shrink()]
            shrunk = compile(counted, passes, example_inputs=example_inputs, verify=False, output=output)
            costs[key] = count(shrunk) / dense
        return costs[key]

    baseline = measure(evaluate, base, "the unpruned model", "search_ratios")

    def mask(removed: dict[str, int]) -> nn.Module:
        return compile(base, [MaskUnits(units(removed))], example_inputs=example_inputs)

    def finish(removed, now, metric, history, final=None) -> RatioSearch:
        if abs(now - goal) > tolerance:
            warnings.warn(
                f"search_ratios target {kind} x{goal:.3f} is out of reach: every group is down to min_channels at "
                f"x{now:.3f}",
                GraphPruneWarning,
                stacklevel=3,
            )
        return RatioSearch(
            {k: removed[k] / sizes[k] for k in keys},
            kind=kind,
            requested=goal,
            reached=now,
            baseline=baseline,
            metric=metric,
            history=tuple(history),
            model=final if final is not None else mask(removed),
        )

    if method == "bayes":
        search = _Bayes(keys, sizes, floor, cost, goal, lambda removed, what: measure(evaluate, mask(removed), what))
        removed, metric, history = search.run(trials, seed)
        return finish(removed, cost(removed), metric, history)
    removed = {k: 0 for k in keys}
    now, metric, current = 1.0, baseline, base
    history = []
    with tqdm(desc="search_ratios", unit="proposal", disable=None) as progress:
        while now > goal:
            proposals = []
            for k in keys:
                left = sizes[k] - floor[k] - removed[k]
                if left <= 0:
                    continue
                chunk = min(max(1, round(step * sizes[k])), left)
                trial = {**removed, k: removed[k] + chunk}
                if cost(trial) < goal:  # past the target: the fewest units that reach it
                    low, high = 1, chunk
                    while low < high:
                        mid = (low + high) // 2
                        if cost({**removed, k: removed[k] + mid}) <= goal:
                            high = mid
                        else:
                            low = mid + 1
                    trial = {**removed, k: removed[k] + low}
                saved = now - cost(trial)
                if saved <= 0:  # these units cost nothing here (e.g. only a frozen consumer reads them)
                    continue
                masked = compile(current, [MaskUnits(units(trial))], example_inputs=example_inputs)
                if finetune is not None:
                    finetune(masked)
                got = measure(evaluate, masked, f"{trial[k]} units of group {k} removed", "search_ratios")
                proposals.append(((metric - got) / saved, -saved, k, trial, got, masked))
                progress.update()
            if not proposals:
                break
            # a proposal that would land further under the target than the tolerance is taken last
            close = [p for p in proposals if now + p[1] >= goal - tolerance]
            if not close and now - goal <= tolerance:
                break  # already within the tolerance, and every step from here lands further off
            close = close or proposals
            _, _, k, removed, metric, chosen = min(close, key=lambda p: (p[0], p[1]))
            now = cost(removed)
            current = chosen if finetune is not None else base
            history.append((k, removed[k], now, metric))
            progress.set_postfix({kind: f"{now:.3f}", "metric": f"{metric:.4g}"})
            logger.info(
                "search_ratios: %d units of %s removed, %s x%.3f, metric %.4g", removed[k], k, kind, now, metric
            )
    return finish(removed, now, metric, history, current if finetune is not None else None)


class _Bayes:
    """Bayesian optimisation over per-group weights; every trial's widths meet the target."""

    def __init__(self, keys, sizes, floor, cost, goal, evaluate) -> None:
        self.keys, self.sizes, self.floor, self.cost, self.goal, self.evaluate = (
            keys,
            sizes,
            floor,
            cost,
            goal,
            evaluate,
        )

    def removed(self, weights: dict[str, float], scale: float) -> dict[str, int]:
        """Units removed per group when group k keeps scale * exp(weights[k]) of its units."""
        out = {}
        for k in self.keys:
            keep = round(self.sizes[k] * min(1.0, scale * math.exp(weights[k])))
            out[k] = self.sizes[k] - min(max(keep, self.floor[k]), self.sizes[k])
        return out

    def fit(self, weights: dict[str, float]) -> dict[str, int]:
        """The widths at the largest scale whose cost is within the target (bisection)."""
        low, high = 0.0, math.exp(1.0)  # at `high` every group keeps all its units
        if self.cost(self.removed(weights, high)) <= self.goal:
            return self.removed(weights, high)
        for _ in range(14):  # the scale to e/16000: finer than one unit of any group
            mid = (low + high) / 2
            low, high = (mid, high) if self.cost(self.removed(weights, mid)) <= self.goal else (low, mid)
        return self.removed(weights, low)

    def run(self, trials: int, seed: int) -> tuple[dict[str, int], float, list]:
        optuna = _optuna()
        history = []

        def objective(trial) -> float:
            weights = {k: trial.suggest_float(k, -1.0, 1.0) for k in self.keys}
            removed = self.fit(weights)
            trial.set_user_attr("removed", removed)
            metric = self.evaluate(removed, f"trial {trial.number}'s widths")
            history.append((f"trial {trial.number}", sum(removed.values()), self.cost(removed), metric))
            progress.update()
            progress.set_postfix({"best": f"{max(h[3] for h in history):.4g}"})
            return metric

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GPSampler(seed=seed))
        study.enqueue_trial({k: 0.0 for k in self.keys})  # the uniform ratio first
        with tqdm(desc="search_ratios (bayes)", unit="trial", total=trials, disable=None) as progress:
            study.optimize(objective, n_trials=trials)
        best = study.best_trial
        return best.user_attrs["removed"], best.value, history


def _optuna():
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError('search_ratios(method="bayes") needs optuna: pip install "graphprune[search]"') from exc
    return optuna
