"""Block-by-block calibration runs every batch through one part of the graph at a time and shows each
op the input a whole forward would."""

from __future__ import annotations

import pytest
import torch

from graphprune.compile import graph_of
from graphprune.ir.blockwise import Blockwise
from graphprune.ir.inputs import calibration_batches
from graphprune.ir.weight_ops import op_inputs, weight_ops
from tests import models

transformers = pytest.importorskip("transformers")


def test_parts_are_the_blocks_and_taps_see_what_a_whole_forward_gives():
    model = models.tiny_decoder(layers=3)
    batches = [torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (1, 5))]
    gm = graph_of(model, (batches[0],))
    ops = weight_ops(gm)
    seen: dict[str, list[torch.Tensor]] = {}
    taps = {n: (lambda x, w=op.weight: seen.setdefault(w, []).append(x)) for op in ops.values() for n in op.nodes}
    with Blockwise(gm, calibration_batches(batches, "test")) as runner:
        assert runner.blocks == 3 and len(runner.parts) == 5  # before, three layers, after
        for part in runner:
            runner.run(part, taps)
            if 0 < part < 4:
                assert all(len(env) <= 8 for env in runner.envs)  # between parts: the few values later parts read
    assert len(seen) == len(ops) == 3 * 7 + 1
    for i, ids in enumerate(batches):
        whole = op_inputs(gm, ops, (ids,))
        for name, inputs in seen.items():
            torch.testing.assert_close(inputs[i], whole[name])
