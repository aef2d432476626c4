"""Score results, as analyses a pipeline holds (`ctx.put(Scores(...))`, `ctx.cached(Scores)`).

Score passes make them; mask passes, CompensateBias and sensitivity read them.
"""

from __future__ import annotations

__all__ = ["Scores", "WeightScores"]


class Scores(dict):
    """Channel group key -> one float64 importance per unit of the group (higher: keep)."""


class WeightScores(dict):
    """Qualified tensor name -> one importance per element of that weight (Wanda), for weight masks.
    A value may be a function of no arguments that computes it when asked (`score`), so that the
    weight-sized tensors are only made for the weights a mask reads."""

    def score(self, name: str):
        value = self.get(name)
        return value() if callable(value) else value
