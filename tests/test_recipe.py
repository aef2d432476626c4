"""Recipes beyond the pass list (calibration, fine-tune, schedule) and glob patterns for layer names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import graphprune as gp
from graphprune.cli import main
from graphprune.errors import ArgumentError
from graphprune.passes import ActivationScore, ChannelMask, L2Score, Shrink
from graphprune.recipe import cross_entropy, read_recipe


class Stages(nn.Module):
    """A stem and two stages of two convolutions: groups stem, layer1.0, layer1.2, layer2.0, layer2.2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.layer2 = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(torch.relu(self.stem(x)))).mean((2, 3)))


def stages():
    torch.manual_seed(0)
    return Stages().eval(), (torch.randn(2, 3, 8, 8),)


def widths(model) -> dict[str, int]:
    return {
        "stem": model.stem.out_channels,
        "layer1.0": model.layer1[0].out_channels,
        "layer1.2": model.layer1[2].out_channels,
        "layer2.0": model.layer2[0].out_channels,
        "layer2.2": model.layer2[2].out_channels,
    }


def pruned_exactly(model, x, mask: ChannelMask):
    """Mask, then shrink; the shrunk model computes what the masked one did."""
    masked = gp.compile(model, [L2Score(), mask], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(*x), masked(*x))
    return shrunk


# -- globs ---------------------------------------------------------------------------------------
def test_glob_ratio_keys_set_the_ratio_of_the_groups_they_match():
    model, x = stages()
    # an exact key beats every glob; the most specific glob beats a looser one; "*" comes last
    got = pruned_exactly(model, x, ChannelMask({"layer1.*": 0.25, "layer1.2": 0.5, "*": 0.75}))
    assert widths(got) == {"stem": 2, "layer1.0": 12, "layer1.2": 8, "layer2.0": 4, "layer2.2": 4}
    got = pruned_exactly(model, x, ChannelMask({"layer*": 0.5, "layer2.*": 0.25, "channel": 0.75}))
    # a glob beats a kind; the kind is the stem's, which no glob matches
    assert widths(got) == {"stem": 2, "layer1.0": 8, "layer1.2": 8, "layer2.0": 12, "layer2.2": 12}
    assert widths(model) == {"stem": 8, "layer1.0": 16, "layer1.2": 16, "layer2.0": 16, "layer2.2": 16}


def test_exclude_takes_globs_over_module_paths():
    model, x = stages()
    got = pruned_exactly(model, x, ChannelMask(0.5, exclude=["layer2.*", "stem"]))
    assert widths(got) == {"stem": 8, "layer1.0": 8, "layer1.2": 8, "layer2.0": 16, "layer2.2": 16}
    # a glob over a parent covers its submodules, like a name does
    got = pruned_exactly(model, x, ChannelMask(0.5, exclude=["layer?"]))
    assert widths(got) == {"stem": 4, "layer1.0": 16, "layer1.2": 16, "layer2.0": 16, "layer2.2": 16}


@pytest.mark.parametrize(
    "mask, named",
    [
        (dict(ratio={"layer9.*": 0.5, "*": 0.5}), "'layer9.*'"),
        (dict(ratio=0.5, exclude=["stem", "head*"]), "'head*'"),
        (dict(ratio={"layer1*": 0.2, "*yer1.0": 0.3}), "['layer1*', '*yer1.0'] match group layer1.0 equally"),
        (dict(ratio={"layer1.*": 0.2}, scope="global"), "scope='local'"),
    ],
)
def test_a_glob_that_matches_nothing_or_ties_names_itself(mask, named):
    model, x = stages()
    with pytest.raises(ArgumentError) as err:
        gp.compile(model, [L2Score(), ChannelMask(**mask)], example_inputs=x)
    assert named in str(err.value)


def test_equally_specific_globs_with_one_ratio_agree():
    model, x = stages()
    got = pruned_exactly(model, x, ChannelMask({"layer1*": 0.5, "*yer1.0": 0.5}))
    assert widths(got) == {"stem": 8, "layer1.0": 8, "layer1.2": 8, "layer2.0": 16, "layer2.2": 16}


