"""Sparse execution: latency of a model whose layers SparseLower stored compressed.

The modules themselves (`SparseLinear`, `SparseConv1x1`: a weight in CSR or BSR form as three
plain buffers, run with torch's sparse kernels, for inference) live with graphprune's other
inserted modules in `graphprune.ir.modules` and are re-exported here.  A lowered model saves and
loads like any other (`gp.save` / `gp.load`: safetensors plus the replayed plan, no pickle).

    from graphprune.backends import sparse
    lowered = gp.compile(model, [UnstructuredMask(0.9), SparseLower()], example_inputs=x)
    gp.save(lowered, "out/")
    again = gp.load(model, "out/", example_inputs=x)
    print(sparse.benchmark(model, lowered, x))
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from graphprune.ir.inputs import call_with, check_example_inputs, eval_mode
from graphprune.ir.modules import FORMATS, SparseConv1x1, SparseLinear, compress
from graphprune.timing import interleaved

__all__ = ["FORMATS", "SparseLinear", "SparseConv1x1", "compress", "Latency", "benchmark"]


@dataclass(frozen=True)
class Latency:
    dense_ms: float
    sparse_ms: float
    threads: int
    runs: int

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms

    def __str__(self) -> str:
        return (
            f"dense {self.dense_ms:.3f} ms, sparse {self.sparse_ms:.3f} ms, speedup {self.speedup:.2f}x "
            f"(median of {self.runs} interleaved runs, {self.threads} threads)"
        )


def benchmark(
    dense: nn.Module, lowered: nn.Module, example_inputs: tuple | dict, runs: int = 20, threads: int | None = None
) -> Latency:
    """Median latency of the dense and the lowered model on the same inputs in this process,
    interleaved run by run so that both see the same machine load."""
    example_inputs = check_example_inputs(example_inputs)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with eval_mode(dense), eval_mode(lowered), torch.no_grad():
            times = interleaved(
                {
                    "dense": lambda: call_with(dense, example_inputs),
                    "sparse": lambda: call_with(lowered, example_inputs),
                },
                runs,
                warmup=3,
            )
        return Latency(
            1e3 * statistics.median(times["dense"]),
            1e3 * statistics.median(times["sparse"]),
            torch.get_num_threads(),
            runs,
        )
    finally:
        torch.set_num_threads(previous)
