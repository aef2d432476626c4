"""Per-group ratios for a cost target, found greedily (NetAdapt, Yang et al., ECCV 2018).

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

from graphprune.analysis import Dependencies, Scores, count_macs, count_params
from graphprune.arguments import fraction, mapping, positive_int
from graphprune.compile import compile
from graphprune.errors import ArgumentError, GraphPruneWarning
from graphprune.passes.mask import MaskUnits
from graphprune.passes.scores.magnitude import L1Score
from graphprune.passes.shrink import Shrink
from graphprune.pipeline import PassBase, PassResult
from graphprune.sensitivity import measure

logger = logging.getLogger(__name__)

__all__ = ["RatioSearch", "search_ratios"]

TARGETS = ("macs", "params")


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


def _target(target) -> tuple[str, float]:
    target = mapping(target, "search_ratios target", f"one of {TARGETS} to a share or a count")
    if len(target) != 1 or next(iter(target)) not in TARGETS:
        raise ArgumentError(
            f"search_ratios target must be one of {TARGETS} with its value, e.g. {{'macs': 0.3}}, got {target!r}"
        )
    ((kind, value),) = target.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ArgumentError(
            f"search_ratios target {kind!r} must be a positive number (up to 1: a share of the dense model's; "
            f"above 1: a count), got {value!r}"
        )
    return kind, float(value)


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
) -> RatioSearch:
    """Per-group ratios whose shrunk model meets `target` (`{"macs": 0.3}`: MACs x0.3 on the example
    inputs; `{"params": 5e6}`: up to 1 a share, above 1 a count) within `tolerance`, chosen greedily
    by `evaluate` (see the module's docstring).  `score` ranks the units inside each group (L1
    magnitude by default); `groups` limits the search to these group keys; every group keeps at
    least `min_channels` units.  The caller's model is not changed."""

    kind, value = _target(target)
    step = fraction(step, "search_ratios step (the share of a group's units one proposal removes)", open_low=True)
    tolerance = fraction(tolerance, "search_ratios tolerance")
    min_channels = positive_int(min_channels, "search_ratios min_channels")
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

    def count(m: nn.Module) -> int:
        return count_macs(m, example_inputs) if kind == "macs" else count_params(m)

    dense = count(base)
    goal = value if value <= 1 else value / max(dense, 1)

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
            costs[key] = count(shrunk) / max(dense, 1)
        return costs[key]

    baseline = measure(evaluate, base, "the unpruned model", "search_ratios")
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
    if abs(now - goal) > tolerance:
        warnings.warn(
            f"search_ratios target {kind} x{goal:.3f} is out of reach: every group is down to min_channels at "
            f"x{now:.3f}",
            GraphPruneWarning,
            stacklevel=2,
        )
    final = (
        current if finetune is not None else compile(base, [MaskUnits(units(removed))], example_inputs=example_inputs)
    )
    return RatioSearch(
        {k: removed[k] / sizes[k] for k in keys},
        kind=kind,
        requested=goal,
        reached=now,
        baseline=baseline,
        metric=metric,
        history=tuple(history),
        model=final,
    )
