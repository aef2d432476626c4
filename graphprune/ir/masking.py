"""Masks are model state: a parametrization that multiplies a tensor by per-dim keep vectors.

A masked model is an ordinary trainable module (gradients reach the
original tensor; masked entries get none), and `module.weight` reads the
masked values.  Shrink later slices the original by the same keep vectors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from graphprune.errors import PassError, PreconditionError

__all__ = [
    "ChannelMaskParametrization",
    "resolve",
    "channel_mask",
    "ensure_channel_mask",
    "is_maskable",
    "raw_tensor",
    "replace_tensor",
    "masks_of",
    "refuse_lowered",
    "channel_masked",
    "detach_masks",
    "attach_masks",
    "unit_mask_state",
    "mask_units",
    "WeightMaskParametrization",
    "weight_mask",
    "take_masks",
    "masks_disabled",
    "register_mask",
    "unregister_masks",
    "sync_recurrent",
]


class ChannelMaskParametrization(nn.Module):
    """tensor * keep_d (broadcast along d) for every masked dim d."""

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.ndim = ndim

    def keep(self, dim: int, size: int) -> torch.Tensor:
        name = f"keep_{dim}"
        if not hasattr(self, name):
            self.register_buffer(name, torch.ones(size, dtype=torch.bool))
        return getattr(self, name)

    def drop(self, dim: int, size: int, index: list[int] | torch.Tensor) -> None:
        """Mask more channels along `dim`.  A new keep vector, never an edit of the old one: the
        old one may be shared with the model a compile() started from."""
        keep = self.keep(dim, size).clone()
        keep[index] = False
        self.register_buffer(f"keep_{dim}", keep)

    def masked_dims(self) -> list[int]:
        return sorted(int(n.split("_")[1]) for n, _ in self.named_buffers() if n.startswith("keep_"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d in self.masked_dims():
            shape = [1] * x.ndim
            shape[d] = -1
            x = x * getattr(self, f"keep_{d}").reshape(shape).to(x.dtype)
        return x


class WeightMaskParametrization(nn.Module):
    """tensor * mask, with a boolean mask of the tensor's shape."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)


def register_mask(owner: nn.Module, attr: str, mask: nn.Module, unsafe: bool = False) -> None:
    """Put a mask (a parametrization) on a tensor; every mask graphprune adds goes through here."""
    parametrize.register_parametrization(owner, attr, mask, unsafe=unsafe)
    sync_recurrent(owner)


def unregister_masks(owner: nn.Module, attr: str) -> None:
    """Take every parametrization off a tensor, the stored original coming back."""
    parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
    sync_recurrent(owner)


def _masked_flat_weights(module: nn.RNNBase) -> list:
    return [getattr(module, n) if hasattr(module, n) else None for n in module._flat_weights_names]


# nn.LSTM/GRU/RNN run from a list of their weights, `_flat_weights`.  torch refreshes it before each
# forward when a weight changed, so a masked weight is seen, but the list then holds the masked tensors
# (non-leaf, with autograd history) until the next forward, and a module holding them cannot be deep-
# copied (compile() copies).  On a masked RNN the list is this property of the module's own
# parametrized class instead: computed on every read, never stored; it goes with that class.
_FLAT_WEIGHTS = property(_masked_flat_weights, lambda module, value: None)


def sync_recurrent(module: nn.Module) -> None:
    """Keep an RNN module's weight list in step with its tensors after masks were added or removed
    (or tensors written past `__setattr__`); a no-op for other modules."""
    if not isinstance(module, nn.RNNBase):
        return
    if parametrize.is_parametrized(module):
        if type(module).__dict__.get("_flat_weights") is not _FLAT_WEIGHTS:  # the class torch made for it
            type(module)._flat_weights = _FLAT_WEIGHTS
        module.__dict__["_flat_weights"] = [  # leaf tensors only, for a copy (the property shadows them)
            raw_tensor(module, n) if hasattr(module, n) else None for n in module._flat_weights_names
        ]
    else:
        module._init_flat_weights()  # plain parameters again (and cuDNN's flat layout on a GPU)


