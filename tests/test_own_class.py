"""The user's own model comes back: its class, methods, modules, train/eval and checkpoints, holding
exactly what the pruned graph computes; where its source cannot express the result, the graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests import models
from tests.helpers import assert_exact, run

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _both(model, x, passes):
    """(own-class result, graph result) of the same passes."""
    return gp.compile(model, passes, example_inputs=x), gp.compile(model, passes, example_inputs=x, output="graph")


VISION = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(),
    "vit": lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, dropout=0.1
    ),
    "timm_resnet18d": lambda: timm.create_model("resnet18d"),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0", drop_rate=0.2),
}


@pytest.mark.parametrize("name", list(VISION))
def test_vision_models_come_back_in_their_own_class_with_their_methods(name):
    torch.manual_seed(0)
    model = models.randomize_bn(VISION[name]()).eval()
    x = (torch.randn(2, 3, 32, 32),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk, graph = _both(masked, x, [Shrink()])
    assert type(shrunk) is type(model)
    assert_exact(graph, shrunk, x)
    assert gp.count_params(shrunk) < gp.count_params(model)
    if name.startswith("timm"):
        features = shrunk.forward_features(x[0])
        torch.testing.assert_close(shrunk.forward_head(features), run(shrunk, x))
        shrunk.reset_classifier(5)
        assert run(shrunk, x).shape == (2, 5)
    # trains with the user's own optimizer code, and switches dropout with train()/eval()
    opt = torch.optim.SGD(shrunk.parameters(), lr=0.01)
    shrunk.train()
    F.cross_entropy(shrunk(x[0]), torch.tensor([0, 1])).backward()
    opt.step()
    shrunk.eval()
    torch.testing.assert_close(run(shrunk, x), run(shrunk, x))


def test_a_masked_model_is_the_users_class_with_masks_on_its_modules():
    model = models.randomize_bn(models.Residual()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    assert isinstance(masked, models.Residual) and hasattr(masked.a, "parametrizations")
    assert int((masked.a.weight.abs().sum((1, 2, 3)) == 0).sum()) == 3  # masked, still stored
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert type(shrunk) is models.Residual and shrunk.a.out_channels == 3
    assert_exact(masked, shrunk, x)


class LiteralHeads(nn.Module):
    """view(b, t, 8, 4) with a literal head count: the source cannot hold fewer heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 8, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 32)
        return self.o(y) + x


def test_a_literal_in_the_source_falls_back_to_the_graph_and_the_summary_names_the_line():
    model = LiteralHeads().eval()
    x = (torch.randn(2, 5, 32),)
    pruned = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    assert isinstance(pruned, torch.fx.GraphModule) and pruned.q.out_features == 16
    text = str(gp.summary(model, pruned, x))
    assert "returned as a graph module" in text and "test_own_class.py" in text and "view(b, t, 8, 4)" in text
    rewritten = pruned.graphprune_report[-1].details["note"].split("rewrote constants at")[1]
    assert rewritten.count("view(b, t, 8, 4)") == 1  # the line of q, k and v's views, named once
    with pytest.raises(gp.GraphPruneError, match="cannot be written back into LiteralHeads"):
        gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x, output="module")


def test_a_saved_model_loads_back_in_its_class_and_its_state_dict_fits_a_loaded_skeleton(tmp_path):
    model = models.randomize_bn(models.Grouped()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    pruned = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    gp.save(pruned, tmp_path / "ckpt")
    loaded = gp.load(model, tmp_path / "ckpt", example_inputs=x)
    assert type(loaded) is models.Grouped
    assert_exact(pruned, loaded, x)
    torch.save(pruned.state_dict(), tmp_path / "weights.pt")  # the user's own checkpoint code
    skeleton = gp.load(models.Grouped(), tmp_path / "ckpt", example_inputs=x)
    skeleton.load_state_dict(torch.load(tmp_path / "weights.pt"))
    assert_exact(pruned, skeleton, x)


def test_load_in_place_rebuilds_the_given_model_and_a_plan_that_does_not_replay_leaves_it_as_it_was(tmp_path):
    model = models.randomize_bn(models.Grouped()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    pruned = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    gp.save(pruned, tmp_path / "ckpt")
    fresh = models.Grouped().eval()  # other weights: the loaded ones must replace them
    loaded = gp.load(fresh, tmp_path / "ckpt", example_inputs=x, inplace=True)
    assert loaded is fresh
    assert_exact(pruned, loaded, x)
    other = models.Mlp()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(gp.CheckpointError, match="does not fit"):
        gp.load(other, tmp_path / "ckpt", example_inputs=(torch.randn(2, 10),), inplace=True)
    assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def _causal_lm(name):
    torch.manual_seed(0)
    T = transformers
    if name == "llama":
        return T.LlamaForCausalLM(
            T.LlamaConfig(
                vocab_size=100,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=8,
                num_key_value_heads=2,
                intermediate_size=128,
                attention_dropout=0.1,
            )
        ).eval()
    return T.GPT2LMHeadModel(
        T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    ).eval()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_pruned_causal_lm_generates_with_its_cache_what_the_graph_computes_step_by_step(name):
    model = _causal_lm(name)
    ids = torch.randint(3, 100, (1, 8))
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs={"input_ids": ids})
    shrunk, graph = _both(masked, {"input_ids": ids}, [Shrink()])
    assert type(shrunk) is type(model)
    out = shrunk.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):  # the graph has no cache: the whole sequence at every step
            seq = torch.cat([seq, graph(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tolist() == seq.tolist()
    shrunk.gradient_checkpointing_enable()
    shrunk.train()
    shrunk(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in shrunk.parameters() if p.requires_grad)


def test_save_pretrained_round_trips_where_the_config_can_say_it_and_is_refused_where_not(tmp_path):
    model = _causal_lm("llama")
    x = {"input_ids": torch.randint(3, 100, (2, 8))}
    uniform = gp.compile(model, [L2Score(), ChannelMask({"ffn": 0.5, "head": 0.5}), Shrink()], example_inputs=x)
    assert (uniform.config.intermediate_size, uniform.config.num_key_value_heads) == (64, 1)
    uniform.save_pretrained(tmp_path / "hf")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(run(again, x).logits, run(uniform, x).logits)
    ffn = [g.key for g in gp.analyze(model, x).groups if g.kind == "ffn"]
    ragged = gp.compile(model, [L2Score(), ChannelMask({ffn[0]: 0.5}), Shrink()], example_inputs=x)
    widths = {m.weight.shape[0] for n, m in ragged.named_modules() if n.endswith("up_proj")}
    assert len(widths) > 1  # per-layer widths: a LlamaConfig cannot say them
    with pytest.raises(gp.GraphPruneError, match="graphprune.save"):
        ragged.save_pretrained(tmp_path / "no")
    gp.save(ragged, tmp_path / "gp")
    loaded = gp.load(model, tmp_path / "gp", example_inputs=x)
    assert type(loaded) is transformers.LlamaForCausalLM
    torch.testing.assert_close(run(loaded, x).logits, run(ragged, x).logits)


def test_hugging_face_models_switch_dropout_with_train_and_eval():
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.5,
    )
    model = transformers.BertModel(config).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 8))}
    pruned = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    assert type(pruned) is transformers.BertModel
    with torch.no_grad():
        first = pruned(**x).last_hidden_state
        pruned.train()
        assert not torch.equal(pruned(**x).last_hidden_state, first)
        pruned.eval()
        torch.testing.assert_close(pruned(**x).last_hidden_state, first)
