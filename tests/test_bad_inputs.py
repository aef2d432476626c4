"""Every public entry point, fed the bad inputs people give it: a GraphPruneError subclass whose
message names the argument, and the caller's model and files on disk untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.backends import onnx as gox
from graphprune.passes import (
    ActivationScore,
    BlockMask,
    ChannelMask,
    L2Score,
    MagnitudeScore,
    NMMask,
    Shrink,
    SparseLower,
    TaylorScore,
    UnstructuredMask,
)
from tests import models
from tests.helpers import assert_same_state, state

X = (torch.randn(2, 10),)


def _compile(passes, example_inputs=X, **kwargs):
    return lambda model: gp.compile(model, passes, example_inputs=example_inputs, **kwargs)


CASES = {
    # compile()
    "two inputs for a one-argument model": (
        _compile([L2Score()], example_inputs=(X[0], X[0])),
        gp.InputError,
        "example_inputs do not fit",
    ),
    "unknown keyword input": (
        _compile([L2Score()], example_inputs={"y": X[0]}),
        gp.InputError,
        "example_inputs do not fit",
    ),
    "input of the wrong shape": (
        _compile([L2Score()], example_inputs=(torch.randn(2, 7),)),
        gp.InputError,
        "does not run on example_inputs",
    ),
    "example_inputs a bare tensor": (_compile([L2Score()], example_inputs=X[0]), gp.ArgumentError, "example_inputs"),
    "passes not a list": (lambda m: gp.compile(m, L2Score, example_inputs=X), gp.ArgumentError, "passes"),
    "not a pass": (_compile([42]), gp.ArgumentError, "not a pass"),
    "unknown output": (_compile([L2Score()], output="onnx"), gp.ArgumentError, "output"),
    "leaf_modules not classes": (_compile([L2Score()], leaf_modules=["Linear"]), gp.ArgumentError, "leaf_modules"),
    # ChannelMask
    "ratio 1": (lambda m: ChannelMask(1.0), gp.ArgumentError, "ratio"),
    "ratio a string": (lambda m: ChannelMask("0.5"), gp.ArgumentError, "ratio"),
    "ratio NaN": (lambda m: ChannelMask(float("nan")), gp.ArgumentError, "ratio"),
    "exclude None": (lambda m: ChannelMask(0.5, exclude=None), gp.ArgumentError, "exclude"),
    "exclude the whole model": (lambda m: ChannelMask(0.5, exclude=[""]), gp.ArgumentError, "exclude"),
    "exclude an unknown module": (
        _compile([L2Score(), ChannelMask(0.5, exclude=["fc9"])]),
        gp.ArgumentError,
        "exclude",
    ),
    "ratio a list": (lambda m: ChannelMask([0.5]), gp.ArgumentError, "ratio"),
    "ratio mapping to a string": (lambda m: ChannelMask({"*": "half"}), gp.ArgumentError, "ratio"),
    "round_to 0": (lambda m: ChannelMask(0.5, round_to=0), gp.ArgumentError, "round_to"),
    "min_channels a float": (lambda m: ChannelMask(0.5, min_channels=1.5), gp.ArgumentError, "min_channels"),
    "unknown kind or group in ratio": (
        _compile([L2Score(), ChannelMask({"neuron": 0.5})]),
        gp.ArgumentError,
        "does not have",
    ),
    "head ratio without attention": (
        _compile([L2Score(), ChannelMask({"head": 0.5})]),
        gp.PreconditionError,
        "no 'head' groups",
    ),
    "unknown scope": (lambda m: ChannelMask(0.5, scope="layer"), gp.ArgumentError, "scope"),
    "mask without scores": (_compile([ChannelMask(0.5)]), gp.PreconditionError, "needs scores"),
    # fine-grained masks, scores, lowering
    "sparsity 1": (lambda m: UnstructuredMask(1), gp.ArgumentError, "sparsity"),
    "N:M with n >= m": (lambda m: NMMask(4, 4), gp.ArgumentError, "NMMask"),
    "block not a pair": (lambda m: BlockMask(0.5, block=4), gp.ArgumentError, "block"),
    "magnitude p 0": (lambda m: MagnitudeScore(0), gp.ArgumentError, "p must"),
    "runs 0": (lambda m: SparseLower(runs=0), gp.ArgumentError, "runs"),
    "calibration missing": (_compile([ActivationScore()]), gp.ArgumentError, "calibration"),
    "calibration of numbers": (_compile([ActivationScore([1, 2])]), gp.ArgumentError, "calibration item 0"),
    "calibration with NaN": (_compile([ActivationScore([torch.full((2, 10), float("nan"))])]), gp.InputError, "NaN"),
    "loss_fn missing": (_compile([TaylorScore([X])]), gp.ArgumentError, "loss_fn"),
    "mask after SparseLower": (
        _compile([UnstructuredMask(0.9), SparseLower(choose="first"), L2Score(), ChannelMask(0.5)]),
        gp.PreconditionError,
        "after SparseLower",
    ),
    # sensitivity, Pruner
    "evaluate returns NaN": (
        lambda m: gp.sensitivity(m, lambda model: float("nan"), example_inputs=X),
        gp.InputError,
        "finite",
    ),
    "sensitivity ratio 0": (
        lambda m: gp.sensitivity(m, lambda model: 1.0, example_inputs=X, ratios=[0.0]),
        gp.ArgumentError,
        "ratio",
    ),
    "Pruner frequency 0": (
        lambda m: gp.Pruner(m, example_inputs=X, target_sparsity=0.5, end_step=10, frequency=0),
        gp.ArgumentError,
        "frequency",
    ),
    # ONNX export
    "opset a string": (lambda m: gox.export(m, "m.onnx", example_inputs=X, opset="18"), gp.ArgumentError, "opset"),
    "opset 0": (lambda m: gox.export(m, "m.onnx", example_inputs=X, opset=0), gp.ArgumentError, "opset"),
    "unknown exporter": (
        lambda m: gox.export(m, "m.onnx", example_inputs=X, exporter="tvm"),
        gp.ArgumentError,
        "exporter",
    ),
    # saving
    "save an uncompiled model": (lambda m: gp.save(m, "never-written"), gp.ArgumentError, "save"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_a_clear_error_and_leaves_the_model_alone(case):
    call, error, pattern = CASES[case]
    model = models.Mlp()
    before = state(model)
    with pytest.raises(error, match=pattern):
        call(model)
    assert_same_state(before, model)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_numpy_numbers_are_numbers():
    assert ChannelMask(np.float32(0.5)).ratio == 0.5
    assert ChannelMask(0.5, round_to=np.int64(8)).round_to == 8


def test_exporting_onto_a_folder_fails_before_exporting(tmp_path):
    with pytest.raises(gp.ArgumentError, match="is a folder"):
        gox.export(models.Mlp(), tmp_path, example_inputs=X)


def test_an_asked_opset_is_written_or_the_export_fails(tmp_path):
    result = gox.export(models.Mlp(), tmp_path / "m.onnx", example_inputs=X, opset=17)
    import onnx

    assert (
        result.opset
        == 17
        == next(o.version for o in onnx.load(result.path).opset_import if o.domain in ("", "ai.onnx"))
    )


def _checkpoint(tmp_path):
    pruned = gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=X)
    gp.save(pruned, tmp_path)
    return {p.name: p.read_bytes() for p in tmp_path.iterdir()}


def _damage_plan(tmp_path, text):
    (tmp_path / "plan.json").write_text(text)


def _out_of_range_units(tmp_path):
    plan = json.loads((tmp_path / "plan.json").read_text())
    plan["steps"][0]["units"] = {k: [10_000] for k in plan["steps"][0]["units"]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))


LOAD_CASES = {
    "plan is not JSON": lambda d: _damage_plan(d, "{not json"),
    "plan without steps": lambda d: _damage_plan(d, json.dumps({"format": "graphprune-plan", "version": 1})),
    "steps of the wrong type": lambda d: _damage_plan(
        d, json.dumps({"format": "graphprune-plan", "version": 1, "steps": [3]})
    ),
    "units out of range": _out_of_range_units,
    "damaged weights": lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 16),
    "missing plan": lambda d: (d / "plan.json").unlink(),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_loading_damaged_checkpoints_says_what_is_wrong(case, tmp_path):
    _checkpoint(tmp_path)
    LOAD_CASES[case](tmp_path)
    model = models.Mlp()
    before = state(model)
    with pytest.raises(gp.CheckpointError):
        gp.load(model, tmp_path, example_inputs=X)
    assert_same_state(before, model)


def test_saving_over_a_checkpoint_is_all_or_nothing(tmp_path, monkeypatch):
    old = _checkpoint(tmp_path)
    pruned = gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.25), Shrink()], example_inputs=X)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("graphprune.saving.save_file", full_disk)  # the disk fills up while the weights are written
    with pytest.raises(OSError, match="No space"):
        gp.save(pruned, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old
    pruned.graphprune_report[-1].details["plan"] = {"op": "shrink", "bad": object()}  # not JSON-serialisable
    monkeypatch.undo()
    with pytest.raises(gp.CheckpointError, match="JSON"):
        gp.save(pruned, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old
    assert [
        p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")
    ] == []  # no staging left


def test_saving_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    pruned = gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=X)
    with pytest.raises(gp.ArgumentError, match="not a graphprune checkpoint"):
        gp.save(pruned, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_function_pass_that_returns_nothing_keeps_the_scores():
    def inspect_only(gm, ctx):
        return None

    out = gp.compile(models.Mlp(), [L2Score(), inspect_only, ChannelMask(0.5), Shrink()], example_inputs=X)
    assert out.fc1.out_features == 16


def test_shrink_before_the_masks_warns():
    with pytest.warns(gp.GraphPruneWarning, match="Shrink ran before"):
        gp.compile(models.Mlp(), [Shrink(), L2Score(), ChannelMask(0.5)], example_inputs=X)


def test_round_to_larger_than_a_group_warns_instead_of_pruning_nothing_silently():
    with pytest.warns(gp.GraphPruneWarning, match="keep every unit because round_to=64"):
        gp.compile(models.Mlp(), [L2Score(), ChannelMask(0.5, round_to=64)], example_inputs=X)


def test_a_lowered_model_can_be_copied_and_compiled_again():
    import copy

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = (torch.randn(3, 64),)
    lowered = gp.compile(model, [UnstructuredMask(0.9), SparseLower(choose="first")], example_inputs=x)
    torch.testing.assert_close(copy.deepcopy(lowered)(*x), lowered(*x))
    again = gp.compile(lowered, [], example_inputs=x)
    torch.testing.assert_close(again(*x), lowered(*x))
