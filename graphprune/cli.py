"""Command line: `graphprune demo` prunes a built-in torchvision model, verifies it, exports dense and
pruned models to ONNX (checked in ONNX Runtime) and reports sizes, MACs and measured latency."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import graphprune as gp
from graphprune.backends import onnx as gox
from graphprune.passes import ChannelMask, L1Score, L2Score, Shrink

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    try:
        import torchvision
    except ImportError:
        print("graphprune demo needs torchvision: pip install 'graphprune[vision]'", file=sys.stderr)
        return 2
    builder = getattr(torchvision.models, args.model, None)
    if builder is None or not callable(builder):
        print(
            f"unknown torchvision model {args.model!r}; try resnet18, mobilenet_v2, densenet121, ...", file=sys.stderr
        )
        return 2
    torch.manual_seed(args.seed)
    model = builder().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    score = {"l1": L1Score, "l2": L2Score}[args.criterion]()
    print(
        f"pruning {args.model} (random init) at ratio {args.ratio}, input {tuple(x.shape)}, criterion {args.criterion}"
    )
    start = time.perf_counter()
    masked = gp.compile(
        model, [score, ChannelMask(args.ratio, scope=args.scope, round_to=args.round_to)], example_inputs=(x,)
    )
    pruned = gp.compile(masked, [Shrink()], example_inputs=(x,))
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        expected, got = masked.double()(x.double()), pruned.double()(x.double())
    err = (expected - got).abs().max().item()
    pruned.float()
    scale = expected.abs().max().item() or 1.0
    ok = err <= 1e-9 * max(scale, 1.0)
    report = gp.summary(model, pruned, (x,))
    print(report)
    print(f"\nanalysis + pruning took {elapsed:.2f}s")
    print(f"equivalence (masked vs shrunk, float64): max abs error {err:.2e} -> {'OK' if ok else 'MISMATCH'}")
    if not ok:
        return 1
    if args.no_export:
        return 0
    return _export_and_measure(model, pruned, x, args, report)


def _export_and_measure(model, pruned, x, args, report) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, m in (("dense", model), ("pruned", pruned)):
        r = gox.export(m, out / f"{args.model}_{name}.onnx", example_inputs=(x,))
        files[name] = r.path
        print(
            f"exported {name}: {r.path} ({r.file_bytes / 1e6:.1f} MB, {r.exporter} exporter, opset {r.opset}); "
            f"ONNX Runtime matches torch: max abs error {r.max_abs_error:.1e}"
        )
    threads = args.threads or torch.get_num_threads()
    rows = {r.name: r for r in gox.benchmark(files, (x,), threads=threads, warmup=3, repeats=args.repeats)}
    d, p = rows["dense"], rows["pruned"]
    ideal = report.macs[1] / report.macs[0]
    print(
        f"\nONNX Runtime CPU latency, batch {x.shape[0]}, {threads} thread(s), median of {args.repeats} interleaved runs:"
    )
    print(
        f"  dense  {d.median_ms:8.2f} ms   pruned {p.median_ms:8.2f} ms   pruned/dense {p.median_ms / d.median_ms:.3f}"
        f"   (MACs ratio {ideal:.3f})"
    )
    print(
        f"  speedup {d.median_ms / p.median_ms:.2f}x   file {d.file_bytes / 1e6:.1f} MB -> {p.file_bytes / 1e6:.1f} MB"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphprune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune a torchvision model, verify mask == shrink, export to ONNX, measure")
    demo.add_argument("--model", default="resnet18")
    demo.add_argument("--ratio", type=float, default=0.5)
    demo.add_argument("--scope", choices=["local", "global"], default="local")
    demo.add_argument("--criterion", choices=["l1", "l2"], default="l2")
    demo.add_argument("--round-to", type=int, default=1)
    demo.add_argument("--size", type=int, default=224)
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="graphprune-demo", help="folder for the ONNX files")
    demo.add_argument("--no-export", action="store_true", help="stop after pruning and the summary")
    demo.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: torch's count)")
    demo.add_argument("--repeats", type=int, default=20)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
