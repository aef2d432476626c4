"""summary(): what pruning did, in numbers a person can check."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from graphprune.analysis.cost import count_macs, count_params
from graphprune.analysis.dependency import FrozenChannels, analyze_dependencies
from graphprune.compile import REPORT_ATTR, graph_of
from graphprune.ir.inputs import check_example_inputs
from graphprune.ir.masking import channel_mask, weight_mask

__all__ = ["Summary", "summary"]


@dataclass(frozen=True)
class Summary:
    model: str
    state: str  # "dense", "masked" or "shrunk"
    params: tuple[int, int]
    macs: tuple[int, int]
    size_bytes: tuple[int, int]
    groups: tuple[tuple[str, int, int], ...]  # (group, channels before, kept)
    frozen: tuple[FrozenChannels, ...] = ()
    frozen_units: int = 0
    sparsity_counts: tuple[tuple[str, int, int], ...] = ()  # masked tensors: (name, zeros, size)
    lowered: tuple[
        tuple[str, str, str], ...
    ] = ()  # SparseLower's decisions: (weight, "csr"/"bsr"/"dense", why and timings)

    @property
    def masked_params(self) -> int:
        """Parameters a mask holds at zero (still stored and computed until Shrink)."""
        return sum(z for _, z, _ in self.sparsity_counts)

    @property
    def sparsity(self) -> tuple[tuple[str, float], ...]:
        """Masked tensors and their share of zeros."""
        return tuple((n, z / max(size, 1)) for n, z, size in self.sparsity_counts)

    passes: tuple[tuple[str, float], ...] = ()
    notes: tuple[str, ...] = field(default=())
    tokens: tuple[tuple[int, int, int], ...] = ()  # TokenPrune: (layer, tokens in, kept) on the example inputs

    def sparsity_report(self) -> str:
        """Per masked tensor and global, in the words of torch's pruning tutorial."""
        if not self.sparsity:
            return "no masked tensors"
        lines = [f"Sparsity in {name}: {100 * z:.2f}%" for name, z in self.sparsity]
        total = sum(n for _, _, n in self.sparsity_counts)
        lines.append(f"Global sparsity: {100 * self.masked_params / max(total, 1):.2f}%")
        return "\n".join(lines)

    def _why_nothing(self) -> str:
        """What kept every channel, when nothing was pruned (never a bare "nothing pruned")."""
        if any(kept < n for _, n, kept in self.groups):
            return ""
        if not self.groups:
            return ": no pass masked or removed anything" + (
                "" if not self.frozen else " (and some channels are frozen, below)"
            )
        top = sorted(self.frozen, key=lambda f: -f.channels)[:2]
        return ": " + "; ".join(
            f"{f.channels} channel(s) at {f.site.location or f.site.node} {f.site.reason}" for f in top
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "state": self.state,
            "params": list(self.params),
            "macs": list(self.macs),
            "size_bytes": list(self.size_bytes),
            "masked_params": self.masked_params,
            "groups": [list(g) for g in self.groups],
            "frozen_units": self.frozen_units,
            "sparsity": [list(r) for r in self.sparsity],
            "frozen": [
                {"node": f.site.location or f.site.node, "reason": f.site.reason, "channels": f.channels}
                for f in self.frozen
            ],
            "passes": [list(p) for p in self.passes],
            "lowered": [list(r) for r in self.lowered],
            "tokens": [list(t) for t in self.tokens],
            "notes": list(self.notes),
        }

    def to_html(self) -> str:
        """The report as a self-contained HTML page (cost, channel groups, masked tensors, frozen channels)."""
        e = html.escape

        def table(header: tuple, rows) -> str:
            head = "".join(f"<th>{e(str(h))}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            return f"<table><tr>{head}</tr>{body}</table>"

        cost = [
            (name, f"{a:,}", f"{b:,}", f"{b / a:.3f}" if a else "-")
            for name, (a, b) in (("params", self.params), ("MACs", self.macs), ("size (bytes)", self.size_bytes))
        ]
        parts = [
            "<!doctype html><meta charset='utf-8'><title>graphprune report</title>",
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px}"
            "table{border-collapse:collapse;margin-bottom:1.5em}</style>",
            f"<h1>graphprune report: {e(self.model)} ({e(self.state)})</h1>",
            table(("", "before", "after", "after/before"), cost),
        ]
        if self.groups:
            parts += ["<h2>Channel groups</h2>", table(("group", "units", "kept"), self.groups)]
        if self.sparsity:
            parts += [
                "<h2>Masked tensors</h2>",
                table(("tensor", "sparsity"), [(n, f"{z:.3f}") for n, z in self.sparsity]),
            ]
        if self.frozen:
            rows = [(f.site.location or f.site.node, f.channels, f.site.reason) for f in self.frozen]
            parts += ["<h2>Frozen channels (kept on purpose)</h2>", table(("where", "channels", "why"), rows)]
        if self.notes:
            parts += ["<h2>Notes</h2>"] + [f"<p>{e(n)}</p>" for n in self.notes]
        return "\n".join(parts) + "\n"

    def __str__(self) -> str:
        def ratio(a: int, b: int) -> str:
            return f"{b / a:.3f}" if a else "-"

        state = {
            "shrunk": "shrunk: pruned channels or blocks were removed, the model is smaller",
            "masked": f"masked only: {self.masked_params:,} parameters are zero but still stored and computed; run Shrink() to remove them",
            "dense": "nothing pruned" + self._why_nothing(),
            "lowered": "sparse layers hold compressed weights and run sparse kernels",
            "tokens": "tokens pruned: later layers compute on fewer tokens",
        }[self.state]
        lines = [f"graphprune summary of {self.model} ({state})", ""]
        rows = [("", "before", "after", "after/before")]
        rows.append(("params", f"{self.params[0]:,}", f"{self.params[1]:,}", ratio(*self.params)))
        rows.append(("MACs", f"{self.macs[0]:,}", f"{self.macs[1]:,}", ratio(*self.macs)))
        rows.append(
            ("size (MB)", f"{self.size_bytes[0] / 1e6:.2f}", f"{self.size_bytes[1] / 1e6:.2f}", ratio(*self.size_bytes))
        )
        lines += _table(rows)
        if self.tokens:
            lines += ["", "tokens per layer (on the example inputs):"]
            lines += _table(
                [("layer", "in", "kept")] + [(str(i), str(a), str(b)) for i, a, b in self.tokens], indent="  "
            )
        if self.groups:
            total = sum(g[1] for g in self.groups)
            kept = sum(g[2] for g in self.groups)
            pruned = sum(1 for g in self.groups if g[2] < g[1])
            lines += ["", f"channel groups: {len(self.groups)} ({pruned} pruned), units kept {kept:,} of {total:,}"]
            lines += _table(
                [("group", "units", "kept")] + [(k, str(n), str(m)) for k, n, m in self.groups], indent="  "
            )
        if self.sparsity:
            lines += ["", "masked tensors (share of zeros):"]
            lines += _table([("tensor", "sparsity")] + [(n, f"{z:.3f}") for n, z in self.sparsity], indent="  ")
        if self.lowered:
            chosen = sum(1 for _, f, _ in self.lowered if f != "dense")
            lines += ["", f"sparse lowering: {chosen} of {len(self.lowered)} layers run sparse kernels"]
            lines += _table([("layer", "runs as", "why")] + list(self.lowered), indent="  ")
        if self.frozen:
            lines += [
                "",
                f"frozen channels (kept on purpose; {self.frozen_units} inside the model, the rest at outputs):",
            ]
            for f in self.frozen:
                lines.append(f"  {f.site.location or f.site.node}: {f.channels} channel(s) {f.site.reason}")
        if self.passes:
            lines += ["", "passes: " + ", ".join(f"{n} {s:.2f}s" for n, s in self.passes)]
        if self.notes:
            lines += [""] + list(self.notes)
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append(indent + "  ".join(cells).rstrip())
    return out


