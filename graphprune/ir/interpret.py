"""An fx Interpreter that calls functions the way the graph module's own code does.

The code fx generates builds a fresh list or dict for every list or dict literal in a node's
arguments on each call; `fx.Interpreter` hands over the node's own argument containers instead,
which fx makes immutable.  A function that fills in the list it is given (torchvision's video
Swin: `_get_window_and_shift_size` writes into its `window_size` and `shift_size` lists) then
fails under the interpreter although the model runs.  Here every container is a plain copy.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

__all__ = ["Interpreter", "plain_containers"]


def plain_containers(value: Any) -> Any:
    """`value` with its lists and dicts (fx's immutable ones too) copied into plain ones, nested."""
    if isinstance(value, list):
        return [plain_containers(v) for v in value]
    if isinstance(value, tuple):
        items = [plain_containers(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {k: plain_containers(v) for k, v in value.items()}
    return value


class Interpreter(fx.Interpreter):
    """`fx.Interpreter` whose calls get their own mutable argument containers, as in the graph's code."""

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return plain_containers(args), plain_containers(kwargs)
