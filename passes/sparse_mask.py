"""Fine-grained masks: unstructured, N:M and block sparsity on Conv/Linear weights.

Weights are ranked by per-weight scores when a score pass left them in the
context (`WandaScore` does: |W| * ||x||), otherwise by magnitude |w| (as
`torch.nn.utils.prune.l1_unstructured`).  Masks go on every weight that a
linear/conv op of the graph reads (`graphprune.ir.weight_ops`): modules, or
`aten.linear` on parameters in exported graphs.  They are parametrizations like
the channel masks: they compose with them, stay applied while training, and a
weight masked once stays masked (a second mask can only add zeros).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from graphprune.analysis import Dependencies, Scores, WeightScores
from graphprune.arguments import choice, fraction, in_modules, module_names, unmatched
from graphprune.errors import ArgumentError
from graphprune.ir.masking import (
    WeightMaskParametrization,
    raw_tensor,
    refuse_lowered,
    register_mask,
    resolve,
    weight_mask,
)
from graphprune.ir.weight_ops import weight_ops
from graphprune.pipeline import PassBase, PassContext, PassResult

logger = logging.getLogger(__name__)

__all__ = ["UnstructuredMask", "NMMask", "BlockMask"]


def _apply(owner: nn.Module, attr: str, keep: torch.Tensor) -> int:
    """AND `keep` into the tensor's weight mask; return how many weights became masked."""
    existing = weight_mask(owner, attr)
    if existing is None:
        before = torch.ones_like(keep, dtype=torch.bool)
        register_mask(owner, attr, WeightMaskParametrization(keep))
    else:
        before = existing.mask
        existing.mask = before & keep  # a new tensor: the old one may be shared with the caller's model
        keep = existing.mask
    return int((before & ~keep).sum())


class WeightMaskSlots(PassBase):
    """Replays a `weight_mask` plan step: the listed tensors get a weight mask, all kept for now (a
    saved model's mask values come with its weights)."""

    preserves = frozenset({Dependencies, Scores, WeightScores})
    plan_op = "weight_mask"

    def __init__(self, tensors: Iterable[str]) -> None:
        self.tensors = list(tensors)

    @classmethod
    def from_plan(cls, step: dict) -> WeightMaskSlots:
        return cls(step["tensors"])

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        for name in self.tensors:
            owner, attr = resolve(gm, name)
            if weight_mask(owner, attr) is None:
                _apply(owner, attr, torch.ones_like(raw_tensor(owner, attr), dtype=torch.bool))
        ctx.record(plan={"op": "weight_mask", "tensors": sorted(self.tensors)})
        return PassResult(gm, True)


class _WeightMaskPass(PassBase):
    preserves = frozenset({Dependencies, Scores, WeightScores})

    def __init__(self, *, exclude: Iterable[str] = (), include_bias: bool = False) -> None:
        self.exclude = module_names(exclude, f"{type(self).__name__} exclude")
        self.include_bias = include_bias

    def _tensors(self, gm: fx.GraphModule, ctx: PassContext) -> list[tuple[str, nn.Module, str, bool]]:
        """(qualified name, owner, attribute, stored (in, out)) of each tensor to mask.  A weight
        read under two names (an LM head tied to the embedding) is left dense and recorded: masked
        in one place only, it would no longer be one tensor."""
        missing = unmatched(self.exclude, (n for n, _ in gm.named_modules()))
        if missing:
            raise ArgumentError(f"{self.name} exclude names modules the model does not have: {missing}")
        uses = Counter(id(t) for _, t in gm.named_parameters(remove_duplicate=False))
        out, tied = [], []
        for op in weight_ops(gm).values():  # nn.Linear/nn.ConvNd modules, or aten.linear/conv on parameters
            module = op.weight.rpartition(".")[0]
            if in_modules(module, self.exclude):
                continue
            owner, attr = resolve(gm, op.weight)
            if uses[id(raw_tensor(owner, attr))] > 1:
                tied.append(op.weight)
                continue
            out.append((op.weight, owner, attr, op.transposed))
            if op.bias is not None and self.include_bias:
                out.append((op.bias, *resolve(gm, op.bias), False))
        if tied:
            ctx.record(tied_left_dense=tied)
        return out

    @staticmethod
    def _score(ctx: PassContext, qualified: str, owner: nn.Module, attr: str, transposed: bool) -> torch.Tensor:
        """The tensor's scores, a weight stored (in, out) as (out, in): rows are outputs in every pattern."""
        given = (ctx.cached(WeightScores) or WeightScores()).score(qualified)
        if given is not None:
            score = given.double() * (getattr(owner, attr).detach() != 0)
        else:
            score = getattr(owner, attr).detach().abs().double()
        return score.T if transposed else score

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        refuse_lowered(gm, self.name)
        tensors = self._tensors(gm, ctx)
        keeps = self.keep_masks(gm, ctx, tensors)
        newly, report = 0, {}
        for (qualified, owner, attr, transposed), keep in zip(tensors, keeps):
            if keep is None:
                continue
            newly += _apply(owner, attr, keep.T if transposed else keep)
            mask = weight_mask(owner, attr).mask
            report[qualified] = 1.0 - float(mask.float().mean())
        ctx.record(sparsity=report, plan={"op": "weight_mask", "tensors": sorted(report)})
        return PassResult(gm, newly > 0)

    def keep_masks(self, gm, ctx, tensors) -> list[torch.Tensor | None]:
        """Per tensor, the weights to keep, shaped like its score (None: left as it is)."""
        raise NotImplementedError


