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

By default the model is calibrated block by block, as in the paper (`graphprune.ir.blockwise`):
every calibration batch goes through the first residual block, its layers are pruned on the
Hessians of the inputs they saw, the block runs again with its pruned weights, and its outputs
are the next block's inputs, so each layer makes up for the errors of the pruned layers before
it, and only one block's activations are alive at a time.  `sequential=False` takes every
layer's Hessian from the dense model in one run.  Conv layers, linear layers inside leaf
modules and tied weights (an LM head that is the embedding) are not touched and are named in
the record.  The pass changes what the model
computes (it is a pruning method, not an exact rewrite); Shrink and SparseLower after it are
exact as for any mask.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from tqdm.auto import tqdm

from graphprune.arguments import fraction
from graphprune.errors import ArgumentError, GraphPruneWarning
from graphprune.ir.blockwise import Blockwise
from graphprune.ir.inputs import calibration_batches
from graphprune.ir.masking import raw_tensor, replace_tensor, weight_mask
from graphprune.ir.weight_ops import RunningMeans, input_hessians, outer_product, weight_ops
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
        sequential: bool = True,
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
        self.sequential = bool(sequential)

    def keep_masks(self, gm, ctx, tensors):
        batches = calibration_batches(self.calibration, self.name)
        where = {q: (owner, attr) for q, owner, attr, _ in tensors}
        ops = {
            k: op
            for k, op in weight_ops(gm).items()
            if k in where
            and op.kind == "linear"
            and raw_tensor(*where[k]).ndim == 2
            and not (self.nm and raw_tensor(*where[k]).shape[op.in_dim] % self.nm[1])
        }
        keeps: dict[str, torch.Tensor] = {}
        if self.sequential:
            self._block_by_block(gm, ops, batches, where, keeps, ctx.spill)
        else:
            for q, h in input_hessians(gm, ops, batches).items():
                keeps[q] = self._prune(*where[q], h, ops[q].transposed, ctx.spill)
        skipped = [t[0] for t in tensors if t[0] not in keeps]
        if skipped:
            ctx.record(skipped=skipped)
        if not keeps:
            warnings.warn(
                f"{self.name} pruned no layer: it prunes the weights of linear layers (nn.Linear, F.linear, "
                f"aten.linear, GPT-2's Conv1D) that are not tied or excluded; left as they were: {skipped[:5]}",
                GraphPruneWarning,
                stacklevel=2,
            )
        return [keeps.get(t[0]) for t in tensors]

    def _block_by_block(self, gm, ops, batches, where, keeps, spill) -> None:
        """Prune each part's layers on the inputs the pruned parts before it give, then run it again."""
        with Blockwise(gm, batches) as runner:
            part_of = {name: i for i in runner for name in runner.ops_in(i)}
            due: dict[int, list[str]] = {}  # each layer is pruned after the last part that calls it
            for q, op in ops.items():
                due.setdefault(max(part_of[n] for n in op.nodes), []).append(q)
            hessians = RunningMeans(outer_product)
            taps = {n: hessians.tap(op) for op in ops.values() for n in op.nodes}
            for i in tqdm(runner, desc=f"{self.name} block by block", unit="part", disable=None, leave=False):
                if i not in due:
                    runner.run(i, taps)
                    continue
                runner.run(i, taps, last=False)
                for q, h in hessians.means(f"{self.name} Hessians", due[i]).items():
                    keeps[q] = self._prune(*where[q], h, ops[q].transposed, spill)
                    for n in ops[q].nodes:
                        taps.pop(n, None)
                runner.run(i)  # again, with the pruned weights: the next part sees their outputs

    def _prune(self, owner, attr: str, hessian: torch.Tensor, transposed: bool, spill) -> torch.Tensor:
        """The layer pruned and its weights reconstructed; the keep mask as (out, in).  `spill`
        (compile(inplace=True) of a big model) takes the old weight out of memory."""
        existing = weight_mask(owner, attr)
        weight = getattr(owner, attr)  # the weight as the forward reads it (any mask applied)
        pruned = None if existing is None else ~existing.mask
        new, keep = sparsegpt_prune(
            weight.T if transposed else weight,  # (out, in), as a stored (in, out) weight computes
            hessian,
            sparsity=self.sparsity,
            nm=self.nm,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            pruned=None if pruned is None else (pruned.T if transposed else pruned),
        )
        # a new tensor: the caller's model keeps its weights
        old = replace_tensor(owner, attr, new.T.contiguous() if transposed else new)
        if spill is not None:
            spill(old)
        return keep


def _nm(sparsity) -> tuple[int, int] | None:
    if not isinstance(sparsity, str):
        return None
    n, sep, m = sparsity.partition(":")
    if not (sep and n.strip().isdigit() and m.strip().isdigit() and 0 < int(n) < int(m)):
        raise ArgumentError(f"SparseGPTMask sparsity as N:M must read like '2:4' with 0 < N < M, got {sparsity!r}")
    return int(n), int(m)
