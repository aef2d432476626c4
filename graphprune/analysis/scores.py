"""Score results, as analyses a pipeline holds (`ctx.put(Scores(...))`, `ctx.cached(Scores)`).

Score passes make them; mask passes, CompensateBias and sensitivity read them.
"""

from __future__ import annotations

__all__ = ["Scores", "WeightScores"]


class Scores(dict):
    """Channel group key -> one float64 importance per unit of the group (higher: keep)."""


class WeightScores(dict):
    """Qualified tensor name -> one importance per element of that weight (Wanda), for weight masks."""
