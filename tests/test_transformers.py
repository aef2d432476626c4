"""Transformers with no hints: Hugging Face models trace through torch.export; FFN neurons and whole
attention heads prune exactly; reshape constants that carry the number of heads are rewritten.

Grouped-query attention, hidden size and vocabulary are the transformers issue's next steps; until
then the channels that reach them are frozen and named.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.analysis import Scores
from graphprune.ir import norms
from graphprune.ir.modules import MaskedLayerNorm
from graphprune.passes import ChannelMask, L2Score, ReinsertZeros, Shrink
from tests import models
from tests.helpers import assert_exact, prune, run

transformers = pytest.importorskip("transformers")


def small_bert():
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_bert_heads_and_ffn_neurons_prune_exactly_with_no_hints():
    model = small_bert()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8))}
    deps = gp.analyze_dependencies(gp.trace(model, example_inputs=inputs), inputs)
    kinds = {g.key: (g.kind, g.size) for g in deps.groups}
    assert kinds == {
        "encoder.layer.0.attention.self.query": ("head", 4),
        "encoder.layer.1.attention.self.query": ("head", 4),
        "encoder.layer.0.intermediate.dense": ("ffn", 64),
        "encoder.layer.1.intermediate.dense": ("ffn", 64),
    }
    masked = gp.compile(model, [L2Score(), ChannelMask({"head": 0.25, "ffn": 0.5})], example_inputs=inputs)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=inputs)
    assert_exact(masked, shrunk, inputs)
    out = run(shrunk, inputs)
    assert type(out) is type(run(model, inputs)) and out.last_hidden_state.shape == (2, 8, 32)
    layer = "encoder.layer.0."
    assert shrunk.get_submodule(layer + "intermediate.dense").weight.shape == (32, 32)
    assert shrunk.get_submodule(layer + "attention.self.query").weight.shape == (24, 32)  # 3 heads of 8 kept
    assert shrunk.get_submodule(layer + "attention.output.dense").weight.shape == (32, 24)
    assert gp.count_macs(shrunk, inputs) < gp.count_macs(model, inputs)
    # the batch stays dynamic: the pruned module runs at another batch size
    assert run(shrunk, {"input_ids": torch.randint(0, 100, (5, 8))}).last_hidden_state.shape == (5, 8, 32)


class SelfAttention(nn.Module):
    """Heads written with constants, as many models do: view(b, t, self.heads, self.dim)."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.dim = heads, width // heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, self.heads * self.dim)) + x


def test_head_count_constants_are_rewritten_in_the_graph_and_in_the_module():
    torch.manual_seed(0)
    model = SelfAttention().eval()
    x = (torch.randn(2, 5, 32),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    graph = gp.compile(masked, [Shrink()], example_inputs=x, output="graph")
    views = [n for n in graph.graph.nodes if n.target in ("view", "reshape")]
    assert all(2 in n.args[1:] or 16 in n.args[1:] for n in views)  # 4 heads -> 2, 32 wide -> 16
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)  # the source reads self.heads: set, verified
    assert type(shrunk) is SelfAttention and shrunk.heads == 2 and shrunk.get_submodule("q").out_features == 16
    assert_exact(masked, shrunk, x)
    assert_exact(graph, shrunk, x)


def _hf(name):
    T = transformers
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 8))
    small = dict(vocab_size=100, num_hidden_layers=2)
    builders = {
        "roberta": lambda: T.RobertaModel(
            T.RobertaConfig(
                hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=40, **small
            )
        ),
        "distilbert": lambda: T.DistilBertModel(
            T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
        ),
        "vit": lambda: T.ViTModel(
            T.ViTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                image_size=32,
                patch_size=8,
            )
        ),
        "gpt2": lambda: T.GPT2Model(
            T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, use_cache=False)
        ),
        "llama": lambda: T.LlamaModel(
            T.LlamaConfig(
                hidden_size=64,
                num_attention_heads=8,
                num_key_value_heads=2,
                intermediate_size=128,
                use_cache=False,
                **small,
            )
        ),
        "qwen2": lambda: T.Qwen2Model(
            T.Qwen2Config(
                hidden_size=64,
                num_attention_heads=8,
                num_key_value_heads=2,
                intermediate_size=128,
                use_cache=False,
                **small,
            )
        ),
        "qwen3": lambda: T.Qwen3Model(  # q and k normalised per head (RMSNorm over head_dim)
            T.Qwen3Config(
                hidden_size=64,
                num_attention_heads=8,
                num_key_value_heads=2,
                head_dim=8,
                intermediate_size=128,
                use_cache=False,
                **small,
            )
        ),
        "t5": lambda: T.T5Model(
            T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, use_cache=False)
        ),
    }
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32)} if name == "vit" else {"input_ids": ids}
    if name == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, 100, (2, 6))
    return builders[name]().eval(), inputs


