"""compile(), summary() and the pass pipeline as users meet them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests import models
from tests.helpers import assert_same_state, prune, run, state


def test_callers_model_is_never_changed():
    model = models.randomize_bn(models.SeedCNN())
    before = state(model)
    x = (torch.randn(1, 3, 32, 32),)
    masked, shrunk = prune(model, x)
    assert_same_state(before, model)
    assert type(model) is models.SeedCNN and model.training
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    # and the masked model survives its own shrink (masks live on copies)
    assert run(masked, x).shape == (1, 10)


def test_callers_model_unchanged_when_a_pass_fails():
    model = models.Mlp()
    before = state(model)
    with pytest.raises(gp.PreconditionError):
        gp.compile(model, [ChannelMask(0.5)], example_inputs=(torch.randn(2, 10),))
    assert_same_state(before, model)


def test_inplace_changes_the_model():
    model = models.Mlp()
    gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=(torch.randn(2, 10),), inplace=True)
    assert model.fc1.out_features == 16


def test_split_calls_equal_one_call():
    torch.manual_seed(0)
    model = models.randomize_bn(models.Residual())
    x = (torch.randn(2, 3, 8, 8),)
    one = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    _, two = prune(model, x)
    assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in two.state_dict().items()}
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[k], v)
    torch.testing.assert_close(run(one, x), run(two, x))


def test_keyword_inputs_and_same_calling_convention():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x, scale=None):
            y = self.b(torch.relu(self.a(x)))
            return {"logits": y if scale is None else y * scale}

    model = TwoInputs()
    inputs = {"x": torch.randn(3, 4)}
    pruned = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=inputs)
    out = pruned(**inputs)
    assert set(out) == {"logits"} and out["logits"].shape == (3, 2)
    assert pruned.get_submodule("a").out_features == 4
    assert pruned(inputs["x"])["logits"].shape == (3, 2)


@pytest.mark.parametrize("bad", [None, torch.randn(1, 3), 3])
def test_example_inputs_are_required_and_checked(bad):
    with pytest.raises(ValueError, match="example_inputs"):
        gp.compile(models.Mlp(), [L2Score()], example_inputs=bad)


def test_passes_must_be_passes():
    with pytest.raises(TypeError, match="not a pass"):
        gp.compile(models.Mlp(), [42], example_inputs=(torch.randn(2, 10),))
    with pytest.raises(TypeError, match="list of passes"):
        gp.compile(models.Mlp(), L2Score, example_inputs=(torch.randn(2, 10),))


def test_untraceable_model_error_names_construct_and_fix():
    class NoParts(nn.Module):  # its own forward branches on values and it calls no module: nothing traces
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 1, 1))

        def forward(self, x):
            y = x * self.weight
            if y.sum() > 0:
                return y
            return -y

    model = NoParts()
    before = state(model)
    with pytest.raises(gp.TraceError) as info:
        gp.compile(model, [L2Score()], example_inputs=(torch.randn(1, 3, 4, 4),))
    msg = str(info.value)
    assert "if y.sum() > 0" in msg and "leaf_modules" in msg and "in parts failed too" in msg
    assert_same_state(before, model)


def test_untraceable_submodule_stays_a_call_named_in_the_summary():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Conv2d(3, 3, 1)
            self.inner = models.Untraceable()
            self.post = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.post(self.inner(self.pre(x)))

    x = (torch.randn(1, 3, 4, 4),)
    model = Outer()
    out = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    assert type(out) is Outer
    torch.testing.assert_close(run(out, x), run(model, x))
    text = str(gp.summary(model, out, x))
    assert "inner" in text and "if y.sum() > 0" in text and "runs untraced" in text
    # the leaf class given by hand works as before
    out = gp.compile(
        Outer(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x, leaf_modules=[models.Untraceable]
    )
    assert run(out, x).shape == (1, 2, 4, 4)


def test_verify_each_catches_a_pass_that_breaks_its_promise():
    class Breaks(gp.PassBase):
        keeps_outputs = True

        def call(self, gm, ctx):
            with torch.no_grad():
                gm.get_submodule("fc3").bias.add_(1.0)
            return gp.PassResult(gm, True)

    with pytest.raises(gp.VerificationError, match="Breaks"):
        gp.compile(models.Mlp(), [Breaks()], example_inputs=(torch.randn(2, 10),), verify_each=True)
    gp.compile(
        models.Mlp(), [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=(torch.randn(2, 10),), verify_each=True
    )


def test_errors_name_the_pass_and_the_passes_before():
    def boom(gm, ctx):
        raise RuntimeError("kaput")

    with pytest.raises(gp.PassError, match=r"boom failed \(after L2Score\).*kaput"):
        gp.compile(models.Mlp(), [L2Score(), boom], example_inputs=(torch.randn(2, 10),))


def test_pipeline_is_a_pass_and_records_timings():
    inner = gp.Pipeline([L2Score(), ChannelMask(0.5)])
    out = gp.compile(models.Mlp(), [inner, Shrink()], example_inputs=(torch.randn(2, 10),))
    assert [r.name for r in out.graphprune_report] == ["L2Score", "ChannelMask", "Shrink"]
    assert all(r.seconds >= 0 for r in out.graphprune_report)


def test_training_mode_is_kept():
    model = models.ConvBnConv().train()
    out = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=(torch.randn(2, 3, 8, 8),))
    assert out.training
    assert torch.equal(out.get_submodule("bn").running_mean, torch.zeros(8))  # analysis ran in eval mode


def test_summary_says_what_was_masked_removed_and_frozen():
    torch.manual_seed(0)
    model = models.WithCustomOp()
    x = (torch.randn(1, 3, 6, 6),)
    masked, shrunk = prune(model, x)
    s = gp.summary(model, shrunk, x)
    text = str(s)
    assert s.state == "shrunk" and s.params[1] < s.params[0] and s.macs[1] < s.macs[0]
    assert "custom_op" in text and "frozen" in text
    assert ("a", 8, 4) in s.groups
    m = gp.summary(model, masked, x)
    assert m.state == "masked" and "run Shrink()" in str(m) and m.macs[1] == m.macs[0]
    assert s.to_dict()["groups"] == [["a", 8, 4]]


def test_inplace_is_all_or_nothing():
    model = models.Mlp()
    before = state(model)

    def boom(gm, ctx):
        raise RuntimeError("kaput")

    with pytest.raises(gp.PassError, match="kaput"):
        gp.compile(
            model, [L2Score(), ChannelMask(0.5), Shrink(), boom], example_inputs=(torch.randn(2, 10),), inplace=True
        )
    assert_same_state(before, model)
    assert model.fc1.out_features == 32 and not any(hasattr(m, "parametrizations") for m in model.modules())
    out = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=(torch.randn(2, 10),), inplace=True)
    assert out is model and model.fc1.out_features == 16


def test_an_exported_graph_switches_between_train_and_eval():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.5,
    )
    model = transformers.BertModel(config).eval()
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    gm = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=ids, output="graph")
    assert not gm.training
    with torch.no_grad():
        first = gm(**ids).last_hidden_state
        torch.testing.assert_close(gm(**ids).last_hidden_state, first)  # eval: dropout off
        gm.train()
        assert not torch.equal(gm(**ids).last_hidden_state, first)  # train: dropout on
        gm.eval()
        torch.testing.assert_close(gm(**ids).last_hidden_state, first)
