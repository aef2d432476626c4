"""Structured channel masks: choose the lowest-scored units of every group and mask them.

`ratio` is the share of each group's units to remove (local), or of all
prunable units of a kind ranked together after normalising each group's scores
by their mean (global; heads and channels are ranked apart), or of the groups'
parameters, every unit of every kind ranked on the scores as they are and
weighed by the parameters it holds (joint: FLAP's adaptive structure, for scores
already on one scale such as `FLAPScore`'s standardised ones).  It is one number
for every group, or a mapping whose keys are kinds of group ("channel", "head",
"ffn", "hidden"), group keys and shell-style globs over group keys (local scope;
a group's key is the path of the module that produces its channels, e.g.
"layer1.0.conv1") and "*" (every other group).  The most specific key wins: a
group's own key, else the most specific glob that matches it (the one with the
most characters other than `*`; two equally specific globs with different
ratios are an error), else its kind, else "*"; a group no key names keeps its
units.  A key or glob that names no group is an error.

    ChannelMask(0.5)                          # half of every group
    ChannelMask({"*": 0.5, "head": 0.0})      # half of every group, no attention head
    ChannelMask({"fc1": 0.3})                 # only group fc1 (e.g. from gp.sensitivity)
    ChannelMask({"layer1.*": 0.2, "*": 0.5})  # a fifth of layer1's groups, half of the others

`exclude` names modules (as `model.named_modules()` spells them) or globs over
them (`exclude=["layer4.*", "fc"]`): a group is left alone when a module whose
width it changes is, or is inside, one of them.  A name or glob that matches no
module is an error.

Every group keeps at least `min_channels` units, rounded up to a multiple of
`round_to` so that the widths stay hardware friendly; in global scope
`max_ratio` caps the share any one group loses.

Instead of a ratio, a `target` for the pruned model's cost: `{"macs": 0.5}` (MACs x0.5 on the
example inputs) or `{"params": 5e6}` (a value up to 1 is a share of the dense model's, above 1 a
count).  The one ratio that meets it (within `tolerance` of the dense cost's share; 0.01 by
default) is searched by bisection, each candidate shrunk on a meta-device copy and counted; with
scope="global" the units go where the normalised scores are lowest, so the cut falls unevenly
across groups:

    ChannelMask(target={"macs": 0.5}, scope="global")

A latency target is a share of the dense model's latency on this machine, for a backend
("torch" or "onnxruntime") at a thread count:

    ChannelMask(target={"latency": 0.5, "backend": "onnxruntime", "threads": 2}, scope="global")

The search runs on a lookup table of op latencies measured on this machine (NetAdapt's:
`graphprune.analysis.latency`), then times the chosen model against the dense one end to end
and, while the measured share misses the target by more than `tolerance` of it (5 % by
default), moves the table's goal by the miss and searches again (at most 4 times).  The pass's
record holds what was requested, estimated and measured.
"""

from __future__ import annotations

import logging
import math
import warnings
from fnmatch import fnmatchcase
from typing import Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from graphprune.analysis import latency
from graphprune.analysis.cost import count_macs, count_params
from graphprune.analysis.dependency import ChannelGroup, Dependencies
from graphprune.analysis.scores import Scores
from graphprune.arguments import (
    choice,
    fraction,
    glob_specificity,
    in_modules,
    is_glob,
    mapping,
    module_names,
    positive_int,
    unmatched,
)
from graphprune.errors import ArgumentError, GraphPruneWarning, PreconditionError
from graphprune.ir.inputs import to_meta
from graphprune.ir.masking import mask_units, refuse_lowered, resolve, unit_mask_state
from graphprune.ir.norms import sync_masked_ops
from graphprune.ir.shadow import deepcopy_model, shadow
from graphprune.passes.shrink import Shrink
from graphprune.pipeline import PassBase, PassContext, PassResult

logger = logging.getLogger(__name__)

__all__ = ["ChannelMask", "MaskUnits", "apply_units"]

SCOPES = ("local", "global", "joint")
KINDS = ("channel", "head", "ffn", "hidden")
TARGETS = ("macs", "params", "latency")
LATENCY_KEYS = ("backend", "threads")
MEASURED_ROUNDS = 4  # end-to-end checks of a latency target


