"""ONNX Runtime latency for `ChannelMask(target={"latency": ..., "backend": "onnxruntime"})`.

The lookup table times each convolution and matrix product of a forward as a one-node ONNX
model in ONNX Runtime (Conv, Gemm, MatMul, MaxPool with the recorded shapes and attributes);
ONNX Runtime fuses the batch norms, activations and bias adds around them into those kernels,
so the other ops get no entry and the end-to-end check (the exported models, timed
interleaved) corrects for what the table leaves out.  Registered as the "onnxruntime" meter of
`graphprune.analysis.latency` when graphprune is imported.  Sessions are timed with idle worker
threads sleeping, not spinning (see `graphprune.backends.onnx.session`): spinning threads make
the timings on a machine with shared cores slower and noisier than the model.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from functools import partial

import numpy as np
import torch

from graphprune.analysis.latency import Meter, Tensor, median_seconds, register_meter
from graphprune.backends.onnx import _feed, _import_onnx, export, session

__all__ = ["OrtMeter"]

aten = torch.ops.aten
_ELEMENT = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


def _pair(values, n: int) -> list[int]:
    values = list(values)
    return values * n if len(values) == 1 else values


def _node(func, args) -> tuple[str, list[int], int, dict] | None:
    """(ONNX op, the positions of its inputs among the recorded arguments, how many of them are fed
    at run time (the rest are initializers, as weights are), attributes) for an op the table times."""
    if func is aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _, groups = args
        if transposed:
            return None
        n = len(w.shape) - 2
        attrs = dict(strides=_pair(stride, n), pads=_pair(padding, n) * 2, dilations=_pair(dilation, n), group=groups)
        return "Conv", [0, 1] + ([2] if b is not None else []), 1, attrs
    if func is aten.addmm.default:  # bias + x @ w (a Linear: w is its weight transposed)
        return "Gemm", [1, 2, 0], 1, {}
    if func in (aten.mm.default, aten.bmm.default):
        return "MatMul", [0, 1], 2, {}
    if func in (aten.max_pool2d_with_indices.default, aten.max_pool2d.default):
        kernel = _pair(args[1], 2)
        stride = _pair(args[2], 2) if len(args) > 2 and args[2] else kernel
        padding = _pair(args[3], 2) if len(args) > 3 else [0, 0]
        dilation = _pair(args[4], 2) if len(args) > 4 else [1, 1]
        ceil = int(len(args) > 5 and bool(args[5]))
        attrs = dict(kernel_shape=kernel, strides=stride, pads=padding * 2, dilations=dilation, ceil_mode=ceil)
        return "MaxPool", [0], 1, attrs
    return None


class OrtMeter(Meter):
    """ONNX Runtime on the CPU at `threads` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, threads: int | None = None, runs: int = 7) -> None:
        super().__init__(threads, runs)
        self._dense: tuple[weakref.ref, str] | None = None
        self._call_overhead: float | None = None
        self._folder: tempfile.TemporaryDirectory | None = None  # made on the first export

    def measure_op(self, func, args, kwargs) -> float:
        built = self.one_node(func, args)
        if built is None:
            return 0.0
        if self._call_overhead is None:  # what any run costs (the call, feeding, fetching): not the op's
            self._call_overhead = self._time(*self.one_node(aten.mm.default, (Tensor(((1, 1), torch.float32)),) * 2))
        return max(self._time(*built) - self._call_overhead, 0.0)

    def _time(self, proto, feeds) -> float:
        sess = session(proto.SerializeToString(), self.threads, spinning=False)
        return median_seconds(partial(sess.run, None, feeds), self.runs)

    @staticmethod
    def one_node(func, args, values: list[torch.Tensor] | None = None):
        """A one-node ONNX model computing the recorded op `func(*args)`, and its feeds: `values`
        (the op's tensor arguments in order) or random ones.  None for an op the table leaves out."""
        node = _node(func, args)
        if node is None or _ELEMENT.get(args[node[1][0]].dtype) is None:
            return None
        onnx, _ = _import_onnx()
        helper, numpy_helper = onnx.helper, onnx.numpy_helper
        op, positions, fed, attributes = node
        dtype = _ELEMENT[args[positions[0]].dtype]
        tensors = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        rng = np.random.default_rng(0)

        def value(i: int) -> np.ndarray:
            if values is not None:
                return values[tensors.index(i)].numpy()
            return rng.standard_normal(args[i].shape).astype(np.float32)

        names = [f"in{i}" for i in range(len(positions))]
        feeds = {name: value(i) for name, i in zip(names[:fed], positions[:fed])}
        initializers = [numpy_helper.from_array(value(i), name) for name, i in zip(names[fed:], positions[fed:])]
        graph = helper.make_graph(
            [helper.make_node(op, names, ["y"], **attributes)],
            "op",
            [helper.make_tensor_value_info(n, dtype, list(args[i].shape)) for n, i in zip(names[:fed], positions)],
            [helper.make_tensor_value_info("y", dtype, None)],
            initializers,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        return proto, feeds

    def _export(self, model, example_inputs, name: str) -> str:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="graphprune-latency-")
        path = os.path.join(self._folder.name, f"{name}.onnx")
        export(model, path, example_inputs=example_inputs, dynamic_batch=False)
        return path

    def models(self, a, b, example_inputs):
        if self._dense is None or self._dense[0]() is not a:  # the dense side is exported once per search
            self._dense = (weakref.ref(a), self._export(a, example_inputs, "dense"))
        paths = {"a": self._dense[1], "b": self._export(b, example_inputs, "pruned")}
        sessions = {k: session(path, self.threads, spinning=False) for k, path in paths.items()}
        feeds = {k: _feed(s, example_inputs) for k, s in sessions.items()}
        return self.race(*(partial(s.run, None, feeds[k]) for k, s in sessions.items()))


register_meter("onnxruntime", OrtMeter)
