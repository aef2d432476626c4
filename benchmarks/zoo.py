"""The models the benchmarks run: torchvision classifiers and small-config Hugging Face
transformers, all random-init (nothing is downloaded)."""

from __future__ import annotations

import torch
import torchvision

MODELS = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "efficientnet_b0",
    "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet", "inception_v3", "vgg11_bn",
    "convnext_tiny", "alexnet", "mnasnet0_5",
]


TRANSFORMERS = ["bert_small"]


def build(name: str) -> torch.nn.Module:
    if name == "bert_small":
        import transformers

        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=1024, max_position_embeddings=128)
        return transformers.BertModel(cfg).eval()
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, name)(**kwargs).eval()


def input_side(name: str, size: int) -> int:
    return max(size, 299) if name == "inception_v3" else size


def example_inputs(name: str, size: int) -> tuple | dict:
    """Batch 1: an image of `size` (299 for Inception), or 128 tokens for a transformer."""
    if name in TRANSFORMERS:
        return {"input_ids": torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))}
    side = input_side(name, size)
    return (torch.randn(1, 3, side, side),)
