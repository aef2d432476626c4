"""The torchvision classifiers the benchmarks run (random-init weights: nothing is downloaded)."""

from __future__ import annotations

import torch
import torchvision

MODELS = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "efficientnet_b0",
    "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet", "inception_v3", "vgg11_bn",
    "convnext_tiny", "alexnet", "mnasnet0_5",
]


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, name)(**kwargs).eval()


def input_side(name: str, size: int) -> int:
    return max(size, 299) if name == "inception_v3" else size