# -- recipes with calibration, fine-tune and schedule --------------------------------------------
DATA = """
import torch

def calibration():
    torch.manual_seed(3)
    return (torch.randn(4, 3, 8, 8) for _ in range(3))   # a generator: read once

def train():
    torch.manual_seed(2)
    return [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(3)]
"""

FACTORY = """
import torch
from tests.test_recipe import Stages

def build():
    torch.manual_seed(0)
    return Stages().eval(), torch.randn(2, 3, 8, 8)
"""


def _write(folder, name, text):
    (folder / name).write_text(text)
    return folder / name


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        torch.testing.assert_close(sb[k], v, rtol=0, atol=0)


def _data():
    namespace: dict = {}
    exec(DATA, namespace)
    return namespace


CALIBRATED_YAML = """passes:
  - ActivationScore: {}
  - ChannelMask: {ratio: {"layer1.*": 0.25, "*": 0.5}, exclude: ["layer2.2"]}
  - Shrink
calibration: data.py:calibration
"""
CALIBRATED_TOML = """passes = [{ActivationScore = {}}, {ChannelMask = {ratio = {"layer1.*" = 0.25, "*" = 0.5}, exclude = ["layer2.2"]}}, "Shrink"]
calibration = "data.py:calibration"
"""


def test_calibration_goes_to_the_passes_that_take_it(tmp_path, monkeypatch):
    _write(tmp_path, "data.py", DATA)
    model, x = stages()
    batches = list(_data()["calibration"]())
    mask = ChannelMask({"layer1.*": 0.25, "*": 0.5}, exclude=["layer2.2"])
    expected = gp.compile(model, [ActivationScore(calibration=batches), mask, Shrink()], example_inputs=x)
    monkeypatch.chdir(tmp_path.parent)  # the function file is found beside the recipe, not in the working dir
    for name, text in (("r.yaml", CALIBRATED_YAML), ("r.toml", CALIBRATED_TOML)):
        file = _write(tmp_path, name, text)
        got = gp.recipe_calibration(file)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, batches))
        _same(gp.compile(model, gp.recipe(file), example_inputs=x), expected)
        _same(gp.apply_recipe(model, file, example_inputs=x).model, expected)
        assert read_recipe(file)[0]["calibration"] == f"{tmp_path / 'data.py'}:calibration"
    # calibration given in Python beats the recipe's
    other = [torch.randn(4, 3, 8, 8)]
    direct = gp.compile(model, [ActivationScore(calibration=other), mask, Shrink()], example_inputs=x)
    _same(gp.compile(model, gp.recipe(tmp_path / "r.yaml", calibration=other), example_inputs=x), direct)


FINETUNE_YAML = """passes:
  - L2Score: {}
  - ChannelMask: {ratio: 0.5}
  - Shrink
finetune: {data: data.py:train, epochs: 2, lr: 0.01}
"""
FINETUNE_TOML = """passes = [{L2Score = {}}, {ChannelMask = {ratio = 0.5}}, "Shrink"]
[finetune]
data = "data.py:train"
epochs = 2
lr = 0.01
"""


def test_a_finetune_recipe_equals_mask_finetune_shrink_in_python(tmp_path):
    _write(tmp_path, "data.py", DATA)
    model, x = stages()
    torch.manual_seed(5)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    losses = gp.finetune(masked, _data()["train"](), cross_entropy, epochs=2, lr=0.01)
    expected = gp.compile(masked, [Shrink()], example_inputs=x)
    for name, text in (("r.yaml", FINETUNE_YAML), ("r.toml", FINETUNE_TOML)):
        torch.manual_seed(5)
        result = gp.apply_recipe(model, _write(tmp_path, name, text), example_inputs=x)
        assert result.losses == tuple(losses)
        _same(result.model, expected)
    # a key given in Python overrides the recipe's
    torch.manual_seed(5)
    assert len(gp.apply_recipe(model, tmp_path / "r.yaml", example_inputs=x, finetune={"epochs": 1}).losses) == 1
    assert widths(model)["stem"] == 8  # the caller's model is not touched


