"""Hugging Face transformers pruned with no hints: half of the attention heads (kv groups under GQA)
and half of the FFN neurons, by L2 magnitude.  Prints, per model, the groups found, params and MACs
before/after, the time to trace + analyse + mask + shrink, and how far the shrunk model is from the
masked one (it must be exact).  Random-init models (benchmarks/zoo.py), batch 1.

    python benchmarks/prune_transformers.py [--models bert,gpt2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.passes import ChannelMask, L2Score, Shrink  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from zoo import HF_MODELS, hf_model  # noqa: E402


def first_tensor(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(HF_MODELS))
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        model, inputs = hf_model(name)
        start = time.perf_counter()
        masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=inputs)
        shrunk = gp.compile(masked, [Shrink()], example_inputs=inputs)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            diff = (first_tensor(shrunk(**inputs)) - first_tensor(masked(**inputs))).abs().max().item()
        groups = gp.summary(model, shrunk, inputs).groups
        deps = gp.analyze_dependencies(gp.trace(model, example_inputs=inputs), inputs)
        kinds = {g.key: g.kind for g in deps.groups}
        count = {k: sum(1 for v in kinds.values() if v == k) for k in ("head", "ffn")}
        heads = [(n, m) for key, n, m in groups if kinds.get(key) == "head"]
        rows.append(
            {
                "model": name,
                "head_groups": count["head"],
                "ffn_groups": count["ffn"],
                "heads": f"{sum(m for _, m in heads)}/{sum(n for n, _ in heads)}" if heads else "-",
                "params": [gp.count_params(model), gp.count_params(shrunk)],
                "macs": [gp.count_macs(model, inputs), gp.count_macs(shrunk, inputs)],
                "seconds": seconds,
                "max_abs_diff": diff,
            }
        )
        print(f"  {name}: {seconds:.1f}s", file=sys.stderr)
    print(
        "Heads (kv groups under GQA) and FFN neurons at ratio 0.5, L2, no hints; random-init, 4 layers, width 256, batch 1\n"
    )
    print(
        "| model | head groups | FFN groups | heads kept | params | params ratio | MACs ratio | prune time (s) | max abs diff shrunk vs masked |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['head_groups']} | {r['ffn_groups']} | {r['heads']} | {r['params'][0] / 1e6:.2f} M -> {r['params'][1] / 1e6:.2f} M "
            f"| {r['params'][1] / r['params'][0]:.3f} | {r['macs'][1] / r['macs'][0]:.3f} | {r['seconds']:.1f} | {r['max_abs_diff']:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
