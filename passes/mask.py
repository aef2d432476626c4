"""Structured channel masks: choose the lowest-scored units of every group and mask them.

`ratio` is the share of each group's units to remove (local), or of all
prunable units of a kind ranked together after normalising each group's scores
by their mean (global; heads and channels are ranked apart).  `ratios` sets the
ratio per kind of group in either scope.  Every group keeps at least `min_channels` units, rounded up to
a multiple of `round_to` so that the widths stay hardware friendly.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Iterable

import torch
import torch.fx as fx

from graphprune.analysis.dependency import ChannelGroup
from graphprune.arguments import choice, fraction, mapping, module_names, positive_int
from graphprune.errors import ArgumentError, GraphPruneWarning, PreconditionError
from graphprune.ir.masking import refuse_lowered, mask_units, unit_mask_state
from graphprune.ir.norms import sync_masked_ops
from graphprune.pipeline import PassBase, PassContext, PassResult
from graphprune.passes.scores.magnitude import SCORES

logger = logging.getLogger(__name__)

__all__ = ["ChannelMask"]

SCOPES = ("local", "global")
KINDS = ("channel", "head", "ffn", "hidden")


class ChannelMask(PassBase):
    preserves = frozenset({"dependencies", SCORES})

    def __init__(
        self,
        ratio: float,
        *,
        scope: str = "local",
        round_to: int = 1,
        min_channels: int = 1,
        exclude: Iterable[str] = (),
        group_ratios: dict[str, float] | None = None,
        max_ratio: float | None = None,
        ratios: dict[str, float] | None = None,
    ) -> None:
        self.ratio = fraction(ratio, "ChannelMask ratio (the share of channels to remove)")
        self.scope = choice(scope, "ChannelMask scope", SCOPES)
        self.round_to = positive_int(round_to, "ChannelMask round_to")
        self.min_channels = positive_int(min_channels, "ChannelMask min_channels")
        self.exclude = module_names(exclude, "ChannelMask exclude")
        self.group_ratios = mapping(group_ratios, "ChannelMask group_ratios", "group keys to ratios")
        for key, r in self.group_ratios.items():
            self.group_ratios[key] = fraction(r, f"ChannelMask group_ratios[{key!r}]")
        if self.group_ratios and scope != "local":
            raise ArgumentError("ChannelMask group_ratios sets each group's own ratio: use it with scope='local'")
        if max_ratio is not None:
            max_ratio = fraction(max_ratio, "ChannelMask max_ratio (caps each group in global scope)", closed=True, open_low=True)
            if scope != "global":
                raise ArgumentError("ChannelMask max_ratio caps each group in global scope: use it with scope='global'")
        self.max_ratio = max_ratio
        self.ratios = mapping(ratios, "ChannelMask ratios", f"kinds of group {KINDS} to ratios")
        for kind, r in self.ratios.items():
            choice(kind, "a key of ChannelMask ratios (a kind of group)", KINDS)
            self.ratios[kind] = fraction(r, f"ChannelMask ratios[{kind!r}]")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        refuse_lowered(gm, "ChannelMask")
        deps = ctx.dependencies(gm)
        scores = ctx.get_analysis(SCORES)
        if scores is None:
            raise PreconditionError("ChannelMask needs scores: put a score pass before it, e.g. [L2Score(), ChannelMask(0.5)]")
        self._check_exclude(gm)
        unknown = sorted(set(self.group_ratios) - {g.key for g in deps.groups})
        if unknown:
            raise ArgumentError(f"ChannelMask group_ratios names groups the model does not have: {unknown[:5]}; groups are {[g.key for g in deps.groups][:10]}...")
        groups = [g for g in deps.groups if not self._excluded(g)]
        absent = sorted(k for k, r in self.ratios.items() if r > 0 and not any(g.kind == k for g in deps.groups))
        if absent:
            found = sorted({g.kind for g in deps.groups})
            note = "; a model with no attention has no 'head' groups" if "head" in absent else ""
            raise PreconditionError(f"ChannelMask ratios name kinds of groups this model does not have: {absent} (it has {found}){note}")
        missing = [g.key for g in groups if g.key not in scores]
        if missing:
            raise PreconditionError(f"no scores for groups {missing[:5]}: run the score pass after any pass that changes the graph")
        done = {g.key: unit_mask_state(gm, g)[0] for g in groups}
        floor = {g.key: self._floor(g) for g in groups}
        if self.scope == "local":
            plan = {
                g.key: self._lowest(scores[g.key], done[g.key], g.size - self._keep_count(g.size, floor[g.key], self._ratio_of(g)))
                for g in groups
            }
        else:  # each kind of group ranked on its own: heads do not compete with channels
            plan = {}
            for kind in sorted({g.kind for g in groups}):
                same = [g for g in groups if g.kind == kind]
                plan.update(self._global(same, scores, done, floor, self.ratios.get(kind, self.ratio)))
        modified, report = False, {}
        for g in groups:
            chosen = plan[g.key]
            new = [u for u in chosen if not bool(done[g.key][u])]
            mask_units(gm, g, new, deps.aliases)
            modified |= bool(new)
            report[g.key] = (g.size, g.size - len(chosen))
        sync_masked_ops(gm, deps)  # LayerNorms and means over masked channels reduce over the kept ones
        masked = {g.key: torch.nonzero(unit_mask_state(gm, g)[0]).reshape(-1).tolist() for g in groups}
        plan = {"op": "channel_mask", "units": {k: ids for k, ids in masked.items() if ids}}
        ctx.record(groups=report, scope=self.scope, ratio=self.ratio, plan=plan)
        self._warn_if_short(deps, groups, report)
        return PassResult(gm, modified)

    def _warn_if_short(self, deps, groups: list[ChannelGroup], report: dict[str, tuple[int, int]]) -> None:
        """Never a silent no-op: say why nothing (or less than asked) was pruned."""
        asked = self.ratio > 0 or any(r > 0 for r in (*self.ratios.values(), *self.group_ratios.values()))
        if not asked:
            return
        if not groups:
            reasons = sorted(deps.frozen, key=lambda f: -f.channels)[:3]
            why = "; ".join(f"{f.site.location or f.site.node}: {f.channels} channel(s) {f.site.reason}" for f in reasons)
            excluded = " (the rest is excluded)" if deps.groups else ""
            warnings.warn(f"ChannelMask: no channel group can be pruned{excluded}; frozen: {why or 'nothing prunable found'}",
                          GraphPruneWarning, stacklevel=2)
            return
        whole = [g.key for g in groups if report[g.key][1] == g.size and math.floor(self._ratio_of(g) * g.size + 1e-9) > 0]
        if whole and self.scope == "local":
            warnings.warn(f"ChannelMask: {len(whole)} group(s) keep every unit because round_to={self.round_to} / "
                          f"min_channels={self.min_channels} / max_ratio leave nothing to remove: {whole[:5]}",
                          GraphPruneWarning, stacklevel=2)

    # -- choosing ----------------------------------------------------------------------
    def _ratio_of(self, g: ChannelGroup) -> float:
        """A group's own ratio, else its kind's ("head", "ffn", "channel"), else `ratio`."""
        return self.group_ratios.get(g.key, self.ratios.get(g.kind, self.ratio))

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

    def _global(self, groups, scores, done, floor, ratio: float) -> dict[str, list[int]]:
        flat, owner = [], []
        for g in groups:
            s = scores[g.key]
            norm = s / (s.mean() + 1e-12) if s.numel() else s
            norm = torch.where(done[g.key], torch.full_like(norm, -math.inf), norm)
            flat.append(norm)
            owner.extend((g.key, u) for u in range(g.size))
        if not flat:
            return {}
        order = torch.argsort(torch.cat(flat), stable=True).tolist()
        total = sum(g.size for g in groups)
        budget = math.floor(ratio * total + 1e-9)
        removable = {g.key: g.size - floor[g.key] for g in groups}
        chosen: dict[str, list[int]] = {g.key: [] for g in groups}
        for i in order:
            if budget <= 0:
                break
            key, u = owner[i]
            if len(chosen[key]) < removable[key]:
                chosen[key].append(u)
                budget -= 1
        sizes = {g.key: g.size for g in groups}
        for key, units in chosen.items():  # round the kept width up to round_to
            keep = sizes[key] - len(units)
            target = min(sizes[key], math.ceil(keep / self.round_to) * self.round_to)
            units.sort(key=lambda u: float(scores[key][u]) if not bool(done[key][u]) else -math.inf)
            fresh = sum(1 for u in units if not bool(done[key][u]))  # masked units cannot come back
            del units[len(units) - min(target - keep, fresh):]
            units.sort()
        return chosen

    # -- exclusion ---------------------------------------------------------------------
    def _excluded(self, g: ChannelGroup) -> bool:
        return any(m == e or m.startswith(e + ".") for m in g.modules for e in self.exclude)

    def _check_exclude(self, gm: fx.GraphModule) -> None:
        names = {n for n, _ in gm.named_modules()}
        missing = [e for e in self.exclude if e not in names]
        if missing:
            raise ArgumentError(f"ChannelMask exclude names modules the model does not have: {missing}; use names from model.named_modules()")
