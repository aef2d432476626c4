"""TokenPrune: tokens dropped or merged after scheduled layers, checked against hand-written
references that gather the same tokens; rate 0 changes nothing; padding never displaces a real
token; ViTs from three libraries, an LSTM's time steps, ONNX export, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.errors import ArgumentError, GraphPruneError, PreconditionError
from graphprune.ir.tokens import (
    SoftTokenMask,
    attention_with_received,
    gather_tokens,
    keep_count,
    merge_tokens,
    proportional_mask,
    select_tokens,
)
from graphprune.passes import TokenPrune, TokenThreshold
from graphprune.passes.token_prune import SOFT
from tests import minilm
from tests.helpers import assert_same_state, run, state

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

PPM = 1_000_000


def _bert(layers: int = 3):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # the second sentence has 3 padded positions
    return model, {"input_ids": ids, "attention_mask": mask}


def _by_position(x: torch.Tensor) -> torch.Tensor:
    """A score preferring the last positions, where the padding is."""
    return torch.arange(x.shape[1], dtype=torch.float32).expand(x.shape[0], -1)


def _bert_reference(model, inputs, rates: dict, score: str | None):
    """BERT by hand from its weights: after the attention sublayer of each layer in `rates`, the
    tokens the score ranks best (padding last, the first token always) are gathered, with the
    mask.  Returns the outputs and the kept tokens' original positions."""
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    valid = am.bool()
    h = model.embeddings(input_ids=ids)
    heads = model.config.num_attention_heads
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    for i, layer in enumerate(model.encoder.layer):
        sa, b, t = layer.attention.self, h.shape[0], h.shape[1]

        def split(lin):
            return lin(h).view(b, t, heads, -1).transpose(1, 2)

        q, k, v = split(sa.query), split(sa.key), split(sa.value)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = torch.softmax(logits.masked_fill(~valid[:, None, None, :], -math.inf), dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, t, -1)
        a = layer.attention.output.dense(ctx) + h
        if i in rates:
            if score == "attention":
                s = (probs * valid[:, None, :, None]).sum(2).mean(1)
            elif score == "cls_attention":
                s = probs[:, :, 0].mean(1)
            else:
                s = _by_position(a)
            s = s.masked_fill(~valid, -math.inf)
            s[:, 0] = math.inf
            kept = t - int(t * rates[i])
            idx = s.topk(kept, dim=1).indices.sort(dim=1).values
            a = torch.gather(a, 1, idx[..., None].expand(-1, -1, a.shape[-1]))
            valid, positions = torch.gather(valid, 1, idx), torch.gather(positions, 1, idx)
        a = layer.attention.output.LayerNorm(a)
        out = layer.output.dense(F.gelu(layer.intermediate.dense(a))) + a
        h = layer.output.LayerNorm(out)
    return h, model.pooler(h), positions


@pytest.mark.parametrize(
    "score, rates",
    [("attention", {1: 0.3}), ("cls_attention", {0: 0.5}), ("by_position", {0: 0.2, 1: 0.3})],
)
def test_bert_equals_hand_reference_and_padding_goes_first(score, rates):
    model, inputs = _bert()
    chosen = _by_position if score == "by_position" else score
    pruned = gp.compile(model, [TokenPrune(rates, score=chosen)], example_inputs=inputs)
    with torch.no_grad():
        hidden, pooled, positions = _bert_reference(model, inputs, rates, score)
        out = run(pruned, inputs)
    assert out[0].shape == hidden.shape
    torch.testing.assert_close(out[0], hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], pooled, rtol=1e-5, atol=1e-5)
    if score == "attention":  # 7 kept: the padded sentence keeps exactly its 7 real tokens
        assert positions[1].tolist() == list(range(7))
    elif score == "cls_attention":  # 5 kept of 7 real
        assert positions[1].max() < 7
    else:  # a score that prefers the padded (last) positions still drops them first
        assert positions[0].tolist() == [0, 5, 6, 7, 8, 9]  # 10 -> 8 -> 6, the first token kept throughout
        assert positions[1].tolist() == [0, 2, 3, 4, 5, 6]  # 7 real tokens: the padding went first


