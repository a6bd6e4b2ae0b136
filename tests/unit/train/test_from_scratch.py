"""Models built from `model.architecture` (no checkpoint): they train, save as HF directories and reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from tunelab.config.loading import validate
from tunelab.config.schema import TrainConfig
from tunelab.errors import ConfigError
from tunelab.tokenizer import Tokenizer
from tunelab.train.run import build_or_load, train

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def char_tokenizer_dir(tmp_path_factory) -> Path:
    """A character-level tokenizer over tinyshakespeare's alphabet, with <|endoftext|> as eos and pad."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(set(text)))}}
    backend = Backend(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    path = tmp_path_factory.mktemp("char-tokenizer")
    Tokenizer(backend, special_tokens={"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}).save(path)
    return path


def scratch_config(tmp_path: Path, tokenizer_dir: Path, **architecture) -> TrainConfig:
    arch = {"family": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64,
            "dropout": 0.0, "attention_dropout": 0.0, **architecture}
    if arch["family"] != "gpt2":
        arch.pop("dropout")
    return validate(TrainConfig, {
        "output_dir": str(tmp_path / "run"),
        "model": {"architecture": arch, "tokenizer": str(tokenizer_dir)},
        "task": {"type": "causal_lm"},
        "data": {"train": str(SHAKESPEARE), "format": "txt", "max_length": 64, "validation_split": 0.1,
                 "max_train_examples": 256, "max_validation_examples": 32},
        "train": {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "warmup": 0, "save_steps": 0, "eval_steps": 0,
                  "eval_at_start": True, "logging_steps": 5},
    }, "test")


def test_a_gpt_from_scratch_learns_characters_and_reloads_with_equal_logits(char_tokenizer_dir, tmp_path):
    import transformers as tf

    import tunelab

    config = scratch_config(tmp_path, char_tokenizer_dir)
    final = train(config, show_progress=False, log=lambda *_: None)
    history = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    start = [line for line in history if '"step": 0' in line and "validation" in line]
    assert start, "eval_at_start should log the untrained validation loss"
    import json

    before = json.loads(start[0])["loss"]
    assert before > 3.5  # ~ln(65): a uniform guess over the alphabet
    assert final["loss"] < before - 0.8

    model, tokenizer = tunelab.load(tmp_path / "run" / "model")
    reference = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.tensor([tokenizer.encode("ROMEO:\nWhat light")])
    with torch.no_grad():
        ours = model(ids, heads=("lm",)).logits["lm"]
        theirs = reference(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_architecture_sizes_and_special_ids_come_from_the_tokenizer(char_tokenizer_dir, tmp_path):
    model, tokenizer = build_or_load(scratch_config(tmp_path, char_tokenizer_dir, family="llama",
                                                    num_kv_heads=2, intermediate_size=64))
    assert model.config.family == "llama"
    assert model.config.vocab_size == tokenizer.vocab_size == 66
    assert model.config.eos_token_id == tokenizer.eos_token_id == 0
    assert model.config.num_kv_heads == 2


def test_an_unknown_architecture_field_suggests_the_nearest(char_tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.architecture\.num_layer: .*did you mean 'num_layers'"):
        build_or_load(scratch_config(tmp_path, char_tokenizer_dir, num_layer=3))
    with pytest.raises(ConfigError, match="not divisible"):
        build_or_load(scratch_config(tmp_path, char_tokenizer_dir, num_heads=5))


def test_source_and_architecture_exclude_each_other(char_tokenizer_dir, tmp_path):
    from tunelab.errors import ConfigError as Error

    raw = scratch_config(tmp_path, char_tokenizer_dir).model_dump(mode="json")
    raw["model"]["source"] = "minilm-l6"
    with pytest.raises(Error, match="exactly one of model.source"):
        validate(TrainConfig, raw, "test.yaml")
    raw["model"].pop("source")
    raw["model"].pop("tokenizer")
    with pytest.raises(Error, match="needs model.tokenizer"):
        validate(TrainConfig, raw, "test.yaml")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mimetic_init_sets_the_attention_products_it_names(char_tokenizer_dir, tmp_path, family):
    extra = {"num_kv_heads": 2, "intermediate_size": 64} if family == "llama" else {}
    config = scratch_config(tmp_path, char_tokenizer_dir, family=family, hidden_size=64, **extra)
    config.model.init = "mimetic"
    torch.manual_seed(0)
    model, _ = build_or_load(config)
    attention = [m for m in model.modules() if type(m).__name__ == "Attention"]
    assert len(attention) == 2
    for layer in attention:
        hd, group = layer.head_dim, layer.num_heads // layer.num_kv_heads
        for h in range(layer.num_heads):  # a query head and its key head: q^T k leans to +identity
            q = layer.q_proj.weight[h * hd:(h + 1) * hd]
            k = layer.k_proj.weight[(h // group) * hd:(h // group + 1) * hd]
            qk = q.T @ k
            diagonal, off = qk.diagonal(), qk - torch.diag(qk.diagonal())
            assert diagonal.mean() > 0.15 and diagonal.mean() > 4 * off.abs().mean()
            assert torch.linalg.matrix_rank(qk) == hd
        if family == "gpt2":  # square value and output projections: (o v)^T = 0.4 Z - 0.4 I exactly (full rank)
            vo = layer.v_proj.weight.T @ layer.o_proj.weight.T
            assert vo.diagonal().mean().item() == pytest.approx(-0.4, abs=0.05)
    # a second seeded build draws the same weights; the default init stays N(0, 0.02)
    torch.manual_seed(0)
    again, _ = build_or_load(config)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    config.model.init = "normal"
    plain, _ = build_or_load(config)
    q = [m for m in plain.modules() if type(m).__name__ == "Attention"][0].q_proj.weight
    assert q.std().item() == pytest.approx(0.02, rel=0.1)


def test_mimetic_init_is_refused_where_it_does_not_apply(char_tokenizer_dir, tmp_path):
    raw = scratch_config(tmp_path, char_tokenizer_dir).model_dump(mode="json")
    raw["model"]["init"] = "mimetic"
    raw["model"]["architecture"] = {"family": "rnn", "cell": "lstm", "hidden_size": 32, "num_layers": 1}
    with pytest.raises(ConfigError, match="mimetic is for self-attention models"):
        validate(TrainConfig, raw, "test.yaml")
    raw["model"].pop("architecture")
    raw["model"]["source"] = "minilm-l6"
    raw["model"].pop("tokenizer")
    with pytest.raises(ConfigError, match="model.source is already trained"):
        validate(TrainConfig, raw, "test.yaml")
