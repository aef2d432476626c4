"""Landing: the graph's result written back onto the user's own module tree, then verified.

The passes decide on a graph whose modules are shadows of the user's model
(`graphprune.ir.shadow`); landing makes the user's modules take on the shadows'
state (sliced tensors, masks, new attributes, swapped sparse layers), so the
result keeps the user's class, methods and module objects.  Graphs from
torch.export have modules of their own: there the tensors are written back by
qualified name and module attributes are fixed by the ops' rules.  The landed
model must compute what the graph computes, on the example inputs and, when
sizes changed, on another batch size; where it does not (the source holds a constant the module
tree cannot change), everything is rolled back and the reason names the line.
"""

from __future__ import annotations

import logging
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from graphprune.hf import with_heads
from graphprune.ir import tokens
from graphprune.ir.inputs import batch_of, with_batch
from graphprune.ir.masking import channel_masked, masks_of, register_mask, sync_recurrent, unregister_masks
from graphprune.ir.modules import MaskedLayerNorm, set_layer_norm_class
from graphprune.ir.norms import masked_layer_norm, masked_reduce
from graphprune.ir.partial import BOUNDARY, boundary_values
from graphprune.ir.shadow import Snapshot, own_class
from graphprune.ir.trace import ROOT_HOLDER, TRACED_BY, no_cache
from graphprune.ir.verify import mismatch, module_of, run_outputs
from graphprune.rules.base import rule_for_module

logger = logging.getLogger(__name__)

__all__ = ["Landing", "land"]


@dataclass(frozen=True)
class Landing:
    model: nn.Module | None  # the user's model (or its copy) holding the result; None if it cannot
    reason: str = ""  # why it cannot
    compared: bool = False  # the reason is the model's own forward computing something else


def _graph_only(gm: fx.GraphModule, work: nn.Module) -> str | None:
    """Constructs that exist only in the graph, which a module tree cannot hold."""
    for name, _ in gm.named_children():
        if name.startswith("graphprune_reinsert"):
            return (
                "zeros are reinserted (ReinsertZeros) by modules that only the graph holds; the pruned model is "
                "returned as a graph"
            )
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__module__", "") == tokens.__name__:
            return (
                f"tokens are selected between layers ({node.name}, TokenPrune) by nodes that only the graph holds; "
                "the pruned model is returned as a graph"
            )
        if node.op == "call_function" and node.target is masked_reduce:
            return (
                f"a mean or sum over masked channels ({_line(node)}) reduces over the kept channels in the graph only; "
                "run Shrink() to get your own class back"
            )
        if node.op == "call_function" and node.target is masked_layer_norm and not _masked_module(node, work):
            return (
                f"a functional layer_norm over masked channels ({_line(node)}) normalises over the kept channels in "
                "the graph only; run Shrink() to get your own class back"
            )
    return None


def _masked_module(node: fx.Node, work: nn.Module) -> str | None:
    """The nn.LayerNorm of `work` (or subclass calling F.layer_norm on its own weight) that a
    masked_layer_norm node stands for, if it was one."""
    original = node.kwargs.get("original", "")
    if original.startswith("module:"):
        return original.partition(":")[2]
    weight = node.args[2]
    path = weight.target.rpartition(".")[0] if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    try:
        return path if path is not None and isinstance(work.get_submodule(path), nn.LayerNorm) else None
    except AttributeError:
        return None


def _mask_layer_norms(work: nn.Module, gm: fx.GraphModule) -> None:
    """LayerNorm modules the graph normalises over kept channels do so in the module tree too (and
    those with nothing masked any more are plain LayerNorms again)."""
    for module in work.modules():
        if isinstance(module, MaskedLayerNorm) and not channel_masked(module):
            set_layer_norm_class(module, masked=False)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is masked_layer_norm and (path := _masked_module(node, work)):
            set_layer_norm_class(work.get_submodule(path), masked=True)


