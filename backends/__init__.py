"""Backends that export pruned models (installed as graphprune.backends).

`graphprune.backends.onnx` (onnx, onnxruntime and onnxscript are base dependencies) is imported
on use, so that importing graphprune does not load ONNX.

`graphprune.backends.sparse` holds the compressed-weight modules that the SparseLower pass puts
in, and a latency helper.
"""

__all__ = ["onnx", "sparse"]