# (kinds of groups found, units per head group): GQA prunes whole kv groups (a kv head with its q heads);
# GPT-2's fused qkv is split with constant sizes, which Shrink rewrites; T5's per-head position bias
# (an embedding with a column per head, shared by every layer of a stack) ties its self-attention heads
# across layers; its cross-attention heads get a constant zero bias and stay (frozen and named).
HF = {
    "roberta": {"ffn", "head"},
    "distilbert": {"ffn", "head"},
    "vit": {"ffn", "head"},
    "gpt2": {"ffn", "head"},
    "llama": {"ffn", "head"},
    "qwen2": {"ffn", "head"},
    "qwen3": {"ffn", "head"},
    "t5": {"ffn", "head"},
}


@pytest.mark.parametrize("name", list(HF))
def test_hugging_face_models_prune_with_no_hints(name):
    model, inputs = _hf(name)
    deps = gp.analyze_dependencies(gp.trace(model, example_inputs=inputs), inputs)
    assert {g.kind for g in deps.groups} == HF[name]
    if name in ("llama", "qwen2", "qwen3"):
        assert all(g.size == 2 for g in deps.groups if g.kind == "head")  # 8 q heads over 2 kv heads
    if name == "t5":  # encoder and decoder self-attention: one group each, over both layers
        heads = [g for g in deps.groups if g.kind == "head"]
        assert len(heads) == 2 and all(g.size == 4 for g in heads)
        assert {
            "encoder.block.1.layer.0.SelfAttention.q",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
        } <= set(heads[0].modules)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=inputs)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=inputs)
    # float32 (some exported graphs pin dtypes); the structure is the same as the original's
    a, b = run(masked, inputs), run(shrunk, inputs)
    assert type(a) is type(run(model, inputs))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert gp.count_params(shrunk) < gp.count_params(model)
    assert gp.count_macs(shrunk, inputs) < gp.count_macs(model, inputs)


def test_head_sensitivity_is_the_gradient_of_a_head_gate():
    from graphprune.passes import HeadSensitivityScore

    torch.manual_seed(0)
    model = SelfAttention().eval()
    x = torch.randn(2, 5, 32)
    target = torch.randn(2, 5, 32)
    loss = lambda out, t: (out - t).pow(2).sum()  # noqa: E731
    seen = {}

    def grab(gm, ctx):
        seen.update(ctx.cached(Scores))
        return gp.PassResult(gm, False)

    gp.compile(model, [HeadSensitivityScore([((x,), target)], loss), grab], example_inputs=(x,))
    head_key = next(k for k in seen if seen[k].numel() == 4)
    # reference: a gate on each head's output, differentiated directly
    gate = torch.ones(4, requires_grad=True)
    b, t, _ = x.shape
    q, k, v = (p(x).view(b, t, 4, 8).transpose(1, 2) for p in (model.q, model.k, model.v))
    y = F.scaled_dot_product_attention(q, k, v) * gate.view(1, 4, 1, 1)
    loss(model.o(y.transpose(1, 2).reshape(b, t, 32)) + x, target).backward()
    torch.testing.assert_close(seen[head_key], gate.grad.abs().double(), rtol=1e-5, atol=1e-6)


