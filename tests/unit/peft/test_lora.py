"""LoRA / rsLoRA / DoRA layers and apply_lora on our own tiny models (no transformers needed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.checkpoint.hf import read_hf_model, write_hf_model
from tunelab.models.bert import BertConfig
from tunelab.models.llama import LlamaConfig
from tunelab.models.registry import build_model
from tunelab.peft import (
    LoraSettings,
    LoRALinear,
    apply_lora,
    lora_disabled,
    lora_modules,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)


def tiny_llama(tiny, *, tie: bool = False, seed: int = 0):
    config = LlamaConfig(
        vocab_size=tiny.VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_position_embeddings=128, tie_embeddings=tie,
    )
    model = build_model(config, ["lm"])
    tiny.randomize_weights(model, seed)
    return model.eval()


def tiny_bert(tiny, seed: int = 0):
    config = BertConfig(
        vocab_size=tiny.VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, labels=["neg", "neu", "pos"],
    )
    model = build_model(config, ["classifier"])
    tiny.randomize_weights(model, seed)
    return model.eval()


def randomize_adapters(model, seed: int = 1) -> None:
    """Non-zero B (and magnitudes off the weight norms) so that adapters change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.weight.copy_(0.1 * torch.randn(m.lora_b.weight.shape, generator=gen))
            if m.dora:
                m.lora_magnitude.mul_(0.5 + torch.rand(m.lora_magnitude.shape, generator=gen))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    out = model(ids)
    return next(iter(out.logits.values()))


# ---------------------------------------------------------------------------------------------
# The layer


def make_layer(r=4, alpha=8.0, **kw) -> tuple[nn.Linear, LoRALinear]:
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    reference = nn.Linear(16, 8)
    reference.load_state_dict(base.state_dict())
    return reference, LoRALinear(base, r, alpha, **kw)


@pytest.mark.parametrize("dora", [False, True])
def test_zero_b_leaves_the_layer_unchanged(dora):
    reference, layer = make_layer(dora=dora)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=1e-6)


def test_forward_is_w_x_plus_scaled_b_a_x():
    reference, layer = make_layer(r=4, alpha=8.0)
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 5, 16)
    A, B, W, b = layer.lora_a.weight, layer.lora_b.weight, reference.weight, reference.bias
    expected = x @ W.T + b + (8.0 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert layer.scaling == 2.0


def test_rslora_scales_by_alpha_over_sqrt_r():
    reference, layer = make_layer(r=16, alpha=8.0, rslora=True)
    assert layer.scaling == pytest.approx(8.0 / math.sqrt(16))
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(2, 16)
    A, B = layer.lora_a.weight, layer.lora_b.weight
    torch.testing.assert_close(layer(x), reference(x) + 2.0 * x @ A.T @ B.T, rtol=0, atol=1e-5)


def test_dora_forward_is_magnitude_times_normalised_weight():
    reference, layer = make_layer(r=4, alpha=8.0, dora=True)
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_b.weight)
        layer.lora_magnitude.mul_(torch.linspace(0.5, 1.5, 8))
    W, b = reference.weight, reference.bias
    adapted = W + 2.0 * layer.lora_b.weight @ layer.lora_a.weight  # W + s B A
    column_norm = torch.linalg.norm(adapted, dim=1, keepdim=True)  # per output row, as PEFT
    W_dora = layer.lora_magnitude[:, None] * adapted / column_norm  # Liu et al. 2024, eq. 5
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), x @ W_dora.T + b, rtol=0, atol=1e-5)


def test_dora_norm_gets_no_gradient_but_magnitude_does():
    _, layer = make_layer(dora=True)
    torch.nn.init.normal_(layer.lora_b.weight)
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.lora_magnitude.grad is not None and layer.lora_a.weight.grad is not None
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_only_in_train_mode(dora):
    _, layer = make_layer(dropout=0.5, dora=dora)
    _, plain = make_layer(dropout=0.0, dora=dora)
    torch.nn.init.normal_(layer.lora_b.weight)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(8, 16)
    layer.eval()
    plain.eval()
    torch.testing.assert_close(layer(x), plain(x))  # eval: no dropout at all
    layer.train()
    torch.manual_seed(3)
    first = layer(x)
    second = layer(x)
    assert not torch.allclose(first, second)  # train: the adapter input is dropped at random


def test_rank_must_be_positive():
    for r in (0, -1):
        with pytest.raises(ValueError, match="rank r must be a positive integer"):
            LoraSettings(r=r)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.0)


# ---------------------------------------------------------------------------------------------
# apply_lora on a model


def test_b_zero_leaves_model_outputs_unchanged(tiny):
    model = tiny_llama(tiny)
    ids = tiny.random_ids(2, tiny.SEQ)
    before = logits(model, ids)
    apply_lora(model, LoraSettings(r=4, target_modules=["all-linear"], dora=True))
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)


