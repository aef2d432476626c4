"""compile() from several threads at once, and plain models run beside it, all work; the tracer's
patches never outlive a trace."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests import models
from tests.helpers import assert_exact

FACTORIES = [models.Residual, models.Concat, models.Grouped, models.Shuffle, models.SqueezeExcite, models.SeedCNN]


def _prune(factory):
    torch.manual_seed(0)
    model = models.randomize_bn(factory()).eval()
    x = (torch.randn(2, 3, 32, 32),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    return type(shrunk)


def test_four_threads_compile_several_models_at_once():
    call_before = nn.Module.__call__
    with ThreadPoolExecutor(max_workers=4) as pool:
        types = list(pool.map(_prune, FACTORIES * 2))
    for t, f in zip(types, FACTORIES * 2):  # each in its own class, but the seed CNN (a literal width in its view)
        assert t is f or (f is models.SeedCNN and issubclass(t, torch.fx.GraphModule))
    assert nn.Module.__call__ is call_before  # nothing left patched
    _prune(models.Residual)  # and compile still works afterwards


def test_plain_models_run_in_other_threads_while_one_is_traced():
    stop = threading.Event()
    errors = []
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def run_plain():
        while not stop.is_set():
            try:
                plain(torch.randn(3, 4))
            except Exception as exc:  # e.g. "module is not installed as a submodule"
                errors.append(exc)
                return

    runner = threading.Thread(target=run_plain)
    runner.start()
    try:
        for factory in FACTORIES:
            _prune(factory)
    finally:
        stop.set()
        runner.join()
    assert errors == []
