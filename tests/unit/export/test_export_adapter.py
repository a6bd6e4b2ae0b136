"""export_peft: the adapters of a LoRA / DoRA model as a directory the peft library loads with our logits."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXTS, our_logits

from tunelab.export import export_peft

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_model_on_the_hf_base_gives_our_logits(dora, adapted, wide_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = adapted(dora=dora)
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    out = export_peft(model, tokenizer, tmp_path / "adapter", base_model=str(wide_llama))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    base = AutoModelForCausalLM.from_pretrained(wide_llama, attn_implementation="eager").eval()
    ref = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = ref(input_ids=ids).logits
    assert (got - our_logits(model, ids)).abs().max().item() <= 1e-5