def _line(node: fx.Node) -> str:
    """`file:line: code` of the user source a node came from (or its name)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File ") and "/torch/" not in lines[i] and "/graphprune/" not in lines[i]:
            where = lines[i].split(",")
            file, line = where[0][6:-1], where[1].strip().removeprefix("line ")
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{file}:{line}: {code}"
    return f"node {node.name}"


def _transplant(work: nn.Module, gm: fx.GraphModule, origin: dict[int, nn.Module]) -> None:
    """Symbolically traced graphs: every shadow module's state goes onto the module it shadows."""
    pairs = [(origin[id(s)], s) for s in {id(m): m for m in gm.modules()}.values() if id(s) in origin]
    shadowed = {id(w) for w, _ in pairs}
    if id(work) not in shadowed:  # the root is the GraphModule itself: only its children and root tensors
        for name, child in gm.named_children():
            if name in work._modules:
                work._modules[name] = origin.get(id(child), child)
        holder = getattr(gm, ROOT_HOLDER, None)
        if holder is not None:
            _write_tensors(work, holder)
    for w, s in pairs:
        attrs = dict(s.__dict__)
        attrs["_modules"] = OrderedDict((k, None if c is None else origin.get(id(c), c)) for k, c in s._modules.items())
        w.__dict__.clear()
        w.__dict__.update(attrs)
        w.__class__ = type(s)
        own_class(w)


def _write_tensors(w: nn.Module, g: nn.Module) -> bool:
    """Give `w` the tensors (and masks) that `g` holds directly; True when a shape changed."""
    changed = False
    for attr, masks in masks_of(w).items():  # the graph's masks replace these
        unregister_masks(w, attr)
    for table in ("_parameters", "_buffers"):
        for attr, t in g.__dict__[table].items():
            old = getattr(w, attr, None)
            if t is None or old is t:
                continue
            changed |= not isinstance(old, torch.Tensor) or old.shape != t.shape
            w.__dict__[table][attr] = t
    for attr, plist in masks_of(g).items():
        original = plist.original
        old = getattr(w, attr, None)
        changed |= not isinstance(old, torch.Tensor) or old.shape != original.shape
        w._parameters.pop(attr, None)
        w._buffers.pop(attr, None)
        if isinstance(original, nn.Parameter):
            w.register_parameter(attr, original)
        else:
            w.register_buffer(attr, original)
        for p in plist:
            register_mask(w, attr, p, unsafe=True)
    sync_recurrent(w)  # tensors were written past __setattr__
    return changed


# Classes traced through in exported graphs whose forward reads their width from an attribute
# (graphs have no modules, so no rule fixes them): set from the sliced tensors.
_WIDTH_ATTRIBUTES = {
    "transformers.pytorch_utils.Conv1D": lambda m: setattr(m, "nf", m.weight.shape[1]),  # GPT-2's projections
}


def _width_fix(module: nn.Module):
    return _WIDTH_ATTRIBUTES.get(f"{type(module).__module__}.{type(module).__qualname__}")


def _by_name(work: nn.Module, gm: fx.GraphModule) -> None:
    """Exported graphs: tensors by qualified name, swapped-in graphprune modules by path, then the
    attributes (in_features, num_heads, ...) that the rules of the modules' classes fix."""
    targets = dict(work.named_modules())
    for path, g in gm.named_modules():
        if not path or path.startswith((ROOT_HOLDER, "parametrizations")) or ".parametrizations" in path:
            continue
        w = targets.get(path)
        if w is None:
            continue
        if type(g).__module__.startswith("graphprune") and type(g) is not type(w):
            parent, _, child = path.rpartition(".")
            targets[parent or ""]._modules[child] = g
            continue
        if _write_tensors(w, g):
            rule = rule_for_module(w, for_attributes=True)
            if rule is not None:
                rule.update_module(w)
            fix = _width_fix(w)
            if fix is not None:
                fix(w)
    holder = getattr(gm, ROOT_HOLDER, None)
    if holder is not None:
        _write_tensors(work, holder)


