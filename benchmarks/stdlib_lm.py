"""A small Llama-architecture causal LM really trained, offline, on the Python standard library.

The corpus is every `.py` file of the running Python's standard library (sources, docstrings
and comments: code and English), split by file into train and test; a byte-level BPE is
trained on the train files with the `tokenizers` package.  The model is Hugging Face's
`LlamaForCausalLM` (RoPE, RMSNorm, SwiGLU, grouped-query attention) at a size two CPU cores
train in a few minutes.  Tokenizer, token files and checkpoint are cached under
`benchmarks/cache/stdlib_lm/` (not in git) and re-used by every later run.

    python benchmarks/stdlib_lm.py [--minutes 25]     # train (or report the cached model)
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402

CACHE = os.path.join(os.path.dirname(__file__), "cache", "stdlib_lm")
VOCAB = 4096
SEQ_LEN = 256
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=SEQ_LEN,
    tie_word_embeddings=False,
    use_cache=False,
)


def _files() -> tuple[list[str], list[str]]:
    """The standard library's .py files (tests and vendored packages left out), 1 in 20 for test."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(
        f
        for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if not any(part in f for part in ("/test", "/site-packages/", "/idlelib/", "/lib2to3/tests"))
    )
    return [f for i, f in enumerate(files) if i % 20], [f for i, f in enumerate(files) if i % 20 == 0]


def _read(files: list[str]) -> list[str]:
    out = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            out.append(fh.read())
    return out


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = os.path.join(CACHE, "tokenizer.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    os.makedirs(CACHE, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eof>"]
    )
    tok.train_from_iterator(_read(_files()[0]), trainer)
    tok.save(path)
    return tok


def tokens(split: str) -> torch.Tensor:
    """All tokens of a split as one 1-D tensor, files separated by <eof>."""
    path = os.path.join(CACHE, f"{split}.pt")
    if os.path.exists(path):
        return torch.load(path)
    tok = tokenizer()
    eof = tok.token_to_id("<eof>")
    ids = []
    for text in _read(_files()[0 if split == "train" else 1]):
        ids.extend(tok.encode(text).ids + [eof])
    out = torch.tensor(ids, dtype=torch.long)
    torch.save(out, path)
    return out


def new_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def trained(minutes: float = 25.0, log=print):
    """The trained model (from the cache, or trained now for `minutes` and cached)."""
    path = os.path.join(CACHE, "model.pt")
    model = new_model()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model
    train = tokens("train")
    test = tokens("test")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batch, budget, start, step = 16, minutes * 60, time.time(), 0
    g = torch.Generator().manual_seed(0)
    while (elapsed := time.time() - start) < budget:
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - SEQ_LEN - 1, (batch,), generator=g)
        ids = torch.stack([train[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"step {step}  {elapsed / 60:5.1f} min  loss {loss.item():.3f}  lr {lr:.2e}")
    model.eval()
    ppl = gp.perplexity(model, test[: 64 * SEQ_LEN], seq_len=SEQ_LEN)
    log(
        f"trained {step} steps ({step * batch * SEQ_LEN / 1e6:.1f} M tokens) in {minutes} min: test perplexity {ppl:.2f}"
    )
    torch.save(model.state_dict(), path)
    with open(os.path.join(CACHE, "trained.json"), "w") as fh:
        json.dump({"steps": step, "tokens": step * batch * SEQ_LEN, "minutes": minutes, "test_ppl": ppl}, fh)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=25.0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t = time.time()
    print(
        f"train tokens {len(tokens('train')) / 1e6:.2f} M, test {len(tokens('test')) / 1e6:.2f} M ({time.time() - t:.0f} s)"
    )
    model = trained(args.minutes)
    print(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")


if __name__ == "__main__":
    main()
