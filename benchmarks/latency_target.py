"""Pruning to a latency target: `ChannelMask(target={"latency": s, "backend": "onnxruntime", "threads": n})`
on torchvision CNNs (random init, batch 1, 224x224), then the requested share of the dense
model's ONNX Runtime latency beside the one achieved, measured again here (not the search's own
numbers): dense and pruned exported, their sessions timed interleaved in `--rounds` separate
rounds of `--repeats` runs each; the share is the median over rounds with its min-max.

    python benchmarks/latency_target.py [--models resnet18,...] [--targets 0.5,0.7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

import graphprune as gp
from graphprune.backends.latency import OrtMeter
from graphprune.passes import ChannelMask, L2Score, Shrink

sys.path.insert(0, os.path.dirname(__file__))
from zoo import build  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "regnet_x_400mf"]


def run(name: str, target: float, threads: int, rounds: int, repeats: int, round_to: int, scope: str) -> dict:
    torch.manual_seed(0)
    model = build(name)
    x = (torch.randn(1, 3, 224, 224),)
    mask = ChannelMask(
        target={"latency": target, "backend": "onnxruntime", "threads": threads}, scope=scope, round_to=round_to
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gp.GraphPruneWarning)
        pruned = gp.compile(model, [L2Score(), mask, Shrink()], example_inputs=x)
    seconds = time.perf_counter() - start
    found = next(r for r in pruned.graphprune_report if r.name == "ChannelMask").details["target"]
    meter = OrtMeter(threads, runs=repeats // 2)  # a fresh meter: nothing carried over from the search
    shares = []
    for _ in range(rounds):  # each round exports the pruned model again and opens fresh sessions
        dense_s, pruned_s = meter.models(model, pruned, x)
        shares.append(pruned_s / dense_s)
    achieved = statistics.median(shares)
    return {
        "model": name,
        "requested": target,
        "search_table": found["estimated"],
        "search_measured": found["reached"],
        "achieved": achieved,
        "achieved_min": min(shares),
        "achieved_max": max(shares),
        "within_5pct": abs(achieved - target) <= 0.05 * target,
        "speedup": 1 / achieved,
        "macs_ratio": gp.count_macs(pruned, x) / gp.count_macs(model, x),
        "params_ratio": gp.count_params(pruned) / gp.count_params(model),
        "ratio": found["ratio"],
        "search_s": seconds,
        "warned": any("missed" in str(w.message) for w in caught),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | requested | table (search) | measured (search) | achieved [min-max] | within 5 % | speedup "
        "| MACs | params | search s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | x{r['requested']:.2f} | x{r['search_table']:.3f} | x{r['search_measured']:.3f} "
            f"| x{r['achieved']:.3f} [{r['achieved_min']:.3f}-{r['achieved_max']:.3f}] "
            f"| {'yes' if r['within_5pct'] else 'no'} | {r['speedup']:.2f}x | x{r['macs_ratio']:.3f} "
            f"| x{r['params_ratio']:.3f} | {r['search_s']:.0f} |"
        )
    met = sum(r["within_5pct"] for r in rows)
    lines.append(f"\n{met} of {len(rows)} targets met within 5 % of the requested share, measured afterwards")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--targets", default="0.5,0.7", help="shares of the dense model's latency")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--round-to", type=int, default=16, help="16: ONNX Runtime's blocked convolutions on AVX-512")
    parser.add_argument("--scope", choices=["local", "global"], default="local")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--md", help="write the markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            rows.append(run(name, target, args.threads, args.rounds, args.repeats, args.round_to, args.scope))
            print(table(rows[-1:]).splitlines()[-3], flush=True)
    header = (
        f"# Latency targets in ONNX Runtime ({time.strftime('%Y-%m-%d')})\n\n"
        f"graphprune {gp.__version__}, torch {torch.__version__}; {platform.machine()}, {args.threads} threads, "
        f"shared VM. L2 scores, scope {args.scope}, round_to "
        f"{args.round_to}, batch 1, 224x224, random init. 'table' and 'measured (search)' are the search's own "
        "numbers; 'achieved' is measured afterwards here: the exported dense and pruned models timed "
        f"interleaved in {args.rounds} rounds of fresh sessions, {args.repeats} runs each; a round's share is "
        "the median of its runs' pruned/dense ratios; the median over rounds with its min-max.\n\n"
    )
    report = header + table(rows) + "\n"
    print(report)
    if args.md:
        with open(args.md, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