def test_base_weight_names_are_kept(tiny):
    model = tiny_llama(tiny)
    names_before = set(model.state_dict())
    apply_lora(model, LoraSettings(r=4, dora=True))
    names = set(model.state_dict())
    assert names_before <= names
    assert isinstance(model.backbone.layers[0].attn.q_proj, LoRALinear)
    added = names - names_before
    assert added == {
        f"backbone.layers.{i}.attn.{p}.{t}"
        for i in range(2) for p in ("q_proj", "v_proj") for t in ("lora_a.weight", "lora_b.weight", "lora_magnitude")
    }


def test_only_adapters_and_modules_to_save_are_trainable(tiny):
    model = tiny_bert(tiny)
    apply_lora(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["heads.classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        *(f"backbone.layers.{i}.attn.{p}.lora_{ab}.weight" for i in range(2) for p in ("q_proj", "v_proj") for ab in "ab"),
        "heads.classifier.out.weight",
        "heads.classifier.out.bias",
    }
    # lora_state_dict: exactly the adapters and the classifier, under our names
    assert set(lora_state_dict(model)) == trainable
    assert model.lora_settings.modules_to_save == ["heads.classifier"]
    # counts: q and v of 2 layers, each r (32 + 32), plus the classifier 32*3 + 3
    assert trainable_parameters(model)[0] == 2 * 2 * 4 * 64 + 99


def test_modules_to_save_by_short_name(tiny):
    model = tiny_bert(tiny)
    apply_lora(model, LoraSettings(r=2, modules_to_save=["classifier"]))
    assert model.lora_settings.modules_to_save == ["heads.classifier"]


def test_training_reduces_loss_and_leaves_base_weights_bit_identical(tiny):
    model = tiny_llama(tiny)
    apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    base = {k: v.clone() for k, v in model.state_dict().items() if k not in lora_state_dict(model)}
    model.train()
    ids = tiny.random_ids(4, tiny.SEQ, seed=5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def loss_fn():
        out = model(ids).logits["lm"]  # next-token loss on a fixed toy batch
        return F.cross_entropy(out[:, :-1].reshape(-1, tiny.VOCAB), ids[:, 1:].reshape(-1))

    first = loss_fn().item()
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    assert loss_fn().item() < first - 0.1
    for name, value in model.state_dict().items():
        if name in base:
            assert torch.equal(value, base[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_merge_then_unmerge(tiny, family, dora, dtype):
    """Merged outputs equal unmerged ones up to rounding (1e-5 of the logits' scale in fp32, 1e-12 in fp64)
    and unmerging gives the weights back (1e-6)."""
    model = (tiny_llama(tiny) if family == "llama" else tiny_bert(tiny)).to(dtype)
    apply_lora(model, LoraSettings(r=4, target_modules=["all-linear"], dora=dora))
    randomize_adapters(model)
    ids = tiny.random_ids(2, tiny.SEQ)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model, ids)
    tolerance = (1e-5 if dtype == torch.float32 else 1e-12) * max(1.0, unmerged.abs().max().item())
    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    q = model.backbone.layers[0].attn.q_proj
    assert not torch.allclose(q.weight, weights["backbone.layers.0.attn.q_proj.weight"])
    kind = f"{family}, {'DoRA' if dora else 'LoRA'}, {str(dtype).removeprefix('torch.')}"
    assert tiny.record(f"peft merged vs unmerged ({kind})", tiny.max_diff(logits(model, ids), unmerged)) <= tolerance
    unmerge_lora(model)
    assert not any(m.merged for m in lora_modules(model).values())
    for name, value in model.state_dict().items():
        assert tiny.max_diff(value, weights[name]) <= 1e-6, name
    assert tiny.max_diff(logits(model, ids), unmerged) <= tolerance


def test_merged_layer_matches_by_hand():
    reference, layer = make_layer(r=4, alpha=8.0)
    torch.nn.init.normal_(layer.lora_b.weight)
    expected = reference.weight + 2.0 * layer.lora_b.weight @ layer.lora_a.weight
    layer.merge()
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)


def test_unload_gives_a_plain_model_that_saves(tiny, tmp_path):
    model = tiny_llama(tiny)
    apply_lora(model, LoraSettings(r=4, target_modules=["all-linear"], dora=True))
    randomize_adapters(model)
    ids = tiny.random_ids(2, tiny.SEQ)
    adapted = logits(model, ids)
    unload_lora(model)
    assert not lora_modules(model) and not hasattr(model, "lora_settings")
    assert type(model.backbone.layers[0].attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(model, ids), adapted, rtol=0, atol=1e-5)
    again = read_hf_model(write_hf_model(model, tmp_path / "merged"))
    torch.testing.assert_close(logits(again, ids), adapted, rtol=0, atol=1e-5)


def test_adapters_disabled_gives_the_base_model(tiny):
    model = tiny_llama(tiny)
    ids = tiny.random_ids(2, tiny.SEQ)
    base = logits(model, ids)
    apply_lora(model, LoraSettings(r=4, dora=True))
    randomize_adapters(model)
    adapted = logits(model, ids)
    with lora_disabled(model):
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), adapted)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        with lora_disabled(model):
            pass


