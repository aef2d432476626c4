"""Sparse execution: linear layers and 1x1 convolutions whose weights are stored compressed.

`SparseLinear` and `SparseConv1x1` hold a weight in CSR or BSR form as three
plain buffers (row pointers, column indices, values), so a lowered model's
state dict is ordinary dense tensors: `save` writes them with safetensors
next to a JSON plan, and `load` rebuilds the model from the original one by
replaying that plan (no pickle; see `graphprune.saving`).  The modules run torch's sparse kernels
(`torch.sparse.mm`), for inference: a lowered model is not trainable.

    from graphprune.backends import sparse
    lowered = gp.compile(model, [UnstructuredMask(0.9), SparseLower()], example_inputs=x)
    sparse.save(lowered, "out/")             # model.safetensors + plan.json
    again = sparse.load(model, "out/", example_inputs=x)
    print(sparse.benchmark(model, lowered, x))
"""

from __future__ import annotations

import statistics
import warnings
import time
from dataclasses import dataclass

import torch
from torch import nn

from graphprune.saving import load, save

__all__ = ["FORMATS", "SparseLinear", "SparseConv1x1", "compress", "save", "load", "Latency", "benchmark"]

FORMATS = ("csr", "bsr")


def _blocksize(shape: tuple[int, int], blocksize: tuple[int, int] | None) -> tuple[int, int]:
    if blocksize is None:
        raise ValueError("format 'bsr' needs a blocksize (rows, cols) that divides the weight's shape")
    if shape[0] % blocksize[0] or shape[1] % blocksize[1]:
        raise ValueError(f"BSR blocksize {blocksize} does not divide the weight's shape {shape}")
    return tuple(blocksize)


class _SparseWeight(nn.Module):
    """A 2-D weight (out, in) in CSR or BSR form, kept as buffers: crow_indices, col_indices, values."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, format: str, blocksize: tuple[int, int] | None = None) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"unknown sparse format {format!r}: use one of {FORMATS}")
        weight = weight.detach()
        if weight.ndim != 2:
            raise ValueError(f"a sparse weight is 2-D (out, in), got shape {tuple(weight.shape)}")
        self.format, self.shape = format, tuple(weight.shape)
        self.blocksize = _blocksize(self.shape, blocksize) if format == "bsr" else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
            compressed = weight.to_sparse_csr() if format == "csr" else weight.to_sparse_bsr(self.blocksize)
        index = torch.int32 if compressed.values().numel() < 2**31 else torch.int64  # half the index bytes; faster kernels
        self.register_buffer("crow_indices", compressed.crow_indices().to(index))
        self.register_buffer("col_indices", compressed.col_indices().to(index))
        self.register_buffer("values", compressed.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._cache: tuple | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The compressed weight (a sparse CSR/BSR tensor built over the buffers, rebuilt when they change)."""
        key = (self.crow_indices.data_ptr(), self.col_indices.data_ptr(), self.values.data_ptr(), self.values._version)
        if self._cache is None or self._cache[0] != key:
            build = torch.sparse_csr_tensor if self.format == "csr" else torch.sparse_bsr_tensor
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
                self._cache = (key, build(self.crow_indices, self.col_indices, self.values, self.shape, check_invariants=False))
        return self._cache[1]

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the sparse tensor built over the buffers (torch cannot copy
        sparse CSR/BSR tensors); it is rebuilt on first use."""
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """The number of stored values is the saved model's: take the saved buffers' shapes."""
        for name in ("crow_indices", "col_indices", "values"):
            if prefix + name in state_dict:  # the saved size, this module's device (and dtype for the values)
                current, saved = getattr(self, name), state_dict[prefix + name]
                dtype = saved.dtype if name != "values" else current.dtype
                setattr(self, name, torch.empty(saved.shape, dtype=dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_dense(self) -> torch.Tensor:
        return self.weight.to_dense()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])

    def graphprune_params(self) -> int:
        """Stored weight values and bias (what count_params counts for this module)."""
        return self.nnz + (0 if self.bias is None else self.bias.numel())

    def graphprune_macs(self, x: torch.Tensor) -> int:
        """One multiply-accumulate per stored value per input row (count_macs)."""
        return self.nnz * (x.numel() // self.shape[1])

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """W @ x + b for x of shape (in, n), the bias fused into the sparse kernel (a separate add and
        a copy of the result cost as much as the product at 90 % sparsity)."""
        if x.shape[1] == 1:  # matrix-vector kernels are about twice as fast for a single row
            y = torch.mv(self.weight, x[:, 0]) if self.bias is None else torch.addmv(self.bias, self.weight, x[:, 0])
            return y.unsqueeze(1)
        return torch.sparse.mm(self.weight, x) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), self.weight, x)

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.blocksize else ""
        return f"{self.shape[1]} -> {self.shape[0]}, format={self.format}{block}, sparsity={self.sparsity:.3f}, bias={self.bias is not None}"


class SparseLinear(_SparseWeight):
    """F.linear(x, W, b) with W compressed; x of any shape (..., in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.shape[1])
        return self._matmul(flat.t()).t().reshape(*x.shape[:-1], self.shape[0])


class SparseConv1x1(_SparseWeight):
    """A 1x1 convolution (stride 1, no padding, one group) with its (out, in) weight compressed;
    x of shape (N, C, *spatial)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        y = self._matmul(x.transpose(0, 1).reshape(c, -1))
        return y.reshape(self.shape[0], n, *spatial).transpose(0, 1)


def compress(weight: torch.Tensor, bias: torch.Tensor | None, kind: str, format: str, blocksize: tuple[int, int] | None = None) -> _SparseWeight:
    """A sparse module computing the same as linear (`kind="linear"`) or a 1x1 conv (`kind="conv"`)."""
    if kind == "linear":
        return SparseLinear(weight, bias, format, blocksize)
    if kind == "conv":
        return SparseConv1x1(weight.reshape(weight.shape[0], weight.shape[1]), bias, format, blocksize)
    raise ValueError(f"unknown layer kind {kind!r}: 'linear' or 'conv'")


# -- latency ---------------------------------------------------------------------------------


def synchronize() -> None:
    """Wait for queued GPU work, so that a timing measures it (nothing to do on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


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
        return (f"dense {self.dense_ms:.3f} ms, sparse {self.sparse_ms:.3f} ms, speedup {self.speedup:.2f}x "
                f"(median of {self.runs} interleaved runs, {self.threads} threads)")


def benchmark(dense: nn.Module, lowered: nn.Module, example_inputs: tuple | dict, runs: int = 20, threads: int | None = None) -> Latency:
    """Median latency of the dense and the lowered model on the same inputs in this process,
    interleaved run by run so that both see the same machine load."""
    from graphprune.inputs import call_with, check_example_inputs, eval_mode

    example_inputs = check_example_inputs(example_inputs)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with eval_mode(dense), eval_mode(lowered), torch.no_grad():
            for _ in range(3):
                call_with(dense, example_inputs)
                call_with(lowered, example_inputs)
            times: dict[str, list[float]] = {"dense": [], "sparse": []}
            for _ in range(runs):
                for name, m in (("dense", dense), ("sparse", lowered)):
                    start = time.perf_counter()
                    call_with(m, example_inputs)
                    synchronize()
                    times[name].append(time.perf_counter() - start)
        return Latency(1e3 * statistics.median(times["dense"]), 1e3 * statistics.median(times["sparse"]), torch.get_num_threads(), runs)
    finally:
        torch.set_num_threads(previous)

