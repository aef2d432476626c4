"""Channel labels: the bookkeeping behind the dependency analyzer.

Every channel an op creates (a conv's output channel, a linear's output
feature) gets a fresh integer label.  The analyzer runs the model on its
example inputs and, beside every real tensor, carries a *label tensor* of the
same shape whose entries say which channel each element belongs to (0 means
"no prunable channel").  Shape ops are executed on the label tensors, so
concat offsets, splits, flattens and channel shuffles compose by
construction instead of by hand-written index maps.  Ops that couple channels
(a residual add, a grouped conv) *unify* labels; ops that cannot be pruned
through *freeze* them.  In the end every union-find class of labels is one
prunable unit, and the parameter slices registered as *slots* say what to
remove when that unit goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NONE = 0


@dataclass(frozen=True)
class FreezeSite:
    """Why some channels may not be pruned, and where (for the report and ReinsertZeros)."""

    kind: str  # "output", "no_rule", "conflict", "norm", "reduction", "indexing", ...
    node: str  # name of the fx node that froze them
    reason: str
    source: str | None = None  # the node producing the frozen tensor (when one tensor is meant)
    dim: int | None = None  # the channel dim of that tensor, when unambiguous
    location: str = ""  # node name and module path, for people


class LabelSpace:
    """Union-find over channel labels, with frozen marks and parameter slots.

    Unions and freezes are recorded as tensors and resolved together (a Llama-8B makes about a million):
    the class of a label is the smallest label connected to it.
    """

    def __init__(self) -> None:
        self._n = 1  # label 0 is NONE
        self._parent = torch.zeros(1, dtype=torch.int64)  # resolved classes of the first len(_parent) labels
        self._edges: list[tuple[torch.Tensor, torch.Tensor]] = []  # unions not yet resolved
        self._frozen: list[tuple[torch.Tensor, int]] = []  # (labels, index into self.sites)
        self.sites: list[FreezeSite] = []
        # (tensor qualified name, dim) -> list of (index tensor, label tensor)
        self._slots: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pinned: dict[tuple[str, int], list[torch.Tensor]] = {}  # indices some use reads with no channel
        self.consumer_slots: set[tuple[str, int]] = set()  # input side of a module (conv/linear weight dim 1)
        self.kinds: dict[int, str] = {}  # label -> kind of unit it makes ("head"); default "channel"

    # -- creating and relating labels -------------------------------------------------
    def fresh(self, n: int) -> torch.Tensor:
        start, self._n = self._n, self._n + n
        return torch.arange(start, start + n, dtype=torch.int64)

    def __len__(self) -> int:
        return self._n

    def _resolve(self) -> torch.Tensor:
        """The class (smallest connected label) of every label so far."""
        parent = torch.cat([self._parent, torch.arange(len(self._parent), self._n, dtype=torch.int64)])
        if self._edges:
            a = torch.cat([e[0] for e in self._edges])
            b = torch.cat([e[1] for e in self._edges])
            self._edges = []
            while True:  # hook each class onto the smallest class it touches, then jump to the roots
                ra, rb = parent[a], parent[b]
                differ = ra != rb
                if not differ.any():
                    break
                ra, rb = ra[differ], rb[differ]
                low = torch.minimum(ra, rb)
                parent.scatter_reduce_(0, torch.maximum(ra, rb), low, "amin")
                while True:
                    jumped = parent[parent]
                    if torch.equal(jumped, parent):
                        break
                    parent = jumped
                a, b = a[differ], b[differ]
        self._parent = parent
        return parent

    def roots_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Map labels to their class representatives."""
        return self._resolve()[labels]

    def unify(self, a: torch.Tensor, b: torch.Tensor, site: FreezeSite) -> None:
        """Unify labels pairwise; where exactly one side has no channel, freeze the other."""
        a, b = compact_together(*torch.broadcast_tensors(a, b))
        a, b = a.reshape(-1), b.reshape(-1)
        lone = (a == NONE) ^ (b == NONE)
        if lone.any():
            self.freeze(torch.cat([a[lone], b[lone]]), site)
        both = (a != NONE) & (b != NONE) & (a != b)
        if both.any():
            pairs = torch.unique(a[both] * self._n + b[both])  # one int per pair: unique on 1-D is fast
            self._edges.append((pairs // self._n, pairs % self._n))

    def unify_all(self, labels: torch.Tensor) -> None:
        """Put all (non-empty) labels into one class."""
        flat = torch.unique(labels.reshape(-1))
        flat = flat[flat != NONE]
        if flat.numel() > 1:
            self._edges.append((flat[:1].expand(flat.numel() - 1), flat[1:]))

    def freeze(self, labels: torch.Tensor, site: FreezeSite) -> None:
        uniq = torch.unique(compact(labels).reshape(-1))
        uniq = uniq[uniq != NONE]
        if uniq.numel() == 0:
            return
        self.sites.append(site)
        self._frozen.append((uniq, len(self.sites) - 1))

    def add_slot(self, tensor: str, dim: int, labels: torch.Tensor, consumer: bool = False) -> None:
        """Index i of `tensor` along `dim` belongs to channel labels[i] (NONE: to none).

        `consumer` marks the input side of a module: pruning there leaves the
        module's own output width alone (what `exclude=` protects).
        """
        if consumer:
            self.consumer_slots.add((tensor, dim))
        labels = labels.reshape(-1)
        index = torch.arange(labels.numel())
        keep = labels != NONE
        if keep.any():
            self._slots.setdefault((tensor, dim), []).append((index[keep], labels[keep]))
        if not keep.all():  # a tensor read twice (tied, or a module called twice) must keep these indices
            self._pinned.setdefault((tensor, dim), []).append(index[~keep])

    def tag(self, labels: torch.Tensor, kind: str) -> None:
        """Mark the units these labels belong to as a kind (e.g. "head") for per-kind ratios."""
        for label in torch.unique(labels.reshape(-1)).tolist():
            if label != NONE:
                self.kinds[label] = kind

    def freeze_slots(self, tensor: str, site: FreezeSite) -> None:
        """Freeze every channel that owns a slice of `tensor`."""
        for (name, _), parts in self._slots.items():
            if name == tensor:
                for _, labels in parts:
                    self.freeze(labels, site)

    def rename_slots(self, rename: dict[str, str]) -> None:
        """Merge the slots of tied tensors under one name (they must lose the same slices)."""
        if not rename:
            return
        merged: dict[tuple[str, int], list] = {}
        for (name, dim), parts in self._slots.items():
            merged.setdefault((rename.get(name, name), dim), []).extend(parts)
        self._slots = merged
        pinned: dict[tuple[str, int], list] = {}
        for (name, dim), parts in self._pinned.items():
            pinned.setdefault((rename.get(name, name), dim), []).extend(parts)
        self._pinned = pinned
        self.consumer_slots = {(rename.get(n, n), d) for n, d in self.consumer_slots}

    # -- reading the result ------------------------------------------------------------
    def finalize(
        self,
    ) -> tuple[torch.Tensor, dict[int, list[FreezeSite]], dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]]:
        """Return (root of every label, frozen roots with their sites, slots by root).

        A slice of a parameter claimed by two labels (a parameter used twice)
        makes those labels one unit.
        """
        merged: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for key, parts in self._slots.items():
            index = torch.cat([p[0] for p in parts])
            labels = torch.cat([p[1] for p in parts])
            order = torch.argsort(index, stable=True)
            index, labels = index[order], labels[order]
            same = torch.nonzero(index[1:] == index[:-1]).reshape(-1)
            if same.numel():
                self._edges.append((labels[same], labels[same + 1]))
            if key in self._pinned:  # read with channels by one use and without by another
                clash = torch.isin(index, torch.cat(self._pinned[key]))
                if clash.any():
                    self.freeze(
                        labels[clash],
                        FreezeSite(
                            "conflict",
                            key[0],
                            f"{key[0]} is shared (tied, or its module is "
                            "called twice) and another use reads these slices unprunable",
                            location=key[0],
                        ),
                    )
            merged[key] = (index, labels)
        roots = self._resolve()
        return roots, self._frozen_roots(roots), self._slots_by_root(merged, roots)

    def _frozen_roots(self, roots: torch.Tensor) -> dict[int, list[FreezeSite]]:
        """Frozen classes in the order their labels were first frozen, each with its sites in order."""
        frozen: dict[int, list[FreezeSite]] = {}
        if not self._frozen:
            return frozen
        r = roots[torch.cat([labels for labels, _ in self._frozen])]
        call = torch.cat([torch.full((labels.numel(),), s) for labels, s in self._frozen])
        uniq, inverse = torch.unique(r, return_inverse=True)
        first = torch.zeros(uniq.numel(), dtype=torch.int64).scatter_reduce(
            0, inverse, torch.arange(r.numel()), "amin", include_self=False
        )
        key = torch.unique(first[inverse] * len(self.sites) + call)  # (root by first freeze, site), sorted
        for root, s in zip(r[key // len(self.sites)].tolist(), (key % len(self.sites)).tolist()):
            bucket = frozen.setdefault(root, [])
            if self.sites[s] not in bucket:
                bucket.append(self.sites[s])
        return frozen

    @staticmethod
    def _slots_by_root(merged, roots: torch.Tensor) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        slots = {}
        for key, (index, labels) in merged.items():
            first = torch.ones_like(index, dtype=torch.bool)
            first[1:] = index[1:] != index[:-1]
            slots[key] = (index[first], roots[labels[first]])
        return slots


def varies_along(labels: torch.Tensor, dim: int) -> bool:
    """True when the label tensor is not constant along `dim`."""
    if labels.shape[dim] <= 1 or labels.stride(dim) == 0:
        return False
    return not torch.equal(labels, labels.narrow(dim, 0, 1).expand_as(labels))  # (stops at the first difference)


def labeled_dims(labels: torch.Tensor) -> list[int]:
    return [d for d in range(labels.ndim) if varies_along(labels, d)]


def channel_dims(labels: torch.Tensor) -> list[int]:
    """Dims along which every index belongs to one channel (or none).  A dim that varies only
    because some positions carry no channel (a class token's position among a sequence's tokens),
    with every index holding several channels, is not one of them."""
    out = []
    for d in labeled_dims(labels):
        _, lo, hi = _index_rows(labels, d)
        if bool((lo == hi).all()):
            out.append(d)
    return out


def _index_rows(labels: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The labels at each index of dim `d` (one row per index), and each row's smallest and
    largest label leaving NONE aside."""
    c = compact(labels).movedim(d, 0)
    rows = c.reshape(c.shape[0], -1)
    hi = rows.max(dim=1).values
    return rows, torch.where(rows == NONE, hi.unsqueeze(1), rows).min(dim=1).values, hi


def compact(labels: torch.Tensor) -> torch.Tensor:
    """Drop broadcast (stride-0) extents so that work scales with channels, not activations."""
    return compact_together(labels)[0]


def squeeze_constant(labels: torch.Tensor) -> torch.Tensor:
    """`compact`, and every dim the labels do not vary along kept at size 1 (a sequence dim that a
    transpose and reshape materialised): what an analysis keeps for later is as small as its channels."""
    labels = compact(labels)
    for d in range(labels.ndim):
        if labels.shape[d] > 1 and not varies_along(labels, d):
            labels = labels.narrow(d, 0, 1)
    return labels.clone()


def compact_together(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """`compact` for tensors of one shape, keeping them aligned element for element."""
    t0 = tensors[0]
    index = tuple(
        slice(0, 1) if t0.shape[d] > 1 and all(t.stride(d) == 0 for t in tensors) else slice(None)
        for d in range(t0.ndim)
    )
    return [t[index] for t in tensors]


def none_like(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64).expand(tuple(shape))


def unit_dims(space: LabelSpace, labels: torch.Tensor) -> list[int]:
    """Dims along which every index holds at most one unit (by the labels' roots now, NONE aside):
    the dims that Shrink makes shorter.  Unlike `along`, it freezes nothing."""
    out = []
    for d in labeled_dims(labels):
        rows, lo, hi = _index_rows(labels, d)
        mixed = torch.nonzero(lo != hi).reshape(-1).tolist()
        if all(_one_unit(space, rows[r]) for r in mixed):
            out.append(d)
    return out


def _one_unit(space: LabelSpace, row: torch.Tensor) -> bool:
    row = torch.unique(row)
    row = row[row != NONE]
    return torch.unique(space.roots_of(row)).numel() <= 1


def along(space: LabelSpace, labels: torch.Tensor, dim: int, site: FreezeSite) -> torch.Tensor:
    """One label per index along `dim` (NONE where none); mixed slices freeze and read as NONE.

    A slice may mix one channel with NONE (zero padding, for instance): it
    then belongs to that channel.  Two different channels in one slice
    cannot be one index of a weight, so they are frozen.
    """
    dim = dim % labels.ndim
    c = compact(labels).movedim(dim, 0)
    rows = c.reshape(c.shape[0], -1) if c.ndim > 1 else c.reshape(-1, 1)
    hi = rows.max(dim=1).values
    masked = torch.where(rows == NONE, hi.unsqueeze(1), rows)
    lo = masked.min(dim=1).values
    mixed = lo != hi
    if mixed.any():
        fixed = hi.clone()
        for r in torch.nonzero(mixed).reshape(-1).tolist():
            row = torch.unique(rows[r])
            row = row[row != NONE]
            if torch.unique(space.roots_of(row)).numel() > 1:
                space.freeze(row, site)
                fixed[r] = NONE
        return fixed.expand(labels.shape[dim]) if fixed.numel() == 1 else fixed
    return hi.expand(labels.shape[dim]) if hi.numel() == 1 else hi
