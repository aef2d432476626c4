"""Prune (ratio 0.5) -> export -> ONNX Runtime, for torchvision classifiers; graphprune beside
Torch-Pruning where it can prune the model.  Prints a markdown table; --json writes the rows.

Transformers prune attention heads and FFN neurons (the LayerNorm'd hidden size stays).

Latency: ONNX Runtime CPU, batch 1, dense / graphprune / Torch-Pruning
sessions run interleaved in one process, medians.  "ideal" is the MACs ratio: a pruned model that
is exactly as much faster as it has fewer MACs has speedup / ideal = 1.

    python benchmarks/onnx_latency.py [--models resnet18,...] [--size 224] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import graphprune as gp
from graphprune.backends import onnx as gox
from graphprune.passes import ChannelMask, L2Score, Shrink

sys.path.insert(0, os.path.dirname(__file__))
from zoo import MODELS, TRANSFORMERS, build, example_inputs  # noqa: E402


def torch_pruning(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, ignored_layers=last
    )
    pruner.step()
    return model


def run(
    name: str,
    ratio: float,
    size: int,
    threads: int,
    repeats: int,
    folder: str,
    round_to: int = 1,
    spinning: bool = True,
) -> dict:
    torch.manual_seed(0)
    model = build(name)
    x = example_inputs(name, size)
    row: dict = {"model": name, "input": "128 tokens" if isinstance(x, dict) else x[0].shape[-1]}
    start = time.perf_counter()
    pruned = gp.compile(model, [L2Score(), ChannelMask(ratio, round_to=round_to), Shrink()], example_inputs=x)
    row["gp_seconds"] = time.perf_counter() - start
    macs = gp.count_macs(model, x)
    row["params"] = gp.count_params(model)
    row["gp_params"] = gp.count_params(pruned)
    row["gp_macs_ratio"] = gp.count_macs(pruned, x) / macs
    files = {}
    for key, m in (("dense", model), ("graphprune", pruned)):
        r = gox.export(m, os.path.join(folder, f"{name}_{key}.onnx"), example_inputs=x)
        files[key] = r.path
        row[f"{key}_export"] = r.exporter
        row[f"{key}_max_abs_err"] = r.max_abs_error
        row[f"{key}_max_rel_err"] = r.max_rel_error
        row[f"{key}_mb"] = r.file_bytes / 1e6
    try:
        if name in TRANSFORMERS:
            raise NotImplementedError("not run on transformers here")
        start = time.perf_counter()
        tpm = torch_pruning(model, x[0], ratio)
        row["tp_seconds"] = time.perf_counter() - start
        row["tp_params"] = gp.count_params(tpm)
        row["tp_macs_ratio"] = gp.count_macs(tpm, x) / macs
        r = gox.export(tpm, os.path.join(folder, f"{name}_tp.onnx"), example_inputs=x)
        files["tp"] = r.path
        row["tp_mb"] = r.file_bytes / 1e6
    except Exception as exc:  # Torch-Pruning cannot prune or export every model
        row["tp_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    lat = {r.name: r for r in gox.benchmark(files, x, threads=threads, warmup=3, repeats=repeats, spinning=spinning)}
    for key, r in lat.items():
        row[f"{key}_ms"] = r.median_ms
    row["gp_speedup"] = lat["dense"].median_ms / lat["graphprune"].median_ms
    row["gp_speedup_over_ideal"] = row["gp_speedup"] * row["gp_macs_ratio"]
    if "tp" in lat:
        row["tp_speedup"] = lat["dense"].median_ms / lat["tp"].median_ms
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default=",".join(MODELS + TRANSFORMERS), help=f"any of {MODELS + TRANSFORMERS}")
    parser.add_argument("--round-to", type=int, default=1, help="graphprune keeps widths that are multiples of this")
    parser.add_argument("--json")
    parser.add_argument(
        "--no-spinning", action="store_true", help="ONNX Runtime's idle threads sleep (steadier where cores are shared)"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            rows.append(
                run(
                    name, args.ratio, args.size, args.threads, args.repeats, folder, args.round_to, not args.no_spinning
                )
            )
            print(f"done {name}", flush=True, file=__import__("sys").stderr)
    import onnxruntime

    print(
        f"graphprune {gp.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{platform.machine()} with {os.cpu_count()} cores; ONNX Runtime CPU with {args.threads} thread(s), batch 1, "
        f"median of {args.repeats} interleaved runs{', idle threads sleeping' if args.no_spinning else ''}; ratio "
        f"{args.ratio}, L2, local scope, graphprune round_to={args.round_to}; "
        f"random-init weights\n"
    )
    print(
        "| model | params dense | graphprune params | MACs ratio (ideal) | dense ms | graphprune ms | speedup | speedup x ideal | ORT match (max rel err) | Torch-Pruning MACs ratio | Torch-Pruning ms | TP speedup |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tp = (
            f"{r['tp_macs_ratio']:.3f} | {r['tp_ms']:.2f} | {r['tp_speedup']:.2f}x"
            if "tp_ms" in r
            else f"failed: {r.get('tp_error', '')[:60]} | - | -"
        )
        print(
            f"| {r['model']} | {r['params']:,} | {r['gp_params']:,} | {r['gp_macs_ratio']:.3f} | {r['dense_ms']:.2f} | "
            f"{r['graphprune_ms']:.2f} | {r['gp_speedup']:.2f}x | {r['gp_speedup_over_ideal']:.2f} | yes ({r['graphprune_max_rel_err']:.1e}) | {tp} |"
        )
    cnn = [r for r in rows if r["model"] not in TRANSFORMERS]
    where = "on the CNNs" if cnn else "overall"
    cnn = cnn or rows
    print(
        f"\n{len(rows)} models pruned, {len(rows)} exported and matched in ONNX Runtime; {where}, "
        f"median speedup {statistics.median(r['gp_speedup'] for r in cnn):.2f}x, "
        f"median speedup / ideal speedup {statistics.median(r['gp_speedup_over_ideal'] for r in cnn):.2f}; "
        f"Torch-Pruning pruned {sum('tp_ms' in r for r in rows)} of {len(rows)}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