SCHEDULE_YAML = """passes:
  - L2Score: {}
  - ChannelMask: {round_to: 2, exclude: ["layer2.*"]}
  - Shrink
finetune: {data: data.py:train, epochs: 2, lr: 0.01}
schedule: {target_sparsity: 0.5, end_step: 4, frequency: 2, schedule: linear}
"""
SCHEDULE_TOML = """passes = [{L2Score = {}}, {ChannelMask = {round_to = 2, exclude = ["layer2.*"]}}, "Shrink"]
[finetune]
data = "data.py:train"
epochs = 2
lr = 0.01
[schedule]
target_sparsity = 0.5
end_step = 4
frequency = 2
schedule = "linear"
"""


def test_a_schedule_recipe_equals_a_pruner_driven_by_the_finetune(tmp_path):
    _write(tmp_path, "data.py", DATA)
    model, x = stages()
    torch.manual_seed(5)
    pruner = gp.Pruner(
        model,
        example_inputs=x,
        target_sparsity=0.5,
        end_step=4,
        frequency=2,
        schedule="linear",
        score=L2Score(),
        mask=lambda s: ChannelMask(s, round_to=2, exclude=["layer2.*"]),
    )
    losses = gp.finetune(pruner.model, _data()["train"](), cross_entropy, epochs=2, lr=0.01, callbacks=[pruner])
    expected = pruner.finalize()
    assert [s for _, s in pruner.history] == [0.25, 0.5]  # steps 2 and 4 of 6
    assert widths(expected) == {"stem": 4, "layer1.0": 8, "layer1.2": 8, "layer2.0": 16, "layer2.2": 16}
    for name, text in (("r.yaml", SCHEDULE_YAML), ("r.toml", SCHEDULE_TOML)):
        torch.manual_seed(5)
        result = gp.apply_recipe(model, _write(tmp_path, name, text), example_inputs=x)
        assert result.losses == tuple(losses)
        _same(result.model, expected)
        assert gp.recipe_pruner(tmp_path / name, model, example_inputs=x).target == 0.5


def test_a_schedule_needs_finetune_data_and_a_mask_without_its_ratio(tmp_path):
    _write(tmp_path, "data.py", DATA)
    model, x = stages()
    file = _write(
        tmp_path, "r.yaml", SCHEDULE_YAML.replace("finetune: {data: data.py:train, epochs: 2, lr: 0.01}\n", "")
    )
    with pytest.raises(ArgumentError, match=r"line 5: schedule: prunes during a fine-tune: add finetune"):
        gp.apply_recipe(model, file, example_inputs=x)
    with pytest.raises(
        ArgumentError, match=r"schedule: this recipe prunes during fine-tuning: run it with gp.apply_recipe"
    ):
        gp.recipe(file)
    file = _write(tmp_path, "r.yaml", SCHEDULE_YAML.replace("{round_to: 2,", "{ratio: 0.3, round_to: 2,"))
    with pytest.raises(ArgumentError, match=r"line 3: passes\[1\].ChannelMask.ratio: the schedule sets the ratio"):
        gp.apply_recipe(model, file, example_inputs=x)


