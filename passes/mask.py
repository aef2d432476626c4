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
from typing import Iterable

import torch
import torch.fx as fx

from graphprune.analysis.dependency import ChannelGroup
from graphprune.errors import PreconditionError
from graphprune.masking import mask_units, unit_mask_state
from graphprune.norms import sync_masked_ops
from graphprune.pipeline import PassBase, PassContext, PassResult
from graphprune.passes.score import SCORES

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
        if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"ChannelMask ratio must be in [0, 1) (the share of channels to remove), got {ratio!r}")
        if scope not in SCOPES:
            raise ValueError(f"ChannelMask scope must be one of {SCOPES}, got {scope!r}")
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"ChannelMask round_to must be a positive int, got {round_to!r}")
        if not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(f"ChannelMask min_channels must be a positive int, got {min_channels!r}")
        if isinstance(exclude, str):
            exclude = [exclude]
        for key, r in (group_ratios or {}).items():
            if not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ValueError(f"ChannelMask group_ratios[{key!r}] must be in [0, 1), got {r!r}")
        if group_ratios and scope != "local":
            raise ValueError("ChannelMask group_ratios sets each group's own ratio: use it with scope='local'")
        if max_ratio is not None and (not isinstance(max_ratio, (int, float)) or not 0 < max_ratio <= 1 or scope != "global"):
            raise ValueError(f"ChannelMask max_ratio caps each group in global scope: a number in (0, 1] with scope='global', got {max_ratio!r}")
        for kind, r in (ratios or {}).items():
            if kind not in KINDS or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ValueError(f"ChannelMask ratios maps a kind of group {KINDS} to a ratio in [0, 1), got {kind!r}: {r!r}")
        self.ratios = dict(ratios or {})
        self.group_ratios = dict(group_ratios or {})
        self.max_ratio = max_ratio
        self.ratio, self.scope, self.round_to, self.min_channels = float(ratio), scope, round_to, min_channels
        self.exclude = tuple(exclude)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        deps = ctx.dependencies(gm)
        scores = ctx.get_analysis(SCORES)
        if scores is None:
            raise PreconditionError("ChannelMask needs scores: put a score pass before it, e.g. [L2Score(), ChannelMask(0.5)]")
        self._check_exclude(gm)
        unknown = sorted(set(self.group_ratios) - {g.key for g in deps.groups})
        if unknown:
            raise ValueError(f"ChannelMask group_ratios names groups the model does not have: {unknown[:5]}; groups are {[g.key for g in deps.groups][:10]}...")
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
        return PassResult(gm, modified)

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
            raise ValueError(f"ChannelMask exclude names modules the model does not have: {missing}; use names from model.named_modules()")
