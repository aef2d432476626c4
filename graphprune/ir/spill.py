"""Old tensors out of memory while a model is pruned in place: a copy on disk, mapped back.

Shrink makes a smaller copy of every tensor it slices.  Until the result has landed on the
user's model and been verified, the model still holds the old tensor, so that a failure leaves it
as it was; pruned in place, that is two copies of the weights at once.  A `Spill` writes each
old tensor to a temporary file once its smaller copy exists and points the tensor at a
copy-on-write map of that file: the model computes what it did, but the old values live in the
file (the operating system's cache), not in the process's memory.  If the compile fails (or its
result goes to a graph), the model still holds them there: its values are what they were, read
from the file as they are used (and copied into memory where written).  Reading them back into
memory at once would need the old and the new tensors together, which is what a big model cannot
afford, the more so while a failure's traceback still holds the new ones.  The folder is
`tempfile`'s (`TMPDIR`); the files are unlinked as soon as they are mapped (the space is freed
when the last tensor mapping one goes), and the folder is removed when the compile ends.

`return_freed_memory()`: glibc's malloc raises its mmap threshold to the largest block freed so
far, after which activations of up to 32 MiB come from the heap, where freed ones stay resident
(on a 1.1 B Llama, calibration grew the process by 1.4 GiB that way).  compile() fixes the
threshold at 1 MiB when it prunes a big model in place, as `MALLOC_MMAP_THRESHOLD_` would.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import shutil
import tempfile

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Spill", "SPILL_BYTES", "tensor_bytes", "return_freed_memory"]

SPILL_BYTES = 2**30  # models pruned in place from this size on spill the tensors Shrink replaces
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory() -> None:
    """Blocks of 1 MiB and more are mapped and unmapped by glibc's malloc, never kept in its heap
    (for the rest of the process; nothing is done on other C libraries)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        if ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 2**20) == 1:
            logger.info("malloc's mmap threshold fixed at 1 MiB: freed activations go back to the system")
    except (OSError, AttributeError):
        pass


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each tensor once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Spill:
    """Moves tensors' values to disk, keeping the tensor objects (and every holder of them) valid."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="graphprune-spill-")
        self._spilled: dict[int, torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> None:
        """Put `t`'s values in a file, mapped back into `t`.  Tensors that are not plain CPU
        tensors owning all of their storage are left as they are (a view would keep it alive)."""
        if (
            id(t) in self._spilled
            or t.device.type != "cpu"
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        ):
            return
        path = os.path.join(self._dir, f"{len(self._spilled)}.pt")
        torch.save(t.detach(), path)
        mapped = torch.load(path, mmap=True, weights_only=True)
        try:
            os.unlink(path)  # the map keeps the file's contents (removed with the folder where it cannot)
        except OSError:
            pass
        t.data = mapped
        self._spilled[id(t)] = t

    def close(self) -> None:
        """Forget the spilled tensors (whoever holds them keeps their maps) and remove the folder."""
        self._spilled.clear()
        shutil.rmtree(self._dir, ignore_errors=True)
