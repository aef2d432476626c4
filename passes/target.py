"""The ratio that meets a cost target, for `ChannelMask(target=...)`.

`{"macs": 0.5}` / `{"params": 5e6}` (a value up to 1 is a share of the dense model's, above 1 a
count): the ratio is searched by interpolation and bisection, each candidate's plan masked and
shrunk on a meta-device copy (no tensor copied or computed; a real copy where the graph does not
run on meta) and counted.

`{"latency": 0.5, "backend": "onnxruntime" | "torch", "threads": n}` (a share of the dense model's
latency on this machine): the same search on a lookup table of op latencies
(`graphprune.analysis.latency`), then the chosen plan shrunk for real and timed against the dense
model end to end; while the measured share misses by more than the tolerance, the table's goal
moves by the miss and the search runs again (at most `MEASURED_ROUNDS` times).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from graphprune.analysis import latency
from graphprune.analysis.cost import count_macs, count_params
from graphprune.arguments import mapping, positive_int
from graphprune.errors import ArgumentError, GraphPruneWarning
from graphprune.ir.inputs import to_meta
from graphprune.ir.shadow import deepcopy_model, shadow

logger = logging.getLogger(__name__)

__all__ = ["TargetSearch", "TARGETS"]

TARGETS = ("macs", "params", "latency")
LATENCY_KEYS = ("backend", "threads")
MEASURED_ROUNDS = 4  # end-to-end checks of a latency target

Plan = dict[str, list[int]]


class TargetSearch:
    """A checked target (`kind`, `value`; `meter` for latency) and the search for its ratio."""

    def __init__(self, target, who: str = "ChannelMask") -> None:
        target = dict(mapping(target, f"{who} target", f"one of {TARGETS} to a share or a count"))
        kinds = [k for k in target if k in TARGETS]
        extra = sorted(set(target) - set(TARGETS) - (set(LATENCY_KEYS) if kinds == ["latency"] else set()))
        if len(kinds) != 1 or extra:
            raise ArgumentError(
                f"{who} target must be one of {TARGETS} with its value, e.g. {{'macs': 0.5}} "
                f"(a latency target may add {LATENCY_KEYS}), got {target!r}"
            )
        (kind,) = kinds
        value = target[kind]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ArgumentError(
                f"{who} target {kind!r} must be a positive number (up to 1: a share of the dense model's; "
                f"above 1: a count), got {value!r}"
            )
        self.kind, self.value, self.meter = kind, float(value), None
        if kind == "latency":
            if not value < 1:
                raise ArgumentError(
                    f"{who} target 'latency' is a share of the dense model's latency, between 0 and 1 "
                    f"(0.5: twice as fast), got {value!r}"
                )
            threads = target.get("threads")
            if threads is not None:
                threads = positive_int(threads, f"{who} target 'threads'")
            self.meter = latency.meter(target.get("backend", "torch"), threads)

    def search(
        self,
        gm: fx.GraphModule,
        example_inputs,
        plan_at: Callable[[float], Plan],
        shrunk: Callable[[fx.GraphModule, Plan, object], fx.GraphModule],
        tolerance: float,
    ) -> tuple[float, Plan, dict]:
        """(ratio, plan, report) meeting the target: `plan_at(ratio)` gives the units to mask at a
        ratio, `shrunk(copy of gm, plan, inputs)` masks and shrinks them on a copy."""
        if self.kind == "latency":
            count = _Counter(gm, example_inputs, self._estimate)
        else:
            count = _Counter(gm, example_inputs, _COUNTS[self.kind])
        dense = count(lambda trial, inputs: trial) or 1
        goal = self.value if self.value <= 1 else self.value / dense

        def cost(plan: Plan) -> float:
            return count(lambda trial, inputs: shrunk(trial, plan, inputs)) / dense

        def share(ratio: float) -> tuple[float, Plan]:
            plan = plan_at(ratio)
            return cost(plan), plan

        if self.kind == "latency":
            ratio, got, plan, report = self._measured(gm, example_inputs, share, cost, shrunk, goal, tolerance)
            missed = abs(got - goal) > tolerance * goal
        else:
            _, ratio, got, plan = _bisect(share, cost, goal, tolerance)
            report = {"kind": self.kind, "requested": goal, "reached": got, "ratio": ratio}
            missed = abs(got - goal) > tolerance
        if missed:
            limits = "frozen channels, min_channels, round_to or max_ratio limit it"
            warnings.warn(
                f"ChannelMask target latency x{goal:.3f} was missed: the closest measured is x{got:.3f} (at ratio "
                f"{ratio:.3f}, x{report['estimated']:.3f} by the lookup table) after {MEASURED_ROUNDS} "
                f"end-to-end checks; timings vary with the load on this machine, or {limits}: retry on a quiet "
                "machine or give a larger tolerance"
                if self.kind == "latency"
                else f"ChannelMask target {self.kind} x{goal:.3f} is out of reach: the closest is x{got:.3f} (at "
                f"ratio {ratio:.3f}); {limits}",
                GraphPruneWarning,
                stacklevel=4,
            )
        logger.info("ChannelMask target %s x%.3f: x%.3f at ratio %.3f", self.kind, goal, got, ratio)
        return ratio, plan, report

    def _estimate(self, model, inputs, meta: bool) -> float:
        return latency.estimate(self.meter, latency.record_ops(model, inputs, on_meta=meta))

    def _measured(self, gm, example_inputs, share, cost, shrunk, goal: float, tolerance: float):
        """Search on the lookup table, time the result against the dense model end to end, and move
        the table's goal by the measured miss until the measured share is within tolerance."""
        asked, best = goal, None
        for _ in range(MEASURED_ROUNDS):
            _, ratio, estimated, plan = _bisect(share, cost, asked, 0.25 * tolerance * asked)
            pruned = shrunk(deepcopy_model(gm), plan, example_inputs)
            dense_s, pruned_s = self.meter.models(gm, pruned, example_inputs)
            measured = pruned_s / dense_s
            logger.info("latency target x%.3f: table x%.3f, measured x%.3f", goal, estimated, measured)
            if best is None or abs(measured - goal) < abs(best[0] - goal):
                best = (measured, plan, ratio, estimated, dense_s, pruned_s)
            if abs(measured - goal) <= tolerance * goal:
                break
            # the table's share scaled by the measured miss, at most x1.5 either way (a slope fitted
            # through two noisy measurements overshoots)
            asked = min(max(estimated * min(max(goal / measured, 1 / 1.5), 1.5), 0.01), 1.0)
        measured, plan, ratio, estimated, dense_s, pruned_s = best
        report = {
            "kind": "latency",
            "requested": goal,
            "reached": measured,
            "estimated": estimated,
            "ratio": ratio,
            "backend": getattr(self.meter, "name", type(self.meter).__name__),
            "threads": getattr(self.meter, "threads", None),
            "dense_ms": dense_s * 1e3,
            "pruned_ms": pruned_s * 1e3,
        }
        return ratio, measured, plan, report