class ChannelMask(PassBase):
    preserves = frozenset({Dependencies, Scores})

    def __init__(
        self,
        ratio: float | Mapping[str, float] | None = None,
        *,
        target: Mapping[str, float | str] | None = None,
        tolerance: float | None = None,
        scope: str = "local",
        round_to: int = 1,
        min_channels: int = 1,
        exclude: Iterable[str] = (),
        max_ratio: float | None = None,
    ) -> None:
        what = "ChannelMask ratio (the share of channels to remove)"
        self.target, self.meter = self._check_target(ratio, target)
        if tolerance is None:
            tolerance = 0.05 if self.meter is not None else 0.01
        self.tolerance = fraction(tolerance, "ChannelMask tolerance")
        if self.target is not None:
            self.ratio = 0.0  # set by the search
        elif isinstance(ratio, Mapping):
            self.ratio = {
                key: fraction(r, f"ChannelMask ratio[{key!r}]")
                for key, r in mapping(ratio, what, f"kinds {KINDS}, group keys or '*' to ratios").items()
            }
        elif isinstance(ratio, (list, tuple, set)):
            raise ArgumentError(
                f"{what} must be a number or a mapping of kinds / group keys to numbers, got {type(ratio).__name__}"
            )
        else:
            self.ratio = fraction(ratio, what)
        self.scope = choice(scope, "ChannelMask scope", SCOPES)
        if scope == "joint" and isinstance(self.ratio, dict):
            raise ArgumentError("ChannelMask scope='joint' ranks every kind together: give one ratio or a target")
        self.round_to = positive_int(round_to, "ChannelMask round_to")
        self.min_channels = positive_int(min_channels, "ChannelMask min_channels")
        self.exclude = module_names(exclude, "ChannelMask exclude")
        if max_ratio is not None:
            max_ratio = fraction(
                max_ratio, "ChannelMask max_ratio (caps each group in global scope)", closed=True, open_low=True
            )
            if scope == "local":
                raise ArgumentError(
                    "ChannelMask max_ratio caps each group in global scope: use it with scope='global' or 'joint'"
                )
        self.max_ratio = max_ratio

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        refuse_lowered(gm, "ChannelMask")
        deps = ctx.get(Dependencies, gm)
        scores = ctx.cached(Scores)
        if scores is None:
            raise PreconditionError(
                "ChannelMask needs scores: put a score pass before it, e.g. [L2Score(), ChannelMask(0.5)]"
            )
        self._check_exclude(gm)
        self._check_keys(deps)
        groups = [g for g in deps.groups if not self._excluded(g)]
        missing = [g.key for g in groups if g.key not in scores]
        if missing:
            raise PreconditionError(
                f"no scores for groups {missing[:5]}: run the score pass after any pass that changes the graph"
            )
        done = {g.key: unit_mask_state(gm, g)[0] for g in groups}
        if self.target is not None:
            plan, reached = self._search(gm, ctx, deps, groups, scores, done)
        else:
            plan, reached = self._plan(gm, groups, scores, done), None
        modified = apply_units(gm, ctx, deps, plan)
        report = {g.key: (g.size, g.size - len(plan[g.key])) for g in groups}
        ctx.record(groups=report, scope=self.scope, ratio=self.ratio, **({"target": reached} if reached else {}))
        self._warn_if_short(deps, groups, report)
        return PassResult(gm, modified)

    def _plan(self, gm, groups, scores, done) -> dict[str, list[int]]:
        """The units to mask in each group at the pass's ratio."""
        floor = {g.key: self._floor(g) for g in groups}
        if self.scope == "joint":
            return self._global(groups, scores, done, floor, self.ratio, _unit_params(gm, groups))
        if self.scope == "local":
            return {
                g.key: self._lowest(
                    scores[g.key], done[g.key], g.size - self._keep_count(g.size, floor[g.key], self._ratio_of(g))
                )
                for g in groups
            }
        plan = {}  # each kind of group ranked on its own: heads do not compete with channels
        for kind in sorted({g.kind for g in groups}):
            same = [g for g in groups if g.kind == kind]
            plan.update(self._global(same, scores, done, floor, self._ratio_of(same[0])))
        return plan

    # -- a target cost -----------------------------------------------------------------
    @staticmethod
    def _check_target(ratio, target) -> tuple[dict[str, float] | None, latency.Meter | None]:
        """The target as {kind: value}, and the latency meter for a latency target."""
        if target is None:
            if ratio is None:
                raise ArgumentError(
                    "ChannelMask needs a ratio (e.g. ChannelMask(0.5)) or a target (e.g. ChannelMask(target={'macs': 0.5}))"
                )
            return None, None
        if ratio is not None:
            raise ArgumentError("ChannelMask takes a ratio or a target, not both: the target sets the ratio")
        target = dict(mapping(target, "ChannelMask target", f"one of {TARGETS} to a share or a count"))
        kinds = [k for k in target if k in TARGETS]
        extra = sorted(set(target) - set(TARGETS) - (set(LATENCY_KEYS) if kinds == ["latency"] else set()))
        if len(kinds) != 1 or extra:
            raise ArgumentError(
                f"ChannelMask target must be one of {TARGETS} with its value, e.g. {{'macs': 0.5}} "
                f"(a latency target may add {LATENCY_KEYS}), got {target!r}"
            )
        (kind,) = kinds
        value = target[kind]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ArgumentError(
                f"ChannelMask target {kind!r} must be a positive number (up to 1: a share of the dense model's; "
                f"above 1: a count), got {value!r}"
            )
        if kind != "latency":
            return {kind: float(value)}, None
        if not value < 1:
            raise ArgumentError(
                f"ChannelMask target 'latency' is a share of the dense model's latency, between 0 and 1 "
                f"(0.5: twice as fast), got {value!r}"
            )
        threads = target.get("threads")
        if threads is not None:
            threads = positive_int(threads, "ChannelMask target 'threads'")
        return {kind: float(value)}, latency.meter(target.get("backend", "torch"), threads)

    def _search(self, gm, ctx, deps, groups, scores, done) -> tuple[dict[str, list[int]], dict]:
        """Search the ratio whose shrunk cost meets the target; the plan at that ratio and a report."""
        ((kind, value),) = self.target.items()
        if kind == "latency":
            count = _Counter(gm, ctx.example_inputs, lambda model, inputs, meta: self._estimate(model, inputs, meta))
        else:
            count = _Counter(gm, ctx.example_inputs, _COUNTS[kind])
        dense = count(lambda trial, inputs: trial) or 1
        goal = value if value <= 1 else value / dense

        def share(ratio: float) -> tuple[float, dict[str, list[int]]]:
            self.ratio = ratio
            plan = self._plan(gm, groups, scores, done)
            return count(lambda trial, inputs: _shrunk(trial, deps, plan, inputs)) / dense, plan

        if kind == "latency":
            got, plan, report = self._measured(gm, ctx, deps, share, goal)
        else:
            _, self.ratio, got, plan = self._bisect(share, goal, self.tolerance)
            report = {"kind": kind, "requested": goal, "reached": got, "ratio": self.ratio}
        limits = "frozen channels, min_channels, round_to or max_ratio limit it"
        if kind == "latency" and abs(got - goal) > self.tolerance * goal:
            warnings.warn(
                f"ChannelMask target latency x{goal:.3f} was missed: the closest measured is x{got:.3f} (at ratio "
                f"{self.ratio:.3f}, x{report['estimated']:.3f} by the lookup table) after {MEASURED_ROUNDS} "
                f"end-to-end checks; timings vary with the load on this machine, or {limits}: retry on a quiet "
                "machine or give a larger tolerance",
                GraphPruneWarning,
                stacklevel=3,
            )
        elif kind != "latency" and abs(got - goal) > self.tolerance:
            warnings.warn(
                f"ChannelMask target {kind} x{goal:.3f} is out of reach: the closest is x{got:.3f} (at ratio "
                f"{self.ratio:.3f}); {limits}",
                GraphPruneWarning,
                stacklevel=3,
            )
        logger.info("ChannelMask target %s x%.3f: x%.3f at ratio %.3f", kind, goal, got, self.ratio)
        return plan, report

    @staticmethod
    def _bisect(share, goal: float, within: float) -> tuple[float, float, float, dict[str, list[int]]]:
        """(miss, ratio, share, plan) of the ratio whose share is closest to `goal`, stopping once
        `within` of it."""
        # the cost falls about as (1 - ratio)^2 (both sides of a layer shrink): interpolate on its
        # square root between a ratio above the goal and one below, bisecting when that stalls
        ends = [(ratio, *share(ratio)) for ratio in (0.0, 0.99)]
        best = min((abs(got - goal), ratio, got, plan) for ratio, got, plan in ends)
        (low, got_low, _), (high, got_high, _) = ends
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
            (low, got_low), (high, got_high) = (
                ((ratio, got), (high, got_high)) if got > goal else ((low, got_low), (ratio, got))
            )
        return best

    def _estimate(self, model, inputs, meta: bool) -> float:
        return latency.estimate(self.meter, latency.record_ops(model, inputs, on_meta=meta))

    def _measured(self, gm, ctx, deps, share, goal: float) -> tuple[float, dict[str, list[int]], dict]:
        """Search on the lookup table, time the result against the dense model end to end, and move
        the table's goal by the measured miss until the measured share is within tolerance."""
        asked, tried, best = goal, [], None
        for _ in range(MEASURED_ROUNDS):
            _, ratio, estimated, plan = self._bisect(share, asked, 0.25 * self.tolerance * asked)
            pruned = _shrunk(deepcopy_model(gm), deps, plan, ctx.example_inputs)
            dense_s, pruned_s = self.meter.models(gm, pruned, ctx.example_inputs)
            measured = pruned_s / dense_s
            logger.info("latency target x%.3f: table x%.3f, measured x%.3f", goal, estimated, measured)
            if best is None or abs(measured - goal) < abs(best[0] - goal):
                best = (measured, plan, ratio, estimated, dense_s, pruned_s)
            if abs(measured - goal) <= self.tolerance * goal:
                break
            tried.append((estimated, measured))
            asked = _next_goal(tried, goal)
        measured, plan, self.ratio, estimated, dense_s, pruned_s = best
        return (
            measured,
            plan,
            {
                "kind": "latency",
                "requested": goal,
                "reached": measured,
                "estimated": estimated,
                "ratio": self.ratio,
                "backend": getattr(self.meter, "name", type(self.meter).__name__),
                "threads": getattr(self.meter, "threads", None),
                "dense_ms": dense_s * 1e3,
                "pruned_ms": pruned_s * 1e3,
            },
        )

    def _warn_if_short(self, deps, groups: list[ChannelGroup], report: dict[str, tuple[int, int]]) -> None:
        """Never a silent no-op: say why nothing (or less than asked) was pruned."""
        ratios = self.ratio.values() if isinstance(self.ratio, dict) else [self.ratio]
        asked = self.target is not None or any(r > 0 for r in ratios)
        if not asked:
            return
        if not groups:
            reasons = sorted(deps.frozen, key=lambda f: -f.channels)[:3]
            why = "; ".join(
                f"{f.site.location or f.site.node}: {f.channels} channel(s) {f.site.reason}" for f in reasons
            )
            excluded = " (the rest is excluded)" if deps.groups else ""
            warnings.warn(
                f"ChannelMask: no channel group can be pruned{excluded}; frozen: {why or 'nothing prunable found'}",
                GraphPruneWarning,
                stacklevel=2,
            )
            return
        whole = [
            g.key for g in groups if report[g.key][1] == g.size and math.floor(self._ratio_of(g) * g.size + 1e-9) > 0
        ]
        if whole and self.scope == "local":
            warnings.warn(
                f"ChannelMask: {len(whole)} group(s) keep every unit because round_to={self.round_to} / "
                f"min_channels={self.min_channels} / max_ratio leave nothing to remove: {whole[:5]}",
                GraphPruneWarning,
                stacklevel=2,
            )

    # -- choosing ----------------------------------------------------------------------
    def _ratio_of(self, g: ChannelGroup) -> float:
        """The group's own ratio, else the most specific matching glob's, else its kind's ("head",
        "ffn", ...), else "*"'s, else 0."""
        if not isinstance(self.ratio, dict):
            return self.ratio
        if g.key in self.ratio:
            return self.ratio[g.key]
        best = self._globs_for(g.key)
        if best:
            return self.ratio[best[0]]
        return self.ratio.get(g.kind, self.ratio.get("*", 0.0))

    def _globs_for(self, key: str) -> list[str]:
        """The ratio's globs (not "*") that match a group key and are the most specific that do."""
        found = [k for k in self.ratio if k != "*" and is_glob(k) and fnmatchcase(key, k)]
        top = max(map(glob_specificity, found), default=0)
        return [k for k in found if glob_specificity(k) == top]

    def _check_keys(self, deps) -> None:
        if not isinstance(self.ratio, dict):
            return
        keys, kinds = {g.key for g in deps.groups}, {g.kind for g in deps.groups}
        ambiguous = sorted(set(self.ratio) & keys & set(KINDS))
        if ambiguous:
            raise ArgumentError(
                f"ChannelMask ratio keys {ambiguous} are both a kind of group and a group of this model; "
                "rename the module or set the ratio per group with a key that is not a kind"
            )
        unknown = sorted(unmatched(set(self.ratio) - set(KINDS) - {"*"}, keys))
        if unknown:
            raise ArgumentError(
                f"ChannelMask ratio names groups the model does not have: {unknown[:5]}; keys are kinds "
                f"{KINDS}, '*', group keys or globs over them (e.g. 'layer1.*'); group keys are "
                f"{[g.key for g in deps.groups][:10]}"
            )
        globs = sorted(k for k in self.ratio if k != "*" and is_glob(k))
        per_group = sorted(set(self.ratio) & keys) + globs
        if per_group and self.scope != "local":
            raise ArgumentError(
                f"ChannelMask ratio sets groups' own ratios ({per_group[:3]}): use it with scope='local'"
            )
        for g in deps.groups:
            tied = self._globs_for(g.key) if globs and g.key not in self.ratio else []
            if len({self.ratio[k] for k in tied}) > 1:
                raise ArgumentError(
                    f"ChannelMask ratio globs {tied} match group {g.key} equally specifically with different "
                    "ratios: name the group itself, or make one glob more specific"
                )
        absent = sorted(k for k, r in self.ratio.items() if k in KINDS and r > 0 and k not in kinds)
        if absent:
            note = "; a model with no attention has no 'head' groups" if "head" in absent else ""
            raise PreconditionError(
                f"ChannelMask ratio names kinds of groups this model does not have: {absent} (it has {sorted(kinds)}){note}"
            )

    def _floor(self, g: ChannelGroup) -> int:
        keep = min(self.min_channels, g.size)
        if self.max_ratio is not None:
            keep = max(keep, g.size - math.floor(self.max_ratio * g.size + 1e-9))
        if keep > g.size - math.floor(self._ratio_of(g) * g.size):
            logger.info("group %s keeps %d of %d units (min_channels / max_ratio)", g.key, keep, g.size)
        return keep

    def _keep_count(self, size: int, floor: int, ratio: float) -> int:
        keep = size - math.floor(ratio * size + 1e-9)
        keep = min(size, math.ceil(keep / self.round_to) * self.round_to)
        return max(keep, floor)

    @staticmethod
    def _lowest(scores: torch.Tensor, done: torch.Tensor, count: int) -> list[int]:
        """Units already masked go first (a ratio counts from the original width), then the lowest."""
        key = torch.where(done, torch.full_like(scores, -math.inf), scores)
        return sorted(torch.argsort(key, stable=True)[: max(count, int(done.sum()))].tolist())

    def _global(self, groups, scores, done, floor, ratio: float, weight=None) -> dict[str, list[int]]:
        """The lowest units across `groups` until `ratio` of them are chosen; with `weight` (per group,
        what one unit holds) the scores are taken as they are and `ratio` counts in weight."""
        flat, owner = [], []
        for g in groups:
            s = scores[g.key]
            norm = s if weight is not None else s / (s.mean() + 1e-12) if s.numel() else s
            norm = torch.where(done[g.key], torch.full_like(norm, -math.inf), norm)
            flat.append(norm)
            owner.extend((g.key, u) for u in range(g.size))
        if not flat:
            return {}
        weight = weight or {g.key: 1 for g in groups}
        order = torch.argsort(torch.cat(flat), stable=True).tolist()
        total = sum(g.size * weight[g.key] for g in groups)
        budget = math.floor(ratio * total + 1e-9)
        removable = {g.key: g.size - floor[g.key] for g in groups}
        chosen: dict[str, list[int]] = {g.key: [] for g in groups}
        for i in order:
            if budget <= 0:
                break
            key, u = owner[i]
            if len(chosen[key]) < removable[key]:
                chosen[key].append(u)
                budget -= weight[key]
        sizes = {g.key: g.size for g in groups}
        for key, units in chosen.items():  # round the kept width up to round_to
            keep = sizes[key] - len(units)
            target = min(sizes[key], math.ceil(keep / self.round_to) * self.round_to)
            units.sort(key=lambda u: float(scores[key][u]) if not bool(done[key][u]) else -math.inf)
            fresh = sum(1 for u in units if not bool(done[key][u]))  # masked units cannot come back
            del units[len(units) - min(target - keep, fresh) :]
            units.sort()
        return chosen

    # -- exclusion ---------------------------------------------------------------------
    def _excluded(self, g: ChannelGroup) -> bool:
        return any(in_modules(m, self.exclude) for m in g.modules)

    def _check_exclude(self, gm: fx.GraphModule) -> None:
        missing = unmatched(self.exclude, (n for n, _ in gm.named_modules()))
        if missing:
            raise ArgumentError(
                f"ChannelMask exclude names modules the model does not have: {missing}; use names from "
                "model.named_modules() or shell-style globs over them (e.g. 'layer4.*')"
            )