@pytest.mark.parametrize("mode", ["drop", "merge"])
def test_rate_zero_changes_nothing(mode):
    model, inputs = _bert(2)
    pruned = gp.compile(model, [TokenPrune([0, 0], mode=mode)], example_inputs=inputs)
    assert type(pruned) is type(model)  # nothing inserted: the user's own model comes back
    a, b = run(model, inputs), run(pruned, inputs)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_select_tokens_puts_padding_last_and_keeps_the_protected():
    score = torch.tensor([[0.0, 5.0, 4.0, -math.inf, -math.inf, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    idx = select_tokens(score, rate=PPM // 2, keep=(0, -1))
    assert idx[0].tolist() == [0, 1, 5]  # 3 kept: the protected first and last, then the best real one
    assert idx[1].tolist() == [0, 4, 5]
    assert keep_count(10, 3 * PPM // 10, 1) == 7 and keep_count(3, PPM - 1, 2) == 2


def test_merge_is_identity_at_rate_zero_and_conserves_mass():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    score = torch.zeros(2, 9)
    same, idx, size, _ = merge_tokens(x, x, None, score, 0, (0,))
    assert torch.equal(same, x) and torch.equal(size, torch.ones(2, 9))
    score[1, 6:] = -math.inf  # padding
    merged, idx, size, dest = merge_tokens(x, x, None, score, PPM // 3, (0,))
    assert merged.shape == (2, 7, 4) and size.sum(1).tolist() == [9.0, 9.0]  # 9 - floor(9 / 3) kept
    torch.testing.assert_close((merged * size[..., None]).sum(1), x.sum(1))  # sizes weight the means
    assert (idx[:, 0] == 0).all() and torch.equal(merged[:, 0], x[:, 0])  # the first token is never merged
    assert (idx.diff(dim=1) > 0).all()  # order kept
    # each kept token is the size-weighted mean of the tokens whose mass went to it (a second merge,
    # with sizes already above 1, checked against a loop over the tokens)
    again, idx2, size2, dest2 = merge_tokens(merged, merged, size, score.gather(1, idx), PPM // 4, (0,))
    for b in range(2):
        for k, p in enumerate(idx2[b].tolist()):
            members = [t for t in range(7) if dest2[b, t] == p]
            weights = size[b, members]
            assert size2[b, k] == weights.sum()
            torch.testing.assert_close(again[b, k], (merged[b, members] * weights[:, None]).sum(0) / weights.sum())
    # a per-token weight (a pooling mask) adds up over merged tokens: a mean pooled with it is size-weighted
    assert torch.equal(gather_tokens(torch.ones(2, 9), idx, (1,), dest), size)
    assert torch.equal(
        gather_tokens(torch.ones(2, 9, dtype=torch.bool), idx, (1,), dest), torch.ones(2, 7, dtype=torch.bool)
    )
    # padding merged into padding only: the real tokens' total mass and count are those of real tokens
    real = idx[1] < 6
    assert size[1][real].sum() == 6
    torch.testing.assert_close((merged[1][real] * size[1][real, None]).sum(0), x[1, :6].sum(0))


def _vits():
    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=20, mlp_dim=32, num_classes=10
    )
    nn.init.normal_(tv.heads.head.weight)  # (torchvision starts its head at zero)
    tm = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=20, depth=3, num_heads=2, num_classes=10
    )
    cfg = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=20,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    hf = transformers.ViTForImageClassification(cfg)
    return {"torchvision": tv.eval(), "timm": tm.eval(), "hf": hf.eval()}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("mode", ["drop", "merge"])
def test_vits_of_three_libraries(mode):
    x = torch.randn(3, 3, 32, 32)
    for name, model in _vits().items():
        pruned = gp.compile(model, [TokenPrune([0.3, 0.0, 0.4], mode=mode)], example_inputs=(x,))
        record = next(r for r in pruned.graphprune_report if r.name == "TokenPrune")
        assert record.details["tokens"] == {0: [17, 12], 2: [12, 8]}, name
        dense, got = _logits(run(model, (x,))), _logits(run(pruned, (x,)))
        assert got.shape == dense.shape == (3, 10), name
        assert not torch.allclose(got, dense), name  # fewer tokens did change the result
        one = run(pruned, (x[:1],))  # another batch size runs too
        assert _logits(one).shape == (1, 10), name


def test_deit_keeps_its_distillation_token_and_distilbert_runs():
    torch.manual_seed(0)
    deit = timm.models.deit.VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=20, depth=3, num_heads=2, num_classes=10
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = gp.compile(deit, [TokenPrune({2: 0.5}, score=_by_position, keep=("cls", 1))], example_inputs=(x,))
    kept = [0, 1, *range(11, 18)]  # 18 tokens, 9 kept: the class and distillation tokens, then the last 7
    with torch.no_grad():
        h = deit._pos_embed(deit.patch_embed(x))
        for i, blk in enumerate(deit.blocks):
            a = h + blk.attn(blk.norm1(h))
            a = a[:, kept] if i == 2 else a
            h = a + blk.mlp(blk.norm2(a))
        torch.testing.assert_close(pruned(x), deit.forward_head(deit.norm(h)), rtol=1e-5, atol=1e-5)
    distil = transformers.DistilBertModel(
        transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100)
    ).eval()
    _, inputs = _bert(2)
    out = run(gp.compile(distil, [TokenPrune([0.3, 0.2])], example_inputs=inputs), inputs)
    assert out[0].shape == (2, 6, 32)  # 10 -> 7 -> 6


def test_timm_equals_hand_reference():
    model = _vits()["timm"]
    x = torch.randn(2, 3, 32, 32)
    pruned = gp.compile(model, [TokenPrune({1: 0.5}, score="norm")], example_inputs=(x,))
    with torch.no_grad():
        h = model._pos_embed(model.patch_embed(x))
        for i, blk in enumerate(model.blocks):
            a = h + blk.attn(blk.norm1(h))
            if i == 1:
                s = a.norm(dim=-1)
                s[:, 0] = math.inf
                idx = s.topk(17 - 8, dim=1).indices.sort(dim=1).values
                a = torch.gather(a, 1, idx[..., None].expand(-1, -1, a.shape[-1]))
            h = a + blk.mlp(blk.norm2(a))
        expected = model.forward_head(model.norm(h))
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)


class _LstmClassifier(nn.Module):
    def __init__(self, embed: int = 12) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(8, embed), nn.ReLU()) if embed else nn.Identity()
        self.lstm = nn.LSTM(embed or 8, 16, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(self.fold(out.mean(dim=1)))

    @staticmethod
    def fold(h):
        return h.reshape(-1, 2, 8).sum(1)  # a literal 8 after the LSTM that is not the length


@pytest.mark.parametrize("embed", [12, 0])  # 0: the LSTM reads the 8 x 8 rows, as many steps as features
def test_lstm_time_steps_before_the_recurrent_layer(embed):
    torch.manual_seed(0)
    model = _LstmClassifier(embed).eval()
    x = torch.randn(4, 8, 8)
    pruned = gp.compile(model, [TokenPrune([0.25], score="norm", keep=())], example_inputs=(x,))
    with torch.no_grad():
        e = model.embed(x)
        idx = e.norm(dim=-1).topk(6, dim=1).indices.sort(dim=1).values
        e = torch.gather(e, 1, idx[..., None].expand(-1, -1, e.shape[-1]))
        expected = model.head(model.fold(model.lstm(e)[0].mean(dim=1)))
        torch.testing.assert_close(pruned(x), expected)
    with pytest.raises(ArgumentError, match="recurrent"):
        gp.compile(model, [TokenPrune([0.25])], example_inputs=(x,))  # attention scores need attention


def test_onnx_export_with_a_dynamic_sequence_length(tmp_path):
    """Merging after layer 0, then dropping after layer 1 (two passes compose), exported once."""
    pytest.importorskip("onnxruntime")
    from graphprune.backends import onnx as gonnx

    model, inputs = _bert(2)
    passes = [TokenPrune([0.3, 0], mode="merge"), TokenPrune([0, 0.2], score="norm")]
    pruned = gp.compile(model, passes, example_inputs=inputs)
    path = tmp_path / "tokens.onnx"
    result = gonnx.export(pruned, path, example_inputs=inputs, dynamic_sequence=True)
    assert result.max_abs_error < 1e-4  # checked in ONNX Runtime at 10 tokens and at 8
    longer = {"input_ids": torch.randint(0, 100, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.long)}
    longer["attention_mask"][0, 12:] = 0
    got = gonnx.session(str(path)).run(None, {k: v.numpy() for k, v in longer.items()})
    expected = run(pruned, longer)
    assert got[0].shape == tuple(expected[0].shape) == (3, 10, 32)  # 16 - 4 merged, then 12 - 2 dropped
    torch.testing.assert_close(torch.from_numpy(got[0]), expected[0], rtol=1e-4, atol=1e-4)


def test_save_and_load_replays_the_selection(tmp_path):
    model, inputs = _bert(2)
    pruned = gp.compile(model, [TokenPrune([0.3, 0.0], score="norm")], example_inputs=inputs)
    gp.save(pruned, tmp_path)
    loaded = gp.load(model, tmp_path, example_inputs=inputs)
    torch.testing.assert_close(run(loaded, inputs)[0], run(pruned, inputs)[0])
    summary = gp.summary(model, pruned, inputs)
    assert summary.state == "tokens" and summary.tokens == ((0, 10, 7),)
    assert summary.macs[1] < summary.macs[0]


def test_bad_arguments_are_named_and_failures_leave_the_model_and_files_as_they_were(tmp_path):
    model, inputs = _bert(2)
    before = state(model)
    with pytest.raises(ArgumentError, match="2 attention layer"):
        gp.compile(model, [TokenPrune([0.3, 0.2, 0.1])], example_inputs=inputs)
    with pytest.raises(ArgumentError, match="cls_attention"):  # a score that needs attention, on an LSTM
        gp.compile(
            _LstmClassifier().eval(), [TokenPrune([0.3], score="cls_attention")], example_inputs=(torch.randn(2, 8, 8),)
        )
    with pytest.raises(ArgumentError, match="layers"):
        TokenThreshold(layers=["0"])
    with pytest.raises(ArgumentError, match="init"):
        TokenThreshold(init="low")
    with pytest.raises(ArgumentError, match="temperature"):
        TokenThreshold(temperature=0)
    with pytest.raises(ArgumentError, match="soft token masks"):
        gp.harden_tokens(model, [(inputs, None)], example_inputs=inputs)
    soft = gp.compile(model, [TokenThreshold(layers=[1])], example_inputs=inputs)
    with pytest.raises(ArgumentError, match="max_rate"):
        gp.harden_tokens(soft, [(inputs, None)], example_inputs=inputs, max_rate=1.5)
    assert_same_state(before, model)  # (compile works on a copy; harden_tokens on a copy of the soft model)
    assert type(model) is transformers.BertModel
    target = tmp_path / "soft"
    with pytest.raises(GraphPruneError):  # soft masks are a training state: no plan step to replay
        gp.save(soft, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ArgumentError, match=r"\[0, 1\)"):
        TokenPrune([1.0, 0])
    with pytest.raises(ArgumentError, match="halves"):
        TokenPrune([0.6, 0], mode="merge")
    with pytest.raises(ArgumentError, match="leading"):
        TokenPrune([0.3, 0], keep=(2,))
    with pytest.raises(ArgumentError, match="mode='drop'"):
        TokenPrune([0.3, 0], score=_by_position, mode="merge")
    with pytest.raises(PreconditionError, match="no layer to prune tokens"):
        gp.compile(nn.Sequential(nn.Linear(4, 4)), [TokenPrune([0.5])], example_inputs=(torch.randn(2, 4),))


def test_token_threshold_is_the_identity_until_trained_then_hardens_to_its_rates():
    torch.manual_seed(0)
    model = _LstmClassifier().eval()
    x = torch.randn(4, 8, 8)
    soft = gp.compile(model, [TokenThreshold(score="norm", keep=(), init=-100.0)], example_inputs=(x,))
    assert torch.equal(soft(x), model(x))  # a threshold far below every score scales by exactly 1
    (mask,) = [m for m in soft.modules() if isinstance(m, SoftTokenMask)]
    with torch.no_grad():
        mask.threshold.fill_(1.0)
        norms = torch.relu(model.embed(x)).norm(dim=-1)
        below = (norms / norms.mean(dim=1, keepdim=True) < 1.0).float().mean().item()
    calibration = [((x,), None)]
    assert gp.token_rates(soft, calibration) == {0: pytest.approx(below)}
    hard = gp.harden_tokens(soft, calibration, example_inputs=(x,))
    expected = gp.compile(model, [TokenPrune([below], score="norm", keep=())], example_inputs=(x,))
    torch.testing.assert_close(run(hard, (x,)), run(expected, (x,)))
    assert not any(isinstance(m, SoftTokenMask) for m in hard.modules())


def test_token_sparsity_raises_the_learned_thresholds():
    bert, inputs = _bert(2)
    model = minilm.SentenceEncoder(bert).eval()  # (mean pooling over an integer mask)
    soft = gp.compile(model, [TokenThreshold()], example_inputs=inputs)
    reg = gp.TokenSparsity(soft, 1.0)
    thresholds = [m.threshold for m in soft.modules() if isinstance(m, SoftTokenMask)]
    assert len(thresholds) == 2
    opt = torch.optim.Adam(thresholds, lr=0.1)
    soft.train()
    before = gp.token_rates(soft, [(inputs, None)])
    for _ in range(12):  # (at random init every token receives about the mean attention: s ~ 1)
        opt.zero_grad()
        soft(**inputs)
        reg().backward()
        opt.step()
    after = gp.token_rates(soft, [(inputs, None)])
    assert all(t.item() > 0.5 for t in thresholds)  # from 0: the penalty pushed every threshold up
    assert sum(after.values()) > sum(before.values()) == 0  # and tokens fall below them
    hard = gp.harden_tokens(soft, [(inputs, None)], example_inputs=inputs)
    expected = gp.compile(model, [TokenPrune({i: min(r, 0.95) for i, r in after.items()})], example_inputs=inputs)
    torch.testing.assert_close(run(hard, inputs), run(expected, inputs))
    leftovers = [n.name for n in hard.graph.nodes if SOFT in n.meta or n.target is proportional_mask]
    assert not leftovers  # the soft masks, their log weights in the attention and their products are gone
    explicit = [n for n in hard.graph.nodes if n.target is attention_with_received]
    assert len(explicit) == sum(r > 0 for r in after.values())  # other layers run the fused kernel again
    with pytest.raises(ArgumentError, match="soft token masks"):
        gp.TokenSparsity(model, 1.0)