def weight_mask(owner: nn.Module, attr: str) -> WeightMaskParametrization | None:
    if not parametrize.is_parametrized(owner, attr):
        return None
    return next((p for p in owner.parametrizations[attr] if isinstance(p, WeightMaskParametrization)), None)


def resolve(root: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    """(owning module, attribute name) of a tensor given by its qualified name."""
    path, _, attr = qualified.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def raw_tensor(owner: nn.Module, attr: str) -> torch.Tensor:
    """The stored tensor (under any parametrization)."""
    if parametrize.is_parametrized(owner, attr):
        return owner.parametrizations[attr].original
    return getattr(owner, attr)


def replace_tensor(owner: nn.Module, attr: str, value: torch.Tensor) -> torch.Tensor:
    """Store a new tensor under `attr` (the original under any parametrization), of the same kind
    (parameter or buffer), and return the old one.  A new object, not an edit: the old one may be
    shared with the model a compile() started from."""
    holder, name = (
        (owner.parametrizations[attr], "original") if parametrize.is_parametrized(owner, attr) else (owner, attr)
    )
    old = getattr(holder, name)
    if isinstance(old, nn.Parameter):
        setattr(holder, name, nn.Parameter(value.detach().to(old.dtype), requires_grad=old.requires_grad))
    else:
        holder.register_buffer(
            name, value.detach().to(old.dtype), persistent=name not in holder._non_persistent_buffers_set
        )
    return old


def is_maskable(owner: nn.Module, attr: str) -> bool:
    """Parameters, and buffers a module declares maskable (the zero-reinsertion keep vector)."""
    t = raw_tensor(owner, attr)
    return isinstance(t, nn.Parameter) or attr in getattr(owner, "graphprune_maskable", ())


def channel_mask(owner: nn.Module, attr: str) -> ChannelMaskParametrization | None:
    if not parametrize.is_parametrized(owner, attr):
        return None
    for p in owner.parametrizations[attr]:
        if isinstance(p, ChannelMaskParametrization):
            return p
    return None


def ensure_channel_mask(owner: nn.Module, attr: str) -> ChannelMaskParametrization:
    mask = channel_mask(owner, attr)
    if mask is None:
        mask = ChannelMaskParametrization(raw_tensor(owner, attr).ndim).to(raw_tensor(owner, attr).device)
        register_mask(owner, attr, mask)
    return mask


def unit_mask_state(root: nn.Module, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked in every maskable slot, masked in some) for each unit of a ChannelGroup."""
    every = torch.ones(group.size, dtype=torch.bool)
    some = torch.zeros(group.size, dtype=torch.bool)
    seen = False
    for s, slot in enumerate(group.slots):
        owner, attr = resolve(root, slot.tensor)
        if not is_maskable(owner, attr):
            continue
        seen = True
        mask = channel_mask(owner, attr)
        if mask is None or f"keep_{slot.dim}" not in dict(mask.named_buffers()):
            every[:] = False
            continue
        keep = getattr(mask, f"keep_{slot.dim}")
        index, unit = group.flat[s]
        kept = torch.zeros(group.size, dtype=torch.long).index_add_(0, unit, keep[index].long())
        off = kept == 0
        every &= off
        some |= off
    if not seen:
        every[:] = False
    return every, some


def mask_units(root: nn.Module, group, unit_ids: list[int], aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """Mask the given units in every maskable slot of the group (and every name of a tied tensor)."""
    if not unit_ids:
        return
    for slot, idx in group.indices(unit_ids).items():
        for name in (slot.tensor, *(aliases or {}).get(slot.tensor, ())):
            owner, attr = resolve(root, name)
            if is_maskable(owner, attr):
                size = raw_tensor(owner, attr).shape[slot.dim]
                ensure_channel_mask(owner, attr).drop(slot.dim, size, idx)


def take_masks(owner: nn.Module, attr: str, name: str) -> list[WeightMaskParametrization]:
    """Remove graphprune's masks from a tensor (restoring the stored original) and return its
    weight masks, to be sliced and put back.  Foreign parametrizations are refused."""
    if not parametrize.is_parametrized(owner, attr):
        return []
    plist = list(owner.parametrizations[attr])
    if any(not isinstance(p, (ChannelMaskParametrization, WeightMaskParametrization)) for p in plist):
        raise PassError(f"{name} has parametrizations graphprune does not know; remove them before Shrink")
    unregister_masks(owner, attr)
    return [p for p in plist if isinstance(p, WeightMaskParametrization)]


def masks_of(module: nn.Module) -> dict[str, nn.Module]:
    """attribute -> ParametrizationList, for the tensors of `module` that only graphprune masks."""
    if not parametrize.is_parametrized(module):
        return {}
    return {
        attr: plist
        for attr, plist in module.parametrizations.items()
        if all(isinstance(p, (ChannelMaskParametrization, WeightMaskParametrization)) for p in plist)
    }


def channel_masked(module: nn.Module) -> bool:
    """Whether some tensor of `module` (itself, not its children) has masked channels."""
    for attr in masks_of(module):
        mask = channel_mask(module, attr)
        if mask is not None and any(not bool(getattr(mask, f"keep_{d}").all()) for d in mask.masked_dims()):
            return True
    return False


def detach_masks(root: nn.Module) -> list[tuple[str, str, list[nn.Module]]]:
    """Take graphprune's masks off every tensor of `root` (its stored originals come back) and return
    them as (module path, attribute, parametrizations), so that a graph is traced from the plain
    tensors (a mask traced through would become a constant) and the masks go back on after."""
    out = []
    for path, module in list(root.named_modules()):
        for attr, plist in masks_of(module).items():
            out.append((path, attr, list(plist)))
            unregister_masks(module, attr)
    return out


def attach_masks(
    root: nn.Module, masks: list[tuple[str, str, list[nn.Module]]], rename: dict[str, str] | None = None
) -> None:
    """Put masks taken by `detach_masks` back on the tensors of the same names (`rename`: module
    paths that moved, e.g. root tensors that a graph keeps in a holder module)."""
    for path, attr, plist in masks:
        owner = root.get_submodule((rename or {}).get(path, path))
        for p in plist:
            register_mask(owner, attr, p, unsafe=True)


def refuse_lowered(model: nn.Module, who: str) -> None:
    """Masks and Shrink work on dense tensors: after SparseLower they would do nothing to the lowered
    layers (which hold compressed weights and count their own cost), so they are refused."""
    lowered = [n for n, m in model.named_modules() if hasattr(m, "graphprune_macs")]
    if lowered:
        raise PreconditionError(
            f"{who} after SparseLower: {lowered[:3]} already hold compressed weights, which cannot be "
            "masked or sliced; put the mask passes and Shrink() before SparseLower()"
        )


KEEP_PREFIX = "graphprune_keep_"  # buffers of the channels a masked mean or sum reduces over (graphprune.ir.norms)


class masks_disabled:
    """Context manager: run the model as if unmasked (the original weights), then restore the masks."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.saved: list[tuple[nn.Module, str, torch.Tensor]] = []

    def __enter__(self) -> nn.Module:
        for m in self.root.modules():
            mask = isinstance(m, (ChannelMaskParametrization, WeightMaskParametrization))
            for name, buf in m.named_buffers(recurse=False):
                if mask or name.startswith(KEEP_PREFIX):  # masks, and the kept channels of masked reductions
                    self.saved.append((m, name, buf.clone()))
                    buf.fill_(True)
        return self.root

    def __exit__(self, *exc) -> None:
        for m, name, buf in self.saved:
            getattr(m, name).copy_(buf)
        self.saved.clear()
