"""Built-in passes (installed as graphprune.passes)."""

from graphprune.passes.compensate import CompensateBias
from graphprune.passes.drop_blocks import DropBlocks
from graphprune.passes.mask import ChannelMask, MaskUnits
from graphprune.passes.query_heads import GQAQueryHeads
from graphprune.passes.reinsert_zeros import ReinsertZeros
from graphprune.passes.scores.criteria import BNScaleScore, FPGMScore
from graphprune.passes.scores.data import (
    ActivationScore,
    APoZScore,
    FLAPScore,
    HeadSensitivityScore,
    TaylorScore,
    WandaScore,
)
from graphprune.passes.scores.magnitude import L1Score, L2Score, MagnitudeScore, RandomScore, ScorePass
from graphprune.passes.shrink import Shrink
from graphprune.passes.sparse_lower import SparseLower
from graphprune.passes.sparse_mask import BlockMask, NMMask, UnstructuredMask
from graphprune.passes.sparsegpt import SparseGPTMask
from graphprune.passes.token_prune import TokenPrune, TokenThreshold

__all__ = [
    "ScorePass",
    "MagnitudeScore",
    "L1Score",
    "L2Score",
    "RandomScore",
    "BNScaleScore",
    "FPGMScore",
    "TaylorScore",
    "HeadSensitivityScore",
    "ActivationScore",
    "APoZScore",
    "WandaScore",
    "FLAPScore",
    "ChannelMask",
    "MaskUnits",
    "GQAQueryHeads",
    "UnstructuredMask",
    "NMMask",
    "BlockMask",
    "SparseGPTMask",
    "Shrink",
    "ReinsertZeros",
    "CompensateBias",
    "DropBlocks",
    "TokenPrune",
    "TokenThreshold",
    "SparseLower",
]
