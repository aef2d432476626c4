"""Analysis + pruning time, graphprune against Torch-Pruning, and analysis without weights at LLM size.

1. torchvision classifiers (224 px, batch 1, random init) and Hugging Face configs (4 layers, width 256,
   128 tokens): graphprune's L2Score + ChannelMask(0.5) then Shrink (two compile() calls, verified as by
   default) against Torch-Pruning's MetaPruner (L2 magnitude, ratio 0.5, the classifier ignored), in the
   same process, alternating, median of --repeats runs each; the model is built before the clock starts,
   and one untimed round of both on ResNet-18 first takes the one-off costs (imports, caches) out.
   graphprune cold: nothing remembered (`graphprune.memo.forget()` first), what a new architecture
   costs; warm: a fresh instance of an architecture compiled before in the process (a checkpoint
   loaded again, a copy: its graph and analysis are re-used, its weights are not); unverified: cold,
   verify=False (Shrink's own output check off; write-back is still checked).
2. `gp.analyze` of Llama-3-8B-, Qwen2.5-7B- and Mistral-7B-shaped models built on the meta device (no
   weights), full depth, 128 tokens, each in its own process: seconds and peak RSS (VmHWM).

    python benchmarks/analysis_speed.py [--models resnet18,...] [--hf bert,...] [--repeats 3] [--skip-llm]

Writes benchmarks/results/analysis_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch_pruning as tp
import torchvision

import graphprune as gp
from graphprune.memo import forget
from graphprune.passes import ChannelMask, L2Score, Shrink

sys.path.insert(0, os.path.dirname(__file__))
from zoo import HF_MODELS, MODELS, build, example_inputs, hf_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MARK = "ANALYSIS_ROW "

LLMS = {  # published shapes (config.json of each model); random init on the meta device
    "Llama-3-8B": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
    ),
    "Qwen2.5-7B": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
    ),
    "Mistral-7B": (
        "MistralForCausalLM",
        "MistralConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32768,
        ),
    ),
}


def graphprune_prune(model, x, verify=True, warm=False):
    if not warm:
        forget()
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x, verify=verify)
    return gp.compile(masked, [Shrink()], example_inputs=x, verify=verify)


def torch_pruning_prune(model, x):
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    inputs = x[0] if isinstance(x, tuple) else x
    pruner = tp.pruner.MetaPruner(
        model, inputs, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=last
    )
    pruner.step()
    return model


def compare(name: str, make, repeats: int) -> dict:
    """make() -> (model, example inputs), fresh each run."""
    times: dict[str, list[float]] = {"gp": [], "gp_warm": [], "gp_unverified": [], "tp": []}
    errors: dict[str, str] = {}
    runs = {
        "gp": graphprune_prune,
        "gp_warm": lambda m, x: graphprune_prune(m, x, warm=True),  # (after "gp": this architecture is known)
        "gp_unverified": lambda m, x: graphprune_prune(m, x, verify=False),
        "tp": torch_pruning_prune,
    }
    for _ in range(repeats):
        for key, fn in runs.items():
            if key in errors:
                continue
            torch.manual_seed(0)
            model, x = make()
            start = time.perf_counter()
            try:
                fn(model, x)
            except Exception as e:  # noqa: BLE001 -- a failure is a row, not the end of the run
                errors[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
                continue
            times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) if v else None for k, v in times.items()}
    row = {"model": name, **{f"{k}_s": v for k, v in med.items()}, "samples": times, "errors": errors}
    if med["gp"] and med["tp"]:
        row["ratio"] = med["gp"] / med["tp"]
        row["ratio_range"] = (min(times["gp"]) / max(times["tp"]), max(times["gp"]) / min(times["tp"]))
        row["ratio_unverified"] = med["gp_unverified"] / med["tp"] if med["gp_unverified"] else None
        row["ratio_warm"] = med["gp_warm"] / med["tp"] if med["gp_warm"] else None
    return row


def llm_row(name: str) -> dict:
    import transformers  # noqa: PLC0415 -- only the LLM rows need it

    cls, cfg_cls, kw = LLMS[name]
    cfg = getattr(transformers, cfg_cls)(**kw)
    start = time.perf_counter()
    with torch.device("meta"):
        model = getattr(transformers, cls)(cfg).eval()
    built = time.perf_counter() - start
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    deps = gp.analyze(model, (ids,))
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "params_b": params / 1e9,
        "layers": kw["num_hidden_layers"],
        "build_s": built,
        "analyze_s": seconds,
        "peak_mib": peak,
        "groups": len(deps.groups),
        "units": sum(g.size for g in deps.groups),
        "weights_materialised": any(not p.is_meta for p in model.parameters()),
    }


def in_subprocess(name: str) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--one-llm", name], capture_output=True, text=True, timeout=900
    )
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    return {"model": name, "error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]}


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], llms: list[dict]) -> str:
    lines = [
        f"# Analysis speed ({time.strftime('%Y-%m-%d')})\n",
        f"graphprune {gp.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"torch-pruning {tp.__version__}; {platform.machine()}, {torch.get_num_threads()} threads, shared VM.\n",
        "Seconds for score + mask + shrink (median of the runs; graphprune: two compile() calls with their "
        "verification, cold: nothing remembered; warm: a fresh instance of an architecture compiled before, whose "
        "graph and analysis are re-used; unverified: cold, verify=False) and for Torch-Pruning's MetaPruner step, "
        "alternating in one process. ratio = graphprune cold / Torch-Pruning (min-max over the runs in brackets).\n",
        "| model | graphprune cold s | warm s | unverified s | Torch-Pruning s | ratio | ratio warm | ratio unverified "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rng = r.get("ratio_range")
        ratio = f"{fmt(r.get('ratio'))} [{rng[0]:.2f}-{rng[1]:.2f}]" if rng else "-"
        errors = "; ".join(f"{k}: {v}" for k, v in r["errors"].items()).replace("|", "\\|")
        lines.append(
            f"| {r['model']} | {fmt(r['gp_s'])} | {fmt(r.get('gp_warm_s'))} | {fmt(r['gp_unverified_s'])} | "
            f"{fmt(r['tp_s'])} | {ratio} | {fmt(r.get('ratio_warm'))} | {fmt(r.get('ratio_unverified'))} | {errors} |"
        )
    for label, keep in (("torchvision", lambda r: not r["model"].startswith("hf/")), ("Hugging Face", None)):
        chosen = [r for r in rows if (keep(r) if keep else r["model"].startswith("hf/"))]
        for key in ("ratio", "ratio_warm"):
            ratios = sorted(r[key] for r in chosen if r.get(key))
            if ratios:
                lines.append(
                    f"\n{label}: median {key.replace('_', ' ')} {statistics.median(ratios):.2f} over {len(ratios)} "
                    f"models (min {ratios[0]:.2f}, max {ratios[-1]:.2f})"
                )
    if llms:
        lines += [
            "\n## Meta-device analysis at LLM size (128 tokens, full depth, no weights)\n",
            "| model | params (B) | layers | analyze s | peak RSS MiB | groups | units | weights materialised |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in llms:
            if "error" in r:
                lines.append(f"| {r['model']} | - | - | - | - | - | - | error: {r['error']} |")
                continue
            lines.append(
                f"| {r['model']} | {r['params_b']:.2f} | {r['layers']} | {r['analyze_s']:.1f} | {r['peak_mib']:.0f} | "
                f"{r['groups']} | {r['units']:,} | {r['weights_materialised']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(m for m in MODELS if m != "inception_v3"))
    parser.add_argument("--hf", default=",".join(HF_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--one-llm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_llm:
        print(MARK + json.dumps(llm_row(args.one_llm)), flush=True)
        return
    rows = []
    compare("warm-up", lambda: (build("resnet18"), example_inputs("resnet18", 224)), 1)  # first-call costs, both
    for name in filter(None, args.models.split(",")):
        rows.append(compare(name, lambda n=name: (build(n), example_inputs(n, 224)), args.repeats))
        print(f"  {name}: ratio {fmt(rows[-1].get('ratio'))} {rows[-1]['errors'] or ''}", file=sys.stderr, flush=True)
    for name in filter(None, args.hf.split(",")):
        rows.append(compare(f"hf/{name}", lambda n=name: hf_model(n), args.repeats))
        print(
            f"  hf/{name}: ratio {fmt(rows[-1].get('ratio'))} {rows[-1]['errors'] or ''}", file=sys.stderr, flush=True
        )
    llms = [] if args.skip_llm else [in_subprocess(name) for name in LLMS]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "analysis_speed.json"), "w") as f:
        json.dump({"rows": rows, "llm": llms}, f, indent=2)
    table = markdown(rows, llms)
    with open(os.path.join(RESULTS, "analysis_speed.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
