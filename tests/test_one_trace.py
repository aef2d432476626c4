"""One trace per pipeline: a model compiled again (mask, then Shrink; a Pruner's steps) re-uses
the graph and the channel analysis of the compile that made it, and traces afresh whenever
that graph no longer describes the model."""

from __future__ import annotations

import importlib
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphprune as gp
import graphprune.analysis.dependency as dependency
import graphprune.memo as memo
from graphprune.passes import ChannelMask, L2Score, Shrink
from tests import models
from tests.helpers import assert_exact, run

compile_module = importlib.import_module("graphprune.compile")  # (graphprune.compile is the function)

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")


@pytest.fixture
def counts(monkeypatch):
    """How often compile() traces a model and the channel analysis runs."""
    seen = {"traces": 0, "analyses": 0}
    trace, analyze = compile_module.trace, dependency.analyze_dependencies

    def counting_trace(model, *args, **kwargs):
        seen["traces"] += not isinstance(model, fx.GraphModule)  # (a graph module is used as it is)
        return trace(model, *args, **kwargs)

    def counting_analysis(*args, **kwargs):
        seen["analyses"] += 1
        return analyze(*args, **kwargs)

    monkeypatch.setattr(compile_module, "trace", counting_trace)
    monkeypatch.setattr(dependency, "analyze_dependencies", counting_analysis)
    monkeypatch.setattr(memo, "_BY_STRUCTURE", type(memo._BY_STRUCTURE)())  # (nothing from other tests)
    return seen


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval(), (torch.randint(0, 64, (1, 12)),)


