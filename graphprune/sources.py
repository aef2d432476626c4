"""Models named on the command line, and their example inputs.

    torchvision:NAME       a torchvision model (random init unless --weights)
    timm:NAME              a timm model (random init unless --weights)
    hf:DIR                 a Hugging Face model folder (save_pretrained), loaded with its weights
    FILE.py:FUNCTION       a function returning a model, or (model, example_inputs)
    DIR                    a folder written by `graphprune prune --out DIR` (the pruned model)

Example inputs come from the factory, else from `shape` (an image batch, e.g. 1x3x224x224) or
`seq_len` (token ids of a model with a vocabulary); images default to 1x3x224x224 and token
models to 128 tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from graphprune.arguments import load_function
from graphprune.errors import ArgumentError
from graphprune.saving import PLAN_FILE, load

__all__ = ["Loaded", "load_source", "load_function", "SOURCE_FILE"]

SOURCE_FILE = "source.json"  # in a folder written by `graphprune prune`: how to rebuild the original


@dataclass
class Loaded:
    model: nn.Module  # what SOURCE names (for a pruned folder: the pruned model)
    example_inputs: tuple | dict
    spec: dict  # how to build it again: {"source": ..., "inputs": {...}, "weights": ...}
    original: nn.Module | None = None  # for a pruned folder: the model it was pruned from


def load_source(
    source: str,
    *,
    shape: list[int] | None = None,
    seq_len: int | None = None,
    weights: str | None = None,
    seed: int = 0,
) -> Loaded:
    path = Path(source)
    if path.is_dir() and (path / SOURCE_FILE).exists():
        return _pruned_folder(path)
    torch.manual_seed(seed)
    kind, _, name = source.partition(":")
    if source.endswith(".py") or (kind.endswith(".py") and name):
        built = _factory(kind, name)
    elif kind == "torchvision" and name:
        built = _torchvision(name)
    elif kind == "timm" and name:
        built = _timm(name)
    elif kind == "hf" and name:
        built = _hf(name)
    else:
        raise ArgumentError(
            f"unknown model source {source!r}: use torchvision:NAME, timm:NAME, hf:FOLDER, FILE.py:FUNCTION "
            "or a folder written by `graphprune prune --out`"
        )
    model, given = built if isinstance(built, tuple) else (built, None)
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"{source} did not give an nn.Module but {type(model).__name__}")
    if weights:
        _load_weights(model, weights)
    model.eval()
    inputs_spec = {"shape": shape} if shape else {"seq_len": seq_len} if seq_len else {}
    example_inputs = given if given is not None and not inputs_spec else _inputs(model, inputs_spec, source)
    spec = {"source": source, "inputs": inputs_spec, "weights": weights, "seed": seed}
    return Loaded(model, example_inputs, spec)


def _pruned_folder(path: Path) -> Loaded:
    spec = json.loads((path / SOURCE_FILE).read_text())
    original = load_source(
        spec["source"],
        shape=spec["inputs"].get("shape"),
        seq_len=spec["inputs"].get("seq_len"),
        weights=spec.get("weights"),
        seed=spec.get("seed", 0),
    )
    if not (path / PLAN_FILE).exists():
        raise ArgumentError(f"{path} has {SOURCE_FILE} but no {PLAN_FILE}: it was not written completely")
    pruned = load(original.model, path, original.example_inputs)
    return Loaded(pruned.eval(), original.example_inputs, spec, original=original.model)


def _factory(file: str, function: str) -> Any:
    if not function:
        raise ArgumentError(f"name the function that builds the model: {file}:FUNCTION")
    built = load_function(f"{file}:{function}")()
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        inputs = built[1]
        return built[0], inputs if isinstance(inputs, (tuple, dict)) else (inputs,)
    return built


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ArgumentError("torchvision models need torchvision: pip install 'graphprune[vision]'") from exc
    builder = getattr(torchvision.models, name, None)
    if not callable(builder):
        raise ArgumentError(f"torchvision has no model {name!r}; e.g. resnet18, mobilenet_v2, convnext_tiny")
    return builder()


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ArgumentError("timm models need timm: pip install timm") from exc
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as exc:
        raise ArgumentError(f"timm cannot build {name!r}: {exc}") from exc


def _hf(folder: str) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise ArgumentError("Hugging Face models need transformers: pip install 'graphprune[hf]'") from exc
    if not (Path(folder) / "config.json").exists():
        raise ArgumentError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return transformers.AutoModel.from_pretrained(folder)


def _load_weights(model: nn.Module, file: str) -> None:
    try:
        state = load_file(file) if file.endswith(".safetensors") else torch.load(file, weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # missing file, not a state dict, tensors that do not fit
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ArgumentError(f"--weights {file} cannot be loaded into the model: {type(exc).__name__}: {first}") from exc


def _inputs(model: nn.Module, spec: dict, source: str) -> tuple:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if "shape" in spec:
        return (torch.randn(*spec["shape"]),)
    if vocab is not None:
        return (torch.randint(0, vocab, (1, spec.get("seq_len", 128))),)
    if "seq_len" in spec:
        raise ArgumentError(f"{source} has no vocabulary (config.vocab_size): give --input-shape instead of --seq-len")
    return (torch.randn(1, 3, 224, 224),)
