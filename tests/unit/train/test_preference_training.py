"""Learning from preferences end to end on a tiny random Llama with a ChatML template and real hh-rlhf pairs:
adapters off is the base model exactly, the reference runs once per example (not per epoch, not on resume),
DPO raises the reward accuracy and margin of its training pairs, and every loss trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tunelab
from tunelab.config.loading import validate
from tunelab.config.schema import TrainConfig
from tunelab.data.preference import encode_preferences, load_preferences
from tunelab.errors import ConfigError
from tunelab.peft import LoraSettings, apply_lora, lora_disabled, lora_modules
from tunelab.train import run as run_module
from tunelab.train.preference import REFERENCE_FILE, PreferenceStep, reference_model
from tunelab.train.run import train

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
HH = DATA / "hh_rlhf" / "harmless-base-pairs.jsonl"


@pytest.fixture(scope="module")
def short_pairs(tmp_path_factory) -> Path:
    """The first 24 hh-rlhf pairs whose transcripts are under 260 characters, as a jsonl file."""
    records = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()]
    short = [r for r in records if max(len(r["chosen"]), len(r["rejected"])) < 260][:24]
    path = tmp_path_factory.mktemp("pref-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in short), encoding="utf-8")
    return path


def make_config(output_dir: Path, model: Path, data: Path, *, task=None, method="lora", **train_options) -> TrainConfig:
    train_section = {"epochs": 3, "batch_size": 4, "lr": 5e-3, "precision": "fp32", "warmup": 0, "logging_steps": 1,
                     "save_steps": 0, "seed": 7, **train_options}
    raw = {"output_dir": str(output_dir), "model": {"source": str(model)}, "task": task or {"type": "preference"},
           "data": {"train": str(data), "max_length": 160, "validation_split": 0.25},
           "method": {"type": method, "lora": {"r": 4, "alpha": 8, "target_modules": ["all-linear"]}},
           "train": train_section}
    return validate(TrainConfig, raw, "test config")


def history(run_dir: Path, split: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == split]


def quiet(config: TrainConfig, **kw) -> dict:
    return train(config, show_progress=False, log=lambda *a: None, **kw)


# ------------------------------------------------------------------------------------------------ the reference


def test_adapters_off_gives_the_base_models_log_probs_exactly(chat_llama, short_pairs):
    base, tokenizer = tunelab.load(chat_llama)
    base.requires_grad_(False)  # frozen like the adapted model's base: the LM head takes the same (fused) path
    adapted, _ = tunelab.load(chat_llama)
    apply_lora(adapted, LoraSettings(r=4, alpha=8, target_modules=["all-linear"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for module in lora_modules(adapted).values():
            module.lora_b.weight.normal_(0.0, 0.5)  # trained-looking adapters: they change the outputs
    pairs, _ = load_preferences(short_pairs)
    step = PreferenceStep(pad_token_id=tokenizer.pad_token_id)
    batch = step.collate(encode_preferences(pairs[:6], tokenizer, 160).features)
    base.eval(), adapted.eval()
    with torch.no_grad():
        expected, counts = step.row_logps(base, batch)
        with lora_disabled(adapted):
            off, _ = step.row_logps(adapted, batch)
        with reference_model(adapted) as reference:
            assert reference is adapted  # no copy
            again, _ = step.row_logps(reference, batch)
        on, _ = step.row_logps(adapted, batch)
    assert torch.equal(off, expected) and torch.equal(again, expected)  # bit for bit
    assert not torch.allclose(on, expected, atol=1e-3)  # the adapters are back on afterwards
    assert counts.min() > 0


def test_the_reference_runs_once_per_example_not_per_epoch_nor_on_resume(chat_llama, short_pairs, tmp_path,
                                                                         monkeypatch):
    forwards: list[tuple[int, bool]] = []  # (rows, adapters on) of every forward pass of the trained model
    original = run_module.prepare_model

    def spied(config, labels, tokenizer=None):
        model, tokenizer = original(config, labels, tokenizer)

        def count(module, args, kwargs):
            forwards.append((args[0].shape[0], all(m.active for m in lora_modules(module).values())))

        model.register_forward_pre_hook(count, with_kwargs=True)
        return model, tokenizer

    monkeypatch.setattr(run_module, "prepare_model", spied)
    out = tmp_path / "run"
    # 24 pairs: 18 train (5 steps of 4 pairs an epoch), 6 validation; evaluations at 0, 5, 10 and at the end (15)
    quiet(make_config(out, chat_llama, short_pairs, epochs=3, eval_steps=5, eval_at_start=True, save_steps=5))
    reference_rows = sum(rows for rows, on in forwards if not on)
    policy_rows = sum(rows for rows, on in forwards if on)
    assert reference_rows == 2 * (18 + 6)  # each chosen and rejected answer once
    assert policy_rows == 3 * 2 * 18 + 4 * 2 * 6  # three epochs of training, four evaluations
    assert (out / REFERENCE_FILE).exists()

    # resumed from checkpoint-10 (and asked for one more epoch): the reference comes from the run directory
    forwards.clear()
    quiet(make_config(out, chat_llama, short_pairs, epochs=4, eval_steps=5, eval_at_start=True, save_steps=5),
          resume=True)
    assert sum(rows for rows, on in forwards if not on) == 0
    assert sum(rows for rows, on in forwards if on) == 2 * 2 * 18 + 2 * 2 * 6  # steps 11-20, evaluations 15 and 20


def test_resumed_run_ends_where_an_uninterrupted_one_does(chat_llama, short_pairs, tmp_path):
    from safetensors.torch import load_file

    whole = tmp_path / "whole"
    quiet(make_config(whole, chat_llama, short_pairs, epochs=2, save_steps=3))
    # the same run resumed from its checkpoint-9 (as after a kill during step 10): the same final adapter
    (whole / "adapter").rename(tmp_path / "adapter-uninterrupted")
    quiet(make_config(whole, chat_llama, short_pairs, epochs=2, save_steps=3), resume=True)
    a = load_file(str(tmp_path / "adapter-uninterrupted" / "adapter_model.safetensors"))
    b = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reference_cache_holds_each_split_for_its_rows_only(tmp_path):
    from tunelab.train.preference import load_reference_cache, reference_fingerprint, save_reference_cache

    step = PreferenceStep()
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "reference_chosen": -1.5,
             "reference_rejected": -2.25},
            {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9], "reference_chosen": -0.5,
             "reference_rejected": -3.0}]
    context = {"reference": "m", "dtype": "float32", "precision": "fp32", "method": "lora"}
    fingerprint = reference_fingerprint(step, rows, context)
    path = tmp_path / REFERENCE_FILE
    save_reference_cache(path, {"train": (rows, fingerprint)}, step)
    fresh = [{k: v for k, v in r.items() if not k.startswith("reference_")} for r in rows]
    assert load_reference_cache(path, "train", step, fresh, fingerprint)
    assert [(f["reference_chosen"], f["reference_rejected"]) for f in fresh] == [(-1.5, -2.25), (-0.5, -3.0)]
    assert not load_reference_cache(path, "validation", step, fresh, fingerprint)  # another split
    other_rows = [dict(fresh[0], chosen_ids=[3, 3]), fresh[1]]
    assert reference_fingerprint(step, other_rows, context) != fingerprint  # other tokens
    assert reference_fingerprint(step, rows, {**context, "precision": "bf16"}) != fingerprint  # another reference
    assert not load_reference_cache(tmp_path / "none.safetensors", "train", step, fresh, fingerprint)


# ------------------------------------------------------------------------------------------------ training


def test_dpo_raises_reward_accuracy_and_margin_on_its_training_pairs(chat_llama, short_pairs, tmp_path):
    out = tmp_path / "dpo"
    config = make_config(out, chat_llama, short_pairs, epochs=6, eval_steps=6, eval_at_start=True)
    # validate on the training pairs themselves: what DPO fits must show there
    config.data.validation = str(short_pairs)
    final = quiet(config)
    evaluations = history(out, "validation")
    start = evaluations[0]
    assert start["step"] == 0 and start["reward_accuracy"] == 0.0 and start["margin"] == 0.0  # policy == reference
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigma(0)
    assert final["reward_accuracy"] >= 0.9 and evaluations[-1]["margin"] > 0.3
    margins = [e["margin"] for e in evaluations]
    assert margins[-1] == max(margins) and margins[2] > margins[1] > margins[0]
    logged = history(out, "train")
    assert {"reward_accuracy", "margin", "chosen_reward", "rejected_reward"} <= logged[0].keys()
    early, late = logged[:6], logged[-6:]
    assert sum(r["margin"] for r in late) > sum(r["margin"] for r in early) + 1.0
    assert sum(r["reward_accuracy"] for r in late) / 6 >= 0.9
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "plots" / "margin.png").exists()


@pytest.mark.parametrize("task", [
    {"type": "preference", "loss": "ipo"},
    {"type": "preference", "loss": "cdpo", "label_smoothing": 0.1},
    {"type": "preference", "loss": "simpo", "gamma": 0.5},
    {"type": "preference", "loss": "orpo"},
    {"type": "kto"},
    {"type": "reward_model"},
], ids=lambda t: t.get("loss", t["type"]))
def test_every_preference_loss_trains(chat_llama, short_pairs, tmp_path, task):
    out = tmp_path / "run"
    final = quiet(make_config(out, chat_llama, short_pairs, task=task, epochs=2, eval_at_start=True))
    first = history(out, "validation")[0]
    assert math.isfinite(final["loss"]) and 0.0 <= final["reward_accuracy"] <= 1.0 and "margin" in final
    if task["type"] == "kto":
        assert {"kl", "desirable_reward", "undesirable_reward"} <= final.keys()
    elif task["type"] == "preference":
        assert {"chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps"} <= final.keys()
    if task.get("loss") in ("simpo", "orpo"):
        assert not (out / REFERENCE_FILE).exists()  # reference-free
    train_log = history(out, "train")
    assert train_log[-1]["loss"] < train_log[0]["loss"] or final["loss"] < first["loss"]


def test_full_fine_tuning_dpo_is_its_own_reference_before_training(chat_llama, short_pairs, tmp_path):
    from tunelab.evaluate.runner import evaluate_source

    out = tmp_path / "full"
    final = quiet(make_config(out, chat_llama, short_pairs, method="full", lr=1e-3, epochs=2, eval_at_start=True))
    assert history(out, "validation")[0]["margin"] == 0.0
    # evaluated again: the reference is model.source, loaded beside the trained model
    again = evaluate_source(str(out))
    assert again["reward_accuracy"] == final["reward_accuracy"]
    assert again["margin"] == pytest.approx(final["margin"], abs=1e-5)
    # the trained model alone has no adapters to switch off: the reference must be named
    with pytest.raises(ConfigError, match="task.reference"):
        evaluate_source(str(out / "model"), data=str(short_pairs), task="preference")
    named = evaluate_source(str(out / "model"), data=str(short_pairs), task="preference",
                            overrides=[f"task.reference={chat_llama}"])
    assert named["pairs"] == 24 and named["margin"] > 0


@pytest.mark.parametrize("raw_task, message", [
    ({"type": "preference", "loss": "cdpo"}, "task.loss cdpo (conservative DPO) needs task.label_smoothing"),
    ({"type": "preference", "loss": "simpo", "reference": "x"}, "needs no reference model"),
    ({"type": "preference", "loss": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to loss dpo / cdpo"),
    ({"type": "classification", "loss": "ipo"}, "task.loss (ipo) chooses the loss of task preference"),
    ({"type": "chat", "beta": 0.2}, "task.beta and task.reference apply to the preference, kto and grpo tasks"),
    ({"type": "kto", "beta": 0.0}, "task.beta of task kto must be positive"),
])
def test_config_errors(raw_task, message, tmp_path):
    raw = {"output_dir": str(tmp_path), "model": {"source": "x"}, "task": raw_task, "data": {"train": "x.jsonl"}}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(TrainConfig, raw, "test config")


def test_data_format_must_hold_preferences(tmp_path):
    raw = {"output_dir": str(tmp_path), "model": {"source": "x"}, "task": {"type": "preference"},
           "data": {"train": "x.tsv", "format": "tsv"}}
    with pytest.raises(ConfigError, match="data.format 'tsv' holds no preference pairs"):
        validate(TrainConfig, raw, "test config")