def test_global_scope_ranks_each_kind_apart():
    """scope='global' with ratios per kind: heads are ranked against heads, FFN channels against channels."""
    torch.manual_seed(0)
    model = nn.Sequential(SelfAttention(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), SelfAttention()).eval()
    x = (torch.randn(2, 5, 32),)
    weak = torch.cat([torch.arange(0, 16), torch.arange(24, 32)])  # heads 0, 1 and 3 of the second block
    with torch.no_grad():
        for p in (model[4].q, model[4].k, model[4].v):
            p.weight[weak] *= 0.01
        model[4].o.weight[:, weak] *= 0.01
    masked = gp.compile(model, [L2Score(), ChannelMask({"*": 0.25, "head": 0.5}, scope="global")], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    assert shrunk.get_submodule("4.q").out_features == 8  # 4 of 8 heads removed: the 3 weak ones and 1 of block 0
    assert shrunk.get_submodule("0.q").out_features == 24
    assert shrunk.get_submodule("1").out_features == 48  # a quarter of the FFN channels


def test_a_pruned_bert_saves_and_loads_back_with_identical_outputs(tmp_path):
    """Weights in safetensors, structure as a plan replayed on a fresh model: no pickle anywhere."""
    model = small_bert()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8))}
    pruned = gp.compile(
        model,
        [ReinsertZeros(), L2Score(), ChannelMask({"*": 0.5, "head": 0.25, "hidden": 0.25}), Shrink()],
        example_inputs=inputs,
    )
    gp.save(pruned, tmp_path)
    loaded = gp.load(small_bert(), tmp_path, example_inputs=inputs)
    other = {"input_ids": torch.randint(0, 100, (3, 8))}
    expected, got = run(pruned, other), run(loaded, other)
    assert type(got) is type(expected)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=0, atol=0)
    assert loaded.get_submodule("encoder.layer.0.attention.self.query").weight.shape == (
        24,
        24,
    )  # 3 heads of 8, 24 hidden


class FusedQKV(nn.Module):
    """One projection for q, k and v, split with constant sizes (as GPT-2 does)."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.width, self.heads, self.dim = width, heads, width // heads
        self.qkv, self.o = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(self.width, dim=2)
        q, k, v = (p.view(b, t, self.heads, self.dim).transpose(1, 2) for p in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, self.heads * self.dim)) + x


def test_a_fused_qkv_split_with_constant_sizes_prunes_whole_heads():
    torch.manual_seed(0)
    model = FusedQKV().eval()
    x = (torch.randn(2, 5, 32),)
    deps = gp.analyze_dependencies(gp.trace(model, example_inputs=x), x)
    assert [(g.kind, g.size) for g in deps.groups] == [("head", 4)]
    masked, shrunk = prune(model, x, 0.5)
    assert_exact(masked, shrunk, x)
    assert shrunk.get_submodule("qkv").out_features == 48  # 2 heads of 8, for q, k and v
    assert type(shrunk) is FusedQKV and (shrunk.width, shrunk.heads) == (16, 2)
    graph = gp.compile(masked, [Shrink()], example_inputs=x, output="graph")
    (split,) = [n for n in graph.graph.nodes if n.target == "split"]
    assert split.args[1] == [16, 16, 16]


def test_head_ratios_on_a_model_without_attention_are_refused_and_rounding_keeps_a_head():
    x = (torch.randn(2, 5, 32),)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.raises(gp.PreconditionError, match="'head'"):
        gp.compile(mlp, [L2Score(), ChannelMask({"head": 0.5})], example_inputs=x)
    model = SelfAttention(heads=2).eval()
    masked = gp.compile(model, [L2Score(), ChannelMask({"head": 0.99})], example_inputs=x)
    assert gp.summary(model, masked, x).groups == (("q", 2, 1),)  # never zero heads: at least min_channels stay


def test_hidden_size_prunes_exactly_through_embeddings_layer_norms_and_residuals():
    """The residual stream of BERT: embeddings, every LayerNorm, every projection.  Masked LayerNorms
    normalise over the kept channels, so mask and shrink agree; the output keeps its width (zeros)."""
    model = small_bert()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8))}
    deps = gp.analyze_dependencies(gp.trace(model, example_inputs=inputs), inputs)
    assert not any(g.kind == "hidden" for g in deps.groups)  # it reaches the output: frozen ...
    masked = gp.compile(model, [ReinsertZeros(), L2Score(), ChannelMask({"hidden": 0.25})], example_inputs=inputs)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=inputs)  # ... unless zeros are reinserted there
    assert ("embeddings.word_embeddings", 32, 24) in gp.summary(model, masked, inputs).groups
    a, b = run(masked, inputs), run(shrunk, inputs)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=1e-4, atol=1e-5)
    assert b.last_hidden_state.shape == (2, 8, 32) and bool(
        (b.last_hidden_state[..., a.last_hidden_state.abs().sum((0, 1)) == 0] == 0).all()
    )
    assert shrunk.get_submodule("embeddings.word_embeddings").weight.shape == (100, 24)
    assert shrunk.get_submodule("encoder.layer.1.output.LayerNorm").weight.shape == (24,)
    assert gp.count_macs(shrunk, inputs) < 0.85 * gp.count_macs(model, inputs)


class TinyEncoder(nn.Module):
    """nn.Embedding and nn.LayerNorm modules, symbolically traced."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm1 = nn.Embedding(50, 32), nn.LayerNorm(32)
        self.attn, self.norm2 = SelfAttention(), nn.LayerNorm(32)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, ids):
        h = self.norm1(self.embed(ids))
        h = self.norm2(self.attn(h))
        return self.head((h + self.ffn(h)).mean(1))


