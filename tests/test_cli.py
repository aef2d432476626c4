"""The command line's main job: prune, verify, export, measure."""

from __future__ import annotations

import pytest

from graphprune.analysis import latency
from graphprune.cli import main
from tests.test_target import CountingMeter

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


# -- graphprune prune / report / export ------------------------------------------------------------
import json  # noqa: E402

import torch  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.passes import ChannelMask, L2Score, Shrink  # noqa: E402
from graphprune.sources import load_source  # noqa: E402
from tests import models  # noqa: E402

SMALL = ["--input-shape", "1x3x64x64"]


@pytest.mark.parametrize("command", ["prune", "report", "export", "bench", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: graphprune " + command in capsys.readouterr().out


def test_prune_saves_a_model_that_report_and_export_read_back(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "torchvision:resnet18", *SMALL, "--ratio", "0.5", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "plan.json",
        "recipe.yaml",
        "report.json",
        "source.json",
    }
    written = json.loads((out / "report.json").read_text())
    assert written["state"] == "shrunk" and written["macs"][1] < 0.35 * written["macs"][0]
    capsys.readouterr()
    assert main(["report", str(out), "--json", "--html", str(tmp_path / "r.html")]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == written["params"]
    page = (tmp_path / "r.html").read_text()
    assert f"{written['params'][1]:,}" in page and "Channel groups" in page and "layer1.0.conv1" in page
    assert (out / "report.html").read_text() == page
    pytest.importorskip("onnxruntime")
    assert main(["export", str(out), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "ONNX Runtime matches torch" in capsys.readouterr().out


def test_the_written_recipe_reproduces_the_result(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["prune", "torchvision:squeezenet1_0", *SMALL, "--target-macs", "0.5", "--out", str(first)]) == 0
    assert (
        main(["prune", "torchvision:squeezenet1_0", "--recipe", str(first / "recipe.yaml"), "--out", str(second)]) == 0
    )
    assert (first / "plan.json").read_text() == (second / "plan.json").read_text()
    a, b = (json.loads((d / "report.json").read_text()) for d in (first, second))
    assert a["macs"] == b["macs"] and abs(a["macs"][1] / a["macs"][0] - 0.5) <= 0.02


def test_yaml_and_toml_recipes_equal_the_python_list(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "passes:\n  - L2Score: {}\n  - ChannelMask: {ratio: 0.4, round_to: 2, scope: global}\n  - Shrink\n"
    )
    (tmp_path / "r.toml").write_text(
        'passes = [{L2Score = {}}, {ChannelMask = {ratio = 0.4, round_to = 2, scope = "global"}}, "Shrink"]\n'
    )
    torch.manual_seed(0)
    model, x = models.Residual().eval(), (torch.randn(1, 3, 8, 8),)
    expected = gp.compile(model, [L2Score(), ChannelMask(0.4, round_to=2, scope="global"), Shrink()], example_inputs=x)
    for file in ("r.yaml", "r.toml"):
        got = gp.compile(model, gp.recipe(tmp_path / file), example_inputs=x)
        assert got.state_dict().keys() == expected.state_dict().keys()
        for k, v in expected.state_dict().items():
            torch.testing.assert_close(got.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "text, named",
    [
        (
            "passes:\n  - L2Score: {}\n  - ChannelMask: {rato: 0.4}\n",
            "line 3: passes[1].ChannelMask.rato: unknown argument",
        ),
        ("passes:\n  - L9Score: {}\n", "line 2: passes[0]: unknown pass 'L9Score'"),
        ("passes:\n  - ChannelMask: {ratio: yes}\n", "passes[0].ChannelMask: ChannelMask ratio"),
        ("passes: [Shrink]\nstages: 2\n", "line 2: stages: unknown key"),
        ("passes: [Shrink]\ninputs: {shape: [1, -3]}\n", "inputs.shape: must be a list of positive ints"),
    ],
)
def test_a_bad_recipe_names_the_key(tmp_path, capsys, text, named):
    (tmp_path / "bad.yaml").write_text(text)
    rc = main(["prune", "torchvision:resnet18", "--recipe", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


FACTORY = """
import torch
from torch import nn

def build():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(2, 3, 12, 12)
    model(x)
    return model, x
"""


def test_prune_a_model_from_a_python_factory(tmp_path, capsys):
    (tmp_path / "make.py").write_text(FACTORY)
    out = tmp_path / "pruned"
    assert main(["prune", f"{tmp_path / 'make.py'}:build", "--ratio", "0.5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params"][1] < report["params"][0]
    assert load_source(str(out)).model[0].out_channels == 8


def _bert_folder(path):
    """A tiny random BERT written with save_pretrained (and a vocabulary file, as a real folder has)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(100)) + "\n")
    return path


def test_prune_a_hugging_face_folder(tmp_path, capsys):
    bert = _bert_folder(tmp_path / "bert")
    out = tmp_path / "pruned"
    assert main(["prune", f"hf:{bert}", "--seq-len", "16", "--ratio", "0.5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["macs"][1] < 0.7 * report["macs"][0]
    assert load_source(str(out)).model.encoder.layer[0].intermediate.dense.out_features == 32
    # BERT's config derives the head size from the hidden size: fewer heads cannot be written with
    # save_pretrained, and the command says so (the graphprune checkpoint holds the model)
    assert not (out / "hf").exists()
    assert "no hf/ folder: save_pretrained cannot describe this pruning" in capsys.readouterr().out


def test_prune_writes_a_hugging_face_folder_that_from_pretrained_loads(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    bert = _bert_folder(tmp_path / "bert")
    (tmp_path / "ffn.yaml").write_text(
        "passes:\n  - L2Score: {}\n  - ChannelMask: {ratio: {ffn: 0.5}}\n  - Shrink\ninputs: {seq_len: 16}\n"
    )
    out = tmp_path / "pruned"
    assert main(["prune", f"hf:{bert}", "--recipe", str(tmp_path / "ffn.yaml"), "--out", str(out)]) == 0
    assert "hf/ (save_pretrained)" in capsys.readouterr().out
    back = transformers.AutoModel.from_pretrained(out / "hf").eval()
    assert type(back) is transformers.BertModel and back.config.intermediate_size == 32
    assert (out / "hf" / "vocab.txt").read_text() == (bert / "vocab.txt").read_text()
    pruned = load_source(str(out))
    with torch.no_grad():
        expected = pruned.model(*pruned.example_inputs)
        got = back(*pruned.example_inputs)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output)
    # pruning into the same folder again in a way save_pretrained cannot describe removes the old hf/
    assert main(["prune", f"hf:{bert}", "--seq-len", "16", "--ratio", "0.5", "--out", str(out)]) == 0
    assert not (out / "hf").exists() and (out / "plan.json").exists()


def test_a_hugging_face_folder_that_reloads_to_other_outputs_is_not_written(tmp_path, capsys, monkeypatch):
    transformers = pytest.importorskip("transformers")
    bert = _bert_folder(tmp_path / "bert")
    (tmp_path / "ffn.yaml").write_text(
        "passes:\n  - L2Score: {}\n  - ChannelMask: {ratio: {ffn: 0.5}}\n  - Shrink\ninputs: {seq_len: 16}\n"
    )
    loads = transformers.BertModel.from_pretrained.__func__

    def off(cls, *args, **kwargs):  # a reload that computes something else (a save_pretrained that drops something)
        model = loads(cls, *args, **kwargs)
        with torch.no_grad():
            model.pooler.dense.bias.add_(0.1)
        return model

    out = tmp_path / "pruned"
    monkeypatch.setattr(transformers.BertModel, "from_pretrained", classmethod(off))
    assert main(["prune", f"hf:{bert}", "--recipe", str(tmp_path / "ffn.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "does not compute what the pruned model computes: output" in printed
    assert not (out / "hf").exists() and not list(out.glob(".hf*")) and (out / "plan.json").exists()


def test_prune_refuses_unknown_sources_and_conflicting_flags(tmp_path, capsys):
    assert main(["prune", "keras:resnet", "--ratio", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "unknown model source" in capsys.readouterr().err
    assert main(["prune", "torchvision:resnet18", "--out", str(tmp_path / "o")]) == 2
    assert "give one of --recipe" in capsys.readouterr().err
    latency = ["prune", "torchvision:resnet18", *SMALL, "--target-latency", "1.5", "--out", str(tmp_path / "o")]
    assert main(latency) == 2
    assert "target 'latency' is a share" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on a refused command


def test_prune_to_a_latency_target_writes_it_into_the_recipe(tmp_path, capsys, monkeypatch):
    # "torch" answered by a meter that counts instead of timing (a timed search on a shared machine varies)
    monkeypatch.setitem(latency.METERS, "torch", lambda threads: CountingMeter(0.0))
    (tmp_path / "make.py").write_text(FACTORY)
    source, out = f"{tmp_path / 'make.py'}:build", tmp_path / "pruned"
    args = ["prune", source, "--target-latency", "0.6", "--backend", "torch", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    written = (out / "recipe.yaml").read_text()
    assert "latency: 0.6" in written and "backend: torch" in written and "threads: 1" in written
    report = json.loads((out / "report.json").read_text())
    assert report["params"][1] < report["params"][0] and report["macs"][1] < 0.7 * report["macs"][0]
    assert main(["prune", source, "--ratio", "0.5", "--backend", "torch", "--out", str(tmp_path / "o")]) == 2
    assert "give --target-latency too" in capsys.readouterr().err


def test_bench_times_dense_and_pruned_interleaved(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert (
        main(["prune", "torchvision:squeezenet1_0", "--input-shape", "1x3x32x32", "--ratio", "0.5", "--out", str(out)])
        == 0
    )
    capsys.readouterr()
    args = ["bench", "torchvision:squeezenet1_0", str(out), "--input-shape", "1x3x32x32", "--repeats", "3"]
    assert main([*args, "--no-spinning"]) == 0
    printed = capsys.readouterr().out
    assert "torch" in printed and "ONNX Runtime (idle threads sleep)" in printed and printed.count("speedup") == 2


EVAL = """
import torch

def agreement(model):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        return float(model(x).argmax(1).eq(torch.zeros(4, dtype=torch.long)).float().mean())
"""


def test_sensitivity_prints_a_table_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "make.py").write_text(FACTORY)
    (tmp_path / "ev.py").write_text(EVAL)
    source = f"{tmp_path / 'make.py'}:build"
    rc = main(
        [
            "sensitivity",
            source,
            "--eval",
            f"{tmp_path / 'ev.py'}:agreement",
            "--ratios",
            "0.5",
            "--plot",
            str(tmp_path / "s.png"),
            "--json",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert {row[0] for row in result["rows"]} == {"0", "2"} and all(row[1] == 0.5 for row in result["rows"])
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("suffix", [".html", ".graphml", ".dot"])
def test_graph_writes_the_channel_groups(tmp_path, capsys, suffix):
    out = tmp_path / f"groups{suffix}"
    assert main(["graph", "torchvision:resnet18", "--input-shape", "1x3x32x32", "--out", str(out)]) == 0
    assert "channel groups" in capsys.readouterr().out
    text = out.read_text()
    assert "layer1.0.conv1" in text and "reaches a model output" in text
    if suffix == ".graphml":
        import networkx as nx

        graph = nx.read_graphml(out)
        groups = [n for n, d in graph.nodes(data=True) if d["kind"] == "group"]
        assert len(groups) == len(gp.analyze(torchvision_model("resnet18"), (torch.randn(1, 3, 32, 32),)).groups)
        # conv1 of the first block produces its group's channels, conv2 reads them
        assert graph.edges["module:layer1.0.conv1", "group:layer1.0.conv1"]["role"] == "out"
        assert graph.edges["module:layer1.0.conv2", "group:layer1.0.conv1"]["role"] == "in"
    assert main(["graph", "torchvision:resnet18", "--out", str(tmp_path / "g.png")]) == 2


def torchvision_model(name):
    import torchvision

    return getattr(torchvision.models, name)().eval()


LOADER = """
import torch

def batches():
    torch.manual_seed(2)
    return [(torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))) for _ in range(4)]
"""


@pytest.mark.parametrize("distill", [False, True])
def test_prune_fine_tunes_between_the_masks_and_shrink(tmp_path, capsys, distill):
    (tmp_path / "make.py").write_text(FACTORY)
    (tmp_path / "data.py").write_text(LOADER)
    out = tmp_path / "pruned"
    extra = ["--distill"] if distill else []
    args = ["prune", f"{tmp_path / 'make.py'}:build", "--ratio", "0.5", "--out", str(out)]
    assert main([*args, "--finetune", f"{tmp_path / 'data.py'}:batches", "--epochs", "2", *extra]) == 0
    assert "fine-tuned 2 epoch(s)" in capsys.readouterr().out
    loaded = load_source(str(out))
    assert loaded.model[0].out_channels == 8
    # the weights were trained: they differ from the ones pruned without fine-tuning
    plain = tmp_path / "plain"
    assert main(["prune", f"{tmp_path / 'make.py'}:build", "--ratio", "0.5", "--out", str(plain)]) == 0
    assert not torch.equal(load_source(str(plain)).model[0].weight, loaded.model[0].weight)


def test_a_failing_prune_leaves_the_files_on_disk_as_they_were(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own file")
    # a folder that holds other files is refused before anything is written
    assert main(["prune", "torchvision:squeezenet1_0", *SMALL, "--ratio", "0.5", "--out", str(out)]) == 2
    assert "not a graphprune checkpoint" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my own file"
    # weights that do not load name the argument, and write nothing
    (tmp_path / "w.pt").write_bytes(b"not a state dict")
    args = ["prune", "torchvision:squeezenet1_0", *SMALL, "--ratio", "0.5", "--weights", str(tmp_path / "w.pt")]
    assert main([*args, "--out", str(tmp_path / "new")]) == 2
    assert "--weights" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