@pytest.mark.parametrize(
    "text, named",
    [
        ("finetune: {data: data.py:train, epochs: 0}\n", "line 5: finetune.epochs: must be a positive int, got 0"),
        ("finetune: {data: data.py:train, lr: -1}\n", "finetune.lr: must be a positive number, got -1"),
        ("finetune: {data: data.py:train, distill: maybe}\n", "finetune.distill: must be true or false"),
        ("finetune: {epochs: 2}\n", "line 5: finetune: needs data: FILE.py:FUNCTION"),
        ("finetune: {data: data.py:train, batch: 8}\n", "finetune.batch: unknown key"),
        ("finetune: {data: nope.py:train}\n", "finetune.data: "),
        ("finetune: {data: data.py}\n", "finetune.data: names a function as FILE.py:FUNCTION"),
        ("calibration: 42\n", "line 5: calibration: names a function as FILE.py:FUNCTION"),
        ("calibration: data.py:calibration\n", "calibration: no pass takes calibration data"),
        ("schedule: {target_sparsity: 1.5, end_step: 4}\n", "schedule.target_sparsity: must be in [0, 1)"),
        ("schedule: {target_sparsity: 0.5}\n", "schedule: needs end_step"),
        (
            "schedule: {target_sparsity: 0.5, end_step: 4, per: batch}\n",
            "schedule.per: must be one of ('step', 'epoch')",
        ),
        (
            "schedule: {target_sparsity: 0.5, end_step: 4, start_step: 4}\n",
            "schedule.start_step: must be below end_step",
        ),
        ("schedule: {target_sparsity: 0.5, end_step: 4, warmup: 1}\n", "schedule.warmup: unknown key"),
        ("schedule: [0.5]\n", "schedule: must be a mapping of Pruner arguments"),
    ],
)
def test_bad_recipe_sections_name_their_key(tmp_path, text, named):
    _write(tmp_path, "data.py", DATA)
    file = _write(tmp_path, "r.yaml", "passes:\n  - L2Score: {}\n  - ChannelMask: {ratio: 0.5}\n  - Shrink\n" + text)
    with pytest.raises(ArgumentError) as err:
        gp.apply_recipe(Stages().eval(), file, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert named in str(err.value)


# -- the command line ----------------------------------------------------------------------------
def test_the_cli_prunes_on_a_schedule_and_its_written_recipe_reproduces_it(tmp_path, monkeypatch, capsys):
    _write(tmp_path, "data.py", DATA)
    _write(tmp_path, "make.py", FACTORY)
    _write(tmp_path, "r.yaml", SCHEDULE_YAML)
    monkeypatch.chdir(tmp_path)
    source = "make.py:build"
    assert main(["prune", source, "--recipe", "r.yaml", "--out", "a"]) == 0
    printed = capsys.readouterr().out
    assert "while fine-tuning (schedule)" in printed and "fine-tuned 2 epoch(s)" in printed
    written = read_recipe(tmp_path / "a" / "recipe.yaml")[0]
    assert written["schedule"]["target_sparsity"] == 0.5
    assert written["finetune"]["data"] == f"{tmp_path / 'data.py'}:train"
    # the written recipe, run from another folder, gives the same model, bit for bit
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert (
        main(["prune", f"{tmp_path / 'make.py'}:build", "--recipe", str(tmp_path / "a" / "recipe.yaml"), "--out", "b"])
        == 0
    )
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    assert (a / "plan.json").read_text() == (b / "plan.json").read_text()
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    report = json.loads((a / "report.json").read_text())
    assert report["params"][1] < report["params"][0]


def test_cli_flags_override_the_recipes_finetune(tmp_path, monkeypatch, capsys):
    _write(tmp_path, "data.py", DATA)
    _write(tmp_path, "make.py", FACTORY)
    _write(tmp_path, "r.yaml", FINETUNE_YAML)
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "make.py:build", "--recipe", "r.yaml", "--epochs", "1", "--distill", "--out", "o"]) == 0
    assert "fine-tuned 1 epoch(s)" in capsys.readouterr().out
    written = read_recipe(tmp_path / "o" / "recipe.yaml")[0]["finetune"]
    assert written["epochs"] == 1 and written["distill"] is True and written["lr"] == 0.01
    # a flag-only run records its fine-tune too
    assert main(["prune", "make.py:build", "--ratio", "0.5", "--finetune", "data.py:train", "--out", "p"]) == 0
    assert read_recipe(tmp_path / "p" / "recipe.yaml")[0]["finetune"]["data"] == f"{tmp_path / 'data.py'}:train"


def test_cli_refuses_a_schedule_without_data_and_fine_tune_flags_without_a_fine_tune(tmp_path, monkeypatch, capsys):
    _write(tmp_path, "data.py", DATA)
    _write(tmp_path, "make.py", FACTORY)
    _write(tmp_path, "r.yaml", SCHEDULE_YAML.replace("finetune: {data: data.py:train, epochs: 2, lr: 0.01}\n", ""))
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "make.py:build", "--recipe", "r.yaml", "--out", "o"]) == 2
    assert "schedule: prunes during a fine-tune" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # --finetune gives the schedule its data
    assert main(["prune", "make.py:build", "--recipe", "r.yaml", "--finetune", "data.py:train", "--out", "o"]) == 0
    assert main(["prune", "make.py:build", "--ratio", "0.5", "--epochs", "2", "--out", "q"]) == 2
    assert "give --finetune" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
