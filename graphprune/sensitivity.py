"""Sensitivity analysis: prune one group at a time, measure a user metric, derive per-group ratios.

sens = graphprune.sensitivity(model, evaluate, example_inputs=(x,))   # evaluate(model) -> float, higher is better
print(sens.table()); sens.plot("sensitivity.png")
ratios = sens.ratios_for(max_drop=0.01)
pruned = graphprune.compile(model, [L1Score(), ChannelMask(ratios), Shrink()], example_inputs=(x,))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from graphprune.analysis import Dependencies, Scores
from graphprune.arguments import fraction
from graphprune.compile import compile
from graphprune.errors import ArgumentError, InputError
from graphprune.passes.mask import ChannelMask
from graphprune.passes.scores.magnitude import L1Score
from graphprune.pipeline import PassBase, PassResult

logger = logging.getLogger(__name__)

__all__ = ["Sensitivity", "sensitivity", "measure"]


@dataclass(frozen=True)
class Sensitivity:
    baseline: float
    rows: tuple[tuple[str, float, float], ...]  # (group, ratio, metric)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g for g, _, _ in self.rows))

    def table(self) -> str:
        """Markdown: one row per group, one column per ratio."""
        ratios = sorted({r for _, r, _ in self.rows})
        values = {(g, r): m for g, r, m in self.rows}
        lines = ["| group | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
        for g in self.groups:
            lines.append(
                f"| {g} | " + " | ".join(f"{values[(g, r)]:.4g}" if (g, r) in values else "-" for r in ratios) + " |"
            )
        return f"baseline {self.baseline:.4g}\n\n" + "\n".join(lines)

    def ratios_for(self, max_drop: float) -> dict[str, float]:
        """Per group, the largest measured ratio whose metric stays within `max_drop` of the baseline
        (and every smaller ratio too); 0.0 where even the smallest costs more."""
        out = {}
        for g in self.groups:
            best = 0.0
            for _, r, m in sorted((row for row in self.rows if row[0] == g), key=lambda row: row[1]):
                if self.baseline - m > max_drop:
                    break
                best = r
            out[g] = best
        return out

    def plot(self, path: str) -> str:
        """Metric against ratio, one line per group, written as a PNG (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("Sensitivity.plot needs matplotlib: pip install matplotlib") from exc
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for g in self.groups:
            pts = sorted((r, m) for gg, r, m in self.rows if gg == g)
            ax.plot([0.0] + [p[0] for p in pts], [self.baseline] + [p[1] for p in pts], marker="o", label=g)
        ax.set_xlabel("share of the group's channels removed")
        ax.set_ylabel("metric")
        ax.set_title("graphprune sensitivity")
        if len(self.groups) <= 20:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class _GivenScores(PassBase):
    """Puts scores computed once back into the context (so every sweep point ranks alike)."""

    def __init__(self, scores: dict[str, torch.Tensor]) -> None:
        self.scores = scores

    def call(self, gm, ctx):
        ctx.put(Scores(self.scores))
        return PassResult(gm, False)


def measure(evaluate: Callable[[nn.Module], float], model: nn.Module, what: str, who: str = "sensitivity") -> float:
    """evaluate(model) as a finite float: a NaN would make every ratio look harmless."""
    value = evaluate(model)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(
            f"{who}: evaluate returned {type(value).__name__} for {what}; return a number (higher is better)"
        ) from None
    if not math.isfinite(value):
        raise InputError(f"{who}: evaluate returned {value} for {what}; it must return a finite number")
    return value


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    example_inputs: tuple | dict,
    ratios: Iterable[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    score: PassBase | None = None,
    groups: Iterable[str] | None = None,
    leaf_modules=(),
) -> Sensitivity:
    """Mask each group alone at each ratio (scores by `score`, L1 magnitude by default) and call
    `evaluate` on the masked model, which computes what the shrunk one would."""

    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise ArgumentError(f"sensitivity ratios must be a list of numbers in (0, 1), got {ratios!r}")
    ratios = sorted(fraction(r, "each sensitivity ratio", open_low=True) for r in ratios)
    if not ratios:
        raise ArgumentError("sensitivity ratios must hold at least one number in (0, 1)")
    if not callable(evaluate):
        raise ArgumentError(f"sensitivity evaluate must be a function model -> float, got {type(evaluate).__name__}")
    seen: dict = {}

    def grab(gm, ctx):
        seen["scores"] = ctx.cached(Scores)
        seen["groups"] = [g.key for g in ctx.get(Dependencies, gm).groups]
        return PassResult(gm, False)

    base = compile(model, [score or L1Score(), grab], example_inputs=example_inputs, leaf_modules=leaf_modules)
    keys = seen["groups"] if groups is None else list(groups)
    unknown = sorted(set(keys) - set(seen["groups"]))
    if unknown:
        raise ArgumentError(f"sensitivity: no such groups {unknown}; the model has {seen['groups']}")
    baseline = measure(evaluate, base, "the unpruned model")
    rows = []
    with tqdm(total=len(keys) * len(ratios), desc="sensitivity", unit="run", disable=None) as progress:
        for key in keys:
            for r in ratios:
                given = [_GivenScores(seen["scores"]), ChannelMask({key: r})]
                masked = compile(base, given, example_inputs=example_inputs)
                rows.append((key, r, measure(evaluate, masked, f"group {key} at ratio {r:g}")))
                logger.info("sensitivity %s @ %.2f: %.4g", key, r, rows[-1][2])
                progress.update()
    return Sensitivity(baseline, tuple(rows))
