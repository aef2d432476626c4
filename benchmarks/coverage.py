"""Coverage: which models graphprune prunes with no hints, and whether the result is exact.

For every torchvision classifier up to 300 M parameters, a list of timm models of different
families (CNNs, ViTs, window attention, hybrids, MLP mixers) and small random-config Hugging Face
transformers: random init, batch 1, no leaf_modules and no exclude,

    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)

and per model: did any group lose units, is shrunk(x) == masked(x) (float64, tolerance 1e-9; when
that fails or takes over 120 s, float32 with rtol 1e-4/atol 1e-5, and the row says so), MACs and params ratios,
analysis+pruning seconds, the RSS high-water mark up to the end of pruning, the largest reasons for
frozen channels (summed per reason; channels frozen only because they reach a model output are
listed only when nothing else is), whether the shrunk model is still the model's own class, and
the error when something fails.  Every model runs in its own subprocess (per-process peak memory,
a 600 s timeout); a crash is a failing row, never a crash of this script.

    python benchmarks/coverage.py                      # everything (takes a while)
    python benchmarks/coverage.py --only timm          # one source: torchvision | timm | hf
    python benchmarks/coverage.py --models resnet18,timm/levit_128s,hf/t5

Writes benchmarks/results/coverage.json and coverage.md; runs with --only or --models merge their
rows into an existing coverage.json (a row of the same model is replaced).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from zoo import HF_MODELS, hf_model  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.ir.inputs import call_with, eval_mode  # noqa: E402
from graphprune.passes import ChannelMask, L2Score, Shrink  # noqa: E402

RESULTS = os.path.join(HERE, "results")
MAX_PARAMS, TIMEOUT_S, F64_BUDGET_S, MARK = 300e6, 600, 120, "@@ROW "
TIMM = [  # 22 families; the list was cut to fit a run of about 2.5 hours on 2 cores
    "resnet18d",
    "cspresnet50",
    "dla34",
    "hrnet_w18_small",
    "repvgg_a0",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "ghostnet_100",
    "rexnet_100",
    "regnety_002",
    "convnext_atto",
    "edgenext_xx_small",
    "fastvit_t8",
    "poolformer_s12",
    "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "maxvit_rmlp_nano_rw_256",
    "mobilevitv2_050",
    "levit_128s",
    "coat_lite_tiny",
    "efficientformer_l1",
    "mixer_s16_224",
]
HF = HF_MODELS + ["gpt_neox", "swin"]


def build(source: str, name: str) -> tuple[torch.nn.Module, tuple | dict]:
    """Random-init model in eval mode and its batch-1 example inputs."""
    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        side = 299 if name == "inception_v3" else 224
        return torchvision.models.get_model(name, weights=None, **kwargs).eval(), (torch.randn(1, 3, side, side),)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        return model, (torch.randn(1, *model.pretrained_cfg["input_size"]),)
    if name in HF_MODELS:
        return hf_model(name)
    import transformers as T

    ids = torch.randint(3, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    if name == "gpt_neox":  # the Pythia architecture
        cfg = T.GPTNeoXConfig(
            vocab_size=1000,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=256,
            use_cache=False,
        )
        return T.GPTNeoXModel(cfg).eval(), {"input_ids": ids}
    cfg = T.SwinConfig(
        image_size=224, patch_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16], window_size=7
    )
    return T.SwinModel(cfg).eval(), {"pixel_values": torch.randn(1, 3, 224, 224)}


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def where(e: BaseException) -> str:
    """file:line of the innermost frame inside graphprune (passes and backends included), looked
    for first in the root cause of a chain of exceptions (a PassError wraps the real one)."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    for exc in reversed(chain):
        frames = [
            f
            for f in traceback.extract_tb(exc.__traceback__)
            if any(os.path.join(ROOT, d) in os.path.abspath(f.filename) for d in ("graphprune", "passes", "backends"))
        ]
        if frames:
            return f"{os.path.relpath(frames[-1].filename, ROOT)}:{frames[-1].lineno}"
    return ""


def run(model: torch.nn.Module, inputs: tuple | dict):
    with eval_mode(model), torch.no_grad():
        return call_with(model, inputs)


