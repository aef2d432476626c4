"""Backends that export pruned models (installed as graphprune.backends).

`graphprune.backends.onnx` needs the `onnx` extra (onnx, onnxruntime, onnxscript); it is
imported on use so that the core has no ONNX dependency.
"""

__all__ = ["onnx"]
