"""The models the benchmarks run: torchvision classifiers and small-config Hugging Face
transformers, all random-init (nothing is downloaded)."""

from __future__ import annotations

import torch
import torchvision

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "densenet121",
    "efficientnet_b0",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "googlenet",
    "inception_v3",
    "vgg11_bn",
    "convnext_tiny",
    "alexnet",
    "mnasnet0_5",
]


TRANSFORMERS = ["bert_small"]


def build(name: str) -> torch.nn.Module:
    if name == "bert_small":
        import transformers

        cfg = transformers.BertConfig(
            vocab_size=1000,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=128,
        )
        return transformers.BertModel(cfg).eval()
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, name)(**kwargs).eval()


def hf_model(name: str) -> tuple[torch.nn.Module, dict]:
    """Random-init Hugging Face models of one family each, 4 layers of width 256, and their inputs
    (batch 1, 128 tokens; 224 px for ViT; 128 + 32 tokens for T5)."""
    import transformers as T

    common = dict(vocab_size=1000, num_hidden_layers=4)
    decoder = dict(  # grouped-query attention: 8 query heads over 2 kv heads
        hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=704, use_cache=False, **common
    )
    builders = {
        "bert": lambda: T.BertModel(
            T.BertConfig(hidden_size=256, num_attention_heads=4, intermediate_size=1024, **common)
        ),
        "roberta": lambda: T.RobertaModel(
            T.RobertaConfig(
                hidden_size=256, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=160, **common
            )
        ),
        "distilbert": lambda: T.DistilBertModel(
            T.DistilBertConfig(vocab_size=1000, dim=256, n_layers=4, n_heads=4, hidden_dim=1024)
        ),
        "vit": lambda: T.ViTModel(
            T.ViTConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        ),
        "gpt2": lambda: T.GPT2Model(
            T.GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4, n_positions=128, use_cache=False)
        ),
        "llama": lambda: T.LlamaModel(T.LlamaConfig(**decoder)),
        "qwen2": lambda: T.Qwen2Model(T.Qwen2Config(**decoder)),
        # q, k and v out of one projection, cut at head counts
        "phi3": lambda: T.Phi3Model(T.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **decoder)),
        "t5": lambda: T.T5Model(
            T.T5Config(vocab_size=1000, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4, use_cache=False)
        ),
    }
    torch.manual_seed(0)
    model = builders[name]().eval()
    ids = torch.randint(3, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    if name == "vit":
        return model, {"pixel_values": torch.randn(1, 3, 224, 224)}
    if name == "t5":
        return model, {"input_ids": ids, "decoder_input_ids": ids[:, :32]}
    return model, {"input_ids": ids}


HF_MODELS = ["bert", "roberta", "distilbert", "vit", "gpt2", "llama", "qwen2", "phi3", "t5"]


def input_side(name: str, size: int) -> int:
    return max(size, 299) if name == "inception_v3" else size


def example_inputs(name: str, size: int) -> tuple | dict:
    """Batch 1: an image of `size` (299 for Inception), or 128 tokens for a transformer."""
    if name in TRANSFORMERS:
        return {"input_ids": torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))}
    side = input_side(name, size)
    return (torch.randn(1, 3, side, side),)
