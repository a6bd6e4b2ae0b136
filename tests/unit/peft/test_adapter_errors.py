"""Malformed or mismatching PEFT adapter directories give a CheckpointError naming the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import CheckpointError
from tunelab.models.bert import BertConfig
from tunelab.models.llama import LlamaConfig
from tunelab.models.registry import build_model
from tunelab.peft import LoraSettings, apply_lora, load_peft_adapter, lora_modules, save_peft_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def llama(intermediate: int = 64):
    config = LlamaConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=intermediate, max_position_embeddings=64)
    return build_model(config, ["lm"])


def bert():
    config = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64, pad_token_id=0)
    return build_model(config, ["mlm"])


@pytest.fixture
def adapter(tmp_path):
    """A valid adapter directory (LoRA on q, v and down_proj of a tiny Llama, DoRA)."""
    model = apply_lora(llama(), LoraSettings(r=4, target_modules=["q_proj", "v_proj", "down_proj"], dora=True))
    return save_peft_adapter(model, tmp_path / "adapter")


def edit_config(directory, **changes) -> None:
    path = directory / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_valid_adapter_loads(adapter):
    model = load_peft_adapter(llama(), adapter)
    assert len(lora_modules(model)) == 6


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no adapter_config\.json"):
        load_peft_adapter(llama(), tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such adapter directory"):
        load_peft_adapter(llama(), tmp_path / "missing")


def test_malformed_config_names_the_line(adapter):
    (adapter / CONFIG).write_text('{\n  "r": 4,\n  "lora_alpha": \n}')
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: malformed JSON at line 4"):
        load_peft_adapter(llama(), adapter)


def test_missing_and_truncated_weights(adapter):
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: not a valid safetensors file"):
        load_peft_adapter(llama(), adapter)
    (adapter / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no adapter weights"):
        load_peft_adapter(llama(), adapter)


@pytest.mark.parametrize("changes,message", [
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"lora_bias": True}, "lora_bias=True is not supported"),
    ({"r": 8}, "rank 4 in the weights but 8"),
    ({"rank_pattern": {"down_proj": 2}}, "down_proj has rank 4 in the weights but 2"),
    ({"use_dora": False}, "lora_magnitude_vector but use_dora is false"),
    ({"r": "four"}, "r must be a number"),
    ({"r": 0}, "rank r must be a positive integer"),
])
def test_bad_config_values(adapter, changes, message):
    edit_config(adapter, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        load_peft_adapter(llama(), adapter)
    assert str(adapter) in str(err.value)


def test_missing_tensors(adapter):
    tensors = load_file(adapter / WEIGHTS)
    for name in [k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_magnitude_vector")]:
        del tensors[name]
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(CheckpointError, match="use_dora is true but .*layers.0.self_attn.q_proj has no lora_magnitude"):
        load_peft_adapter(llama(), adapter)


def test_unexpected_tensor(adapter):
    tensors = load_file(adapter / WEIGHTS)
    tensors["base_model.model.model.norm.weight"] = torch.ones(32)
    save_file(tensors, adapter / WEIGHTS)
    with pytest.raises(CheckpointError, match="model.norm.weight is neither a LoRA weight nor part of modules_to_save"):
        load_peft_adapter(llama(), adapter)


def test_adapter_for_another_model(adapter):
    with pytest.raises(CheckpointError, match=r"targets 'model\.layers\.0\.\S+', which BertForMaskedLM does not have"):
        load_peft_adapter(bert(), adapter)
    with pytest.raises(CheckpointError, match=r"down_proj.lora_A.weight has shape \(4, 64\), expected \(r, 48\)"):
        load_peft_adapter(llama(intermediate=48), adapter)


def test_failed_load_leaves_the_model_untouched(adapter):
    model = llama(intermediate=48)
    with pytest.raises(CheckpointError):
        load_peft_adapter(model, adapter)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_saving_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft_adapter(llama(), tmp_path / "a")
