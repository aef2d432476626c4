"""SparseGPT (Frantar & Alistarh 2023): unstructured or N:M masks chosen with the layer's Hessian,
and the kept weights updated to make up for the removed ones (optimal brain surgeon, OBS).

For a linear layer y = W x, removing weights changes the output by dW x; over the calibration
inputs its squared error is a quadratic form in each row of W with the Hessian H = X X^T.  The
columns are processed left to right: a removed weight w_q is set to zero and the columns not yet
processed absorb its loss through the OBS update -w_q / [H^-1]_qq * [H^-1]_q,:, with H^-1 of the
columns still free.  The upper Cholesky factor of H^-1 gives those rows for every step at once.
Within each block of `blocksize` columns the mask is chosen adaptively, by the OBS saliency
w^2 / [H^-1]_qq^2 of the weights as updated so far (per block for unstructured sparsity, per m
consecutive columns for N:M).

Layers are pruned one-shot here: every layer's Hessian comes from the dense model's activations
(the paper feeds each block the outputs of the blocks already pruned).  Conv layers, and linear
layers inside leaf modules, are not touched and are named in the record.  The pass changes what
the model computes (it is a pruning method, not an exact rewrite); Shrink and SparseLower after
it are exact as for any mask.
"""

from __future__ import annotations

from typing import Iterable

import torch

from graphprune.arguments import fraction
from graphprune.errors import ArgumentError
from graphprune.ir.inputs import calibration_batches
from graphprune.ir.masking import raw_tensor, replace_tensor, weight_mask
from graphprune.ir.weight_ops import input_hessians, weight_ops
from graphprune.passes.sparse_mask import _WeightMaskPass

__all__ = ["SparseGPTMask", "sparsegpt_prune"]


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    pruned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) for one (rows x columns) weight given H = E[x x^T] over its inputs.
    `pruned`: weights that must end up removed (an earlier mask); they count towards the sparsity."""
    w = weight.detach().double().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs that are always zero: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(cols, dtype=h.dtype) * (percdamp * torch.diagonal(h).mean())
    # rows of H^-1 restricted to the columns not yet processed: the upper Cholesky factor of H^-1
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    forced = torch.zeros_like(w, dtype=torch.bool) if pruned is None else pruned.clone()
    removed = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, hblock = w[:, start:end].clone(), hinv[start:end, start:end]
        diag = torch.diagonal(hblock)
        errors = torch.zeros_like(block)
        mask = forced[:, start:end].clone()
        if nm is None and sparsity > 0:
            saliency = block.pow(2) / diag.pow(2)
            saliency[mask] = -1.0  # the forced ones go first and count
            k = round(sparsity * saliency.numel())
            if k:
                chosen = torch.zeros(saliency.numel(), dtype=torch.bool)
                chosen[torch.argsort(saliency.reshape(-1), stable=True)[:k]] = True
                mask |= chosen.reshape(mask.shape)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                span = block[:, i : i + m].pow(2) / diag[i : i + m].pow(2)
                span[mask[:, i : i + m]] = -1.0
                drop = torch.topk(span, m - n, dim=1, largest=False).indices
                mask[:, i : i + m].scatter_(1, drop, True)
            column = block[:, i]
            err = torch.where(mask[:, i], column, torch.zeros_like(column)) / hblock[i, i]
            block[:, i:] -= err.unsqueeze(1) * hblock[i, i:].unsqueeze(0)
            block[:, i] = torch.where(mask[:, i], torch.zeros_like(column), block[:, i])
            errors[:, i] = err
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
        removed[:, start:end] = mask
    w[removed] = 0.0
    return w.to(weight.dtype), ~removed


class SparseGPTMask(_WeightMaskPass):
    """Unstructured (`sparsity=0.5`) or N:M (`sparsity="2:4"`) masks on every linear layer, the
    kept weights reconstructed by OBS from calibration activations (SparseGPT).

    calibration: batches shaped like example_inputs (a DataLoader or a list); blocksize: columns
    whose mask is chosen together; percdamp: dampening added to H's diagonal, as a share of its
    mean, so that H is invertible."""

    def __init__(
        self,
        sparsity: float | str,
        *,
        calibration: Iterable | None = None,
        blocksize: int = 128,
        percdamp: float = 0.01,
        exclude: Iterable[str] = (),
    ) -> None:
        self.nm = _nm(sparsity)
        self.sparsity = 0.0 if self.nm else float(fraction(sparsity, "SparseGPTMask sparsity"))
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ArgumentError(f"SparseGPTMask blocksize must be a positive integer, got {blocksize!r}")
        if self.nm and blocksize % self.nm[1]:
            raise ArgumentError(f"SparseGPTMask blocksize ({blocksize}) must be a multiple of m ({self.nm[1]})")
        if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp > 0:
            raise ArgumentError(f"SparseGPTMask percdamp must be a positive number (e.g. 0.01), got {percdamp!r}")
        super().__init__(exclude=exclude)
        self.calibration, self.blocksize, self.percdamp = calibration, blocksize, float(percdamp)

    def keep_masks(self, gm, ctx, tensors):
        batches = calibration_batches(self.calibration, self.name)
        ops = weight_ops(gm)
        wanted = {q for q, _, _ in tensors}
        hessians = input_hessians(gm, {k: op for k, op in ops.items() if k in wanted}, batches)
        keeps, skipped = [], []
        for qualified, owner, attr in tensors:
            h = hessians.get(qualified)
            w = raw_tensor(owner, attr)
            if h is None or w.ndim != 2 or (self.nm and w.shape[1] % self.nm[1]):
                skipped.append(qualified)
                keeps.append(None)
                continue
            existing = weight_mask(owner, attr)
            new, keep = sparsegpt_prune(
                getattr(owner, attr),  # the weight as the forward reads it (any mask applied)
                h,
                sparsity=self.sparsity,
                nm=self.nm,
                blocksize=self.blocksize,
                percdamp=self.percdamp,
                pruned=None if existing is None else ~existing.mask,
            )
            replace_tensor(owner, attr, new)  # a new tensor: the caller's model keeps its weights
            keeps.append(keep)
        if skipped:
            ctx.record(skipped=skipped)
        return keeps


def _nm(sparsity) -> tuple[int, int] | None:
    if not isinstance(sparsity, str):
        return None
    n, sep, m = sparsity.partition(":")
    if not (sep and n.strip().isdigit() and m.strip().isdigit() and 0 < int(n) < int(m)):
        raise ArgumentError(f"SparseGPTMask sparsity as N:M must read like '2:4' with 0 < N < M, got {sparsity!r}")
    return int(n), int(m)