def to_double(inputs: tuple | dict) -> tuple | dict:
    cast = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return {k: cast(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(cast(v) for v in inputs)


def exactness(masked, shrunk, x, out_masked, out_shrunk) -> tuple[str, str]:
    """("f64" | "f32" | "no", why float64 failed or the mismatch).  Float64 gets F64_BUDGET_S seconds:
    CPU convolutions with groups > 1 have no fast float64 kernel (EfficientNet-B5 takes minutes)."""

    def stop(signum, frame):
        raise TimeoutError(f"float64 check stopped after {F64_BUDGET_S} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(F64_BUDGET_S)
    try:
        a, b = run(copy.deepcopy(masked).double(), to_double(x)), run(copy.deepcopy(shrunk).double(), to_double(x))
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
        return "f64", ""
    except Exception as e:  # noqa: BLE001 -- a model that cannot run in float64 is compared in float32
        f64 = first_line(e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    try:
        torch.testing.assert_close(out_shrunk, out_masked, rtol=1e-4, atol=1e-5)
        return "f32", f64
    except AssertionError as e:
        return "no", f"{f64} | float32: {first_line(e)}"


def top_frozen(frozen) -> list[str]:
    """The 3 largest reasons, channels summed over sites, named after their largest site."""
    by_reason: dict[tuple[str, str], list] = {}
    for f in frozen:
        by_reason.setdefault((f.site.kind, f.site.reason), []).append(f)
    ranked = sorted(by_reason.items(), key=lambda kv: (kv[0][0] == "output", -sum(f.channels for f in kv[1])))
    inside = [kv for kv in ranked if kv[0][0] != "output"] or ranked
    out = []
    for (_, reason), sites in inside[:3]:
        big = max(sites, key=lambda f: f.channels)
        more = f" +{len(sites) - 1} sites" if len(sites) > 1 else ""
        out.append(f"{big.site.location or big.site.node}{more}: {reason} ({sum(f.channels for f in sites)})")
    return out


def peak_rss_mib() -> float:
    """This process's RSS high-water mark.  /proc's VmHWM belongs to the process image; getrusage's ru_maxrss
    also counts the parent that forked it (every row would show the runner's peak)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(source: str, name: str) -> dict:
    row = {
        "model": name,
        "source": source,
        "params_m": None,
        "prunes": None,
        "exact": None,
        "macs_ratio": None,
        "params_ratio": None,
        "seconds": None,
        "peak_mib": None,
        "own_class": None,
        "frozen": [],
        "error": "",
        "where": "",
    }
    begin = time.perf_counter()
    try:
        model, x = build(source, name)
        row["params_m"] = gp.count_params(model) / 1e6
        start = time.perf_counter()
        masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
        shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
        row["seconds"] = time.perf_counter() - start
        row["peak_mib"] = peak_rss_mib()
        row["own_class"] = type(shrunk) is type(model)
        out_masked = run(masked, x)
        try:
            out_shrunk = run(shrunk, x)
        except Exception as e:
            row["error"], row["where"] = f"shrunk model cannot run: {first_line(e)}"[:200], where(e)
            return row
        s = gp.summary(model, shrunk, x)
        row["macs_ratio"], row["params_ratio"] = s.macs[1] / s.macs[0], s.params[1] / s.params[0]
        row["prunes"] = any(kept < n for _, n, kept in s.groups) if s.groups else s.params[1] < s.params[0]
        row["frozen"], row["frozen_all"] = top_frozen(s.frozen), s.to_dict()["frozen"]
        start = time.perf_counter()
        row["exact"], why = exactness(masked, shrunk, x, out_masked, out_shrunk)
        row["check_seconds"] = time.perf_counter() - start
        if row["exact"] == "no":
            row["error"] = f"not exact: {why}"[:300]
        elif row["exact"] == "f32":
            row["f64_failure"] = why
    except Exception as e:  # noqa: BLE001 -- every failure is a row
        row["error"], row["where"] = first_line(e), where(e)
        row["traceback"] = traceback.format_exc()[-4000:]
    row["total_seconds"] = time.perf_counter() - begin  # build, prune, checks and summary
    return row


def in_subprocess(key: str) -> dict:
    source, name = key.split("/", 1)
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", key], capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "source": source, "error": f"timeout after {TIMEOUT_S} s", "frozen": []}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {
        "model": name,
        "source": source,
        "error": f"process died (rc {proc.returncode}): {tail}"[:200],
        "frozen": [],
    }


def torchvision_params(name: str) -> int:
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    try:
        with torch.device("meta"):  # no memory, no init time
            model = torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception:  # noqa: BLE001 -- some initialisers copy data (RegNet): build it for real
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return sum(p.numel() for p in model.parameters())


def selected(args) -> list[str]:
    import torchvision

    known = {"torchvision": torchvision.models.list_models(module=torchvision.models), "timm": TIMM, "hf": HF}
    if args.models:
        keys = []
        for m in args.models.split(","):
            keys += [m] if "/" in m else [f"{s}/{m}" for s, names in known.items() if m in names]
    else:
        keys = [f"{s}/{n}" for s, names in known.items() if args.only in (None, s) for n in names]
    return [k for k in keys if not k.startswith("torchvision/") or torchvision_params(k.split("/", 1)[1]) <= MAX_PARAMS]


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else ("yes" if v else "no") if isinstance(v, bool) else format(v, spec)


def markdown(rows: list[dict]) -> str:
    import timm
    import torchvision
    import transformers

    ok = sum(1 for r in rows if not r.get("error") and r.get("prunes"))
    lines = [
        f"# graphprune coverage ({datetime.date.today()})",
        "",
        f"graphprune {gp.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"transformers {transformers.__version__}; {platform.machine()}, {os.cpu_count()} cores, shared VM (times are noisy).",
        "Random init, batch 1, no hints; L2Score + ChannelMask(0.5) then Shrink. exact: f64 = equal in float64 "
        "(tolerance 1e-9), f32 = equal in float32 (rtol 1e-4, atol 1e-5) where "
        f"float64 failed or took over {F64_BUDGET_S} s (the JSON says which). Peak = RSS high-water mark of the "
        "model's own process up to the end of pruning. Frozen: channels summed per reason, at most 3, named after "
        "the largest site; channels that only reach a model output are shown only when nothing else is frozen.",
        f"\n{ok} of {len(rows)} models prune exactly with no error.\n",
        "| model | source | params (M) | prunes | exact | MACs ratio | params ratio | seconds | peak MiB | own_class | top frozen reasons | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        error = (r.get("error") or "") + (f" [{r['where']}]" if r.get("where") else "")
        cells = [
            r["model"],
            r["source"],
            fmt(r.get("params_m"), ".1f"),
            fmt(r.get("prunes")),
            r.get("exact") or "-",
            fmt(r.get("macs_ratio")),
            fmt(r.get("params_ratio")),
            fmt(r.get("seconds"), ".1f"),
            fmt(r.get("peak_mib"), ".0f"),
            fmt(r.get("own_class")),
            "; ".join(r.get("frozen") or []),
            error,
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["torchvision", "timm", "hf"])
    parser.add_argument("--models", help="comma-separated names, or source/name (e.g. timm/efficientnet_b0)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one source/name, print its row
    args = parser.parse_args()
    if args.one:
        print(MARK + json.dumps(measure(*args.one.split("/", 1))), flush=True)
        return
    path = os.path.join(RESULTS, "coverage.json")
    rows = []
    if (args.only or args.models) and os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    for key in selected(args):
        row = in_subprocess(key)
        same = [i for i, r in enumerate(rows) if (r["source"], r["model"]) == (row["source"], row["model"])]
        if same:
            rows[same[0]] = row
        else:
            rows.append(row)
        print(
            f"  {key}: {row.get('exact') or '-'} {fmt(row.get('macs_ratio'))} {fmt(row.get('seconds'), '.1f')}s {row.get('error') or ''}",
            file=sys.stderr,
            flush=True,
        )
        os.makedirs(RESULTS, exist_ok=True)
        with open(path, "w") as f:  # after every model, so an interrupted run keeps what it measured
            json.dump(rows, f, indent=2)
    order = {"torchvision": 0, "timm": 1, "hf": 2}
    rows.sort(key=lambda r: order[r["source"]])
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    table = markdown(rows)
    with open(os.path.join(RESULTS, "coverage.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
