"""Pruning a 1-8 B-parameter Llama-shaped model on this machine: wall time and peak memory.

The shape of TinyLlama-1.1B (22 layers, width 2048, 32 query / 4 key-value heads, FFN 5632,
vocabulary 32000; the default), Llama-3.2-3B or Llama-3-8B, random init, built directly in
bfloat16.  Wanda-sp scores heads and FFN neurons on calibration tokens, `ChannelMask` removes a
quarter of the key-value groups (with their query heads) and 20 % of the FFN neurons of every
layer, `Shrink` removes them, all in one
`compile(..., inplace=True)`.  Peak resident memory is read from the process's high-water mark,
which is reset once the model is built; it is compared with the weights' size after taking away
what the process held before the model was built (Python, torch, transformers).

    python benchmarks/llm_memory.py [--shape tinyllama-1.1b] [--batches 32] [--seq-len 512] [--layers N]

Results go to results/llm_memory.md (TinyLlama) or results/llm_memory_<shape>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.passes import ChannelMask, Shrink, WandaScore  # noqa: E402

SHAPES = {  # Llama-architecture shapes: the published models' sizes, random weights
    "tinyllama-1.1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    "llama-3.2-3b": dict(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}


def _status_gib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
        fh.write("5")


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--layers", type=int, default=None, help="fewer than the shape has, to try it quickly")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.json is None:
        stem = "llm_memory" if args.shape == "tinyllama-1.1b" else f"llm_memory_{args.shape}"
        args.json = os.path.join(os.path.dirname(__file__), "results", f"{stem}.json")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    runtime = _status_gib("VmRSS")  # the process without a model: Python, torch, transformers
    torch.manual_seed(0)
    start = time.time()
    torch.set_default_dtype(torch.bfloat16)
    shape = dict(SHAPES[args.shape], max_position_embeddings=2048, use_cache=False)
    shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    torch.set_default_dtype(torch.float32)
    built = time.time() - start
    params = gp.count_params(model)
    model_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, shape["vocab_size"], (1, args.seq_len), generator=g) for _ in range(args.batches)]
    example = (calibration[0][:, :32],)
    base = _status_gib("VmRSS")
    _reset_peak()
    samples: list[tuple[float, float]] = []  # (time, resident GiB), to tell which step the peak is in
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            samples.append((time.time(), _status_gib("VmRSS")))
            time.sleep(0.05)

    marks = [("tracing and analysis", time.time())]

    def mark(name):
        def record(gm, ctx):
            last, t0 = marks[-1]
            high = max((r for t, r in samples if t >= t0), default=float("nan"))
            print(
                f"  {last} done: highest {high:.2f} GiB; now {_status_gib('VmRSS'):.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
            marks.append((name, time.time()))

        record.__name__ = f"mark_{name}"
        return record

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.time()
    pruned = gp.compile(
        model,
        [
            mark("WandaScore"),
            WandaScore(calibration),
            mark("ChannelMask"),
            ChannelMask({"head": 0.25, "ffn": 0.2}),
            mark("Shrink"),
            Shrink(),
            mark("verification and write-back"),
        ],
        example_inputs=example,
        inplace=True,
    )
    seconds = time.time() - start
    marks.append(("end", time.time()))
    sampling.set()
    sampler.join()
    peak = _status_gib("VmHWM")
    phases = {
        name: max((r for t, r in samples if t0 <= t < t1), default=float("nan"))
        for (name, t0), (_, t1) in zip(marks, marks[1:])
    }
    after = gp.count_params(pruned)
    result = {
        "params": params,
        "model_gib": model_gib,
        "build_seconds": built,
        "calibration_tokens": args.batches * args.seq_len,
        "rss_runtime_gib": runtime,
        "rss_before_gib": base,
        "peak_during_prune_gib": peak,
        "peak_over_model": peak / model_gib,
        "peak_above_runtime_over_model": (peak - runtime) / model_gib,
        "prune_seconds": seconds,
        "params_after": after,
        "same_class": type(pruned) is type(model),
        "passes": [(r.name, round(r.seconds, 1)) for r in pruned.graphprune_report if not r.name.startswith("mark_")],
        "peak_by_step_gib": phases,
    }
    calibration = phases.get("WandaScore", float("nan"))
    text = (
        f"# Pruning a {params / 1e9:.1f} B Llama-shaped model (benchmarks/llm_memory.py)\n\n"
        f"{args.shape} shape ({shape['num_hidden_layers']} layers), random init, bfloat16: {params / 1e9:.3f} B params, "
        f"{model_gib:.2f} GiB of weights (built in {built:.0f} s). Wanda-sp on {args.batches} x {args.seq_len} "
        f"calibration tokens, {shape['num_key_value_heads'] // 4} of {shape['num_key_value_heads']} kv groups "
        "(25 % of heads) and 20 % of FFN neurons per layer, Shrink, `compile(inplace=True)`:\n\n"
        "| | value |\n|---|---:|\n"
        f"| resident memory of the process before the model was built (Python, torch, transformers) | {runtime:.2f} GiB |\n"
        f"| resident memory before pruning | {base:.2f} GiB |\n"
        f"| peak resident memory while pruning | {peak:.2f} GiB |\n"
        f"| peak above the process's own, over the weights | **{(peak - runtime) / model_gib:.2f} x** |\n"
        f"| calibration (WandaScore) peak above the process's own, over the weights | {(calibration - runtime) / model_gib:.2f} x |\n"
        f"| wall time | {seconds:.0f} s |\n"
        f"| params after | {after / 1e9:.3f} B ({after / params:.3f} of dense) |\n"
        f"| result is a {type(pruned).__name__} | {type(pruned) is type(model)} |\n\n"
        "Time per pass: " + ", ".join(f"{n} {s:.1f} s" for n, s in result["passes"]) + "\n\n"
        "Highest resident memory sampled in each step (GiB): "
        + ", ".join(f"{n} {r:.2f}" for n, r in phases.items())
        + "\n"
    )
    print(text)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