def _bisect(share, cost, goal: float, within: float) -> tuple[float, float, float, Plan]:
    """(miss, ratio, share, plan) of the plan whose share is closest to `goal`, stopping once `within`
    of it: the one ratio is searched first; where rounding leaves no ratio close enough (round_to,
    small groups), the plans at the two ratios around the goal are mixed, group by group, so that
    the step is one group's instead of every group's at once."""
    # the cost falls about as (1 - ratio)^2 (both sides of a layer shrink): interpolate on its
    # square root between a ratio above the goal and one below, bisecting when that stalls
    ends = [(ratio, *share(ratio)) for ratio in (0.0, 0.99)]
    best = min((abs(got - goal), ratio, got, plan) for ratio, got, plan in ends)
    (low, got_low, plan_low), (high, got_high, plan_high) = ends
    for step in range(14):
        root = math.sqrt(max(got_low, 0)) - math.sqrt(max(got_high, 0))
        guess = low + (high - low) * (math.sqrt(got_low) - math.sqrt(goal)) / root if root > 0 else math.nan
        edge = 0.1 * (high - low)
        ratio = guess if step % 3 != 2 and low + edge <= guess <= high - edge else (low + high) / 2
        got, plan = share(ratio)
        if abs(got - goal) < best[0]:
            best = (abs(got - goal), ratio, got, plan)
        if abs(got - goal) <= within or got_low <= goal or got_high >= goal:
            break
        if got > goal:
            low, got_low, plan_low = ratio, got, plan
        else:
            high, got_high, plan_high = ratio, got, plan
    if best[0] <= within or not got_low > goal > got_high:
        return best
    keys = [k for k in plan_low if plan_low[k] != plan_high.get(k)]
    fewer, more = 0, len(keys)  # how many groups take the higher ratio's units
    while more - fewer > 1:
        mid = (fewer + more) // 2
        plan = {**plan_low, **{k: plan_high[k] for k in keys[:mid]}}
        got = cost(plan)
        if abs(got - goal) < best[0]:
            best = (abs(got - goal), low + (high - low) * mid / len(keys), got, plan)
        if abs(got - goal) <= within:
            break
        fewer, more = (mid, more) if got > goal else (fewer, mid)
    else:  # the step at the crossing is one group's: try instead each other group's step alone
        for k in keys[fewer + 1 : fewer + 33]:
            plan = {**plan_low, **{j: plan_high[j] for j in keys[:fewer]}, k: plan_high[k]}
            got = cost(plan)
            if abs(got - goal) < best[0]:
                best = (abs(got - goal), low + (high - low) * (fewer + 1) / len(keys), got, plan)
    return best


def _on_meta(gm: fx.GraphModule) -> fx.GraphModule:
    """A shadow of `gm` whose tensors are meta tensors of the same shapes (tied ones stay tied)."""
    trial, _ = shadow(gm)
    metas: dict[int, torch.Tensor] = {}
    for m in {id(m): m for m in trial.modules()}.values():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is not None and id(t) not in metas:
                    meta = t.to("meta")
                    metas[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
                if t is not None:
                    table[k] = metas[id(t)]
    return trial


_COUNTS = {
    "macs": lambda model, inputs, meta: count_macs(model, inputs),
    "params": lambda model, inputs, meta: count_params(model),
}


class _Counter:
    """Counts a cost (MACs, parameters, estimated latency) of variants of `gm` built on copies of it:
    on the meta device (no tensor copied or computed) where the graph runs there, else on real copies."""

    def __init__(self, gm: fx.GraphModule, example_inputs, cost) -> None:
        self.gm, self.example_inputs, self.cost = gm, example_inputs, cost
        self.meta = True
        try:
            self(lambda trial, inputs: trial)
        except RuntimeError:  # e.g. a constant made on the CPU inside the graph
            logger.debug("counting on real copies: the graph does not run on the meta device", exc_info=True)
            self.meta = False

    def __call__(self, build) -> float:
        if self.meta:
            model, inputs = _on_meta(self.gm), to_meta(self.example_inputs)
        else:
            model, inputs = deepcopy_model(self.gm), self.example_inputs
        return self.cost(build(model, inputs), inputs, self.meta)
