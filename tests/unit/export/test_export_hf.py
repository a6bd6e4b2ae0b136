"""export_hf: a LoRA / DoRA / QLoRA model merged into an HF directory that transformers reads with our logits."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXTS, our_logits

from tunelab.export import export_hf


@pytest.mark.parametrize("settings", [{}, {"dora": True}, {"quantize_base": True}], ids=["lora", "dora", "qlora"])
def test_merged_directory_gives_our_logits_and_tokens_in_transformers(settings, adapted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = adapted(**settings)
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    expected = our_logits(model, ids)
    out = export_hf(model, tokenizer, tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json",
    ]
    ref = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert not any("lora" in name for name, _ in ref.named_parameters())
    with torch.no_grad():
        got = ref(input_ids=ids).logits
    tol = 1e-2 if settings.get("quantize_base") else 1e-5  # QLoRA: the NF4 base, dequantised, against NF4 compute
    assert (got - expected).abs().max().item() <= tol
    ref_tokenizer = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert ref_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    messages = [{"role": "user", "content": "Hi!"}]
    assert ref_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_f16_weights(adapted, tmp_path):
    from safetensors.torch import load_file

    model, tokenizer = adapted()
    out = export_hf(model, tokenizer, tmp_path / "half", dtype="float16")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float16}
