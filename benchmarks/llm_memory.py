"""Pruning a 1.1 B-parameter Llama-shaped model on this machine: wall time and peak memory.

TinyLlama-1.1B's shape (22 layers, width 2048, 32 query / 4 key-value heads, FFN 5632, vocabulary
32000), random init, built directly in bfloat16.  Wanda-sp scores heads and FFN neurons on
calibration tokens, `ChannelMask` removes 20 % of each, `Shrink` removes them, all in one
`compile(..., inplace=True)`.  Peak resident memory is read from the process's high-water mark,
which is reset once the model is built, so the figure is what pruning added on top of it.

    python benchmarks/llm_memory.py [--batches 8] [--seq-len 512]
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

CONFIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    use_cache=False,
)


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
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "llm_memory.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(0)
    start = time.time()
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    torch.set_default_dtype(torch.float32)
    built = time.time() - start
    params = gp.count_params(model)
    model_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 32000, (1, args.seq_len), generator=g) for _ in range(args.batches)]
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
        "rss_before_gib": base,
        "peak_during_prune_gib": peak,
        "peak_over_model": peak / model_gib,
        "prune_seconds": seconds,
        "params_after": after,
        "same_class": type(pruned) is type(model),
        "passes": [(r.name, round(r.seconds, 1)) for r in pruned.graphprune_report if not r.name.startswith("mark_")],
        "peak_by_step_gib": phases,
    }
    text = (
        "# Pruning a 1.1 B Llama-shaped model (benchmarks/llm_memory.py)\n\n"
        f"TinyLlama-1.1B shape, random init, bfloat16: {params / 1e9:.3f} B params, {model_gib:.2f} GiB of weights "
        f"(built in {built:.0f} s). Wanda-sp on {args.batches} x {args.seq_len} calibration tokens, 1 of 4 kv groups "
        "(25 % of heads) and 20 % of FFN neurons per layer, Shrink, `compile(inplace=True)`:\n\n"
        "| | value |\n|---|---:|\n"
        f"| resident memory before pruning | {base:.2f} GiB |\n"
        f"| peak resident memory while pruning | {peak:.2f} GiB ({peak / model_gib:.2f} x the weights) |\n"
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
