"""LLM pruning without fine-tuning, on a Llama-architecture LM really trained here (stdlib_lm.py).

Test perplexity (held-out standard-library files, windows of 256 tokens) after one-shot pruning,
each method on the same 16 x 256 calibration tokens from the training files:

structured, 20 % and 50 % of all parameters removed (ChannelMask(target={"params": ...}) finds
the ratio; heads and FFN neurons only, the embedding width is kept; lm_head and embeddings count
in the total, as in the papers):
  L2            weight magnitude per unit, the same ratio in every layer
  Wanda-sp      ||W[:, j]|| * ||x_j|| (WandaScore), same ratio in every layer
  LLM-Pruner    first-order Taylor |w * dL/dw| of the coupled group (TaylorScore), same ratio
  FLAP          fluctuation metric, standardised, global ranking across layers (each layer keeps
                what its scores earn; heads and FFN neurons each ranked on their own, both at the
                ratio), CompensateBias folds the removed channels' means into biases; the same
                with one ratio in every layer; and with heads and neurons ranked on one scale,
                weighed by their parameters (scope="joint", FLAP's own adaptive structure)
  depth         DropBlocks: whole decoder layers by block influence (ShortGPT), as many as come
                closest to the share
  ..., query heads  Wanda-sp and FLAP with GQAQueryHeads: the query heads within kv groups are the
                units of attention (the same ones from each group; the kv heads kept) instead of
                whole kv groups
unstructured 50 % and 2:4 on every linear layer of the decoder (lm_head kept):
  magnitude     |w|, per output row
  Wanda         |w| * ||x||, per output row
  SparseGPT     OBS reconstruction, block by block (each block calibrated on the pruned blocks before it)

    python benchmarks/llm_pruning.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import stdlib_lm  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.finetune import logits_of  # noqa: E402
from graphprune.passes import (  # noqa: E402
    ChannelMask,
    CompensateBias,
    DropBlocks,
    FLAPScore,
    GQAQueryHeads,
    L2Score,
    NMMask,
    Shrink,
    SparseGPTMask,
    TaylorScore,
    UnstructuredMask,
    WandaScore,
)

SEQ = stdlib_lm.SEQ_LEN
KEEP_DENSE = ["model.embed_tokens"]  # the residual width (its group holds the embedding) stays
LINEARS_EXCEPT_HEAD = ["lm_head"]


def _lm_loss(output, ids):
    logits = logits_of(output)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _structured(name: str, share_kept: float, calibration, n_blocks: int):
    batches = [((ids,), ids) for ids in calibration]
    mask = dict(target={"params": share_kept}, exclude=KEEP_DENSE)
    return {
        "L2": [L2Score(), ChannelMask(**mask)],
        "Wanda-sp": [WandaScore(calibration), ChannelMask(**mask)],
        "LLM-Pruner (Taylor)": [TaylorScore(batches, loss_fn=_lm_loss), ChannelMask(**mask)],
        "FLAP": [FLAPScore(calibration), ChannelMask(**mask, scope="global"), CompensateBias(calibration)],
        "FLAP, same ratio per layer": [FLAPScore(calibration), ChannelMask(**mask), CompensateBias(calibration)],
        "FLAP, joint": [FLAPScore(calibration), ChannelMask(**mask, scope="joint"), CompensateBias(calibration)],
        "depth (block influence)": [DropBlocks(n_blocks, calibration=calibration)],
        "Wanda-sp, query heads": [GQAQueryHeads(), WandaScore(calibration), ChannelMask(**mask)],
        "FLAP, query heads": [
            GQAQueryHeads(),
            FLAPScore(calibration),
            ChannelMask(**mask, scope="global"),
            CompensateBias(calibration),
        ],
    }[name] + [Shrink()]


def _unstructured(name: str, sparsity, calibration):
    nm = isinstance(sparsity, str)
    exclude = LINEARS_EXCEPT_HEAD
    mask = NMMask(2, 4, exclude=exclude) if nm else UnstructuredMask(sparsity, scope="row", exclude=exclude)
    return {
        "magnitude": [mask],
        "Wanda": [WandaScore(calibration), mask],
        "SparseGPT": [SparseGPTMask(sparsity, calibration=calibration, exclude=exclude)],
    }[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "llm_pruning.json"))
    parser.add_argument("--eval-windows", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = stdlib_lm.trained()
    with open(os.path.join(stdlib_lm.CACHE, "trained.json")) as fh:
        trained = json.load(fh)
    test = stdlib_lm.tokens("test")[: args.eval_windows * SEQ]
    train = stdlib_lm.tokens("train")
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(train) - SEQ, (16,), generator=g).tolist()
    calibration = [torch.stack([train[s : s + SEQ] for s in starts[i : i + 4]]) for i in range(0, 16, 4)]
    example = (calibration[0][:1, :64],)
    dense_params = gp.count_params(model)
    block_params = gp.count_params(model.model.layers[0])
    ppl = lambda m: gp.perplexity(m, test, seq_len=SEQ, batch_size=8)  # noqa: E731
    dense_ppl = ppl(model)
    print(
        f"model: Llama-architecture, {dense_params / 1e6:.2f} M params, {stdlib_lm.CONFIG['num_hidden_layers']} layers, "
        f"trained {trained['minutes']:.0f} min ({trained['tokens'] / 1e6:.1f} M tokens); dense test perplexity {dense_ppl:.2f} "
        f"on {len(test):,} tokens"
    )
    rows = []

    def run(kind: str, name: str, level: str, passes) -> None:
        start = time.time()
        pruned = gp.compile(model, passes, example_inputs=example)
        seconds = time.time() - start
        layers = [m.weight for m in pruned.model.layers.modules() if isinstance(m, torch.nn.Linear)]  # as masked
        row = {
            "kind": kind,
            "method": name,
            "level": level,
            "params_removed": 1 - gp.count_params(pruned) / dense_params,
            "layer_sparsity": sum(int((p == 0).sum()) for p in layers) / max(sum(p.numel() for p in layers), 1),
            "perplexity": ppl(pruned),
            "seconds": seconds,
        }
        rows.append(row)
        print(
            f"{kind:12s} {level:5s} {name:24s} removed {row['params_removed']:6.1%}  zeros in layers "
            f"{row['layer_sparsity']:6.1%}  ppl {row['perplexity']:10.2f}  "
            f"({seconds:.0f} s)",
            flush=True,
        )

    for share in (0.2, 0.5):
        n_blocks = max(1, round(share * dense_params / block_params))
        for name in (
            "L2",
            "Wanda-sp",
            "LLM-Pruner (Taylor)",
            "FLAP",
            "FLAP, same ratio per layer",
            "FLAP, joint",
            "depth (block influence)",
            "Wanda-sp, query heads",
            "FLAP, query heads",
        ):
            run("structured", name, f"{share:.0%}", _structured(name, 1 - share, calibration, n_blocks))
    for sparsity in (0.5, "2:4"):
        for name in ("magnitude", "Wanda", "SparseGPT"):
            level = sparsity if isinstance(sparsity, str) else f"{sparsity:.0%}"
            run("unstructured", name, level, _unstructured(name, sparsity, calibration))

    lines = [
        "# LLM pruning without fine-tuning (benchmarks/llm_pruning.py)",
        "",
        f"Llama-architecture causal LM ({dense_params / 1e6:.2f} M params: {stdlib_lm.CONFIG['num_hidden_layers']} layers, "
        f"width {stdlib_lm.CONFIG['hidden_size']}, {stdlib_lm.CONFIG['num_attention_heads']} query / "
        f"{stdlib_lm.CONFIG['num_key_value_heads']} key-value heads, FFN {stdlib_lm.CONFIG['intermediate_size']}, "
        f"vocabulary {stdlib_lm.VOCAB}) trained here for {trained['minutes']:.0f} min on {trained['tokens'] / 1e6:.1f} M "
        "tokens of the Python standard library (benchmarks/stdlib_lm.py). Perplexity on held-out standard-library files, "
        f"{len(test):,} tokens in windows of {SEQ}; calibration 16 x {SEQ} training tokens; no fine-tuning.",
        "",
        f"Dense perplexity: **{dense_ppl:.2f}**",
        "",
        "| kind | level | method | params removed | zeros in the layers | perplexity | time (s) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['level']} | {r['method']} | {r['params_removed']:.1%} | {r['layer_sparsity']:.1%} | "
            f"{r['perplexity']:.2f} | {r['seconds']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    with open(args.json, "w") as fh:
        json.dump({"dense_perplexity": dense_ppl, "trained": trained, "rows": rows}, fh, indent=1)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