CASES = {
    "resnet18": lambda: (torchvision.models.resnet18().eval(), (torch.randn(1, 3, 64, 64),)),
    "llama (torch.export)": _llama,
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_masked_model_shrinks_in_a_second_compile_without_a_new_trace(name, counts):
    torch.manual_seed(0)
    model, x = CASES[name]()
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    assert counts == {"traces": 1, "analyses": 1}
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert counts == {"traces": 1, "analyses": 1}, "the second compile traced or analysed again"
    assert type(shrunk) is type(model)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    # (float32: the masked Llama is torch.export's graph, which checks that its buffers stay float32)
    out, expected = run(shrunk, x), run(masked, x)
    if isinstance(out, dict):  # (a key/value cache in the model's own output, not in the graph's)
        out, expected = out["logits"], expected["logits"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_compiling_the_same_model_again_reuses_its_graph_and_gives_the_same_result(counts):
    torch.manual_seed(0)
    model, x = models.Residual().eval(), (torch.randn(2, 3, 8, 8),)
    passes = [L2Score(), ChannelMask(0.5), Shrink()]
    first = gp.compile(model, passes, example_inputs=x)
    again = gp.compile(model, passes, example_inputs=x)
    assert counts == {"traces": 1, "analyses": 1}
    for (k, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_a_changed_model_is_traced_again(counts):
    torch.manual_seed(0)
    model, x = models.Residual().eval(), (torch.randn(2, 3, 8, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    masked.train()  # another mode: the graph may differ (dropout, batch statistics)
    gp.compile(masked, [Shrink()], example_inputs=x)
    assert counts["traces"] == 2
    gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=(torch.randn(3, 3, 8, 8),))  # other shapes
    assert counts["traces"] == 3
    model.head = nn.Conv2d(8, 3, 1)  # a module replaced
    gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    assert counts["traces"] == 4


class _Switchable(nn.Module):
    scaled = False  # read from the class unless an instance sets its own

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return y * 2 if self.scaled else y


def test_a_forward_that_changed_unseen_is_caught_by_the_landing_and_traced_again(counts, monkeypatch):
    torch.manual_seed(0)
    model, x = _Switchable().eval(), (torch.randn(2, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    monkeypatch.setattr(_Switchable, "scaled", True)  # a class attribute the memo's key does not see
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert counts["traces"] == 2
    assert type(shrunk) is _Switchable and shrunk.b.in_features < 16
    assert_exact(masked, shrunk, x)


class _RefusesScaling(gp.PassBase):
    def call(self, gm, ctx):
        if any(n.target in (torch.mul, operator.mul, torch.ops.aten.mul.Tensor) for n in gm.graph.nodes):
            raise gp.PassError("this pass cannot handle a scaled output")
        return gp.PassResult(gm, False)


def test_a_pass_that_fails_on_a_remembered_graph_is_run_again_on_a_fresh_trace(counts, monkeypatch):
    # a failure on a graph remembered for another instance (or for the model, before a change the key
    # cannot see) may be the stale graph's: only a fresh trace's failure is the model's
    torch.manual_seed(0)
    x = (torch.randn(2, 8),)
    monkeypatch.setattr(_Switchable, "scaled", True)
    gp.compile(_Switchable().eval(), [L2Score()], example_inputs=x)
    monkeypatch.setattr(_Switchable, "scaled", False)
    model = _Switchable().eval()
    result = gp.compile(model, [_RefusesScaling()], example_inputs=x)
    assert counts["traces"] == 2
    assert_exact(model, result, x)
    monkeypatch.setattr(_Switchable, "scaled", True)  # an error a fresh trace also meets is raised
    with pytest.raises(gp.PassError, match="scaled output"):
        gp.compile(model, [_RefusesScaling()], example_inputs=x)
    assert counts["traces"] == 3


def test_an_error_a_stale_graph_cannot_cause_is_raised_without_a_fresh_trace(counts):
    model, x = _Switchable().eval(), (torch.randn(2, 8),)
    gp.compile(model, [L2Score()], example_inputs=x)
    with pytest.raises(gp.PreconditionError, match="needs scores"):  # (the passes' order, not the graph)
        gp.compile(model, [ChannelMask(0.5)], example_inputs=x)
    assert counts["traces"] == 1


class _Kept(nn.Module):
    keep = slice(None)

    def __init__(self, keep: slice) -> None:
        super().__init__()
        self.a, self.b, self.keep = nn.Linear(8, 8), nn.Linear(4, 2), keep

    def forward(self, x):
        return self.b(self.a(x)[:, self.keep])


def test_a_module_attribute_of_any_kind_keys_the_memo():
    # a slice (not hashable before Python 3.12), True against 1, a conjugated tensor
    x = (torch.randn(2, 8),)
    first, second = _Kept(slice(0, 4)).eval(), _Kept(slice(4, 8)).eval()
    a = gp.compile(first, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    b = gp.compile(second, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    assert type(a) is type(b) is _Kept and a.a.out_features == b.a.out_features == 4  # (half read, half not)
    assert (a.keep, b.keep) == (slice(0, 2), slice(2, 8))  # the slice attribute moved with the channels
    assert memo._key(first, (), x) != memo._key(second, (), x)
    flags = [_Kept(slice(0, 4)) for _ in range(2)]
    flags[0].flag, flags[1].flag = True, 1
    flags[0].phase = torch.randn(2, dtype=torch.cfloat).conj()
    assert memo._key(flags[0], (), x) != memo._key(flags[1], (), x)


class _Heads(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, 8 // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


def test_instances_that_differ_in_a_plain_attribute_are_other_structures(counts):
    # the same tensors, another head count: the graph of one is never the other's (its heads
    # differ), and the memo's key tells them apart before any pass runs on the wrong graph
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 8),)
    runs = []

    class Counting(gp.PassBase):
        def call(self, gm, ctx):
            runs.append(gm)
            return gp.PassResult(gm, False)

    passes = [L2Score(), ChannelMask({"head": 0.5}), Counting()]
    two = gp.compile(_Heads(2).eval(), passes, example_inputs=x)
    four = gp.compile(_Heads(4).eval(), passes, example_inputs=x)
    assert counts["traces"] == 2 and counts["analyses"] == 2 and len(runs) == 2  # (no run on the other graph)
    assert two.graphprune_report[1].details["groups"] == {"q": (2, 1)}  # (ChannelMask's record: heads, kept)
    assert four.graphprune_report[1].details["groups"] == {"q": (4, 2)}
    gp.compile(_Heads(4).eval(), passes, example_inputs=x)  # the same structure: the same graph
    assert counts["traces"] == 2 and len(runs) == 3


def test_a_pruner_traces_once_over_all_its_steps(counts):
    torch.manual_seed(0)
    model, x = models.Residual(), (torch.randn(2, 3, 8, 8),)
    pruner = gp.Pruner(
        model, example_inputs=x, target_sparsity=0.5, end_step=3, frequency=1, score=L2Score(), mask=ChannelMask
    )
    for _ in range(4):
        pruner.on_step_end()
    assert len(pruner.history) == 3
    pruned = pruner.finalize()
    assert counts["traces"] == 1
    assert_exact(pruner.model, pruned, x)


def test_a_vit_with_root_parameters_is_traced_once_and_its_layer_norms_prune_again(counts):
    # timm's ViT holds cls_token and pos_embed on its root, and its LayerNorm class has its own forward
    timm = pytest.importorskip("timm")
    from graphprune.memo import forget

    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    ).eval()
    x = (torch.randn(2, 3, 16, 16),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert counts["traces"] == 1 and shrunk.patch_embed.proj.out_channels == 16
    assert_exact(masked, shrunk, x)
    assert type(shrunk.blocks[0].norm1) is timm.layers.LayerNorm
    assert not [f for f in gp.summary(model, shrunk, x).frozen if f.site.kind != "output"]
    again = gp.compile(shrunk, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    assert counts["traces"] == 1 and again.patch_embed.proj.out_channels == 8
    # traced afresh (nothing remembered, as after loading a checkpoint), the masked model calls its
    # LayerNorms whole (graphprune's masked class mixed into timm's); once Shrink restores timm's
    # class that graph is not a trace of the result, so the next compile traces it again, through
    # timm's forward, and the hidden width still prunes
    forget(masked)
    memo._BY_STRUCTURE.clear()
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    again = gp.compile(shrunk, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    assert counts["traces"] == 3 and again.patch_embed.proj.out_channels == 8
    assert again.blocks[0].norm1.weight.shape == (8,)


def test_the_landing_tries_another_batch_size_only_where_sizes_changed():
    # masks change no size: the model computes what the graph computes at the example batch, and
    # another batch cannot differ where the dense model did not; Shrink's sizes are checked at two
    torch.manual_seed(0)
    model, x = models.Residual().eval(), (torch.randn(2, 3, 8, 8),)
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    assert batches == [2]
    shrunk = gp.compile(masked, [Shrink()], example_inputs=x)
    assert batches == [2, 2, 3]
    assert_exact(masked, shrunk, x)


def test_a_masked_model_edited_in_place_between_compiles_is_checked_against_what_it_computes_now():
    # the second compile re-uses what the masked model computed only while its tensors and the
    # inputs are the ones it computed that from (a stale value would fail Shrink's check here)
    torch.manual_seed(0)
    model, x = models.Residual().eval(), (torch.randn(2, 3, 8, 8),)
    masked = gp.compile(model, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    with torch.no_grad():
        for p in masked.parameters():
            p.mul_(1.5)  # a training step, in place
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=x), x)
    x[0].mul_(2)  # the inputs edited in place
    assert_exact(masked, gp.compile(masked, [Shrink()], example_inputs=x), x)


def test_another_instance_of_an_architecture_reuses_its_graph_and_one_that_computes_otherwise_is_traced(
    counts, monkeypatch
):
    # a checkpoint loaded again or a fresh copy has the structure the memo is keyed by: its graph is
    # re-used over the new instance's tensors; a forward that differs where the key cannot see
    # (a class attribute) is caught by the landing, and that model is traced afresh
    torch.manual_seed(0)
    x = (torch.randn(2, 8),)
    first = _Switchable().eval()
    gp.compile(first, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    second = _Switchable().eval()  # other weights
    pruned = gp.compile(second, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=x)
    assert counts["traces"] == 1
    expected = gp.compile(second, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    assert_exact(expected, pruned, x)
    third = _Switchable().eval()
    monkeypatch.setattr(_Switchable, "scaled", True)  # (a class attribute: the key does not see it)
    masked = gp.compile(third, [L2Score(), ChannelMask(0.5)], example_inputs=x)
    assert counts["traces"] == 2
    assert type(masked) is _Switchable
    torch.testing.assert_close(run(masked, x), 2 * masked.b(torch.relu(masked.a(x[0]))).detach())


def test_a_remembered_graph_carries_the_shapes_the_analysis_saw(counts):
    # ReinsertZeros reads the width of what it pads from the analysed shapes: a graph built again
    # from the memo (the same model, or another instance) gets them with the analysis
    from graphprune.passes import ReinsertZeros

    torch.manual_seed(0)
    model, x = models.Residual().eval(), (torch.randn(2, 3, 8, 8),)
    passes = [ReinsertZeros(), L2Score(), ChannelMask(0.5), Shrink()]
    first = gp.compile(model, passes, example_inputs=x)
    again = gp.compile(model, passes, example_inputs=x)
    assert counts["traces"] == 1
    assert_exact(first, again, x)
