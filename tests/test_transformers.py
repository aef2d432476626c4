"""Hugging Face models trace through torch.export and their FFN neurons prune exactly, with no hints.

Attention heads, hidden size and vocabulary are the transformers issue's; until then the channels
reaching attention are frozen and named.
"""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests.helpers import assert_exact, run

transformers = pytest.importorskip("transformers")


def small_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_bert_ffn_neurons_prune_exactly_with_no_hints():
    model = small_bert()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8))}
    deps = gp.analyze_dependencies(gp.trace(model, example_inputs=inputs), inputs)
    assert [g.key for g in deps.groups] == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    assert any("scaled_dot_product_attention" in f.site.reason for f in deps.frozen)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=inputs)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=inputs)
    assert_exact(masked, shrunk, inputs)
    out = run(shrunk, inputs)
    assert type(out) is type(run(model, inputs)) and out.last_hidden_state.shape == (2, 8, 32)
    assert shrunk.get_submodule("encoder.layer.0.intermediate.dense").weight.shape == (32, 32)
    assert gp.count_macs(shrunk, inputs) < gp.count_macs(model, inputs)
    # the batch stays dynamic: the pruned module runs at another batch size
    assert run(shrunk, {"input_ids": torch.randint(0, 100, (5, 8))}).last_hidden_state.shape == (5, 8, 32)