def _head_width(work: nn.Module) -> None:
    """timm models keep the width their classifier reads in `num_features` (reset_classifier builds the
    new head from it): the classifier's input width after pruning."""
    if not (hasattr(work, "get_classifier") and isinstance(getattr(work, "num_features", None), int)):
        return
    head = work.get_classifier()
    if isinstance(head, nn.Linear) and head.in_features != work.num_features:
        if getattr(work, "head_hidden_size", None) == work.num_features:
            work.head_hidden_size = head.in_features
        work.num_features = head.in_features


def _head_counts(work: nn.Module) -> None:
    """Hugging Face attention keeps head counts its forward reads, set here from the projections'
    widths after pruning: `num_key_value_groups` (its eager attention repeats the kv heads by it,
    GQAQueryHeads), and where q, k and v come out of one fused projection cut at head counts
    (Phi-3's `qkv[..., :config.num_attention_heads * head_dim]`), `num_key_value_heads` and the
    config's head counts: a copy of the config, shared by the layers that keep as many heads
    (hf.express_config puts the model's own config back where it can say them)."""
    copies: dict[tuple[int, int, int], Any] = {}
    for m in work.modules():
        q, k, qkv, o = (getattr(m, name, None) for name in ("q_proj", "k_proj", "qkv_proj", "o_proj"))
        head_dim = getattr(m, "head_dim", None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            q_width, kv_width = q.out_features, k.out_features
        elif isinstance(qkv, nn.Linear) and isinstance(o, nn.Linear) and type(head_dim) is int:
            q_width, kv_width = o.in_features, (qkv.out_features - o.in_features) // 2
        else:
            continue
        if not kv_width or q_width % kv_width:
            continue
        if type(getattr(m, "num_key_value_groups", None)) is int:
            m.num_key_value_groups = q_width // kv_width
        if qkv is None or q is not None or q_width % head_dim or kv_width % head_dim:
            continue
        heads, kv_heads = q_width // head_dim, kv_width // head_dim
        if type(getattr(m, "num_key_value_heads", None)) is int:
            m.num_key_value_heads = kv_heads
        config = getattr(m, "config", None)
        said = (getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", kv_heads))
        if type(said[0]) is int and said != (heads, kv_heads):
            key = (id(config), heads, kv_heads)
            copies[key] = with_heads(m, copies.get(key, config), heads, kv_heads)


def _second_inputs(example_inputs: tuple | dict) -> tuple | dict | None:
    batch = batch_of(example_inputs)
    return with_batch(example_inputs, batch + 1) if batch else None


def _why(exc: BaseException) -> str:
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/torch/" not in f.filename and "/graphprune/" not in f.filename
    ]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else ""
    return f"{type(exc).__name__}{where}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _set_attributes(work: nn.Module, gm: fx.GraphModule) -> bool:
    """Where Shrink rewrote a literal size in the graph (a head count, a hidden width), the source
    most often reads it from an int attribute of the module it runs in (`self.num_heads`), or a slice
    (`x[:, self.keep]`): set those attributes to the new value.  A guess, so the caller verifies it
    (and rolls back if wrong)."""
    modules = dict(work.named_modules())
    changed = False
    for node in gm.graph.nodes:
        moved: dict[int, int] = {}
        for old, new in node.meta.get("graphprune_rewritten") or ():
            moved.setdefault(old, new)  # (the first, as the graph's sizes are read in order)
        if not moved:
            continue
        path = module_of(node)
        while path not in modules:
            path = path.rpartition(".")[0]
        module = modules[path]
        if rule_for_module(module, for_attributes=True) is not None or _width_fix(module) is not None:
            continue  # its widths are kept right by its rule
        for attr, value in list(vars(module).items()):
            if attr.startswith("_"):
                continue
            if type(value) is int and value in moved:
                setattr(module, attr, moved[value])
                changed = True
            elif type(value) is slice and (value.start in moved or value.stop in moved):  # (`x[:, self.keep]`)
                setattr(
                    module,
                    attr,
                    slice(moved.get(value.start, value.start), moved.get(value.stop, value.stop), value.step),
                )
                changed = True
    return changed


def _rewritten_lines(gm: fx.GraphModule) -> list[str]:
    return list(dict.fromkeys(_line(n) for n in gm.graph.nodes if n.meta.get("graphprune_rewritten")))  # (once a line)


def land(
    work: nn.Module,
    gm: fx.GraphModule,
    origin: dict[int, nn.Module],
    example_inputs: tuple | dict,
    expected: Any = None,
) -> Landing:
    """Write the graph's result onto `work` (the user's model or its copy) and verify it; on any
    mismatch `work` is rolled back and the reason says what in the source prevents it.
    `expected`: the graph's outputs on the example inputs, when the caller has them."""
    reason = _graph_only(gm, work)
    if reason is not None:
        return Landing(None, reason)
    snapshot, before = Snapshot(work), _structure(work)
    try:
        if id(gm) in origin or (
            origin and gm.meta.get(TRACED_BY) in ("fx", "partial")
        ):  # the graph holds shadows of work's modules
            _transplant(work, gm, origin)
        else:
            _by_name(work, gm)
        _mask_layer_norms(work, gm)
        _head_width(work)
        _head_counts(work)
        resized = _structure(work) != before or bool(_rewritten_lines(gm))
        problem = _compare(work, gm, example_inputs, expected, resized)
        if problem is not None and _set_attributes(work, gm):  # sizes the source reads from module attributes
            problem = _compare(work, gm, example_inputs, expected, resized)
    except Exception as exc:  # landing itself failed: the model stays as it was
        logger.debug("landing failed", exc_info=True)
        problem = _why(exc)
    if problem is None:
        return Landing(work)
    snapshot.restore()
    lines = _rewritten_lines(gm)
    hint = f"; the graph rewrote constants at {lines[:3]}, which your source cannot change" if lines else ""
    return Landing(
        None,
        f"{type(work).__name__}'s own forward does not compute the pruned graph's result: {problem}{hint}",
        compared=True,
    )


def _structure(model: nn.Module) -> dict[str, Any]:
    """Every tensor's shape and every module's class, by name, masks left out (a masked weight is
    named as the weight): what decides whether the result may compute differently at other sizes."""
    out: dict[str, Any] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if ".parametrizations" in f".{path}":
            continue
        out[path] = type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            out[f"{path}.{name}"] = tuple(t.shape)
        for name in getattr(m, "parametrizations", {}):
            out[f"{path}.{name}"] = tuple(getattr(m, "parametrizations")[name].original.shape)
    return out


def _compare(
    work: nn.Module, gm: fx.GraphModule, example_inputs: tuple | dict, known: Any = None, resized: bool = True
) -> str | None:
    """None when `work` computes what `gm` computes on the example inputs, and on another batch
    size if `resized` (sizes or classes changed, or the graph rewrote literals: the source may hold
    one the graph does not); else what differs."""
    if BOUNDARY in gm.meta:  # a graph of regions: their outputs in the model, on the example inputs
        try:
            expected, got = boundary_values(work, gm, example_inputs)
        except Exception as exc:
            return _why(exc)
        return mismatch(list(expected), got)
    second = _second_inputs(example_inputs) if resized else None
    for inputs, expected in ((example_inputs, known), (second, None)):
        if inputs is None:
            continue
        try:
            expected = run_outputs(gm, inputs) if expected is None else expected
        except Exception:  # the graph itself is specialised to these shapes: nothing to compare there
            continue
        try:
            with no_cache(work):  # the graph was traced without a key/value cache in its outputs
                got = run_outputs(work, inputs)
        except Exception as exc:
            return _why(exc)
        problem = mismatch(_plain(expected), _plain(got))
        if problem is not None:
            return problem
    return None


def _plain(value: Any) -> Any:
    """Model outputs as plain containers (a Hugging Face ModelOutput compares as the tuple of its values)."""
    if isinstance(value, dict) and type(value) is not dict:
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
