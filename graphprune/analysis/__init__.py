"""Analyses: computed on demand, cached by the pass context, dropped when a pass modifies the graph."""

from graphprune.analysis.cost import count_macs, count_params
from graphprune.analysis.dependency import ChannelGroup, Dependencies, FrozenChannels, Slot, analyze_dependencies
from graphprune.analysis.scores import Scores, WeightScores

__all__ = [
    "ChannelGroup",
    "Dependencies",
    "FrozenChannels",
    "Slot",
    "Scores",
    "WeightScores",
    "analyze_dependencies",
    "count_macs",
    "count_params",
]
