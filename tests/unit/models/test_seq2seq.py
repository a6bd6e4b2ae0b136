"""The encoder-decoder Transformer: shapes, masks, cached decoding, tied embeddings, save / load, BERT2BERT."""

from __future__ import annotations

import json

import pytest
import torch

import tunelab
from tunelab.errors import CheckpointError
from tunelab.models.registry import build_model
from tunelab.models.seq2seq import Seq2SeqConfig, warm_start_from_bert

VOCAB = 61


def tiny(seed: int = 0, **overrides):
    """A tiny seq2seq model in eval mode, fp32, no dropout, weights drawn with seed."""
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_decoder_layers=3, num_heads=4,
                  intermediate_size=48, dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=64)
    torch.manual_seed(seed)
    return build_model(Seq2SeqConfig(**{**fields, **overrides}), ["lm"]).eval()


def ids(batch: int, length: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm_first", [False, True])
def test_logits_have_the_target_shape_and_padding_changes_nothing(norm_first):
    model = tiny(norm_first=norm_first)
    source, target = ids(3, 9, 1), ids(3, 6, 2)
    out = model(source, decoder_input_ids=target)
    assert out.hidden.shape == (3, 6, 32) and out.logits["lm"].shape == (3, 6, VOCAB)
    # row 1 alone vs padded to 12 source and 8 target positions: the real positions are unchanged
    padded_source = torch.cat([source, torch.zeros(3, 3, dtype=torch.long)], dim=1)
    mask = torch.ones_like(padded_source)
    mask[:, 9:] = 0
    padded_target = torch.cat([target, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    padded = model(padded_source, mask, decoder_input_ids=padded_target).logits["lm"]
    torch.testing.assert_close(padded[:, :6], out.logits["lm"], atol=1e-5, rtol=0)


def test_decoder_is_causal_and_reads_the_source():
    model = tiny()
    source, target = ids(2, 7, 3), ids(2, 6, 4)
    base = model(source, decoder_input_ids=target).logits["lm"]
    later = target.clone()
    later[:, 4:] = 5
    changed = model(source, decoder_input_ids=later).logits["lm"]
    torch.testing.assert_close(changed[:, :4], base[:, :4], atol=1e-6, rtol=0)
    assert (changed[:, 4:] - base[:, 4:]).abs().max() > 1e-3
    other_source = model(ids(2, 7, 5), decoder_input_ids=target).logits["lm"]
    assert (other_source - base).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, {"norm_first": True}, {"target_vocab_size": 45},
                                       {"embeddings": "bert", "activation": "gelu", "layer_norm_eps": 1e-12}])
def test_cached_decoding_equals_the_full_pass(overrides):
    model = tiny(**overrides)
    target_vocab = overrides.get("target_vocab_size", VOCAB)
    source, target = ids(2, 8, 6), ids(2, 7, 7, vocab=target_vocab)
    mask = torch.ones_like(source)
    mask[1, 5:] = 0
    full = model(source, mask, decoder_input_ids=target).logits["lm"]
    encoded = model.backbone.encode(source, mask)
    cache = model.new_cache(2, 7)
    steps = []
    for chunk in ([0, 1, 2], [3], [4], [5, 6]):  # a prefill of 3, single tokens, then 2 at once
        hidden = model.backbone.decode(target[:, chunk], encoded, cache=cache)
        steps.append(model.heads["lm"](hidden))
    assert cache.length == 7
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_shared_vocabulary_ties_three_matrices_and_separate_ones_two():
    shared = tiny()
    table = shared.backbone.token_embeddings.weight
    assert shared.heads["lm"].proj.weight is table and shared.backbone.source_embeddings is None
    separate = tiny(target_vocab_size=45)
    assert separate.heads["lm"].proj.weight is separate.backbone.token_embeddings.weight
    assert separate.backbone.token_embeddings.weight.shape == (45, 32)
    assert separate.backbone.source_embeddings.weight.shape == (VOCAB, 32)


def test_embeddings_are_scaled_by_sqrt_d_and_add_sinusoids():
    from tunelab.nn.positions import sinusoidal_positions

    model = tiny()
    source = ids(1, 5, 8)
    expected = model.backbone.token_embeddings(source) * 32 ** 0.5 + sinusoidal_positions(64, 32)[:5]
    torch.testing.assert_close(model.backbone.embed_source(source), expected)
    with pytest.raises(ValueError, match="position 64; this model has max_position_embeddings 64"):
        model(ids(1, 65, 9), decoder_input_ids=ids(1, 2, 9))


def test_save_and_load_give_equal_logits_and_store_tied_weights_once(tmp_path):
    from safetensors import safe_open

    from tunelab.tokenizer import Tokenizer
    from tunelab.tokenizer.pair import TokenizerPair

    model = tiny(target_vocab_size=45, norm_first=True)
    source, target = ids(2, 6, 10), ids(2, 5, 11, vocab=45)
    before = model(source, decoder_input_ids=target).logits["lm"]
    words = Tokenizer.from_dir  # a real tokenizer pair, saved with the model
    pair = TokenizerPair(words(_word_tokenizer(tmp_path / "src", ["ein", "mann"])),
                         words(_word_tokenizer(tmp_path / "tgt", ["a", "man"])))
    tunelab.save_pretrained(model, pair, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "tunelab-seq2seq" and config["heads"] == ["lm"]
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "backbone.token_embeddings.weight" in names and "heads.lm.proj.weight" not in names
    loaded, tokenizer = tunelab.load(tmp_path / "model")
    assert isinstance(tokenizer, TokenizerPair)
    assert tokenizer.source.token_to_id("mann") is not None and tokenizer.target.token_to_id("man") is not None
    assert loaded.heads["lm"].proj.weight is loaded.backbone.token_embeddings.weight
    torch.testing.assert_close(loaded(source, decoder_input_ids=target).logits["lm"], before, atol=0, rtol=0)
    generation = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 1 and generation["eos_token_id"] == 2


def test_loading_a_damaged_directory_names_the_problem(tmp_path):
    model = tiny()
    tunelab.save_pretrained(model, None, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(CheckpointError, match=r"/m: weight backbone\..* has shape \(32,\), the config implies \(48,\)"):
        tunelab.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "embeddings": "rnn"}))
    with pytest.raises(CheckpointError, match="cannot be built: embeddings must be one of sinusoidal, bert"):
        tunelab.load(tmp_path / "m")


