"""ONNX backend: export a (pruned) model, verify it in ONNX Runtime, measure it.

`export` writes to a temporary name beside the target and renames it only
after ONNX Runtime loaded the file and matched torch's outputs, so a failed
export never leaves a file that looks valid.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import numbers
import os
import statistics
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from graphprune.arguments import choice, fraction, positive_int
from graphprune.errors import ArgumentError, GraphPruneError, VerificationError
from graphprune.ir.inputs import (
    batch_of,
    batched,
    call_with,
    check_example_inputs,
    eval_mode,
    with_batch,
    with_shorter_sequences,
)
from graphprune.timing import interleaved

logger = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportResult", "export", "LatencyRow", "benchmark", "MAX_IR_VERSION"]

# onnx >= 1.23 writes IR version 14 by default; onnxruntime 1.31 (and older) reads up to 10 safely.
MAX_IR_VERSION = 10
MAX_OPSET = 21  # the newest opset IR version 10 covers
MIN_OPSET = 7
EXPORTERS = ("auto", "dynamo", "torchscript")


class ExportError(GraphPruneError):
    """The model could not be exported, or ONNX Runtime cannot run what was exported."""


@dataclass(frozen=True)
class ExportResult:
    path: str
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    ir_version: int
    file_bytes: int
    max_abs_error: float | None  # None when verify=False
    max_rel_error: float | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    sparse_initializers: int = 0
    notes: tuple[str, ...] = field(default=())


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "the ONNX backend needs onnx, onnxruntime and onnxscript: pip install onnx onnxruntime onnxscript"
        ) from exc
    return onnx, onnxruntime


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _run_torch(model: nn.Module, inputs: tuple | dict) -> list[np.ndarray]:
    with torch.no_grad():
        out = call_with(model, inputs)
    return [t.detach().cpu().numpy() for t in _flat_tensors(out)]


def _names(model: nn.Module, inputs: tuple | dict) -> list[str]:
    if isinstance(inputs, dict):
        return [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]

    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return [params[i] if i < len(params) else f"input_{i}" for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]


def _dynamic_dims(inputs, dynamic_batch: bool, dynamic_sequence: bool, name: Callable) -> Callable:
    """For an input value: {dim: name(dim)} of its dynamic dims (batch: 0, sequence: 1), or None."""
    size = batch_of(inputs)

    def spec(v):
        if not batched(v, size):
            return None
        dims = ([0] if dynamic_batch else []) + ([1] if dynamic_sequence and v.ndim >= 2 else [])
        return {d: name(d) for d in dims} or None

    return spec


def _export_dynamo(model, inputs, tmp, input_names, output_names, opset, dynamic_batch, dynamic_sequence) -> None:
    args, kwargs = (inputs, None) if isinstance(inputs, tuple) else ((), inputs)
    dynamic_shapes = None
    if dynamic_batch or dynamic_sequence:
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim.AUTO}  # (a length has model limits)
        spec = _dynamic_dims(inputs, dynamic_batch, dynamic_sequence, dims.__getitem__)
        dynamic_shapes = (
            {k: spec(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(spec(v) for v in inputs)
        )
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            tmp,
            kwargs=kwargs,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            verbose=False,
            external_data=False,
        )


def _export_torchscript(model, inputs, tmp, input_names, output_names, opset, dynamic_batch, dynamic_sequence) -> None:
    if isinstance(inputs, dict):
        args = (inputs,)  # the TorchScript exporter takes keyword inputs as a trailing dict
    else:
        args = inputs
    spec = _dynamic_dims(inputs, dynamic_batch, dynamic_sequence, {0: "batch", 1: "sequence"}.__getitem__)
    axes = {n: s for n, t in zip(input_names, _flat_tensors(inputs)) if (s := spec(t))}
    axes.update({n: {0: "batch"} for n in output_names} if dynamic_batch else {})
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            tmp,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamic_axes=axes,
            dynamo=False,
        )


def _sparsify(onnx, proto, min_sparsity: float, min_size: int = 256) -> int:
    """Move initializers that are at least `min_sparsity` zeros into graph.sparse_initializer."""
    from onnx import numpy_helper

    graph = proto.graph
    keep, count = [], 0
    input_names = {i.name for i in graph.input}
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.size < min_size or arr.dtype.kind != "f" or (arr == 0).mean() < min_sparsity:
            keep.append(init)
            continue
        flat = arr.reshape(-1)
        nz = np.nonzero(flat)[0].astype(np.int64)
        values = numpy_helper.from_array(flat[nz], init.name)
        indices = numpy_helper.from_array(nz, f"{init.name}_indices")
        graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(arr.shape)))
        count += 1
    if count:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        sparse = {s.values.name for s in graph.sparse_initializer}
        remaining = [i for i in graph.input if i.name not in sparse or i.name not in input_names]
        del graph.input[:]
        graph.input.extend(remaining)
    return count


def _compare(expected: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    if len(expected) != len(got):
        raise VerificationError(f"torch returned {len(expected)} outputs, ONNX Runtime {len(got)}")
    max_abs, max_rel = 0.0, 0.0
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            raise VerificationError(f"output shape differs: torch {e.shape}, ONNX Runtime {g.shape}")
        if e.dtype.kind == "f" and not np.array_equal(np.isfinite(e), np.isfinite(g)):
            raise VerificationError("ONNX Runtime and torch disagree on which outputs are finite (NaN or inf)")
        if e.dtype.kind == "f":
            e, g = np.where(np.isfinite(e), e, 0), np.where(np.isfinite(g), g, 0)
        diff = np.abs(e.astype(np.float64) - g.astype(np.float64))
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(diff.max() / max(np.abs(e).max(), 1e-12)))
    return max_abs, max_rel


def session(path_or_bytes: str | bytes, threads: int | None = None, *, spinning: bool = True):
    """An ONNX Runtime CPU session (threads: intra-op threads; None = ORT's default).  `spinning=False`
    lets idle worker threads sleep instead of spinning: on a machine whose cores are shared,
    spinning threads compete with the work (ResNet-18 at 2 threads on this project's 2-core VM:
    about 2x slower, and noisier)."""
    _, ort = _import_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def _feed(sess, inputs: tuple | dict) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, dict) and set(names) <= set(inputs):
        return {n: inputs[n].detach().cpu().numpy() for n in names}
    tensors = [t.detach().cpu().numpy() for t in _flat_tensors(inputs)]
    if len(names) != len(tensors):
        raise VerificationError(
            f"the ONNX model takes {len(names)} inputs ({names}); {len(tensors)} tensors were given"
        )
    return dict(zip(names, tensors))


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: tuple | dict,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = False,
    opset: int | None = None,
    verify: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    sparse_initializers: float | None = None,
    exporter: str = "auto",
) -> ExportResult:
    """Export `model` to ONNX at `path`, check it in ONNX Runtime, return what happened.

    exporter="auto" tries torch's dynamo-based exporter and falls back to the
    TorchScript one; the result says which was used.  `sparse_initializers=0.5`
    stores weights that are at least half zeros as ONNX sparse initializers
    (smaller files; ORT densifies them when loading).  Verification runs the
    example inputs, and with dynamic_batch a different batch size too; outputs
    must agree within atol + rtol * max|output|.  `dynamic_sequence=True` also
    leaves dim 1 of every batched input free (text models, token-pruned models)
    and checks a shorter sequence.
    """
    onnx, _ = _import_onnx()
    example_inputs = check_example_inputs(example_inputs)
    choice(exporter, "exporter", EXPORTERS)
    if sparse_initializers is not None:
        sparse_initializers = fraction(
            sparse_initializers, "sparse_initializers (the minimal share of zeros)", closed=True, open_low=True
        )
    if opset is not None and (
        not isinstance(opset, numbers.Integral) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET
    ):
        raise ArgumentError(
            f"opset must be an int from {MIN_OPSET} to {MAX_OPSET} (the opsets torch's exporters write and "
            f"ONNX Runtime reads at IR version {MAX_IR_VERSION}), got {opset!r}"
        )
    lowered = [n for n, m in model.named_modules() if hasattr(m, "graphprune_macs")]
    if lowered:
        raise GraphPruneError(
            f"{lowered[:3]} hold compressed weights for torch's sparse kernels, which ONNX cannot express: "
            "export the model before SparseLower (sparse_initializers=0.5 keeps the file small)"
        )
    path = Path(path)
    if path.is_dir():
        raise ArgumentError(f"cannot write {path}: it is a folder; give a file name such as {path / 'model.onnx'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ExportError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {path}: the folder {folder} is not writable")
    opset = 18 if opset is None else int(opset)
    if isinstance(example_inputs, dict):  # signature order, so that names and values pair up
        order = list(inspect.signature(model.forward).parameters)
        example_inputs = dict(
            sorted(example_inputs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        )
    with eval_mode(model):
        input_names = _names(model, example_inputs)
        with torch.no_grad():
            expected_out = call_with(model, example_inputs)
        n_out = len(_flat_tensors(expected_out))
        output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        # torch.export specialises a batch of 1, so a dynamic batch is traced at batch 2.
        trace_inputs = (
            with_batch(example_inputs, 2) if dynamic_batch and batch_of(example_inputs) == 1 else example_inputs
        )
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        notes: list[str] = []
        try:
            order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[exporter]
            used, errors, proto = None, [], None
            for name in order:
                try:
                    fn = _export_dynamo if name == "dynamo" else _export_torchscript
                    fn(model, trace_inputs, tmp, input_names, output_names, opset, dynamic_batch, dynamic_sequence)
                    proto = onnx.load(tmp)
                    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
                    if written != opset:  # the dynamo exporter writes the opsets it supports, whatever was asked
                        raise ExportError(f"it wrote opset {written} instead of {opset}")
                    used = name
                    break
                except Exception as exc:
                    errors.append(
                        f"{name} exporter: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                    )
                    logger.info("ONNX export with the %s exporter failed: %s", name, exc)
            if used is None:
                raise ExportError(
                    f"torch could not export the model to ONNX at opset {opset}:\n  " + "\n  ".join(errors)
                )
            if errors:
                notes.append("fell back: " + "; ".join(errors))
            proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
            n_sparse = _sparsify(onnx, proto, sparse_initializers) if sparse_initializers else 0
            onnx.save(proto, tmp)
            max_abs = max_rel = None
            if verify:
                try:
                    sess = session(tmp)
                except Exception as exc:
                    raise ExportError(
                        f"ONNX Runtime cannot load the model exported with the {used} exporter (opset {opset}): "
                        f"{str(exc).strip().splitlines()[-1][:400]}. An op in the model has no ONNX Runtime kernel; "
                        f"try another opset (opset=...), exporter=..., or replace that op."
                        + (f" ({'; '.join(notes)})" if notes else "")
                    ) from exc
                checks = [example_inputs]
                if dynamic_batch and batch_of(example_inputs):
                    checks.append(with_batch(example_inputs, batch_of(example_inputs) + 3))
                if dynamic_sequence:
                    checks.append(with_shorter_sequences(example_inputs))
                max_abs = max_rel = 0.0
                for inputs in checks:
                    expected = _run_torch(model, inputs)
                    got = sess.run(None, _feed(sess, inputs))
                    a, r = _compare(expected, got)
                    max_abs, max_rel = max(max_abs, a), max(max_rel, r)
                    scale = max((float(np.abs(e).max()) for e in expected if e.size), default=0.0)
                    if a > atol + rtol * scale:
                        raise VerificationError(
                            f"ONNX Runtime disagrees with torch: max abs error {a:.3g}, max rel error {r:.3g} "
                            f"(allowed {atol} + {rtol} x {scale:.3g}) with the {used} exporter; the file was not written"
                        )
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it the permissions of a normal file
            os.replace(tmp, path)
        finally:
            for leftover in (tmp, tmp + ".data"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    return ExportResult(
        str(path),
        used,
        opset,
        min(proto.ir_version, MAX_IR_VERSION),
        path.stat().st_size,
        max_abs,
        max_rel,
        tuple(input_names),
        tuple(output_names),
        n_sparse,
        tuple(notes),
    )


@dataclass(frozen=True)
class LatencyRow:
    name: str
    median_ms: float
    p90_ms: float
    throughput: float  # samples per second at the benchmark batch size
    file_bytes: int


def benchmark(
    models: dict[str, str | os.PathLike],
    example_inputs: tuple | dict,
    *,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 20,
    spinning: bool = True,
) -> list[LatencyRow]:
    """ONNX Runtime CPU latency of several ONNX files on the same inputs, runs interleaved
    (one run of each model per round) so that machine noise hits all alike; medians reported.
    `spinning=False`: idle worker threads sleep (see `session`)."""
    positive_int(repeats, "repeats")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ArgumentError(f"warmup must be an int >= 0, got {warmup!r}")
    sessions = {name: session(str(p), threads, spinning=spinning) for name, p in models.items()}
    feeds = {name: _feed(s, example_inputs) for name, s in sessions.items()}
    times = interleaved({name: partial(s.run, None, feeds[name]) for name, s in sessions.items()}, repeats, warmup)
    batch = batch_of(example_inputs) or 1
    rows = []
    for name, ts in times.items():
        ts.sort()
        med = statistics.median(ts)
        rows.append(
            LatencyRow(
                name,
                med * 1e3,
                ts[min(len(ts) - 1, int(0.9 * len(ts)))] * 1e3,
                batch / med,
                os.path.getsize(models[name]),
            )
        )
    return rows
