"""An LSTM really trained on scikit-learn's digits read row by row (8 time steps of 8 pixels):
test accuracy against the fraction of hidden units pruned, one-shot and after a short fine-tune,
with params and MACs after Shrink; and against the fraction of time steps (rows) dropped before
the LSTM by TokenPrune (by the row's norm), one-shot and after the same fine-tune.  Prints a markdown table and writes
benchmarks/results/lstm_digits.md and .json.

    python benchmarks/lstm_digits.py [--ratios 0,0.25,0.5,0.75] [--retrain]

The trained model is cached in benchmarks/cache/lstm_digits.pt (not in git).  Each kind of pruning
is a row family: a function (model, data, ratios) -> rows, listed in FAMILIES; `train_or_load()`
gives the model and data to a family written elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphprune as gp  # noqa: E402
from graphprune.passes import ActivationScore, ChannelMask, L2Score, Shrink, TaylorScore, TokenPrune  # noqa: E402
from tests import digits  # noqa: E402

HERE = os.path.dirname(__file__)
CHECKPOINT = os.path.join(HERE, "cache", "lstm_digits.pt")
RESULTS = os.path.join(HERE, "results", "lstm_digits")
HIDDEN, EPOCHS, FINE_TUNE_EPOCHS = 64, 30, 3


class DigitsLSTM(nn.Module):
    """Rows of the image as time steps: LSTM over the 8 rows, the last step's output -> 10 classes."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):  # (batch, 8 rows, 8 pixels)
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@dataclass(frozen=True)
class Data:
    """Digits as sequences (batch, 8 time steps, 8 features), scaled to [0, 1]: 1,397 train, 400 test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def example(self) -> tuple[torch.Tensor]:
        return (self.test_x[:8],)


def load_data() -> Data:
    tx, ty, vx, vy = digits.load()
    return Data(tx.squeeze(1), ty, vx.squeeze(1), vy)


def train_or_load(retrain: bool = False, log: Callable[[str], None] = print) -> tuple[DigitsLSTM, Data]:
    """The trained dense model (from the cache, or trained now, ~1 min on a CPU, and cached) and the data."""
    data = load_data()
    model = DigitsLSTM()
    if os.path.exists(CHECKPOINT) and not retrain:
        model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
        return model.eval(), data
    torch.manual_seed(0)
    model = DigitsLSTM()
    start = time.perf_counter()
    digits.train(model, data.train_x, data.train_y, epochs=EPOCHS, lr=5e-3)
    log(f"trained {EPOCHS} epochs in {time.perf_counter() - start:.0f} s")
    os.makedirs(os.path.dirname(CHECKPOINT), exist_ok=True)
    torch.save(model.state_dict(), CHECKPOINT)
    return model.eval(), data


def accuracy(model: nn.Module, data: Data) -> float:
    return digits.accuracy(model, data.test_x, data.test_y)


def hidden_unit_rows(model: nn.Module, data: Data, ratios: list[float]) -> list[dict]:
    """Hidden units of the LSTM pruned by each criterion: accuracy one-shot, after fine-tuning with
    the masks on, params and MACs of the shrunk model (relative to dense)."""
    calib = digits.calibration(data.train_x, data.train_y)
    criteria = {
        "l2": L2Score,
        "taylor": lambda: TaylorScore(calib, F.cross_entropy),
        "activation": lambda: ActivationScore(calib),
    }
    x = data.example
    params, macs = gp.count_params(model), gp.count_macs(model, x)
    rows = []
    for name, make in criteria.items():
        for ratio in ratios:
            masked = gp.compile(model, [make(), ChannelMask(ratio)], example_inputs=x)
            one_shot = accuracy(masked, data)
            torch.manual_seed(0)
            digits.train(masked, data.train_x, data.train_y, epochs=FINE_TUNE_EPOCHS, lr=1e-3)
            pruned = gp.compile(masked, [Shrink()], example_inputs=x)
            rows.append(
                {
                    "family": "hidden units",
                    "criterion": name,
                    "ratio": ratio,
                    "hidden": pruned.lstm.hidden_size,
                    "one_shot": one_shot,
                    "fine_tuned": accuracy(pruned, data),
                    "params": gp.count_params(pruned) / params,
                    "macs": gp.count_macs(pruned, x) / macs,
                }
            )
    return rows


def time_step_rows(model: nn.Module, data: Data, ratios: list[float]) -> list[dict]:
    """Time steps (rows of the image) dropped before the LSTM by TokenPrune, lowest input norm
    first, the kept ones in order: accuracy one-shot and after fine-tuning the pruned model (the
    same epochs and learning rate as the hidden units), MACs on the full 8-row inputs.  Each pruned
    model is checked against a hand reference (the LSTM run on the kept rows)."""
    x = data.example
    macs = gp.count_macs(model, x)
    rows = []
    for ratio in ratios:
        pruned = gp.compile(model, [TokenPrune([ratio], score="norm", keep=())], example_inputs=x)
        kept = 8 - int(8 * ratio)
        idx = data.test_x.norm(dim=-1).topk(kept, dim=1).indices.sort(dim=1).values
        reference = model(data.test_x.gather(1, idx[..., None].expand(-1, -1, 8)))
        with torch.no_grad():
            assert torch.allclose(pruned(data.test_x), reference, atol=1e-5), "pruned model differs from the reference"
        one_shot = accuracy(pruned, data)
        torch.manual_seed(0)
        digits.train(pruned, data.train_x, data.train_y, epochs=FINE_TUNE_EPOCHS, lr=1e-3)
        rows.append(
            {
                "family": "time steps",
                "criterion": "norm",
                "ratio": ratio,
                "hidden": model.lstm.hidden_size,
                "steps": kept,
                "one_shot": one_shot,
                "fine_tuned": accuracy(pruned, data),
                "params": gp.count_params(pruned) / gp.count_params(model),
                "macs": gp.count_macs(pruned, x) / macs,
            }
        )
    return rows


# one entry per kind of pruning; each row: family, criterion, ratio, one_shot, fine_tuned, params, macs
FAMILIES: dict[str, Callable[[nn.Module, Data, list[float]], list[dict]]] = {
    "hidden units": hidden_unit_rows,
    "time steps": time_step_rows,
}


def markdown(model: nn.Module, data: Data, rows: list[dict]) -> str:
    head = (
        f"DigitsLSTM (LSTM(8, {HIDDEN}) over the 8 rows of scikit-learn's digits, last step -> Linear) trained "
        f"{EPOCHS} epochs (1,397 train / 400 test images); dense accuracy {accuracy(model, data):.3f}, "
        f"{gp.count_params(model):,} params, {gp.count_macs(model, (data.test_x[:1],)):,} MACs per image; "
        f"fine-tune: {FINE_TUNE_EPOCHS} epochs Adam 1e-3 with masks on, then Shrink (params and MACs relative to dense); "
        "time steps: TokenPrune([ratio], score='norm', keep=()) before the LSTM (the rows with the lowest norm "
        "dropped, the others in order), fine-tuned the same way\n"
    )
    lines = [
        head,
        "| pruned | criterion | ratio | hidden | time steps | accuracy one-shot | accuracy fine-tuned | params ratio | MACs ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['criterion']} | {r['ratio']:g} | {r.get('hidden', '')} | {r.get('steps', 8)} | {r['one_shot']:.3f} | "
            f"{r['fine_tuned']:.3f} | {r['params']:.3f} | {r['macs']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75")
    parser.add_argument("--retrain", action="store_true", help="train again instead of using the cached model")
    args = parser.parse_args()
    model, data = train_or_load(args.retrain)
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = [row for family in FAMILIES.values() for row in family(model, data, ratios)]
    table = markdown(model, data, rows)
    print(table)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".md", "w") as f:
        f.write(table)
    with open(RESULTS + ".json", "w") as f:
        json.dump({"dense_accuracy": accuracy(model, data), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