def _word_tokenizer(path, words):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from tunelab.tokenizer import Tokenizer

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    Tokenizer(backend, special_tokens={"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                                       "unk_token": "<unk>"}).save(path)
    return path


def test_bert2bert_encoder_reproduces_bert_and_decoder_starts_from_its_layers(tiny, make_hf_model):
    """Rothe et al. 2020: both stacks start as copies of BERT; the encoder's hidden states equal BERT's exactly."""
    from tunelab.checkpoint.hf import read_hf_model

    _, path = make_hf_model("bert-base")
    bert = read_hf_model(path)
    c = bert.config
    model = build_model(Seq2SeqConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers, num_heads=c.num_heads,
        intermediate_size=c.intermediate_size, activation=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
        max_position_embeddings=c.max_position_embeddings, embeddings="bert", pad_token_id=0, bos_token_id=1,
        eos_token_id=2), ["lm"]).eval()
    warm_start_from_bert(model, bert)
    source, mask = tiny.padded_batch([9, 6], 9, side="right", pad=0)
    with torch.no_grad():
        expected = bert(source, mask, heads=()).hidden
        encoded = model.backbone.encode(source, mask).hidden
    assert torch.equal(encoded, expected)
    b, layer = bert.backbone, model.backbone.decoder_layers[1]
    assert torch.equal(layer.attn.q_proj.weight, b.layers[1].attn.q_proj.weight)
    assert torch.equal(layer.mlp.fc_out.bias, b.layers[1].mlp.fc_out.bias)
    assert torch.equal(model.backbone.decoder_embeddings.pos.weight, b.embeddings.pos.weight)
    assert model.heads["lm"].proj.weight is model.backbone.decoder_embeddings.tok.weight
    # the decoder's own weights are copies, not the encoder's tensors: they train apart
    assert model.backbone.decoder_embeddings.tok.weight.data_ptr() != model.backbone.encoder_embeddings.tok.weight.data_ptr()


@pytest.mark.real
def test_bert2bert_from_minilm_reproduces_its_hidden_states():
    from tunelab.config.loading import validate
    from tunelab.config.schema import TrainConfig
    from tunelab.train.run import build_or_load

    config = validate(TrainConfig, {"output_dir": "unused", "model": {"source": "minilm-l6", "warm_start": "bert2bert"},
                                    "task": {"type": "seq2seq"}, "data": {"train": "unused.jsonl"}}, "test")
    model, tokenizer = build_or_load(config)
    bert, _ = tunelab.load("minilm-l6")
    batch = tokenizer.encode_batch(["A man rides a bike down a hill.", "Two dogs."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = bert(batch["input_ids"], batch["attention_mask"], heads=()).hidden
        encoded = model.eval().backbone.encode(batch["input_ids"], batch["attention_mask"]).hidden
    assert torch.equal(encoded, expected)
    assert model.config.start_token_id == tokenizer.cls_token_id and model.config.eos_token_id == tokenizer.sep_token_id
    assert model.num_parameters() > 2 * bert.num_parameters() - 12e6  # two stacks (the embeddings twice)
