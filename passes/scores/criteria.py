"""More data-free criteria: network slimming (BatchNorm scale) and FPGM (geometric median).

Both score the *producer* side of a unit (the slices that create its
channels), not the consumers that merely read them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from graphprune.analysis.dependency import ChannelGroup
from graphprune.errors import PreconditionError
from graphprune.ir.masking import resolve
from graphprune.passes.scores.magnitude import MagnitudeScore, ScorePass

logger = logging.getLogger(__name__)

__all__ = ["BNScaleScore", "FPGMScore", "unit_vectors"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def unit_vectors(gm: nn.Module, group: ChannelGroup, min_ndim: int = 2) -> torch.Tensor | None:
    """One row per unit: its producer weight slices (ndim >= min_ndim), flattened and concatenated."""
    parts = []
    for s, slot in enumerate(group.slots):
        if slot in group.consumers:
            continue
        owner, attr = resolve(gm, slot.tensor)
        t = getattr(owner, attr)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim < min_ndim:
            continue
        rows = t.detach().movedim(slot.dim, 0).reshape(t.shape[slot.dim], -1).double()
        parts.append(rows[group.index[s]].reshape(group.size, -1))
    return torch.cat(parts, dim=1) if parts else None


class BNScaleScore(ScorePass):
    """|gamma| of the BatchNorm layers in a group (network slimming, Liu et al. 2017).

    Groups without a BatchNorm are scored by L1 magnitude instead; the pass
    records which ones (a run where no group has a BatchNorm is an error).
    """

    def scores(self, gm, groups, ctx):
        out, fallback = {}, []
        magnitude = MagnitudeScore(1)
        for g in groups:
            gammas = []
            for s, slot in enumerate(g.slots):
                owner, attr = resolve(gm, slot.tensor)
                if isinstance(owner, _BN) and attr == "weight":
                    w = owner.weight.detach().abs().double()
                    gammas.append(w[g.index[s]].sum(1))
            if gammas:
                out[g.key] = torch.stack(gammas).mean(0)
            else:
                fallback.append(g.key)
                out[g.key] = magnitude.score_group(gm, g, ctx)
        if groups and len(fallback) == len(groups):
            raise PreconditionError(
                "BNScaleScore: no channel group contains a BatchNorm; use another criterion (e.g. L1Score())"
            )
        if fallback:
            logger.info(
                "BNScaleScore: %d group(s) without BatchNorm scored by L1 magnitude: %s", len(fallback), fallback
            )
        ctx.record(magnitude_fallback=fallback)
        return out


class FPGMScore(ScorePass):
    """Distance of each unit's filters to the others (FPGM, He et al. 2019): units near the
    geometric median are the most replaceable, so they score lowest."""

    def score_group(self, gm, group, ctx):
        vecs = unit_vectors(gm, group)
        if vecs is None:
            vecs = unit_vectors(gm, group, min_ndim=1)
        if vecs is None:
            return torch.zeros(group.size, dtype=torch.float64)
        return torch.cdist(vecs, vecs).sum(1)