# ---------------------------------------------------------------------------------------------
# Choosing the layers


def test_all_linear_is_every_backbone_linear(tiny):
    model = tiny_bert(tiny)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("backbone.")]
    apply_lora(model, LoraSettings(r=2, target_modules="all-linear"))
    assert sorted(lora_modules(model)) == sorted(linears)
    assert "backbone.pooler.dense" in lora_modules(model)
    assert not any(n.startswith("heads.") for n in lora_modules(model))


def test_regex_targets_match_full_paths(tiny):
    model = tiny_llama(tiny)
    apply_lora(model, LoraSettings(r=2, target_modules=[r"backbone\.layers\.0\.attn\.[qk]_proj", "down_proj"]))
    assert sorted(lora_modules(model)) == [
        "backbone.layers.0.attn.k_proj", "backbone.layers.0.attn.q_proj",
        "backbone.layers.0.mlp.down_proj", "backbone.layers.1.mlp.down_proj",
    ]


def test_target_matching_nothing_names_the_pattern_and_the_choices(tiny):
    model = tiny_llama(tiny)
    with pytest.raises(ValueError) as err:
        apply_lora(model, LoraSettings(target_modules=["q_proj", "query"]))
    message = str(err.value)
    assert "'query'" in message and "q_proj" in message and "gate_proj" in message
    assert not lora_modules(model)  # nothing was changed
    assert all(p.requires_grad for p in model.parameters())


def test_bad_modules_to_save_and_double_application(tiny):
    model = tiny_llama(tiny)
    with pytest.raises(ValueError, match="'heads.classifier'.*heads.lm"):
        apply_lora(model, LoraSettings(modules_to_save=["heads.classifier"]))
    apply_lora(model, LoraSettings())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraSettings())


def test_tied_weights_are_refused(tiny):
    model = tiny_llama(tiny, tie=True)
    with pytest.raises(ValueError, match="tied"):
        apply_lora(model, LoraSettings(target_modules=[r"heads\.lm\.proj"]))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_bf16_frozen_base_trains_like_the_fp32_one_under_autocast(tiny, family):
    """cast_frozen_base: under bf16 autocast the loss and every adapter gradient are the same as with the fp32
    base (autocast casts the weights to bf16 either way); outside autocast the layers still run (in fp32).
    DoRA layers keep their fp32 base (their column norms need it)."""
    from tunelab.peft.lora import cast_frozen_base

    models = []
    for _ in range(2):
        model = tiny_llama(tiny) if family == "llama" else tiny_bert(tiny)
        apply_lora(model, LoraSettings(r=4, alpha=8, target_modules="all-linear"))
        randomize_adapters(model)
        models.append(model.eval())  # no dropout: the two passes must draw nothing at random
    fp32, low = models
    low.load_state_dict(fp32.state_dict())  # the same adapters (A is drawn at random)
    freed = cast_frozen_base(low, torch.bfloat16)
    adapted = lora_modules(low).values()
    assert freed == sum(m.weight.numel() * 2 + (m.bias.numel() * 2 if m.bias is not None else 0) for m in adapted)
    assert {m.weight.dtype for m in adapted} == {torch.bfloat16}
    assert {p.dtype for p in low.parameters() if p.requires_grad} == {torch.float32}  # the adapters stay fp32
    ids = tiny.random_ids(2, tiny.SEQ, seed=3)
    grads = []
    for model in (fp32, low):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = next(iter(model(ids).logits.values()))
        loss = out.float().square().mean()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, grad in grads[0][1].items():
        assert torch.equal(grad, grads[1][1][name]), name
    assert cast_frozen_base(low, torch.bfloat16) == 0  # already cast
    with torch.no_grad():  # fp32 activations, no autocast: the base is cast to them
        reference = logits(fp32, ids)
        assert tiny.max_diff(logits(low, ids), reference) <= 0.05 * float(reference.abs().max())
    dora = tiny_llama(tiny)
    apply_lora(dora, LoraSettings(r=4, alpha=8, dora=True, target_modules="all-linear"))
    assert cast_frozen_base(dora, torch.bfloat16) == 0
    assert {m.weight.dtype for m in lora_modules(dora).values()} == {torch.float32}
