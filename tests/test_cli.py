"""The command line's main job: prune, verify, export, measure."""

from __future__ import annotations

import pytest

from graphprune.cli import main

pytest.importorskip("torchvision")


def test_demo_prunes_verifies_exports_and_measures(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    rc = main(["demo", "--model", "resnet18", "--size", "64", "--out", str(tmp_path), "--repeats", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "-> OK" in out and "ONNX Runtime matches torch" in out and "speedup" in out
    assert (tmp_path / "resnet18_pruned.onnx").stat().st_size < (tmp_path / "resnet18_dense.onnx").stat().st_size


def test_demo_without_export(capsys):
    assert main(["demo", "--model", "squeezenet1_0", "--size", "64", "--no-export", "--scope", "global"]) == 0
    assert "shrunk" in capsys.readouterr().out


def test_demo_rejects_unknown_model_and_bad_ratio(capsys):
    assert main(["demo", "--model", "nope", "--no-export"]) == 2
    assert "unknown torchvision model" in capsys.readouterr().err
    assert main(["demo", "--ratio", "1.5", "--size", "32", "--no-export"]) == 2
    assert "[0, 1)" in capsys.readouterr().err
