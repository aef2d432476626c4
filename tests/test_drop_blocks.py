"""DropBlocks: whole residual blocks removed, equal to the model with those blocks replaced by the
identity; chosen by block influence; the user's class, numbering, generate() and checkpoints kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.ir.modules import SkippedBlock
from graphprune.passes import ChannelMask, DropBlocks, L2Score, Shrink
from tests import models

transformers = pytest.importorskip("transformers")


Block = models.ResidualMlpBlock


class Net(nn.Module):
    def __init__(self, depth: int = 5) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList([Block() for _ in range(depth)])
        self.plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU())  # items that are not residual blocks

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.plain(x))


def _identity_replaced(model: nn.Module, paths: list[str]) -> nn.Module:
    ref = copy.deepcopy(model)
    for path in paths:
        parent, _, name = path.rpartition(".")
        ref.get_submodule(parent)._modules[name] = nn.Identity()
    return ref


def _influence(model: Net, batches: list[torch.Tensor]) -> list[float]:
    """1 - cos(block input, block output) over every row, by hand."""
    sums, count = torch.zeros(len(model.blocks), dtype=torch.float64), 0
    with torch.no_grad():
        for x in batches:
            h = model.stem(x)
            for i, block in enumerate(model.blocks):
                out = block(h)
                sums[i] += (1 - F.cosine_similarity(h.double(), out.double(), dim=-1)).sum()
                h = out
            count += len(x)
    return (sums / count).tolist()


def test_drops_the_least_influential_blocks_and_equals_the_identity_replaced_model():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # blocks 1 and 2 (next to each other) barely change their input
        model.blocks[1].fc2.weight.mul_(0.01)
        model.blocks[2].fc2.weight.mul_(0.02)
    before = copy.deepcopy(model.state_dict())
    calibration = [torch.randn(6, 4) for _ in range(3)]
    x = torch.randn(5, 4)
    pruned = gp.compile(model, [DropBlocks(2, calibration=calibration)], example_inputs=(x,))
    record = pruned.graphprune_report[-1].details
    assert sorted(record["dropped"]) == ["blocks.1", "blocks.2"]
    expected = dict(zip([f"blocks.{i}" for i in range(5)], _influence(model, calibration)))
    assert record["influence"] == pytest.approx(expected, abs=1e-6)
    assert "plain.0" not in record["influence"]  # not a residual block
    assert type(pruned) is Net and len(pruned.blocks) == 5
    assert [type(b).__name__ for b in pruned.blocks] == ["ResidualMlpBlock", "SkippedBlock", "SkippedBlock"] + [
        "ResidualMlpBlock"
    ] * 2
    torch.testing.assert_close(pruned(x), _identity_replaced(model, record["dropped"])(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model as it was
    assert gp.count_params(pruned) == gp.count_params(model) - 2 * gp.count_params(model.blocks[0])
    assert "removed" in str(gp.summary(model, pruned, (x,)))


def test_named_blocks_a_share_and_what_cannot_be_dropped():
    torch.manual_seed(0)
    model, x = Net(4), (torch.randn(2, 4),)
    pruned = gp.compile(model, [DropBlocks(blocks=["blocks.3", "blocks.0"])], example_inputs=x)
    torch.testing.assert_close(pruned(*x), _identity_replaced(model, ["blocks.0", "blocks.3"])(*x))
    half = gp.compile(model, [DropBlocks(0.5, calibration=[x])], example_inputs=x)
    assert sum(isinstance(b, SkippedBlock) for b in half.blocks) == 2
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(gp.ArgumentError, match=r"plain\.0.*residual branch"):
        gp.compile(model, [DropBlocks(blocks=["plain.0"])], example_inputs=x, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(b, Block) for b in model.blocks)  # a failed in-place compile leaves the model alone
    with pytest.raises(gp.ArgumentError, match="keep at least one"):
        gp.compile(model, [DropBlocks(4, calibration=[x])], example_inputs=x)
    with pytest.raises(gp.ArgumentError, match="calibration"):
        gp.compile(model, [DropBlocks(1)], example_inputs=x)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(gp.ArgumentError, match="DropBlocks n"):
            DropBlocks(bad)
    with pytest.raises(gp.ArgumentError, match="one of them"):
        DropBlocks(1, blocks=["blocks.0"])
    with pytest.raises(gp.PreconditionError, match="no residual block"):
        gp.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), [DropBlocks(1, calibration=[x])], example_inputs=x)


def test_items_of_a_sequential_with_names_are_blocks_too():
    from collections import OrderedDict

    torch.manual_seed(0)
    model = Net(1)
    model.blocks = nn.Sequential(OrderedDict(first=Block(), second=Block()))  # torchvision's ViT names them so
    x = (torch.randn(3, 4),)
    pruned = gp.compile(model, [DropBlocks(blocks=["blocks.second"])], example_inputs=x)
    assert isinstance(pruned.blocks.second, SkippedBlock) and isinstance(pruned.blocks.first, Block)
    torch.testing.assert_close(pruned(*x), _identity_replaced(model, ["blocks.second"])(*x))


def _llama():
    model = models.tiny_decoder(layers=4, use_cache=True)
    return model, model.config


def test_a_llama_without_two_layers_generates_saves_and_prunes_on(tmp_path):
    model, config = _llama()
    ids = torch.randint(0, 100, (1, 8))
    calibration = [torch.randint(0, 100, (2, 8)) for _ in range(2)]
    pruned = gp.compile(model, [DropBlocks(2, calibration=calibration)], example_inputs=(ids,))
    dropped = pruned.graphprune_report[-2].details["dropped"]
    assert type(pruned) is type(model) and len(pruned.model.layers) == 4
    reference = _identity_replaced(model, dropped)
    reference.model.layers = nn.ModuleList(
        [SkippedBlock("x", "hidden_states") if isinstance(m, nn.Identity) else m for m in reference.model.layers]
    )
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits)
        out = pruned.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)  # with its cache
        seq = ids
        for _ in range(5):
            seq = torch.cat([seq, pruned(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)
    with pytest.raises(gp.GraphPruneError, match="removed blocks"):
        pruned.save_pretrained(tmp_path / "hf")
    narrow = gp.compile(pruned, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=(ids,))
    gp.save(narrow, tmp_path / "ckpt")
    loaded = gp.load(transformers.LlamaForCausalLM(config).eval(), tmp_path / "ckpt", example_inputs=(ids,))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, narrow(ids).logits)
    assert gp.count_params(narrow) < gp.count_params(pruned) < gp.count_params(model)


def test_a_plan_made_on_one_instance_prunes_another_with_its_own_weights(tmp_path):
    small, config = _llama()
    ids = torch.randint(0, 100, (1, 8))
    calibration = [torch.randint(0, 100, (2, 8)) for _ in range(2)]
    decided = gp.compile(
        small,
        [DropBlocks(1, calibration=calibration), L2Score(), ChannelMask({"ffn": 0.5}), Shrink()],
        example_inputs=(ids,),
    )
    gp.save(decided, tmp_path / "ckpt")
    plan = gp.saving.plan_of(decided)
    masked = next(s["units"] for s in plan["steps"] if s["op"] == "channel_mask")
    layer = next(k for k in masked if k.endswith("mlp.gate_proj")).rpartition(".mlp")[0]  # a layer that stayed
    kept = [u for u in range(64) if u not in masked[f"{layer}.mlp.gate_proj"]]
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(config).eval()  # other weights, same architecture
    before = copy.deepcopy(other.state_dict())
    for source in (decided, tmp_path / "ckpt", plan):
        pruned = gp.apply_plan(other, source, (ids,))
        assert type(pruned) is type(other)
        shapes = {k: v.shape for k, v in decided.state_dict().items()}
        assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes
        torch.testing.assert_close(
            pruned.get_submodule(layer).mlp.up_proj.weight, before[f"{layer}.mlp.up_proj.weight"][kept]
        )
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # `other` itself as it was
    net = Net()
    net_before = copy.deepcopy(net.state_dict())
    with pytest.raises(gp.CheckpointError, match="does not fit"):
        gp.apply_plan(net, decided, (torch.randn(2, 4),), inplace=True)
    assert all(torch.equal(net_before[k], v) for k, v in net.state_dict().items())  # failed: left as it was
    with pytest.raises(gp.ArgumentError, match="source must be"):
        gp.apply_plan(other, 42, (ids,))
    with pytest.raises(gp.CheckpointError, match="no plan.json"):
        gp.apply_plan(other, tmp_path / "nowhere", (ids,))
