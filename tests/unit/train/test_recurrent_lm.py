"""Task recurrent_lm: truncated back-propagation through time with the state carried by the step, evaluation
over the whole stream, exact resume (the carried state is in the checkpoint), and fine-tuning the
pretrained recurrent LM for classification. Tiny LSTMs on slices of WikiText-2 and SST-2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config.loading import validate
from tunelab.config.schema import TrainConfig
from tunelab.errors import CheckpointError, ConfigError, DataError
from tunelab.models import RNNConfig, build_model
from tunelab.tokenizer.word_level import train_word_level
from tunelab.train.run import build_or_load, prepare_model, train
from tunelab.train.tasks import RecurrentLMStep

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
WIKITEXT = DATA / "wikitext2"
SST2_DEV = DATA / "sst2" / "dev.tsv"


@pytest.fixture(scope="module")
def words_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("words")
    train_word_level([WIKITEXT / "valid.txt"], max_vocab=2000).save(path)  # the rest is <unk>: a faster softmax
    return path


def lm_config(out: Path, words: Path, **train) -> TrainConfig:
    return validate(TrainConfig, {
        "output_dir": str(out),
        "model": {"architecture": {"family": "rnn", "cell": "lstm", "hidden_size": 24, "embedding_size": 16,
                                   "num_layers": 2, "embedding_dropout": 0.1, "input_dropout": 0.2,
                                   "hidden_dropout": 0.2, "output_dropout": 0.2},
                  "tokenizer": str(words)},
        "task": {"type": "recurrent_lm"},
        "data": {"train": str(WIKITEXT / "valid.txt"), "validation": str(WIKITEXT / "test.txt"), "bptt": 10,
                 "max_train_examples": 60, "max_validation_examples": 30},
        "train": {"epochs": 4, "batch_size": 6, "lr": 2e-2, "warmup": 0, "precision": "fp32", "seed": 3,
                  "save_steps": 0, "eval_steps": 0, "logging_steps": 1, "eval_batch_size": 4, **train},
    }, "test")


def quiet(config: TrainConfig, **kw) -> dict:
    return train(config, show_progress=False, log=lambda *_: None, **kw)


def test_chunked_evaluation_equals_one_pass_over_the_stream():
    torch.manual_seed(0)
    model = build_model(RNNConfig(vocab_size=30, hidden_size=12, num_layers=2, cell="gru"), ["lm"]).eval()
    tokens = torch.randint(0, 30, (203,)).tolist()
    features = [{"input_ids": tokens[:100]}, {"input_ids": tokens[100:]}]  # documents of one stream
    none = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    by_7 = RecurrentLMStep(bptt=7).evaluate(model, features, 3, none)
    by_50 = RecurrentLMStep(bptt=50).evaluate(model, features, 3, none)
    assert by_7["tokens"] == by_50["tokens"] == 202
    assert by_7["loss"] == pytest.approx(by_50["loss"], abs=1e-6)
    # one stream, one forward pass, by hand
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits["lm"][0]
    by_hand = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    assert RecurrentLMStep(bptt=9).evaluate(model, features, 1, none)["loss"] == pytest.approx(by_hand, abs=1e-6)


def test_training_carries_the_state_and_resets_it_each_epoch():
    torch.manual_seed(0)
    model = build_model(RNNConfig(vocab_size=30, hidden_size=8, num_layers=1), ["lm"])
    step = RecurrentLMStep()
    batch = {"input_ids": torch.randint(0, 30, (2, 5)), "labels": torch.randint(0, 30, (2, 5)), "chunk": 0}
    step.loss(model, batch)
    first = step.state
    assert not first[0][0].requires_grad  # detached: gradients stop at the chunk boundary
    with torch.no_grad():
        carried = model(batch["input_ids"], state=first).logits["lm"]
        fresh = model(batch["input_ids"]).logits["lm"]
    loss_carried, _ = step.loss(model, {**batch, "chunk": 1})
    assert loss_carried.item() == pytest.approx(
        torch.nn.functional.cross_entropy(carried.flatten(0, 1), batch["labels"].flatten(), reduction="sum").item(),
        rel=1e-6)
    loss_reset, _ = step.loss(model, {**batch, "chunk": 0})
    assert loss_reset.item() == pytest.approx(
        torch.nn.functional.cross_entropy(fresh.flatten(0, 1), batch["labels"].flatten(), reduction="sum").item(),
        rel=1e-6)


def test_an_lstm_learns_wikitext_and_evaluates_on_the_whole_test_slice(words_dir, tmp_path):
    config = lm_config(tmp_path / "run", words_dir, eval_at_start=True)
    final = quiet(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if r["split"] == "validation" and r["step"] == 0)
    assert before["loss"] == pytest.approx(7.60, abs=0.05)  # ln(2,000): nothing learned yet
    assert final["loss"] < before["loss"] - 1.0  # 600 training tokens: about the unigram level on new text
    assert final["perplexity"] == pytest.approx(torch.tensor(final["loss"]).exp().item(), rel=1e-6)
    assert final["tokens"] == 30 * 10  # max_validation_examples chunks of bptt tokens, every one scored
    # 60 chunks in 6 streams: 10 batches an epoch, 4 epochs
    assert final["step"] == 40
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert sum(train_losses[-10:]) < sum(train_losses[:10]) - 10
    config_json = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config_json["model_type"] == "tunelab-rnn" and config_json["heads"] == ["lm"]


def _resumable(out: Path, words: Path) -> TrainConfig:
    # 10 batches an epoch; 14 steps cross an epoch boundary (the state restarts); dropout needs the RNG restored
    return lm_config(out, words, epochs=None, max_steps=14, save_steps=6, save_total_limit=5)


def test_resume_is_exact_because_the_carried_state_is_saved(words_dir, tmp_path):
    reference = tmp_path / "reference"
    quiet(_resumable(reference, words_dir))
    expected = load_file(str(reference / "model" / "model.safetensors"))
    blob = torch.load(reference / "checkpoint-6" / "training.pt", weights_only=False)
    assert blob["task"]["state"]  # the state after step 6 (chunk 5 of epoch 0), saved

    def resumed_from_step_6(name: str, edit=None) -> dict:
        run = tmp_path / name
        shutil.copytree(reference, run)
        for extra in ("model", "checkpoint-12"):
            shutil.rmtree(run / extra)
        (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(reference), str(run)))
        if edit:
            edit(run / "checkpoint-6" / "training.pt")
        quiet(_resumable(run, words_dir), resume=True)
        return load_file(str(run / "model" / "model.safetensors"))

    again = resumed_from_step_6("resumed")
    assert again.keys() == expected.keys()
    assert all(torch.equal(again[k], expected[k]) for k in expected)

    def zero_state(path: Path) -> None:
        data = torch.load(path, weights_only=False)
        data["task"]["state"] = {k: torch.zeros_like(v) for k, v in data["task"]["state"].items()}
        torch.save(data, path)

    cold = resumed_from_step_6("cold", zero_state)  # a resume that forgot the state ends elsewhere
    assert max((cold[k] - expected[k]).abs().max().item() for k in expected) > 1e-4

    def drop_state(path: Path) -> None:
        data = torch.load(path, weights_only=False)
        del data["task"]
        torch.save(data, path)

    with pytest.raises(CheckpointError, match="lacks the task's carried state"):
        resumed_from_step_6("old", drop_state)


def test_fine_tuning_the_pretrained_lstm_for_sentiment(words_dir, tmp_path):
    quiet(lm_config(tmp_path / "lm", words_dir, epochs=1))
    lm = load_file(str(tmp_path / "lm" / "model" / "model.safetensors"))
    config = validate(TrainConfig, {
        "output_dir": str(tmp_path / "sst"),
        "model": {"source": str(tmp_path / "lm")},
        "task": {"type": "classification"},
        "data": {"train": str(SST2_DEV), "text_field": "sentence", "max_length": 32, "max_train_examples": 96,
                 "max_validation_examples": 48, "validation_split": 0.2},
        "train": {"epochs": 12, "batch_size": 16, "lr": 1e-2, "precision": "fp32", "save_steps": 0,
                  "logging_steps": 6, "seed": 1},  # 6 batches an epoch: one logged loss per epoch
    }, "test")
    model, _ = prepare_model(config, ["0", "1"])
    assert list(model.heads) == ["classifier"]
    assert torch.equal(model.backbone.tok_embeddings.weight, lm["backbone.tok_embeddings.weight"])  # pretrained
    assert model.heads["classifier"].out.in_features == 3 * 16  # concat pooling over the 16-wide outputs
    final = quiet(config)
    records = [json.loads(line) for line in (tmp_path / "sst" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train_losses) == 12, train_losses
    assert sum(train_losses[-3:]) / 3 < sum(train_losses[:3]) / 3 - 0.1, train_losses
    assert "accuracy" in final
    saved = json.loads((tmp_path / "sst" / "model" / "config.json").read_text())
    assert saved["heads"] == ["classifier"] and saved["labels"] == ["0", "1"]


def test_task_and_model_must_fit(words_dir, train_llama_dir, tmp_path):
    config = lm_config(tmp_path / "a", words_dir)
    raw = config.model_dump(mode="json")
    raw["task"]["type"] = "causal_lm"
    with pytest.raises(ConfigError, match="recurrent model learns language modelling with task recurrent_lm"):
        quiet(validate(TrainConfig, raw, "test"))
    raw = config.model_dump(mode="json")
    raw["model"] = {"source": str(train_llama_dir)}
    raw["output_dir"] = str(tmp_path / "b")
    with pytest.raises(ConfigError, match="recurrent_lm needs a recurrent model .*use task causal_lm"):
        quiet(validate(TrainConfig, raw, "test"))
    raw = config.model_dump(mode="json")
    raw["train"]["batch_size"] = 1000
    raw["data"]["max_train_examples"] = 3
    raw["output_dir"] = str(tmp_path / "c")
    with pytest.raises(DataError, match="31 tokens are too few for 1000 parallel streams"):
        quiet(validate(TrainConfig, raw, "test"))
    model, _ = build_or_load(lm_config(tmp_path / "d", words_dir))
    assert model.config.vocab_size == 2000 and model.config.eos_token_id == 2 and model.config.pad_token_id == 0