def test_hidden_size_of_a_symbolically_traced_model_updates_module_attributes():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    x = (torch.randint(0, 50, (2, 7)),)
    deps = gp.analyze_dependencies(gp.trace(model, example_inputs=x), x)
    assert {g.kind for g in deps.groups} == {"hidden", "head", "ffn"}
    graph = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x, output="graph")
    assert any(n.target is norms.masked_layer_norm for n in graph.graph.nodes)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)  # the LayerNorm modules normalise
    assert isinstance(masked.norm1, MaskedLayerNorm)  # over the kept channels too
    assert_exact(graph, masked, x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    assert type(shrunk) is TinyEncoder and type(shrunk.norm1) is nn.LayerNorm
    assert shrunk.embed.embedding_dim == 16 and shrunk.norm1.normalized_shape == (16,) and shrunk.head.in_features == 16


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class GatedSum(nn.Module):
    """A mean of squares (RMSNorm) and a sum over channels after a sigmoid, where masked channels are 0.5, not 0."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, 32), RMSNorm(32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.norm(self.up(x))
        return self.down(h) + torch.sigmoid(h).sum(-1, keepdim=True)


def test_means_and_sums_over_pruned_channels_reduce_over_the_kept_ones():
    torch.manual_seed(0)
    model = GatedSum().eval()
    x = (torch.randn(4, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    assert sum(n.target is norms.masked_reduce for n in masked.graph.nodes) == 2
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert_exact(masked, shrunk, x)
    assert shrunk.norm.weight.shape == (16,) and not any("graphprune_keep" in k for k in shrunk.state_dict())


@pytest.mark.parametrize("name", ["llama", "distilbert"])
def test_hidden_size_prunes_through_rms_norm_and_layer_norm(name):
    model, inputs = _hf(name)
    masked = gp.compile(
        model, [ReinsertZeros(), L2Score(), ChannelMask({"*": 0.25, "hidden": 0.25})], example_inputs=inputs
    )
    shrunk = gp.compile(masked, [Shrink()], example_inputs=inputs)
    torch.testing.assert_close(run(shrunk, inputs), run(masked, inputs), rtol=1e-4, atol=1e-5)
    embedding = [m for m in shrunk.modules() if hasattr(m, "weight") and getattr(m, "weight").shape[0] == 100][0]
    width = 64 if name == "llama" else 32
    assert embedding.weight.shape == (100, width - width // 4)


def test_a_pruned_model_goes_back_to_its_own_class_when_the_config_can_say_it(tmp_path):
    model = small_bert()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8))}
    pruned = gp.compile(model, [L2Score(), ChannelMask({"ffn": 0.5}), Shrink()], example_inputs=inputs)
    own = gp.as_hf_model(pruned, model, inputs)
    assert type(own) is transformers.BertModel and own.config.intermediate_size == 32
    other = {"input_ids": torch.randint(0, 100, (3, 11))}  # any length: the class is not tied to the traced shapes
    shrunk_like = gp.compile(model, [L2Score(), ChannelMask({"ffn": 0.5}), Shrink()], example_inputs=other)
    torch.testing.assert_close(run(own, other).last_hidden_state, run(shrunk_like, other).last_hidden_state)
    own.train()  # trainable again
    own(**other).last_hidden_state.sum().backward()
    assert own.encoder.layer[0].intermediate.dense.weight.grad is not None
    own.save_pretrained(tmp_path)
    again = transformers.BertModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(again, other).last_hidden_state, run(own.eval(), other).last_hidden_state)


def test_fewer_kv_groups_become_fewer_heads_in_the_config_and_bert_heads_cannot():
    model, inputs = _hf("llama")
    pruned = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=inputs)
    own = gp.as_hf_model(pruned, model, inputs)
    assert (own.config.num_attention_heads, own.config.num_key_value_heads, own.config.intermediate_size) == (4, 1, 64)
    assert own.config.head_dim == model.config.head_dim  # same shapes as half the head_dim, but not the same model
    torch.testing.assert_close(run(own, inputs).last_hidden_state, run(pruned, inputs).last_hidden_state)
    bert = small_bert()
    x = {"input_ids": torch.randint(0, 100, (2, 8))}
    heads = gp.compile(bert, [L2Score(), ChannelMask({"head": 0.5}), Shrink()], example_inputs=x)
    with pytest.raises(gp.GraphPruneError, match="cannot express"):
        gp.as_hf_model(heads, bert, x)


def test_phi3_fused_qkv_cut_at_head_counts_prunes_whole_kv_groups_and_round_trips(tmp_path):
    # Phi-3 cuts q, k and v out of one projection at bounds it computes from head counts
    # (`qkv[..., :num_heads * head_dim]`): Shrink moves the bounds, the landing sets the counts its
    # forward reads, and the config says the pruned sizes
    model = models.tiny_decoder("phi3")
    x = {"input_ids": torch.randint(3, 100, (2, 8))}
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert type(shrunk) is transformers.Phi3ForCausalLM
    attention = shrunk.model.layers[0].self_attn
    assert attention.qkv_proj.out_features == (2 + 2 * 1) * 8 and attention.num_key_value_heads == 1
    assert (shrunk.config.num_attention_heads, shrunk.config.num_key_value_heads) == (2, 1)
    assert attention.config is shrunk.config and model.config.num_attention_heads == 4
    torch.testing.assert_close(run(shrunk, x).logits, run(masked, x).logits, rtol=1e-4, atol=1e-5)
    shrunk.save_pretrained(tmp_path)
    again = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(again, x).logits, run(shrunk, x).logits)


def test_phi3_layers_pruned_unevenly_then_evenly_share_the_models_config_again():
    # layers that keep other head counts than the config says hold a copy of it; once a later round
    # evens them out, the config says the counts and every layer reads the model's config again
    model = models.tiny_decoder("phi3")
    x = {"input_ids": torch.randint(3, 100, (2, 8))}
    uneven = gp.compile(
        model, [L2Score(), ChannelMask({"head": 0.5}, exclude=["model.layers.0.self_attn"]), Shrink()], example_inputs=x
    )
    first, second = (layer.self_attn for layer in uneven.model.layers)
    assert first.config is uneven.config and second.config is not uneven.config
    assert (second.config.num_attention_heads, second.config.num_key_value_heads) == (2, 1)
    with pytest.raises(gp.GraphPruneError, match="graphprune.save"):
        uneven.save_pretrained("unused")
    even = gp.compile(
        uneven,
        [L2Score(), ChannelMask({"head": 0.5}, exclude=["model.layers.1.self_attn"]), Shrink()],
        example_inputs=x,
    )
    assert all(layer.self_attn.config is even.config for layer in even.model.layers)
    assert (even.config.num_attention_heads, even.config.num_key_value_heads) == (2, 1)
    torch.testing.assert_close(run(even, x).logits, run(gp.as_hf_model(even, model, x), x).logits)


class MhaBlock(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.need_weights = need_weights

    def forward(self, x, pad):
        a, w = self.attn(x, x, x, key_padding_mask=pad, need_weights=self.need_weights)
        x = x + a
        return x + self.ffn(x) + (w.sum() if self.need_weights else 0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_prune_exactly(batch_first):
    torch.manual_seed(0)
    model = MhaBlock(batch_first).eval()
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    inputs = (x, pad)
    deps = gp.analyze_dependencies(gp.trace(model), inputs)
    assert ("attn", "head", 4) in [(g.key, g.kind, g.size) for g in deps.groups]
    masked = gp.compile(model, [ReinsertZeros(), L2Score(), ChannelMask(0.5)], example_inputs=inputs)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=inputs)
    assert_exact(masked, shrunk, inputs)
    assert shrunk.attn.num_heads == 2 and shrunk.attn.in_proj_weight.shape[0] == 3 * 2 * 8
    weights = MhaBlock(batch_first, need_weights=True).eval()  # the weights averaged over heads are used: frozen
    deps = gp.analyze_dependencies(gp.trace(weights), inputs)
    assert not any(g.kind == "head" for g in deps.groups)


def test_torchvision_vision_transformer_heads_prune():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero
    x = (torch.randn(2, 3, 32, 32),)
    masked, shrunk = prune(model, x, 0.5)
    assert_exact(masked, shrunk, x)
    assert shrunk.get_submodule("encoder.layers.encoder_layer_0.self_attention").num_heads == 2
    assert gp.count_macs(shrunk, x) < 0.9 * gp.count_macs(model, x)
