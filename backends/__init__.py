"""Backends that export pruned models (installed as graphprune.backends).

`graphprune.backends.onnx` (onnx, onnxruntime and onnxscript are base dependencies) is imported
on use, so that importing graphprune does not load ONNX.
"""

__all__ = ["onnx"]
