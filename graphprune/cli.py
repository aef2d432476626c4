"""Command line.

    graphprune prune SOURCE --out DIR (--recipe FILE | --ratio R | --target-macs X | --target-params N
                                       | --target-latency S [--backend onnxruntime|torch] [--threads N])
    graphprune report SOURCE_OR_DIR [--json] [--html FILE]
    graphprune export SOURCE_OR_DIR --onnx FILE
    graphprune bench DENSE PRUNED [--threads N] [--repeats N] [--no-spinning]
    graphprune sensitivity SOURCE --eval FILE.py:FUNCTION [--plot out.png] [--json]
    graphprune graph SOURCE --out groups.html | groups.graphml | groups.dot
    graphprune demo

SOURCE is torchvision:NAME, timm:NAME, hf:FOLDER, FILE.py:FUNCTION or a folder written by
`graphprune prune` (see graphprune.sources).  `prune` runs a recipe (graphprune.recipe: passes,
calibration, fine-tune, schedule) and writes DIR: the model (gp.save), recipe.yaml, the reports,
and for a Hugging Face model DIR/hf (save_pretrained, loaded back and compared) where its config
can describe the pruning.  Exit codes: 0 done, 1 pruning or verification failed, 2 bad arguments."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

import graphprune as gp
from graphprune.backends import onnx as gox
from graphprune.errors import ArgumentError, GraphPruneError
from graphprune.groups_graph import write_groups_graph
from graphprune.ir.inputs import call_with
from graphprune.ir.verify import mismatch
from graphprune.passes import ChannelMask, L1Score, L2Score, Shrink
from graphprune.recipe import Recipe, write_recipe
from graphprune.sources import SOURCE_FILE, load_function, load_source
from graphprune.timing import interleaved

__all__ = ["main", "HF_FOLDER"]

HF_FOLDER = "hf"  # in --out, for a Hugging Face model: the pruned model written with save_pretrained
TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model")


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
    threads = args.threads or torch.get_num_threads()
    d, p = _ort_latency({"dense": model, "pruned": pruned}, (x,), out, f"{args.model}_", threads, args.repeats)
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


def _shape(text: str) -> list[int]:
    try:
        shape = [int(d) for d in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"an input shape is like 1x3x224x224, got {text!r}") from None
    if not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"an input shape has positive sizes, got {text!r}")
    return shape


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


HOW = ("ratio", "target_macs", "target_params", "target_latency")


def _recipe_from_flags(args: argparse.Namespace) -> dict:
    given = [f for f in HOW if getattr(args, f) is not None]
    if len(given) != 1:
        raise ArgumentError("give one of --recipe, --ratio, --target-macs, --target-params or --target-latency")
    if (args.backend or args.threads) and args.target_latency is None:
        raise ArgumentError("--backend and --threads set up a latency target: give --target-latency too")
    mask: dict = {"scope": args.scope, "round_to": args.round_to}
    if args.ratio is not None:
        mask["ratio"] = args.ratio
    elif args.target_latency is not None:
        mask["target"] = {"latency": args.target_latency, "backend": args.backend or "onnxruntime"}
        mask["target"].update({"threads": args.threads} if args.threads else {})
    else:
        mask["target"] = {"macs": args.target_macs} if args.target_macs is not None else {"params": args.target_params}
    score = {"l1": "L1Score", "l2": "L2Score"}[args.criterion]
    return {"passes": [{score: {}}, {"ChannelMask": mask}, "Shrink"]}


def _load(args: argparse.Namespace, inputs: dict | None = None):
    inputs = inputs or {}
    return load_source(
        args.source,
        shape=args.input_shape or inputs.get("shape"),
        seq_len=args.seq_len or inputs.get("seq_len"),
        weights=getattr(args, "weights", None),
        seed=args.seed,
    )


def _prune(args: argparse.Namespace) -> int:
    if args.recipe and any(getattr(args, f) is not None for f in HOW):
        raise ArgumentError(
            "--recipe already says how to prune: leave out --ratio / --target-macs / --target-params / --target-latency"
        )
    flags = {"data": args.finetune, "epochs": args.epochs, "lr": args.lr, "distill": args.distill}
    if args.finetune is None and any(v is not None for v in flags.values()) and not _has_finetune(args.recipe):
        raise ArgumentError("--epochs / --lr / --distill set up a fine-tune: give --finetune FILE.py:FUNCTION too")
    plan = Recipe(args.recipe or _recipe_from_flags(args), finetune=flags)
    plan.check()  # (a bad pass argument is found before the model is built)
    loaded = _load(args, plan.data.get("inputs"))
    if loaded.original is not None:
        raise ArgumentError(f"{args.source} is already pruned: prune its source again with a new recipe")
    names = [p if isinstance(p, str) else next(iter(p)) for p in plan.data["passes"]]
    how = " while fine-tuning (schedule)" if "schedule" in plan.data else ""
    print(f"pruning {args.source} with {names}{how} on inputs {_describe(loaded.example_inputs)}")
    start = time.perf_counter()
    result = plan.apply(loaded.model, loaded.example_inputs)
    if result.losses:
        print(f"fine-tuned {len(result.losses)} epoch(s): loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}")
    pruned = result.model
    print(f"pruning took {time.perf_counter() - start:.2f}s")
    report = gp.summary(loaded.model, pruned, loaded.example_inputs)  # (before anything is written)
    out = Path(args.out)
    hf_model, hf_note = _as_hf(pruned, loaded)
    staged = None
    if hf_model is not None:  # written and checked beside DIR, moved in once the rest is written
        staged, hf_note = _save_pretrained(hf_model, pruned, loaded, out.parent)
    try:
        _write_pruned(pruned, plan, loaded, report, out, staged)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    print(report)
    wrote = f", {HF_FOLDER}/ (save_pretrained)" if staged is not None else ""
    print(f"\nwrote {out}/: model (model.safetensors + plan.json), recipe.yaml, report.txt/.json/.html{wrote}")
    if hf_note:
        print(f"no {HF_FOLDER}/ folder: {hf_note}")
    return 0


def _write_pruned(pruned, plan: Recipe, loaded, report, out: Path, staged: Path | None) -> None:
    gp.save(pruned, out)  # (replaces the folder, refusing one that holds other files: the rest go in after)
    data = {**plan.data, "inputs": loaded.spec["inputs"]} if loaded.spec["inputs"] else plan.data
    write_recipe(data, out / "recipe.yaml")
    (out / SOURCE_FILE).write_text(json.dumps(loaded.spec, indent=1))
    (out / "report.txt").write_text(str(report) + "\n")
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    (out / "report.html").write_text(report.to_html())
    shutil.rmtree(out / HF_FOLDER, ignore_errors=True)  # (an earlier run's)
    if staged is not None:
        staged.rename(out / HF_FOLDER)


def _has_finetune(recipe_file: str | None) -> bool:
    return recipe_file is not None and "finetune" in Recipe(recipe_file).data


def _as_hf(pruned, loaded):
    """The pruned model as its Hugging Face class with a config that describes it, or why not."""
    if not (hasattr(loaded.model, "config") and hasattr(loaded.model, "save_pretrained")):
        return None, None
    try:
        return gp.as_hf_model(pruned, loaded.model, loaded.example_inputs), None
    except GraphPruneError as exc:
        return None, f"save_pretrained cannot describe this pruning ({exc})"


def _save_pretrained(hf_model, pruned, loaded, parent: Path) -> tuple[Path | None, str | None]:
    """Write the model with save_pretrained (and the source folder's tokenizer files) into a new
    folder in `parent`, load it back with from_pretrained and compare its outputs with the pruned
    model's: (the folder, None) when they match, else (None, why not)."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{HF_FOLDER}.", dir=parent))
    try:
        hf_model.save_pretrained(staging)
        kind, _, source = loaded.spec["source"].partition(":")
        if kind == "hf":
            for file in Path(source).iterdir():
                if file.is_file() and any(fnmatch.fnmatchcase(file.name, p) for p in TOKENIZER_FILES):
                    shutil.copy2(file, staging / file.name)
        try:
            back = type(loaded.model).from_pretrained(staging).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            return _discard(staging, f"from_pretrained cannot load what save_pretrained wrote ({exc})")
        with torch.no_grad():
            expected, got = (_tensors(call_with(m.eval(), loaded.example_inputs)) for m in (pruned, back))
        problem = mismatch(expected, got)  # (the tolerance every other check uses)
        if problem is not None:
            return _discard(
                staging,
                f"from_pretrained on the saved folder does not compute what the pruned model computes: {problem}",
            )
        return staging, None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _discard(folder: Path, why: str) -> tuple[None, str]:
    shutil.rmtree(folder, ignore_errors=True)
    return None, why


def _tensors(output) -> list[torch.Tensor]:
    """Every tensor of a model output (a tensor, a ModelOutput or other mapping, nested tuples)."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [t for v in values for t in _tensors(v)]


def _describe(inputs) -> str:
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return ", ".join("x".join(map(str, v.shape)) if isinstance(v, torch.Tensor) else repr(v) for v in values)


def _report(args: argparse.Namespace) -> int:
    loaded = _load(args)
    before = loaded.original if loaded.original is not None else loaded.model
    report = gp.summary(before, loaded.model, loaded.example_inputs)
    if args.html:
        Path(args.html).write_text(report.to_html())
    print(json.dumps(report.to_dict(), indent=1) if args.json else report)
    return 0


def _export(args: argparse.Namespace) -> int:
    loaded = _load(args)
    _export_checked(loaded.model, args.onnx, loaded.example_inputs)
    return 0


def _export_checked(model, path, example_inputs, label: str = "") -> Path:
    """Export to ONNX (verified in ONNX Runtime) and say so."""
    r = gox.export(model, path, example_inputs=example_inputs)
    print(
        f"exported {label}{r.path} ({r.file_bytes / 1e6:.1f} MB, {r.exporter} exporter, opset {r.opset}); "
        f"ONNX Runtime matches torch: max abs error {r.max_abs_error:.1e}"
    )
    return r.path


def _ort_latency(
    models: dict, example_inputs, folder: Path, prefix: str, threads: int, repeats: int, spinning: bool = True
):
    """Export the dense and pruned models into `folder` and time them in ONNX Runtime, interleaved:
    their latency rows (dense, pruned)."""
    files = {k: _export_checked(m, folder / f"{prefix}{k}.onnx", example_inputs, f"{k}: ") for k, m in models.items()}
    rows = gox.benchmark(files, example_inputs, threads=threads, warmup=3, repeats=repeats, spinning=spinning)
    rows = {r.name: r for r in rows}
    return rows["dense"], rows["pruned"]


def _bench(args: argparse.Namespace) -> int:
    """Latency of two models on the same inputs (DENSE's), in torch and in ONNX Runtime, interleaved."""
    dense = _load(argparse.Namespace(**{**vars(args), "source": args.dense}))
    pruned = _load(argparse.Namespace(**{**vars(args), "source": args.pruned}))
    x, threads = dense.example_inputs, args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    models = {"dense": dense.model.eval(), "pruned": pruned.model.eval()}
    with torch.no_grad():
        times = interleaved({k: partial(call_with, m, x) for k, m in models.items()}, args.repeats, warmup=2)
    ratios = sorted(d / p for d, p in zip(times["dense"], times["pruned"]))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"latency on inputs {_describe(x)}, {threads} thread(s), median of {args.repeats} interleaved runs:")
    print(
        f"  torch          dense {med['dense']:8.2f} ms   pruned {med['pruned']:8.2f} ms   speedup "
        f"{statistics.median(ratios):.2f}x (per-run range {ratios[len(ratios) // 10]:.2f}-{ratios[-1 - len(ratios) // 10]:.2f})"
    )
    if args.no_onnx:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        d, p = _ort_latency(models, x, Path(tmp), "", threads, args.repeats, spinning=not args.no_spinning)
    print(
        f"  ONNX Runtime{' (idle threads sleep)' if args.no_spinning else ''}   dense {d.median_ms:8.2f} ms   pruned {p.median_ms:8.2f} ms   speedup "
        f"{d.median_ms / p.median_ms:.2f}x (files {d.file_bytes / 1e6:.1f} MB -> {p.file_bytes / 1e6:.1f} MB)"
    )
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    loaded = _load(args)
    evaluate = load_function(args.eval)
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        raise ArgumentError(f"--ratios is a comma-separated list of numbers, got {args.ratios!r}") from None
    result = gp.sensitivity(loaded.model, evaluate, example_inputs=loaded.example_inputs, ratios=ratios)
    if args.json:
        print(json.dumps({"baseline": result.baseline, "rows": [list(r) for r in result.rows]}, indent=1))
    else:
        print(result.table())
    if args.plot:
        print(f"plot: {result.plot(args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _graph(args: argparse.Namespace) -> int:
    loaded = _load(args)
    deps = gp.analyze(loaded.model, loaded.example_inputs)
    path = write_groups_graph(deps, args.out)
    print(f"wrote {path}: {len(deps.groups)} channel groups, {len(deps.frozen)} frozen sites")
    return 0


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="torchvision:NAME, timm:NAME, hf:FOLDER, FILE.py:FUNCTION or a pruned folder")
    parser.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1x3x224x224")
    parser.add_argument("--seq-len", type=int, help="example token count for a model with a vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="seed for random init and random example inputs")


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

    prune = sub.add_parser("prune", help="prune a model with a recipe or a ratio/target; save it with its report")
    _source_arguments(prune)
    prune.add_argument("--out", required=True, help="folder for the pruned model, recipe and report")
    prune.add_argument("--recipe", help="a YAML or TOML recipe (see graphprune.recipe)")
    prune.add_argument("--ratio", type=float, help="share of every channel group to remove")
    prune.add_argument("--target-macs", type=float, help="MACs of the pruned model as a share of the dense one's")
    prune.add_argument("--target-params", type=float, help="parameters to keep: a share (<= 1) or a count")
    prune.add_argument(
        "--target-latency",
        type=float,
        help="latency of the pruned model as a share of the dense one's on this machine (0.5: twice as fast), "
        "searched on a lookup table of op latencies and checked end to end",
    )
    prune.add_argument(
        "--backend", choices=["onnxruntime", "torch"], help="where --target-latency is measured (onnxruntime)"
    )
    prune.add_argument("--threads", type=_positive(int), help="threads for --target-latency's measurements")
    prune.add_argument("--criterion", choices=["l1", "l2"], default="l2")
    prune.add_argument("--scope", choices=["local", "global"], default="local")
    prune.add_argument("--round-to", type=int, default=1)
    prune.add_argument("--weights", help="a state dict (.safetensors, or .pt read with weights_only) to load first")
    prune.add_argument(
        "--finetune",
        help="FILE.py:FUNCTION returning batches (inputs, targets) to fine-tune on before Shrink "
        "(overrides the recipe's finetune.data; with a recipe schedule, the Pruner prunes during it)",
    )
    prune.add_argument("--epochs", type=_positive(int), help="fine-tuning epochs (default: the recipe's, else 1)")
    prune.add_argument(
        "--lr", type=_positive(float), help="fine-tuning learning rate, Adam (default: the recipe's, else 1e-3)"
    )
    prune.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune on the dense model's logits instead of the targets (default: the recipe's, else no)",
    )
    prune.set_defaults(func=_prune)

    report = sub.add_parser("report", help="params, MACs, size, channel groups and frozen channels of a model")
    _source_arguments(report)
    report.add_argument("--json", action="store_true", help="print JSON")
    report.add_argument("--html", help="also write the report as an HTML page to this file")
    report.set_defaults(func=_report)

    export = sub.add_parser("export", help="export a model (e.g. a pruned folder) to ONNX, checked in ONNX Runtime")
    _source_arguments(export)
    export.add_argument("--onnx", required=True, help="the .onnx file to write")
    export.set_defaults(func=_export)

    bench = sub.add_parser("bench", help="latency of a dense and a pruned model, torch and ONNX Runtime, interleaved")
    bench.add_argument("dense", help="the model before pruning (a source, see `prune --help`)")
    bench.add_argument("pruned", help="the pruned model (e.g. a folder written by `graphprune prune`)")
    bench.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1x3x224x224")
    bench.add_argument("--seq-len", type=int, help="example token count for a model with a vocabulary")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--threads", type=int, default=0, help="threads (default: torch's count)")
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument("--no-onnx", action="store_true", help="time torch only")
    bench.add_argument(
        "--no-spinning",
        action="store_true",
        help="ONNX Runtime's idle threads sleep instead of spinning: steadier (and on shared cores faster) timings",
    )
    bench.set_defaults(func=_bench)

    sens = sub.add_parser("sensitivity", help="metric of the model with each channel group pruned alone, per ratio")
    _source_arguments(sens)
    sens.add_argument("--eval", required=True, help="FILE.py:FUNCTION taking the model, returning a float")
    sens.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9")
    sens.add_argument("--plot", help="write the curves to this PNG (needs matplotlib)")
    sens.add_argument("--json", action="store_true", help="print JSON")
    sens.set_defaults(func=_sensitivity)

    graph = sub.add_parser(
        "graph", help="the dependency graph: which layers share which channel groups, what is frozen"
    )
    _source_arguments(graph)
    graph.add_argument("--out", required=True, help="a .html, .graphml or .dot file")
    graph.set_defaults(func=_graph)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:  # ArgumentError and other bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GraphPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
