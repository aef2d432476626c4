"""A small CNN really trained on scikit-learn's digits (shipped with the package, no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def load(seed: int = 0):
    """(train_x, train_y, test_x, test_y): 1,397 training and 400 test images, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[400:], y[400:], x[:400], y[:400]


def train(
    model: nn.Module, x, y, epochs: int, lr: float = 2e-3, seed: int = 0, penalty=None, on_step=None
) -> nn.Module:
    """Adam on cross-entropy (plus `penalty()`, e.g. a gp.GroupLasso, when given), batches of 64;
    `on_step(step)` after each optimizer step (counted from 1), e.g. a gp.Pruner's `on_step_end`."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            (loss if penalty is None else loss + penalty()).backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step)
    model.eval()
    return model


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def calibration(x, y, batches: int = 4, size: int = 64):
    return [((x[i * size : (i + 1) * size],), y[i * size : (i + 1) * size]) for i in range(batches)]
