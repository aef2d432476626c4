"""GQAQueryHeads: under grouped-query attention, query heads within their kv groups are the units
(the same number from every group); the kv heads are kept.  Checked on Hugging Face Llama and
Qwen2 configs: masked ≡ shrunk in float64, the model's own class and config after Shrink, a plan
that replays, and what is refused."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.passes import ChannelMask, GQAQueryHeads, L2Score, Shrink
from tests.helpers import assert_exact, assert_same_state, run, state

transformers = pytest.importorskip("transformers")


def _model(kind: str = "llama", heads: int = 8, kv: int = 2):
    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),  # (q and k normalised per head)
    }[kind]
    # head_dim 12, so that no module attribute equals a head count by chance
    config = config_cls(
        vocab_size=100,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        use_cache=False,
        **({"head_dim": 12} if kind == "qwen3" else {}),  # (Qwen3's own default is 128)
    )
    return model_cls(config).eval(), {"input_ids": torch.randint(0, 100, (2, 12))}


def _heads(model) -> list[tuple[int, int]]:
    return [(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim) for a in _attentions(model)]


def _attentions(model):
    return [layer.self_attn for layer in model.model.layers]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_query_heads_within_kv_groups_prune_exactly_and_the_model_keeps_its_class(kind, tmp_path):
    model, x = _model(kind)
    masked = gp.compile(model, [GQAQueryHeads(), L2Score(), ChannelMask({"head": 0.25})], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)  # a second compile: the choice holds
    assert type(shrunk) is type(model)
    assert _heads(shrunk) == [(6, 2), (6, 2)]  # one query head of each group of four, both kv heads kept
    assert_exact(masked, shrunk, x)
    for attention in _attentions(shrunk):
        assert attention.num_key_value_groups == 3 and attention.o_proj.in_features == 6 * attention.head_dim
    assert shrunk.config.num_attention_heads == 6 and shrunk.config.num_key_value_heads == 2
    assert getattr(shrunk.config, "head_dim", 12) == 12  # (Qwen2 derives it from the hidden size unless given)
    # any length and batch: the new repeat count is not tied to the traced shapes
    other = {"input_ids": torch.randint(0, 100, (3, 7))}
    torch.testing.assert_close(run(shrunk, other).logits, run(masked, other).logits, rtol=1e-4, atol=1e-5)
    shrunk.save_pretrained(tmp_path)  # the config says it all: from_pretrained builds the pruned model
    back = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(back, other).logits, run(shrunk, other).logits, rtol=0, atol=0)


def test_the_same_query_heads_go_from_every_group_and_the_kv_heads_are_frozen():
    model, x = _model(heads=8, kv=2)
    default = gp.analyze(model, x)
    pruned = gp.compile(model, [GQAQueryHeads(), L2Score(), ChannelMask({"head": 0.5}), Shrink()], example_inputs=x)
    assert _heads(pruned) == [(4, 2), (4, 2)]
    # by default a kv group (its k, v and query heads) is one unit: half of them is one of the two groups
    groups = gp.compile(model, [L2Score(), ChannelMask({"head": 0.5}), Shrink()], example_inputs=x)
    assert _heads(groups) == [(4, 1), (4, 1)]
    assert not any("GQAQueryHeads" in f.site.reason for f in default.frozen)
    # q rows of head j in group 0 go with those of head j in group 1: equal masks over the two halves
    masked = gp.compile(model, [GQAQueryHeads(), L2Score(), ChannelMask({"head": 0.5})], example_inputs=x)
    for attention in _attentions(masked):
        rows = (attention.q_proj.weight != 0).any(1).view(2, 4, -1).all(-1)  # (group, head within it)
        assert torch.equal(rows[0], rows[1]) and int(rows[0].sum()) == 2
        assert (attention.k_proj.weight != 0).all()


def test_a_saved_plan_replays_the_query_heads(tmp_path):
    model, x = _model()
    pruned = gp.compile(model, [GQAQueryHeads(), L2Score(), ChannelMask({"head": 0.25}), Shrink()], example_inputs=x)
    gp.save(pruned, tmp_path)
    back = gp.load(model, tmp_path, x)
    assert _heads(back) == _heads(pruned)
    torch.testing.assert_close(run(back, x).logits, run(pruned, x).logits)


def test_without_grouped_query_attention_the_heads_are_frozen_with_the_reason():
    model, x = _model(heads=4, kv=4)  # multi-head attention: nothing to prune within a group
    deps = gp.analyze(model, x)
    assert any(g.kind == "head" for g in deps.groups)
    pruned = gp.compile(model, [GQAQueryHeads(), L2Score(), ChannelMask({"ffn": 0.5}), Shrink()], example_inputs=x)
    assert _heads(pruned) == [(4, 4), (4, 4)]
    summary = gp.summary(model, pruned, x)
    assert summary.params[1] < summary.params[0]
    before, config = state(model), model.config.to_dict()
    with pytest.raises(
        gp.GraphPruneError, match=r"ratio names .*\['head'\].*heads are frozen: GQAQueryHeads: no grouped"
    ):
        gp.compile(model, [GQAQueryHeads(), L2Score(), ChannelMask({"head": 0.5})], example_inputs=x, inplace=True)
    assert_same_state(before, model)  # refused: the model (even in place) is as it was
    assert model.config.to_dict() == config and all(a.num_key_value_groups == 1 for a in _attentions(model))


def test_eager_attention_is_frozen_with_the_reason_not_pruned_by_groups():
    model, x = _model()
    eager = type(model)(type(model.config)(**model.config.to_dict())).eval()
    eager.set_attn_implementation("eager")  # (transformers 5.25 no longer reads it from the config's arguments)
    eager.load_state_dict(model.state_dict())
    assert eager.config._attn_implementation == "eager"
    with pytest.raises(gp.GraphPruneError, match="heads are frozen: GQAQueryHeads: .*eager attention"):
        gp.compile(eager, [GQAQueryHeads(), L2Score(), ChannelMask({"head": 0.25})], example_inputs=x)
    ffn = gp.compile(eager, [GQAQueryHeads(), L2Score(), ChannelMask({"ffn": 0.5}), Shrink()], example_inputs=x)
    assert _heads(ffn) == [(8, 2), (8, 2)]  # the FFN pruned, every head kept (not whole kv groups)
