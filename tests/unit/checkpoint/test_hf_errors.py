"""A broken model directory gives a CheckpointError that names the file and says what is wrong."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.checkpoint.hf import read_hf_model
from tunelab.errors import CheckpointError, TunelabError


@pytest.fixture(scope="module")
def pristine(tiny, tmp_path_factory):
    """A valid tiny Llama directory, written once; tests break copies of it."""
    return tiny.save_hf_model(tiny.build_hf_model("llama-gqa"), tmp_path_factory.mktemp("pristine") / "llama")


@pytest.fixture
def model_dir(pristine, tmp_path):
    """A fresh copy of the valid directory to break."""
    return shutil.copytree(pristine, tmp_path / "model")


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


DELETE = object()


def read_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_hf_model(path)
    assert isinstance(info.value, TunelabError)
    return str(info.value)


def test_the_valid_directory_reads(model_dir):
    assert read_hf_model(model_dir).family == "llama"


def test_wrong_path(tmp_path):
    missing = tmp_path / "no-such-model"
    message = read_error(missing)
    assert str(missing) in message and "no such model directory" in message


def test_directory_without_config(model_dir):
    (model_dir / "config.json").unlink()
    message = read_error(model_dir)
    assert str(model_dir / "config.json") in message and "not found" in message


def test_truncated_config_names_the_line(model_dir):
    path = model_dir / "config.json"
    text = path.read_text()
    cut = text[: len(text) // 2]
    path.write_text(cut)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(cut)
    message = read_error(model_dir)
    assert str(path) in message and "malformed JSON" in message
    assert f"line {expected.value.lineno}," in message and expected.value.lineno > 5


def test_syntax_error_names_its_line(model_dir):
    path = model_dir / "config.json"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].rstrip(",") + ",,"  # line 5
    path.write_text("\n".join(lines))
    message = read_error(model_dir)
    assert str(path) in message and "line 5," in message


def test_config_that_is_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[1, 2, 3]\n")
    message = read_error(model_dir)
    assert str(model_dir / "config.json") in message and "expected a JSON object" in message


def test_unknown_model_type(model_dir):
    edit_config(model_dir, model_type="mamba9", architectures=["Mamba9ForCausalLM"])
    message = read_error(model_dir)
    assert str(model_dir / "config.json") in message
    assert "mamba9" in message and "unknown architecture" in message and "llama" in message  # lists supported ones


def test_unknown_architectures_entry(model_dir):
    edit_config(model_dir, architectures=["LlamaForImageGeneration"])
    message = read_error(model_dir)
    assert str(model_dir / "config.json") in message
    assert "LlamaForImageGeneration" in message and "LlamaForCausalLM" in message  # names the supported classes


def test_missing_required_field(model_dir):
    edit_config(model_dir, hidden_size=DELETE)
    message = read_error(model_dir)
    assert str(model_dir) in message and "'hidden_size'" in message


@pytest.mark.parametrize("field,value,words", [
    ("num_attention_heads", 5, "num_heads (5) must be a multiple of num_kv_heads (2)"),
    ("hidden_size", "thirty-two", "cannot be built"),
    ("num_hidden_layers", "2", "cannot be built"),
    ("rope_parameters", 5, "wrong type"),
])
def test_field_of_wrong_type_or_value(model_dir, field, value, words):
    edit_config(model_dir, **{field: value})
    message = read_error(model_dir)
    assert str(model_dir) in message and words in message


def test_truncated_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = read_error(model_dir)
    assert str(path) in message and "truncated or corrupt" in message


def test_truncated_pytorch_bin(model_dir):
    weights = model_dir / "model.safetensors"
    bin_path = model_dir / "pytorch_model.bin"
    torch.save(load_file(weights), bin_path)
    weights.unlink()
    read_hf_model(model_dir)  # the intact .bin reads
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[: len(data) // 2])
    message = read_error(model_dir)
    assert str(bin_path) in message and "truncated or corrupt" in message


def test_no_weights_file(model_dir):
    (model_dir / "model.safetensors").unlink()
    message = read_error(model_dir)
    assert str(model_dir) in message and "no weights found" in message and "model.safetensors" in message


def test_weight_with_the_wrong_shape(model_dir):
    edit_config(model_dir, intermediate_size=48)  # the file holds 64
    message = read_error(model_dir)
    assert str(model_dir) in message and "shape" in message
    assert re.search(r"mlp\.\w+\.weight has shape \((32, 64|64, 32)\), the config implies \((32, 48|48, 32)\)", message)


def test_missing_and_unexpected_weights(model_dir):
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    missing = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, path)
    message = read_error(model_dir)
    assert str(model_dir) in message and "missing weights" in message and "layers.1.mlp.up_proj.weight" in message

    tensors["model.layers.1.mlp.up_proj.weight"] = missing
    tensors["model.layers.1.mlp.extra_proj.weight"] = missing.clone()
    save_file(tensors, path)
    message = read_error(model_dir)
    assert "unexpected weights" in message and "model.layers.1.mlp.extra_proj.weight" in message


def _shard(model_dir):
    """Split model.safetensors in two shards with an index, as save_pretrained does for large models."""
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, model_dir / shard)
        weight_map.update({n: shard for n in part})
    index = model_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index, weight_map


def test_index_pointing_to_a_missing_shard(model_dir):
    index, _ = _shard(model_dir)
    read_hf_model(model_dir)  # intact shards read
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    message = read_error(model_dir)
    assert str(model_dir / "model-00002-of-00002.safetensors") in message and "not found" in message


def test_index_listing_a_tensor_no_shard_holds(model_dir):
    index, weight_map = _shard(model_dir)
    weight_map["model.layers.7.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    message = read_error(model_dir)
    assert str(index) in message and "missing from the shards" in message and "layers.7" in message


def test_index_without_weight_map(model_dir):
    index, _ = _shard(model_dir)
    index.write_text(json.dumps({"metadata": {}}))
    message = read_error(model_dir)
    assert str(index) in message and "weight_map" in message