def _unit_params(gm: fx.GraphModule, groups) -> dict[str, int]:
    """Per group: the tensor elements one of its units holds (every unit of a group holds as many)."""
    out = {}
    for g in groups:
        total = 0
        for slot, index in zip(g.slots, g.index):
            owner, attr = resolve(gm, slot.tensor)
            t = getattr(owner, attr)
            total += index.shape[1] * (t.numel() // max(t.shape[slot.dim], 1))
        out[g.key] = max(total, 1)
    return out


def apply_units(gm: fx.GraphModule, ctx: PassContext, deps: Dependencies, units: dict[str, list[int]]) -> bool:
    """Mask these units of these groups (units already masked stay masked), let LayerNorms and means
    over masked channels reduce over the kept ones, and record the plan step: every unit masked now.
    Whether anything new was masked."""
    groups = {g.key: g for g in deps.groups}
    modified = False
    for key, ids in units.items():
        done = unit_mask_state(gm, groups[key])[0]
        new = [u for u in ids if not bool(done[u])]
        mask_units(gm, groups[key], new, deps.aliases)
        modified |= bool(new)
    sync_masked_ops(gm, deps)
    masked = {g.key: torch.nonzero(unit_mask_state(gm, g)[0]).reshape(-1).tolist() for g in deps.groups}
    ctx.record(plan={"op": "channel_mask", "units": {k: ids for k, ids in masked.items() if ids}})
    return modified


class MaskUnits(PassBase):
    """Mask exactly these units: `{group key: [unit indices]}`, e.g. a plan step recorded on another
    instance of the same architecture (how a saved masked model is rebuilt)."""

    preserves = frozenset({Dependencies, Scores})
    plan_op = "channel_mask"

    def __init__(self, units: dict[str, list[int]]) -> None:
        self.units = {
            key: list(ids) for key, ids in mapping(units, "MaskUnits units", "group keys to unit indices").items()
        }

    @classmethod
    def from_plan(cls, step: dict) -> MaskUnits:
        return cls(step["units"])

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        refuse_lowered(gm, "MaskUnits")
        deps = ctx.get(Dependencies, gm)
        groups = {g.key: g for g in deps.groups}
        missing = sorted(set(self.units) - set(groups))
        if missing:
            raise ArgumentError(f"MaskUnits names groups this model does not have: {missing[:5]}")
        for key, ids in self.units.items():
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < groups[key].size for i in ids):
                raise ArgumentError(
                    f"MaskUnits masks units of group {key} that it does not have (it has {groups[key].size})"
                )
        return PassResult(gm, apply_units(gm, ctx, deps, self.units))


def _next_goal(tried: list[tuple[float, float]], goal: float) -> float:
    """The table share to ask for next, from the (table, measured) shares tried so far: the last
    table share scaled by the measured miss (a slope fitted through two noisy measurements
    overshoots), by at most a factor 1.5 either way."""
    est, got = tried[-1]
    return min(max(est * min(max(goal / got, 1 / 1.5), 1.5), 0.01), 1.0)


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


def _shrunk(trial: fx.GraphModule, deps: Dependencies, plan: dict[str, list[int]], inputs) -> fx.GraphModule:
    """`trial` (a copy) with `plan` masked and shrunk."""
    trial_ctx = PassContext(inputs, verify=False)
    trial_ctx.put(deps)
    apply_units(trial, trial_ctx, deps, plan)
    return Shrink().call(trial, trial_ctx).gm


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
