"""QLoRA: NF4 base weights (torchao), outputs near the unquantised model, gradients for adapters only, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.models.llama import LlamaConfig
from tunelab.models.registry import build_model
from tunelab.peft import LoraSettings, LoRALinear, apply_lora, lora_modules, merge_lora, unload_lora, unmerge_lora
from tunelab.peft import qlora


def llama(tiny, hidden=32, intermediate=64, layers=2, seed=0, std=0.3):
    """A tiny Llama with weights from N(0, std) (0.02: the usual initialisation, 0.3: the parity tests')."""
    config = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                         intermediate_size=intermediate, max_position_embeddings=128)
    model = build_model(config, ["lm"])
    tiny.randomize_weights(model, seed, std=std)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def lm_logits(model, ids):
    return model(ids).logits["lm"]


@pytest.mark.parametrize("dora", [False, True])
def test_base_weights_are_nf4_and_outputs_stay_close(tiny, dora):
    """NF4 rounds each weight with ~9% relative RMS error (16 levels); through a model with the usual
    N(0, 0.02) initialisation the logits move by a few percent."""
    from torchao.quantization import NF4Tensor

    model = llama(tiny, std=0.02)
    ids = tiny.random_ids(2, tiny.SEQ)
    reference = lm_logits(model, ids)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_lora(model, LoraSettings(r=4, target_modules="all-linear", quantize_base=True, dora=dora))
    for name, layer in lora_modules(model).items():
        assert isinstance(layer.weight, NF4Tensor) and qlora.is_nf4(layer.weight), name
        assert relative_error(qlora.dequantize(layer.weight), dense[name]) < 0.12, name
        assert layer.weight.block_size == qlora.BLOCK_SIZE
        assert layer.weight.shape == (layer.out_features, layer.in_features)
    assert "backbone.layers.0.attn.q_proj.weight" in model.state_dict()
    assert not qlora.is_nf4(model.heads["lm"].proj.weight)  # heads and embeddings are not quantised
    error = relative_error(lm_logits(model, ids), reference)
    tiny.record(f"peft QLoRA relative error ({'DoRA' if dora else 'LoRA'})", error)
    assert 0 < error < 0.1


def test_gradients_reach_only_the_adapters(tiny):
    model = llama(tiny)
    apply_lora(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj", "down_proj"], quantize_base=True))
    model.train()
    ids = tiny.random_ids(2, tiny.SEQ)
    out = model(ids).logits["lm"]
    F.cross_entropy(out[:, :-1].reshape(-1, tiny.VOCAB), ids[:, 1:].reshape(-1)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_b.weight"))


def test_nf4_base_uses_about_a_quarter_of_bf16_memory(tiny):
    model = llama(tiny, hidden=256, intermediate=512, layers=1).to(torch.bfloat16)
    targets = [r"backbone\.layers\.0\.(attn|mlp)\.\w+_proj"]
    bf16 = {n: m.weight.numel() * 2 for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    apply_lora(model, LoraSettings(r=8, target_modules=targets, quantize_base=True))
    nf4 = {n: qlora.nbytes(m.weight) for n, m in lora_modules(model).items()}
    assert nf4.keys() == bf16.keys()
    ratio = sum(bf16.values()) / sum(nf4.values())
    tiny.record("peft QLoRA NF4 bytes / bf16 bytes", 1 / ratio)
    assert 3.7 < ratio < 4.0  # 4 bits + one int8 scaler per 64 weights + small per-tensor constants
    for name in nf4:
        assert bf16[name] / nf4[name] > 3.5, name


def test_compute_in_the_input_dtype(tiny):
    model = llama(tiny).to(torch.bfloat16)
    apply_lora(model, LoraSettings(r=4, quantize_base=True))
    q = model.backbone.layers[0].attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_a.weight.dtype == torch.bfloat16
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16
    expected = F.linear(x, qlora.dequantize(q.weight, torch.bfloat16))  # B = 0: the dequantised base alone
    torch.testing.assert_close(q(x), expected)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_gives_dense_weights_and_unmerge_restores_nf4(tiny, dora):
    model = llama(tiny)
    apply_lora(model, LoraSettings(r=4, target_modules="all-linear", quantize_base=True, dora=dora))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.weight.normal_(0, 0.1)
    ids = tiny.random_ids(2, tiny.SEQ)
    unmerged = lm_logits(model, ids)
    nf4 = {n: m.weight for n, m in lora_modules(model).items()}
    merge_lora(model)
    for m in lora_modules(model).values():
        assert not qlora.is_nf4(m.weight) and m.weight.dtype == torch.float32
    assert tiny.max_diff(lm_logits(model, ids), unmerged) <= 1e-5 * unmerged.abs().max().item()
    unmerge_lora(model)
    for name, m in lora_modules(model).items():
        assert m.weight is nf4[name]
    unload_lora(model)
    assert not any(isinstance(m, LoRALinear) or qlora.is_nf4(p) for m in model.modules() for p in m.parameters())
    assert tiny.max_diff(lm_logits(model, ids), unmerged) <= 1e-5 * unmerged.abs().max().item()


def test_peft_adapter_loads_onto_an_nf4_base(tiny, tmp_path):
    from tunelab.peft import load_peft_adapter, save_peft_adapter

    trained = llama(tiny)
    apply_lora(trained, LoraSettings(r=4, target_modules=["q_proj", "v_proj"], dora=True))
    with torch.no_grad():
        for m in lora_modules(trained).values():
            m.lora_b.weight.normal_(0, 0.1)
    directory = save_peft_adapter(trained, tmp_path / "adapter")
    model = load_peft_adapter(llama(tiny), directory, quantize_base=True)
    assert all(m.quantized for m in lora_modules(model).values())
    for name, m in lora_modules(model).items():
        assert torch.equal(m.lora_b.weight, lora_modules(trained)[name].lora_b.weight)
    ids = tiny.random_ids(2, tiny.SEQ)
    assert relative_error(lm_logits(model, ids), lm_logits(trained, ids)) < 0.5  # NF4 error through N(0, 0.3) weights


def test_scaler_blocks_follow_qlora_and_shrink_for_tiny_layers():
    assert qlora.scaler_block_size(256 * 256) == 256  # 1024 blocks of 64
    assert qlora.scaler_block_size(32 * 32) == 16  # 16 blocks of 64
    assert qlora.scaler_block_size(16 * 96) == 24


def test_layers_that_do_not_fill_nf4_blocks_are_refused():
    layer = nn.Linear(10, 6)  # 60 weights, not a multiple of 64
    with pytest.raises(ValueError, match="block size 64"):
        LoRALinear(layer, 2, 4, quantize_base=True, name="backbone.odd")
