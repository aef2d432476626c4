"""Score passes: one number per prunable unit of every channel group (higher = more important).

Scores are analysis results: they live in the pass context beside the
dependency groups they describe, and a mask pass reads them from there.
Write your own by subclassing `ScorePass` and implementing `score_group`.
"""

from __future__ import annotations

import numbers

import torch
import torch.fx as fx

from graphprune.analysis.dependency import ChannelGroup, Dependencies
from graphprune.analysis.scores import Scores
from graphprune.errors import ArgumentError, PassError
from graphprune.ir.masking import resolve
from graphprune.pipeline import PassBase, PassContext, PassResult

__all__ = ["ScorePass", "MagnitudeScore", "L1Score", "L2Score", "RandomScore"]


class ScorePass(PassBase):
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        deps = ctx.get(Dependencies, gm)
        scores = {key: s.to(torch.float64) for key, s in self.scores(gm, deps.groups, ctx).items()}
        for key, s in scores.items():
            if s.shape != (deps.group(key).size,):
                raise PassError(
                    f"{self.name}.score_group returned shape {tuple(s.shape)} for group {key}; expected ({deps.group(key).size},)"
                )
        bad = [key for key, s in scores.items() if not bool(torch.isfinite(s).all())]
        if bad:
            raise PassError(
                f"{self.name} gave NaN or infinite scores to groups {bad[:5]}: check the calibration data and "
                "the model's outputs on it (a mask from such scores would be arbitrary)"
            )
        ctx.put(Scores(scores))
        ctx.record(groups=len(scores))
        return PassResult(gm, False)

    def scores(self, gm: fx.GraphModule, groups: tuple[ChannelGroup, ...], ctx: PassContext) -> dict[str, torch.Tensor]:
        return {g.key: self.score_group(gm, g, ctx) for g in groups}

    def score_group(self, gm: fx.GraphModule, group: ChannelGroup, ctx: PassContext) -> torch.Tensor:
        raise NotImplementedError


class MagnitudeScore(ScorePass):
    """Lp norm of every parameter slice of a unit, averaged over the group's parameters
    (as effectively used: masked entries count as zero)."""

    def __init__(self, p: float = 2) -> None:
        if not (isinstance(p, numbers.Real) and not isinstance(p, bool) and p > 0):
            raise ArgumentError(f"MagnitudeScore p must be a positive number (1 for L1, 2 for L2), got {p!r}")
        self.p = p

    def score_group(self, gm, group, ctx):
        total = torch.zeros(group.size, dtype=torch.float64)
        used = 0
        for s, slot in enumerate(group.slots):
            owner, attr = resolve(gm, slot.tensor)
            t = getattr(owner, attr)
            if (
                not (isinstance(t, torch.Tensor) and t.is_floating_point())
                or attr.startswith("running_")
                or attr in getattr(owner, "graphprune_maskable", ())
            ):
                continue
            flat = t.detach().movedim(slot.dim, 0).reshape(t.shape[slot.dim], -1)
            rows = torch.linalg.vector_norm(flat, ord=self.p, dim=1).double().pow(self.p)
            index, unit = group.flat[s]
            per_unit = torch.zeros(group.size, dtype=torch.float64).index_add_(0, unit, rows[index])
            total += per_unit.pow(1.0 / self.p)
            used += 1
        return total / max(used, 1)


class L1Score(MagnitudeScore):
    def __init__(self) -> None:
        super().__init__(1)


class L2Score(MagnitudeScore):
    def __init__(self) -> None:
        super().__init__(2)


class RandomScore(ScorePass):
    """Uniform random scores from a seeded generator (a baseline)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, gm, groups, ctx):
        generator = torch.Generator().manual_seed(self.seed)
        return {g.key: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in groups}
