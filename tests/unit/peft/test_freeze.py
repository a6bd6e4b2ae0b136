"""The "freeze" method and parameter counting."""

from __future__ import annotations

import pytest

from tunelab.models.bert import BertConfig
from tunelab.models.gpt2 import GPT2Config
from tunelab.models.registry import build_model
from tunelab.peft import LoraSettings, apply_lora, freeze, trainable_parameters


def tiny_bert():
    config = BertConfig(vocab_size=99, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64, pad_token_id=0, labels=["a", "b"])
    return build_model(config, ["classifier"])


def tiny_gpt2():
    config = GPT2Config(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64)
    return build_model(config, ["lm"])


def frozen(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_freeze_embeddings_only():
    model = tiny_bert()
    freeze(model)
    assert frozen(model) == {
        "backbone.embeddings.tok.weight", "backbone.embeddings.pos.weight", "backbone.embeddings.segment.weight",
    }  # the embedding LayerNorm, the layers, the pooler and the head still train


def test_freeze_first_layers():
    model = tiny_bert()
    freeze(model, embeddings=False, first_n_layers=2)
    names = frozen(model)
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("backbone.layers.0.", "backbone.layers.1."))}
    freeze(model, first_n_layers=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("backbone.embeddings.norm.", "backbone.pooler.", "heads.")) for n in trainable)


def test_trainable_parameters_counts_tied_weights_once():
    model = tiny_gpt2()
    assert model.heads["lm"].proj.weight is model.backbone.tok_embeddings.weight
    trainable, total = trainable_parameters(model)
    assert trainable == total == model.num_parameters() == sum(p.numel() for p in model.parameters())
    freeze(model)  # token + position embeddings; the tied output projection is the same tensor
    trainable, total = trainable_parameters(model)
    assert total - trainable == 99 * 32 + 64 * 32
    assert not model.heads["lm"].proj.weight.requires_grad


def test_trainable_parameters_after_lora():
    model = tiny_bert()
    apply_lora(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = trainable_parameters(model)
    assert trainable == 3 * 2 * (4 * 32 + 32 * 4)
    assert total == tiny_bert().num_parameters() + trainable


@pytest.mark.parametrize("n", [-1, 4])
def test_bad_layer_counts(n):
    with pytest.raises(ValueError, match="first_n_layers"):
        freeze(tiny_bert(), first_n_layers=n)
