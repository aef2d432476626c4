"""Command line: `graphprune demo` prunes a built-in torchvision model and reports what changed."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    try:
        import torchvision
    except ImportError:
        print("graphprune demo needs torchvision: pip install 'graphprune[vision]'", file=sys.stderr)
        return 2
    import graphprune as gp
    from graphprune.passes import ChannelMask, L1Score, L2Score, Shrink

    builder = getattr(torchvision.models, args.model, None)
    if builder is None or not callable(builder):
        print(f"unknown torchvision model {args.model!r}; try resnet18, mobilenet_v2, densenet121, ...", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = builder().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    score = {"l1": L1Score, "l2": L2Score}[args.criterion]()
    print(f"pruning {args.model} (random init) at ratio {args.ratio}, input {tuple(x.shape)}, criterion {args.criterion}")
    start = time.perf_counter()
    masked = gp.compile(model, [score, ChannelMask(args.ratio, scope=args.scope, round_to=args.round_to)], example_inputs=(x,))
    pruned = gp.compile(masked, [Shrink()], example_inputs=(x,))
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        expected, got = masked.double()(x.double()), pruned.double()(x.double())
    err = (expected - got).abs().max().item()
    pruned.float()
    scale = expected.abs().max().item() or 1.0
    ok = err <= 1e-9 * max(scale, 1.0)
    print(gp.summary(model, pruned, (x,)))
    print(f"\nanalysis + pruning took {elapsed:.2f}s")
    print(f"equivalence (masked vs shrunk, float64): max abs error {err:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphprune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune a torchvision model, verify mask == shrink, print the summary")
    demo.add_argument("--model", default="resnet18")
    demo.add_argument("--ratio", type=float, default=0.5)
    demo.add_argument("--scope", choices=["local", "global"], default="local")
    demo.add_argument("--criterion", choices=["l1", "l2"], default="l2")
    demo.add_argument("--round-to", type=int, default=1)
    demo.add_argument("--size", type=int, default=224)
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--seed", type=int, default=0)
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