def _size_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _mask_sparsity(model: nn.Module) -> list[tuple[str, int, int]]:
    """(tensor, masked-to-zero count, size) for every tensor graphprune masks."""
    rows = []
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations.keys():
            if channel_mask(module, attr) is not None or weight_mask(module, attr) is not None:
                t = getattr(module, attr)
                rows.append((f"{name}.{attr}", int((t == 0).sum()), t.numel()))
    return rows


def _lowered(records) -> tuple[tuple[str, str, str], ...]:
    """(layer, format or "dense", reason and timings) from the records of SparseLower passes."""
    rows = {}
    for r in records:
        for name, d in (r.details.get("lowered") or {}).items():
            times = ", ".join(f"{k[:-3]} {v:.3f} ms" for k, v in d.items() if k.endswith("_ms"))
            why = d.get("kept_dense", f"sparsity {d['sparsity']:.3f}" if "sparsity" in d else "")
            rows[name] = (name, d.get("format", "dense"), "; ".join(x for x in (why, times) if x))
    return tuple(rows.values())


def summary(before: nn.Module, after: nn.Module, example_inputs: tuple | dict) -> Summary:
    """Compare a model with its pruned version on the same inputs (neither is changed)."""
    example_inputs = check_example_inputs(example_inputs)
    records = list(getattr(after, REPORT_ATTR, []))
    groups: tuple = ()
    for r in records:
        if isinstance(r.details.get("groups"), dict):
            groups = tuple((k, v[0], v[1]) for k, v in r.details["groups"].items())
    shrunk = any((r.name == "Shrink" and r.modified) or r.details.get("dropped") for r in records)
    lowered = _lowered(records)
    tokens = tuple((int(i), *t) for r in records for i, t in r.details.get("tokens", {}).items())
    sparsity = _mask_sparsity(after)
    state = (
        "masked"
        if any(z for _, z, _ in sparsity)
        else "shrunk"
        if shrunk
        else "lowered"
        if any(f != "dense" for _, f, _ in lowered)
        else "tokens"
        if tokens
        else "dense"
    )
    try:
        gm = graph_of(after, example_inputs)
        deps = analyze_dependencies(gm, example_inputs)
        frozen, frozen_units = deps.frozen, deps.frozen_units
    except Exception:  # a summary of an untraceable model still reports its cost
        frozen, frozen_units = (), 0
    with torch.no_grad():
        return Summary(
            model=type(before).__name__,
            state=state,
            params=(count_params(before), count_params(after)),
            macs=(count_macs(before, example_inputs), count_macs(after, example_inputs)),
            size_bytes=(_size_bytes(before), _size_bytes(after)),
            sparsity_counts=tuple(sparsity),
            groups=groups,
            frozen=frozen,
            frozen_units=frozen_units,
            passes=tuple((r.name, r.seconds) for r in records),
            lowered=lowered,
            tokens=tokens,
            notes=tuple(f"note ({r.name}): {r.details['note']}" for r in records if r.details.get("note")),
        )
