"""The torch.fx tracer graphprune traces with: extra leaf classes, untraced module paths, regions."""

from __future__ import annotations

import traceback

import torch.fx as fx
from torch import nn

__all__ = ["Tracer", "broke_in", "user_frame", "short_path"]

REGION_ROOT = "inner"  # a region is traced as a wrapper holding the module under this name


class Tracer(fx.Tracer):
    """`leaf_types`: classes kept as calls; `untraced`: module paths (of the model) kept as calls;
    `prefix`: the model path of the module a region wrapper holds as `inner`, so that paths and
    errors name the model's modules."""

    def __init__(
        self, leaf_types: tuple[type, ...] = (), untraced: dict[str, str] | None = None, prefix: str | None = None
    ) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.untraced = {} if untraced is None else untraced
        self.prefix = prefix
        self.record_stack_traces = True  # nodes keep the source line they came from (for messages)
        # buffers read in a traced-through forward (FrozenBatchNorm2d's) stay the module's own tensors,
        # not copies folded into graph constants that pruning would slice behind the module's back
        self.proxy_buffer_attributes = True

    def model_path(self, qualname: str) -> str:
        if self.prefix is None:
            return qualname
        return self.prefix + qualname[len(REGION_ROOT) :] if qualname.startswith(REGION_ROOT) else qualname

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.model_path(qualname) in self.untraced:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if type(m).__module__.startswith("graphprune.") and not getattr(m, "graphprune_traced_through", False):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            # a module of another model, run by another thread while this one traces (fx patches
            # nn.Module.__call__ for the whole process): run it as if nothing were patched
            if not _holds_proxy((args, kwargs)):
                return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_graphprune_module"):
                try:
                    exc._graphprune_module = (self.model_path(self.path_of_module(m)), type(m).__name__)
                except Exception:
                    pass
            raise


def broke_in(exc: BaseException) -> str:
    """The path of the innermost module whose own forward raised `exc` while tracing ("" for the root)."""
    return getattr(exc, "_graphprune_module", ("", ""))[0]


def _holds_proxy(value) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return bool(found)


def user_frame(exc: BaseException) -> str:
    """The innermost frame of the traceback that is not inside torch (the construct that broke)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/graphprune/" not in frame.filename:
            return f"{short_path(frame.filename)}:{frame.lineno}: {frame.line}"
    return "unknown location"


def short_path(filename: str) -> str:
    """An installed package's file from its package folder on (site-packages/ left out)."""
    return filename.rpartition("site-packages/")[2]
