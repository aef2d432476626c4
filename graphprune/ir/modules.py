"""The modules graphprune puts into a model, in one place.

- `ZeroReinsert` (ReinsertZeros): keeps an interface width while the channels behind it shrink.
- `PrunedMultiheadAttention` (Shrink of nn.MultiheadAttention): fewer heads of the same size.
- `SparseLinear` / `SparseConv1x1` (SparseLower): weights stored compressed, torch's sparse kernels.
- `MaskedLayerNorm` (write-back of a masked model): a LayerNorm over the kept channels only.
- `SkippedBlock` (DropBlocks): where a residual block was, passes its hidden state on.

Each is an ordinary nn.Module whose state dict is plain dense tensors (saved with safetensors).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from graphprune.ir.masking import channel_mask
from graphprune.ir.norms import masked_layer_norm

__all__ = [
    "ZeroReinsert",
    "PrunedMultiheadAttention",
    "FORMATS",
    "SparseLinear",
    "SparseConv1x1",
    "compress",
    "MaskedLayerNorm",
    "set_layer_norm_class",
    "SkippedBlock",
]


class ZeroReinsert(nn.Module):
    """Identity that zeroes pruned channels while masked; after Shrink, scatters the kept channels
    back into a zero tensor of the original width along `dim`."""

    graphprune_maskable = ("keep",)

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.width, self.dim = width, dim
        self.register_buffer("keep", torch.ones(width))
        self.register_buffer("index", torch.arange(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.dim] = -1
        x = x * self.keep.reshape(shape).to(x.dtype)
        if x.shape[self.dim] == self.width:
            return x
        out_shape = list(x.shape)
        out_shape[self.dim] = self.width
        return x.new_zeros(out_shape).index_copy(self.dim, self.index, x)

    def graphprune_shrink(self, removed: dict[str, dict[int, torch.Tensor]]) -> None:
        gone = removed.get("keep", {}).get(0)
        if gone is None:
            return
        kept = torch.ones(self.keep.numel(), dtype=torch.bool)
        kept[gone] = False
        self.index = self.index[kept]
        self.keep = torch.ones(int(kept.sum()), dtype=self.keep.dtype)

    def extra_repr(self) -> str:
        return f"width={self.width}, dim={self.dim}, kept={self.index.numel()}"


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with `num_heads` heads of `head_dim` each, which need not make up
    `embed_dim` (the width of the inputs and outputs).  Same tensors, same call."""

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        (tgt, batch, _), src = query.shape, key.shape[0]
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)

        def heads(x, i, length):
            return F.linear(x, w[i], b[i]).reshape(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(query, 0, tgt), heads(key, 1, src), heads(value, 2, src)
        bias = torch.zeros(batch, 1, tgt, src, dtype=q.dtype, device=q.device)
        if attn_mask is not None:  # MultiheadAttention's masks: True (or -inf) = not attended
            bias = bias + (
                torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else attn_mask
            )
        if key_padding_mask is not None:
            pad = key_padding_mask.reshape(batch, 1, 1, src)
            bias = bias + (
                torch.zeros_like(pad, dtype=q.dtype).masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else pad
            )
        if is_causal and attn_mask is None:
            bias = bias + torch.full((tgt, src), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5 + bias, dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        out = (weights @ v).permute(2, 0, 1, 3).reshape(tgt, batch, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights


FORMATS = ("csr", "bsr")


def _check_blocksize(shape: tuple[int, int], blocksize: tuple[int, int] | None) -> tuple[int, int]:
    if blocksize is None:
        raise ValueError("format 'bsr' needs a blocksize (rows, cols) that divides the weight's shape")
    if shape[0] % blocksize[0] or shape[1] % blocksize[1]:
        raise ValueError(f"BSR blocksize {blocksize} does not divide the weight's shape {shape}")
    return tuple(blocksize)


class _SparseWeight(nn.Module):
    """A 2-D weight (out, in) in CSR or BSR form, kept as buffers: crow_indices, col_indices, values."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, format: str, blocksize: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"unknown sparse format {format!r}: use one of {FORMATS}")
        weight = weight.detach()
        if weight.ndim != 2:
            raise ValueError(f"a sparse weight is 2-D (out, in), got shape {tuple(weight.shape)}")
        self.format, self.shape = format, tuple(weight.shape)
        self.blocksize = _check_blocksize(self.shape, blocksize) if format == "bsr" else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
            compressed = weight.to_sparse_csr() if format == "csr" else weight.to_sparse_bsr(self.blocksize)
        index = (
            torch.int32 if compressed.values().numel() < 2**31 else torch.int64
        )  # half the index bytes; faster kernels
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
                self._cache = (
                    key,
                    build(self.crow_indices, self.col_indices, self.values, self.shape, check_invariants=False),
                )
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
        return (
            torch.sparse.mm(self.weight, x)
            if self.bias is None
            else torch.addmm(self.bias.unsqueeze(1), self.weight, x)
        )

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


def compress(
    weight: torch.Tensor, bias: torch.Tensor | None, kind: str, format: str, blocksize: tuple[int, int] | None = None
) -> _SparseWeight:
    """A sparse module computing the same as linear (`kind="linear"`) or a 1x1 conv (`kind="conv"`)."""
    if kind == "linear":
        return SparseLinear(weight, bias, format, blocksize)
    if kind == "conv":
        return SparseConv1x1(weight.reshape(weight.shape[0], weight.shape[1]), bias, format, blocksize)
    raise ValueError(f"unknown layer kind {kind!r}: 'linear' or 'conv'")


class MaskedLayerNorm(nn.Module):
    """Mixed into the user's LayerNorm class once its weight has masked channels: statistics over the
    kept channels only, as the masked graph computes them (`masked_layer_norm`), so the module tree
    can hold the masked model.  Shrink takes it out again (the LayerNorm is then over the channels
    that are left)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = channel_mask(self, "weight")
        if mask is None or not hasattr(mask, "keep_0"):
            return super().forward(x)
        return masked_layer_norm(x, mask.keep_0, self.weight, self.bias, self.eps)


_MASKED_CLASSES: dict[type, type] = {}


def set_layer_norm_class(module: nn.Module, masked: bool) -> None:
    """Mix MaskedLayerNorm into an nn.LayerNorm's class, or take it out (a parametrized class keeps
    its tensor properties, over the other base)."""
    if not isinstance(module, nn.LayerNorm):
        return
    cls = type(module)
    parametrized = parametrize.is_parametrized(module)
    base = cls.__bases__[0] if parametrized else cls
    if masked == issubclass(base, MaskedLayerNorm):
        return
    if masked:
        if base not in _MASKED_CLASSES:
            _MASKED_CLASSES[base] = type(base.__name__, (MaskedLayerNorm, base), {"__module__": __name__})
        new_base = _MASKED_CLASSES[base]
    else:
        new_base = base.__bases__[1]
    if parametrized:
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, (new_base,), namespace)
    else:
        module.__class__ = new_base


class SkippedBlock(nn.Module):
    """Stands where a residual block was removed (DropBlocks): it is called as the block was and
    returns the hidden state it is given (the block's first argument, `argument` by keyword), so
    the container's numbering and the code that loops over it stay as they were.  Traced through:
    a graph has no node for it."""

    graphprune_traced_through = True

    def __init__(self, replaces: str, argument: str) -> None:
        super().__init__()
        self.replaces, self.argument = replaces, argument

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs[self.argument]

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"
