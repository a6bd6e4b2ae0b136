"""Exports refuse to overwrite, and a format the model cannot take is one clear error naming why."""

from __future__ import annotations

import pytest

import tunelab
from tunelab.checkpoint.hf import read_hf_model
from tunelab.errors import CheckpointError
from tunelab.export import check_options, export_gguf, export_model, export_peft


def test_non_empty_output_directory_is_refused_before_loading(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not empty"):
        export_model("no-such-model", "hf", tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_existing_gguf_file_is_not_overwritten(wide_llama, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    model, tokenizer = tunelab.load(wide_llama)
    with pytest.raises(CheckpointError, match="output file exists"):
        export_gguf(model, tokenizer, out)
    assert out.read_bytes() == b"old"


def test_peft_without_adapters(wide_llama, tmp_path):
    model, tokenizer = tunelab.load(wide_llama)
    with pytest.raises(CheckpointError, match="no LoRA/DoRA adapters"):
        export_peft(model, tokenizer, tmp_path / "adapter", source=str(wide_llama))
    assert not (tmp_path / "adapter").exists()


def test_gguf_of_a_bert_model_names_the_supported_families(make_hf_model, wide_llama, tmp_path):
    _, directory = make_hf_model("bert-mlm")
    with pytest.raises(CheckpointError, match=r"bert models have no GGUF writer \(supported: gpt2, llama, mistral, qwen2\)"):
        export_gguf(read_hf_model(directory), tunelab.load(wide_llama)[1], tmp_path / "bert.gguf", source="bert")
    assert not (tmp_path / "bert.gguf").exists()


def test_gguf_of_a_classifier_is_refused(make_hf_model, wide_llama, tmp_path):
    _, directory = make_hf_model("llama-cls")
    with pytest.raises(CheckpointError, match="heads are classifier"):
        export_gguf(read_hf_model(directory), tunelab.load(wide_llama)[1], tmp_path / "cls.gguf")


@pytest.mark.parametrize(("format", "quant", "message"), [
    ("onnx", None, "unknown export format"), ("hf", "q8_0", "q8_0 is for gguf"), ("peft", "f16", "does not apply"),
    ("gguf", "q4_0", "unknown quantization"),
])
def test_bad_options(format, quant, message):
    with pytest.raises(CheckpointError, match=message):
        check_options(format, quant)
