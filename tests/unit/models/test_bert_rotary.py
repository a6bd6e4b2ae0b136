"""BERT with rotary positions (position_style "rotary"): RoFormer's maths, relative positions, its own save
layout, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.checkpoint.families import ARCHITECTURES
from tunelab.checkpoint.gguf import unpermute_rope_rows
from tunelab.checkpoint.hf import hf_to_ours, load_state, read_hf_model, write_hf_model
from tunelab.errors import CheckpointError
from tunelab.models.bert import BertConfig
from tunelab.models.registry import build_model, config_from_architecture

VOCAB, HEADS = 97, 4


def tiny(heads=("mlm",), seed: int = 0, **overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=HEADS, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=0, hidden_dropout=0.0, attention_dropout=0.0,
                  position_style="rotary")
    torch.manual_seed(seed)
    return build_model(BertConfig(**{**fields, **overrides}), list(heads)).eval()


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_mlm_logits_equal_transformers_roformer():
    """RoFormer (Su et al. 2021) rotates pairs (2i, 2i+1) of each head's query and key; tunelab rotates (i, i + d/2),
    so the same model is RoFormer's weights with the query and key rows reordered per head."""
    tf = pytest.importorskip("transformers")
    hf_config = tf.RoFormerConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=64,
                                  pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    reference = tf.RoFormerForMaskedLM(hf_config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "embed_positions" not in name:
                p.normal_(0, 0.3) if "LayerNorm" not in name else p.copy_(1 + 0.1 * torch.randn_like(p))
    hf = {}
    for name, tensor in reference.state_dict().items():
        if "embed_positions" in name or name == "cls.predictions.decoder.bias":
            continue  # RoFormer's fixed sin / cos table (tunelab computes the same angles); a tied copy of the bias
        if ".attention.self.query." in name or ".attention.self.key." in name:
            tensor = unpermute_rope_rows(tensor, HEADS)
        hf[name.replace("roformer.", "bert.")] = tensor
    model = tiny(seed=2, add_pooler=False)  # RoFormer has no pooler
    load_state(model, hf_to_ours(hf, ARCHITECTURES["BertForMaskedLM"], model, "roformer"), "roformer")
    x = ids(2, 11, 3)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    types = torch.zeros_like(x)
    types[:, 5:] = 1
    with torch.no_grad():
        expected = reference(input_ids=x, attention_mask=mask, token_type_ids=types).logits
        ours = model(x, mask, token_type_ids=types).logits["mlm"]
    torch.testing.assert_close(ours[0], expected[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1, :8], expected[1, :8], atol=2e-5, rtol=1e-5)


def test_only_relative_positions_matter():
    """Shifting every position by the same amount changes nothing with rotary positions; a learned table does."""
    x = ids(2, 9, 4)
    shifted = torch.arange(9).expand(2, 9) + 17
    for style, same in (("rotary", True), ("absolute", False)):
        model = tiny(seed=5, position_style=style)
        with torch.no_grad():
            plain = model(x).logits["mlm"]
            moved = model(x, position_ids=shifted).logits["mlm"]
        assert torch.allclose(plain, moved, atol=1e-5) is same, style
    assert not hasattr(tiny().backbone.embeddings.pos, "weight")  # no position table at all


def test_saved_in_tunelab_layout_and_loaded_back(tmp_path):
    from safetensors import safe_open

    model = tiny(heads=("mlm", "nsp"), seed=6)
    x, types = ids(2, 10, 7), torch.zeros(2, 10, dtype=torch.long)
    before = model(x, token_type_ids=types).logits
    write_hf_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # transformers' BERT would build a position table the file does not have: the config names our own type
    assert config["model_type"] == "tunelab-bert" and config["position_style"] == "rotary"
    assert config["heads"] == ["mlm", "nsp"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert not any(".pos." in name for name in f.keys())
    loaded = read_hf_model(tmp_path)
    assert loaded.config.model_type == "bert" and loaded.config.position_style == "rotary"
    after = loaded(x, token_type_ids=types).logits
    for head in ("mlm", "nsp"):
        torch.testing.assert_close(after[head], before[head], atol=0, rtol=0)


def test_an_absolute_bert_still_saves_as_hugging_face_bert(tmp_path):
    write_hf_model(tiny(position_style="absolute"), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"


@pytest.mark.parametrize("fields, message", [
    ({"position_style": "alibi"}, "position_style must be one of absolute, roberta, rotary, got 'alibi'"),
    ({"position_style": "rotary", "sinusoidal_positions": True}, "sinusoidal_positions needs a position table"),
    ({"position_style": "rotary", "hidden_size": 36, "num_heads": 4}, "position_style rotary needs an even head size, got 9"),
])
def test_bad_position_settings_are_named(fields, message):
    arch = {"family": "bert", "hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 8, **fields}
    with pytest.raises(ValueError, match=f"model.architecture: {message}"):
        config_from_architecture(arch, vocab_size=VOCAB)


def test_no_peft_adapter_in_hugging_face_names():
    from tunelab.peft import LoraSettings, apply_lora, save_peft_adapter

    model = tiny()
    apply_lora(model, LoraSettings(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(CheckpointError, match="tunelab-bert models have no Hugging Face architecture"):
        save_peft_adapter(model, "unused")

