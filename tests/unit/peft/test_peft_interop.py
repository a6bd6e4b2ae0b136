"""Adapters in PEFT's format against the peft library itself, on tiny random transformers models.

Ours -> peft: apply our LoRA/DoRA with random non-zero A and B, save_peft_adapter, then
PeftModel.from_pretrained(hf_model, directory) gives our logits. peft -> ours: an adapter made with
get_peft_model + save_pretrained loads with load_peft_adapter and gives peft's logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.checkpoint.hf import read_hf_model
from tunelab.peft import LoraSettings, apply_lora, load_peft_adapter, lora_modules, lora_state_dict, save_peft_adapter
from tunelab.peft.lora import LoRALinear

peft = pytest.importorskip("peft")

TOL = 1e-5


def randomize_peft(peft_model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def our_logits(model, ids) -> torch.Tensor:
    return next(iter(model(ids).logits.values()))


@torch.no_grad()
def hf_logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


S = LoraSettings
CLS = ["heads.classifier"]
OURS_TO_PEFT = {
    "llama-qv": ("llama-gqa", S(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-dora": ("llama-gqa", S(r=4, alpha=8, target_modules="all-linear", dora=True)),
    "llama-rslora": ("llama-gqa", S(r=8, alpha=4, target_modules=["k_proj", "o_proj", "gate_proj"], rslora=True)),
    "bert-cls-qv": ("bert-cls", S(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=CLS)),
    "bert-cls-dora": ("bert-cls", S(r=4, alpha=16, target_modules="all-linear", dora=True, modules_to_save=CLS)),
    "distilbert-cls-dora": (
        "distilbert-cls", S(r=4, alpha=8, target_modules="all-linear", dora=True, modules_to_save=["classifier"]),
    ),
    "llama-cls": ("llama-cls", S(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])),
    "gpt2-qv": ("gpt2-lm", S(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "gpt2-all-dora": ("gpt2-lm", S(r=4, alpha=8, target_modules="all-linear", dora=True)),
    "gpt2-layer0-rslora": (
        "gpt2-lm", S(r=2, alpha=3, target_modules=[r"backbone\.layers\.0\.attn\.[qk]_proj", "fc_in"], rslora=True),
    ),
}


@pytest.mark.parametrize("name", list(OURS_TO_PEFT))
def test_our_adapter_loads_in_peft(tiny, make_hf_model, tmp_path, name):
    case, settings = OURS_TO_PEFT[name]
    hf_model, path = make_hf_model(case)
    model = read_hf_model(path)
    apply_lora(model, settings)
    tiny.randomize_adapters(model)
    ids = tiny.random_ids(2, tiny.SEQ)
    base = hf_logits(hf_model, ids)
    directory = save_peft_adapter(model, tmp_path / "adapter", base_model=str(path))
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = peft.PeftModel.from_pretrained(hf_model, directory).eval()
    expected = hf_logits(peft_model, ids)
    assert tiny.max_diff(expected, base) > 1e-2  # the adapter changes the outputs
    assert tiny.record(f"peft ours->peft {name}", tiny.max_diff(our_logits(model, ids), expected)) <= TOL


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_dropout_matches_peft_in_train_mode(tiny, make_hf_model, tmp_path, dora):
    """With the same random stream, dropout falls on the same adapter inputs in both (Llama draws no other
    random numbers: attention dropout is 0), so train-mode outputs agree too."""
    hf_model, path = make_hf_model("llama-gqa")
    model = read_hf_model(path)
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.3, target_modules=["q_proj", "v_proj", "up_proj"], dora=dora))
    tiny.randomize_adapters(model)
    peft_model = peft.PeftModel.from_pretrained(hf_model, save_peft_adapter(model, tmp_path / "a"), is_trainable=True)
    model.train()
    peft_model.train()
    ids = tiny.random_ids(2, tiny.SEQ)
    torch.manual_seed(7)
    ours = our_logits(model, ids)
    torch.manual_seed(7)
    theirs = hf_logits(peft_model, ids)
    model.eval()
    assert tiny.max_diff(ours, our_logits(model, ids)) > 1e-2  # dropout did act
    assert tiny.record(f"peft ours vs peft, train-mode dropout ({'DoRA' if dora else 'LoRA'})", tiny.max_diff(ours, theirs)) <= TOL


def test_written_config_uses_hf_module_names(make_hf_model, tmp_path):
    _, path = make_hf_model("bert-cls")
    model = read_hf_model(path)
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.1, modules_to_save=["heads.classifier"], dora=True))
    config = json.loads((save_peft_adapter(model, tmp_path / "a", base_model="tiny-bert") / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == ("LORA", "SEQ_CLS", "tiny-bert")
    assert config["use_dora"] is True and config["use_rslora"] is False and config["fan_in_fan_out"] is False


def test_gpt2_fused_qkv_is_written_as_c_attn(make_hf_model, tmp_path):
    _, path = make_hf_model("gpt2-lm")
    model = read_hf_model(path)
    apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "fc_out"]))
    directory = save_peft_adapter(model, tmp_path / "a")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "c_proj"]  # attn.c_proj and mlp.c_proj are both adapted
    assert config["fan_in_fan_out"] is True
    assert config["rank_pattern"] == {"c_attn": 8} and config["alpha_pattern"] == {"c_attn": 16.0}  # s = 2 kept
    from safetensors.torch import load_file

    tensors = load_file(directory / "adapter_model.safetensors")
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (96, 8) and not B[32:64].any()  # no update for the keys


def test_per_module_ranks_go_to_rank_and_alpha_patterns(tiny, make_hf_model, tmp_path):
    hf_model, path = make_hf_model("llama-gqa")
    model = read_hf_model(path)
    ranks = {f"backbone.layers.{i}.attn.q_proj": (4, 8) for i in range(2)}
    ranks.update({"backbone.layers.0.attn.v_proj": (2, 8), "backbone.layers.1.attn.v_proj": (6, 3)})
    apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), ranks=ranks)
    tiny.randomize_adapters(model)
    directory = save_peft_adapter(model, tmp_path / "a")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.v_proj": 2, r"model\.layers\.1\.self_attn\.v_proj": 6}
    assert config["alpha_pattern"] == {r"model\.layers\.1\.self_attn\.v_proj": 3}
    ids = tiny.random_ids(2, tiny.SEQ)
    peft_model = peft.PeftModel.from_pretrained(hf_model, directory).eval()
    assert tiny.record("peft ours->peft rank patterns", tiny.max_diff(our_logits(model, ids), hf_logits(peft_model, ids))) <= TOL
    again = load_peft_adapter(read_hf_model(path), directory)
    assert {p: (m.r, m.alpha) for p, m in lora_modules(again).items()} == ranks
    assert tiny.max_diff(our_logits(again, ids), our_logits(model, ids)) <= TOL


PEFT_TO_OURS = {
    "llama-patterns-rslora": (
        "llama-gqa",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], rank_pattern={"o_proj": 2},
             alpha_pattern={"k_proj": 3}, use_rslora=True, task_type="CAUSAL_LM"),
    ),
    "llama-mlp-dora": (
        "llama-gqa", dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_dora=True),
    ),
    "bert-cls-dora": (
        "bert-cls",
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], use_dora=True,
             task_type="SEQ_CLS"),
    ),
    "gpt2-all-dora": (
        "gpt2-lm",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True, fan_in_fan_out=True,
             task_type="CAUSAL_LM"),
    ),
    "gpt2-c_attn": ("gpt2-lm", dict(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("name", list(PEFT_TO_OURS))
def test_peft_adapter_loads_onto_our_model(tiny, make_hf_model, tmp_path, name):
    case, options = PEFT_TO_OURS[name]
    hf_model, path = make_hf_model(case)
    model = read_hf_model(path)
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(**options))
    randomize_peft(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = tiny.random_ids(2, tiny.SEQ)
    expected = hf_logits(peft_model, ids)
    assert load_peft_adapter(model, tmp_path / "adapter") is model
    model.eval()
    assert tiny.record(f"peft peft->ours {name}", tiny.max_diff(our_logits(model, ids), expected)) <= TOL
    layers = lora_modules(model)
    assert layers and all(m.dora == options.get("use_dora", False) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))  # adapters (+ modules_to_save) train, the base is frozen
    if case == "bert-cls":
        assert model.lora_settings.modules_to_save == ["heads.classifier.out"]
        assert "heads.classifier.out.weight" in trainable


def test_gpt2_c_attn_adapter_splits_over_q_k_v(make_hf_model, tmp_path):
    hf_model, path = make_hf_model("gpt2-lm")
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_peft_adapter(read_hf_model(path), tmp_path / "adapter")
    attn = model.backbone.layers[0].attn
    assert all(isinstance(getattr(attn, p), LoRALinear) for p in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(attn.q_proj.lora_a.weight, attn.v_proj.lora_a.weight)  # one A shared by the three
    assert attn.q_proj.r == 3 and attn.q_proj.scaling == 2.0
    assert model.lora_settings.target_modules == ["k_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("case,settings", [
    ("llama-gqa", LoraSettings(r=4, alpha=8, target_modules="all-linear", dora=True, rslora=True)),
    ("bert-cls", LoraSettings(r=4, alpha=8, modules_to_save=["heads.classifier"])),
])
def test_round_trip_through_our_own_files(tiny, make_hf_model, tmp_path, case, settings):
    _, path = make_hf_model(case)
    model = read_hf_model(path)
    apply_lora(model, settings)
    tiny.randomize_adapters(model)
    directory = save_peft_adapter(model, tmp_path / "adapter")
    again = load_peft_adapter(read_hf_model(path), directory)
    ours, theirs = lora_state_dict(model), lora_state_dict(again)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert sorted(lora_modules(again)) == sorted(lora_modules(model))
    assert again.lora_settings.target_modules == sorted({p.rsplit(".", 1)[-1] for p in lora_modules(model)})
    assert (again.lora_settings.dora, again.lora_settings.rslora) == (settings.dora, settings.rslora)
    ids = tiny.random_ids(2, tiny.SEQ)
    assert tiny.max_diff(our_logits(again, ids), our_logits(model, ids)) == 0.0
