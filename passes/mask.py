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
from graphprune.ir.masking import mask_units, refuse_lowered, resolve, unit_mask_state
from graphprune.ir.norms import sync_masked_ops
from graphprune.passes.shrink import Shrink
from graphprune.passes.target import TargetSearch
from graphprune.pipeline import PassBase, PassContext, PassResult

logger = logging.getLogger(__name__)

__all__ = ["ChannelMask", "MaskUnits", "apply_units"]

SCOPES = ("local", "global", "joint")
KINDS = ("channel", "head", "ffn", "hidden")


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
        if (ratio is None) == (target is None):
            raise ArgumentError(
                "ChannelMask takes a ratio or a target, not both: the target sets the ratio"
                if target is not None
                else "ChannelMask needs a ratio (e.g. ChannelMask(0.5)) or a target (e.g. ChannelMask(target={'macs': 0.5}))"
            )
        self.target = TargetSearch(target) if target is not None else None
        if tolerance is None:
            tolerance = 0.05 if self.target is not None and self.target.kind == "latency" else 0.01
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
        if self.target is not None and groups:  # (with nothing to prune there is nothing to search)

            def plan_at(ratio: float) -> dict[str, list[int]]:
                self.ratio = ratio
                return self._plan(gm, groups, scores, done)

            def shrunk(trial, plan, inputs):
                return _shrunk(trial, deps, plan, inputs)

            self.ratio, plan, reached = self.target.search(gm, ctx.example_inputs, plan_at, shrunk, self.tolerance)
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
        if whole and self.scope == "local" and self.target is None:  # (a target's search mixes ratios)
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
            frozen = [f.site for f in deps.frozen if f.site.kind == "attention"]
            note = (
                ""
                if "head" not in absent
                else f"; its attention heads are frozen: {frozen[0].reason} ({frozen[0].location or frozen[0].node})"
                if frozen
                else "; a model with no attention has no 'head' groups"
            )
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


def _shrunk(trial: fx.GraphModule, deps: Dependencies, plan: dict[str, list[int]], inputs) -> fx.GraphModule:
    """`trial` (a copy) with `plan` masked and shrunk."""
    trial_ctx = PassContext(inputs, verify=False)
    trial_ctx.put(deps)
    apply_units(trial, trial_ctx, deps, plan)
    return Shrink().call(trial, trial_ctx).gm
