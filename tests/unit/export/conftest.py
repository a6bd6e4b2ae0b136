"""A tiny random Llama (64 wide, so that every matrix row splits into Q8_0 blocks) with the ChatML byte-level
BPE tokenizer of the shared `chat_llama` fixture, saved as a transformers directory, and a LoRA-adapted copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def wide_llama(chat_llama, tmp_path_factory, tiny) -> Path:
    import transformers as tf

    from tunelab.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(chat_llama)
    path = tmp_path_factory.mktemp("export-llama")
    config = tf.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    tiny.randomize_weights(model, seed=0, std=0.1)
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


@pytest.fixture
def adapted(wide_llama, tiny):
    """adapted(dora=False, quantize_base=False) -> (our model with random adapters on every linear, tokenizer)."""
    import tunelab
    from tunelab.peft import LoraSettings, apply_lora

    def make(**settings):
        model, tokenizer = tunelab.load(wide_llama)
        apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["all-linear"], **settings))
        tiny.randomize_adapters(model)
        return model.eval(), tokenizer

    return make


TEXTS = ["To be, or not to be: that is the question.", "<|im_start|>user\nHi there!<|im_end|>\n", "123 ünï 🚀"]


@torch.no_grad()
def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits["lm"]
