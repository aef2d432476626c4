"""Timing that survives a noisy machine: the compared calls run interleaved (one call of each per
round) so that load hits them alike, and callers report medians.  Every latency graphprune
measures (SparseLower's per-layer choice, `backends.sparse.benchmark`, `backends.onnx.benchmark`)
goes through `interleaved`."""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable

import torch

__all__ = ["synchronize", "interleaved"]


def synchronize() -> None:
    """Wait for queued GPU work, so that a timing measures it (nothing to do on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(calls: dict[Hashable, Callable[[], Any]], runs: int, warmup: int = 1) -> dict[Hashable, list[float]]:
    """Seconds per call of each entry: `warmup` untimed rounds, then `runs` timed rounds, each
    round calling every entry once in order (GPU work waited for)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[Hashable, list[float]] = {key: [] for key in calls}
    for _ in range(runs):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            synchronize()
            samples[key].append(time.perf_counter() - start)
    return samples