class UnstructuredMask(_WeightMaskPass):
    """Mask the `sparsity` share of lowest-scored weights, per tensor (scope="layer"), per output row
    of each tensor (scope="row": Wanda's comparison group, best for LLMs) or across all targeted
    tensors at once (scope="global", like torch's global_unstructured)."""

    def __init__(
        self, sparsity: float, *, scope: str = "layer", exclude: Iterable[str] = (), include_bias: bool = False
    ) -> None:
        sparsity = fraction(sparsity, "UnstructuredMask sparsity")
        choice(scope, "UnstructuredMask scope", ("layer", "row", "global"))
        super().__init__(exclude=exclude, include_bias=include_bias)
        self.sparsity, self.scope = float(sparsity), scope

    def keep_masks(self, gm, ctx, tensors):
        scores = [self._score(ctx, *t) for t in tensors]
        if self.scope == "layer":
            return [_keep_top(s, self.sparsity) for s in scores]
        if self.scope == "row":
            return [torch.stack([_keep_top(r, self.sparsity) for r in _as_rows(s)]).reshape(s.shape) for s in scores]
        if not scores:
            return []
        flat = torch.cat([s.reshape(-1) for s in scores])
        k = round(self.sparsity * flat.numel())  # as torch.nn.utils.prune counts
        if k == 0:
            return [torch.ones_like(s, dtype=torch.bool) for s in scores]
        threshold = torch.kthvalue(flat, k).values
        # exactly k weights: everything below the threshold, then ties in order
        below = [s < threshold for s in scores]
        ties_left = k - sum(int(b.sum()) for b in below)
        keeps = []
        for s, b in zip(scores, below):
            tie = (s == threshold).reshape(-1)
            take = torch.zeros_like(tie)
            idx = torch.nonzero(tie).reshape(-1)[: max(ties_left, 0)]
            take[idx] = True
            ties_left -= idx.numel()
            keeps.append(~(b | take.reshape(s.shape)))
        return keeps


def _keep_top(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = round(sparsity * score.numel())  # as torch.nn.utils.prune counts
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        keep[torch.argsort(score.reshape(-1), stable=True)[:k]] = False
    return keep.reshape(score.shape)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A weight as a matrix: output channels by everything a row reads (in-channel major)."""
    return t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(1, -1)


class NMMask(_WeightMaskPass):
    """Keep the `n` highest-scored weights of every `m` consecutive inputs of an output row
    (2:4 is what sparse tensor cores run).  Tensors whose row length is not a multiple of m are
    left dense and named in the pass record."""

    def __init__(self, n: int = 2, m: int = 4, *, exclude: Iterable[str] = ()) -> None:
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ArgumentError(f"NMMask needs integers 0 < n < m, got n={n!r}, m={m!r}")
        super().__init__(exclude=exclude)
        self.n, self.m = n, m

    def keep_masks(self, gm, ctx, tensors):
        keeps, skipped = [], []
        for t in tensors:
            score = self._score(ctx, *t)
            s = _as_rows(score)
            if s.shape[1] % self.m:
                skipped.append(t[0])
                keeps.append(None)
                continue
            blocks = s.reshape(-1, self.m)
            keep = torch.zeros_like(blocks, dtype=torch.bool)
            keep.scatter_(1, torch.topk(blocks, self.n, dim=1).indices, True)
            keeps.append(keep.reshape(score.shape))
        if skipped:
            logger.info(
                "NMMask left %d tensor(s) dense (row length not a multiple of %d): %s", len(skipped), self.m, skipped
            )
            ctx.record(skipped=skipped)
        return keeps


class BlockMask(_WeightMaskPass):
    """Mask whole (rows x cols) blocks of each weight matrix, the lowest-scored `sparsity` share of
    blocks per tensor (Intel Neural Compressor's NxM patterns, e.g. block=(4, 1))."""

    def __init__(self, sparsity: float, block: tuple[int, int] = (4, 1), *, exclude: Iterable[str] = ()) -> None:
        sparsity = fraction(sparsity, "BlockMask sparsity")
        if not (isinstance(block, tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ArgumentError(f"BlockMask block must be a (rows, cols) tuple of positive ints, got {block!r}")
        super().__init__(exclude=exclude)
        self.sparsity, self.block = float(sparsity), block

    def keep_masks(self, gm, ctx, tensors):
        keeps, skipped = [], []
        bh, bw = self.block
        for t in tensors:
            score = self._score(ctx, *t)
            s = _as_rows(score)
            rows, cols = s.shape
            if rows % bh or cols % bw:
                skipped.append(t[0])
                keeps.append(None)
                continue
            blocks = s.reshape(rows // bh, bh, cols // bw, bw).sum((1, 3))
            keep_blocks = _keep_top(blocks, self.sparsity)
            keep = keep_blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
            keeps.append(keep.reshape(score.shape))
        if skipped:
            logger.info(
                "BlockMask left %d tensor(s) dense (shape not a multiple of %s): %s", len(skipped), self.block, skipped
            )
            ctx.record(skipped=skipped)
        return keeps
