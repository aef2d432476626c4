"""Analysis without weights: a model built on the meta device has the channel groups of the real one,
and masks chosen from them apply to a real instance loaded separately."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.passes import L2Score, MaskUnits, Shrink
from tests.helpers import run

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")


def _llama():
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg), (torch.randint(0, 100, (1, 12)),)


def _qwen2():
    cfg = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg), (torch.randint(0, 100, (1, 12)),)


def _bert():
    cfg = transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    )
    return transformers.BertModel(cfg), (torch.randint(0, 100, (1, 12)),)


def _resnet():
    return torchvision.models.resnet18(num_classes=10), (torch.randn(1, 3, 64, 64),)


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "bert": _bert, "resnet": _resnet}


def _pair(name):
    torch.manual_seed(0)
    real, x = BUILDERS[name]()
    with torch.device("meta"):
        meta, _ = BUILDERS[name]()
    return real.eval(), meta.eval(), x


@pytest.mark.parametrize("name", list(BUILDERS))
def test_meta_analysis_equals_real_analysis(name):
    real, meta, x = _pair(name)
    assert all(p.is_meta for p in meta.parameters())
    on_meta, on_real = gp.analyze(meta, x), gp.analyze(real, x)
    assert on_meta.groups and on_meta.groups == on_real.groups
    assert [(f.site, f.channels) for f in on_meta.frozen] == [(f.site, f.channels) for f in on_real.frozen]
    assert all(p.is_meta for p in meta.parameters())  # nothing was materialised


def test_masks_chosen_on_a_meta_model_apply_to_the_real_one():
    real, meta, x = _pair("llama")
    groups = gp.analyze(meta, x).groups
    units = {g.key: list(range(0, g.size, 2)) for g in groups if g.kind in ("ffn", "head") and g.size > 1}
    assert units
    masked = gp.compile(real, [MaskUnits(units)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert gp.count_params(shrunk) < gp.count_params(real)
    torch.testing.assert_close(run(shrunk, x).logits, run(masked, x).logits)


def test_compile_refuses_a_meta_model_and_says_what_to_use():
    _, meta, x = _pair("resnet")
    with pytest.raises(gp.ArgumentError, match="meta device.*analyze"):
        gp.compile(meta, [L2Score(), Shrink()], example_inputs=x)
    with pytest.raises(gp.ArgumentError, match="meta device.*analyze"):  # not "the plan does not fit"
        gp.apply_plan(meta, {"steps": [{"op": "shrink"}]}, x)
    assert all(p.is_meta for p in meta.parameters())
