"""BERT pretraining end to end through `tunelab`: train (masked LM + NSP) on WikiText-2, evaluate, fill-mask on
the run directory, reload the saved heads in transformers with equal logits, and fine-tune the result.

The model is a 2-layer, 64-wide BERT from scratch with a 2,000-piece WordPiece tokenizer trained on WikiText-2
(the `wordpiece_tokenizer_dir` fixture); 16 training pairs of 32 tokens, 80 steps: the masked LM learns
the words and the next-sentence head learns the 16 pairs by heart, so both training losses fall.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.cli.main import main

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
WIKITEXT_VALID = DATA / "wikitext2" / "valid.txt"
WIKITEXT_TEST = DATA / "wikitext2" / "test.txt"
SST2_DEV = DATA / "sst2" / "dev.tsv"

TINY_BERT = {"family": "bert", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
             "max_position_embeddings": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0}


def pretraining_config(run: Path, tokenizer: Path, **task) -> dict:
    return {
        "output_dir": str(run),
        "model": {"architecture": TINY_BERT, "tokenizer": str(tokenizer)},
        "task": {"type": "masked_lm", **task},
        "data": {"train": str(WIKITEXT_VALID), "validation": str(WIKITEXT_TEST), "documents": "wikitext",
                 "max_length": 32, "max_train_examples": 16, "max_validation_examples": 32},
        "train": {"max_steps": 80, "batch_size": 16, "lr": 3e-3, "schedule": "constant", "warmup": 0,
                  "precision": "fp32", "logging_steps": 10, "eval_at_start": True, "save_steps": 0,
                  "num_threads": 1},  # module fixtures run before the one_torch_thread fixture
    }


def cli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def train_run(tmp: Path, config: dict) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    code, out = cli("train", str(path), "--no-progress")
    assert code == 0, out
    return Path(config["output_dir"])


def records(run: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, wordpiece_tokenizer_dir) -> Path:
    tmp = tmp_path_factory.mktemp("bert-pretrain")
    return train_run(tmp, pretraining_config(tmp / "run", wordpiece_tokenizer_dir))


def test_pretraining_lowers_the_masked_lm_and_next_sentence_losses(pretrained):
    train = records(pretrained, "train")
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60, 70, 80]
    first, last = train[0], train[-1]
    assert last["mlm_loss"] < first["mlm_loss"] - 1.5, (first, last)
    assert last["nsp_loss"] < first["nsp_loss"] - 0.3, (first, last)  # 16 pairs seen 80 times: learnt by heart
    assert last["loss"] == pytest.approx(last["mlm_loss"] + last["nsp_loss"])

    before, final = records(pretrained, "validation")[0], json.loads((pretrained / "metrics.json").read_text())
    assert before["mlm_loss"] == pytest.approx(math.log(2000), abs=0.05)  # an untrained model guesses uniformly
    assert final["mlm_loss"] < before["mlm_loss"] - 0.05  # from 16 training rows: word frequencies, mostly
    assert final["mlm_perplexity"] == pytest.approx(math.exp(final["mlm_loss"]), rel=1e-6)
    assert 0.0 <= final["nsp_accuracy"] <= 1.0 and 0.0 < final["mlm_accuracy"] < 1.0
    assert final["masked_tokens"] == before["masked_tokens"] > 100  # the same fixed validation targets each time
    config = json.loads((pretrained / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"]
    report = (pretrained / "report.md").read_text()
    assert "mlm_accuracy" in report and (pretrained / "plots" / "mlm_loss.png").exists()


def test_eval_of_the_run_repeats_its_final_metrics(pretrained):
    code, out = cli("eval", str(pretrained), "--json")
    assert code == 0
    metrics = json.loads(out)
    final = json.loads((pretrained / "metrics.json").read_text())
    for key in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "masked_tokens"):
        assert metrics[key] == pytest.approx(final[key], abs=1e-6), key
    code, out = cli("eval", str(pretrained / "model"), "--data", str(WIKITEXT_TEST), "data.documents=wikitext",
                    "data.max_length=32", "data.max_train_examples=16", "--json")
    assert code == 0, out
    assert set(json.loads(out)) >= {"mlm_loss", "nsp_accuracy"}


def test_fill_mask_answers_from_the_run_directory(pretrained):
    code, out = cli("fill-mask", "--model", str(pretrained), "the lobster is [MASK] in colour .", "--json", "--top-k", "4")
    assert code == 0
    (predictions,) = json.loads(out)
    assert len(predictions) == 4
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0
    assert all("[MASK]" not in p["sequence"] for p in predictions)


def _hf_logits_match(model_dir: Path, hf_class: str) -> None:
    import transformers as tf

    import tunelab

    ours, tokenizer = tunelab.load(model_dir)
    theirs = getattr(tf, hf_class).from_pretrained(model_dir).eval()
    batch = tokenizer.encode_batch(["the lobster is [MASK] .", "it lives in the sea"], ["it is blue", "near rocks"],
                                   padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ours(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"])
        ref = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    mlm_ref = ref.prediction_logits if hf_class == "BertForPreTraining" else ref.logits
    assert (out.logits["mlm"][real] - mlm_ref[real]).abs().max() < 1e-4
    if hf_class == "BertForPreTraining":
        assert (out.logits["nsp"] - ref.seq_relationship_logits).abs().max() < 1e-5
    else:
        assert "nsp" not in out.logits


def test_transformers_loads_the_pretraining_heads_with_equal_logits(pretrained):
    _hf_logits_match(pretrained / "model", "BertForPreTraining")


def test_the_pretrained_model_fine_tunes_for_classification(pretrained, tmp_path):
    config = {
        "output_dir": str(tmp_path / "sst2"),
        "model": {"source": str(pretrained)},
        "task": {"type": "classification"},
        "data": {"train": str(SST2_DEV), "text_field": "sentence", "max_length": 32, "max_train_examples": 64,
                 "max_validation_examples": 32},
        "train": {"max_steps": 60, "batch_size": 16, "lr": 5e-4, "schedule": "constant", "warmup": 0, "precision": "fp32", "logging_steps": 4,
                  "num_threads": 1},
    }
    run = train_run(tmp_path, config)
    losses = [r["loss"] for r in records(run, "train")]
    # 15 epochs over 64 sentences: the head and the encoder fit them (0.74 to 0.24 when this was written)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    final = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= final["accuracy"] <= 1.0


def test_masked_lm_alone_saves_bert_for_masked_lm_and_still_fine_tunes(tmp_path, wordpiece_tokenizer_dir):
    config = pretraining_config(tmp_path / "mlm", wordpiece_tokenizer_dir, nsp=False, whole_word_masking=True)
    config["train"].update(max_steps=20, eval_at_start=False)
    run = train_run(tmp_path, config)
    train = records(run, "train")
    assert "nsp_loss" not in train[0] and train[-1]["loss"] < train[0]["loss"] - 0.5
    final = json.loads((run / "metrics.json").read_text())
    assert "nsp_accuracy" not in final and final["loss"] == final["mlm_loss"]
    assert json.loads((run / "model" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    _hf_logits_match(run / "model", "BertForMaskedLM")

    # BertForMaskedLM has no pooler; BERT's classifier reads the pooled [CLS] vector: a fresh pooler is made
    fine_tune = {
        "output_dir": str(tmp_path / "cls"), "model": {"source": str(run)}, "task": {"type": "classification"},
        "data": {"train": str(SST2_DEV), "text_field": "sentence", "max_length": 32, "max_train_examples": 32,
                 "max_validation_examples": 16},
        "train": {"max_steps": 4, "batch_size": 16, "precision": "fp32"},
    }
    cls_run = train_run(tmp_path, fine_tune)
    assert json.loads((cls_run / "model" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"]


def test_pretraining_errors_are_clear(tmp_path, wordpiece_tokenizer_dir):
    config = pretraining_config(tmp_path / "bad", wordpiece_tokenizer_dir)
    config["task"]["mask_propability"] = 0.2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", str(path), "--no-progress"]) == 1
    assert "task.mask_propability: unknown key; did you mean 'task.mask_probability'?" in err.getvalue()

    config = pretraining_config(tmp_path / "bad2", wordpiece_tokenizer_dir, mask_token_fraction=0.95)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", str(path), "--no-progress"]) == 1
    assert "mask_token_fraction + task.random_token_fraction must be at most 1" in err.getvalue()

    config = pretraining_config(tmp_path / "bad3", wordpiece_tokenizer_dir)
    config["data"].update(documents="file", validation=None)  # one document: no other document to draw B from
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", str(path), "--no-progress"]) == 1
    assert "next-sentence prediction needs at least 2 documents" in err.getvalue()


def test_a_rotary_bert_pretrains_answers_fill_mask_and_fine_tunes(tmp_path, wordpiece_tokenizer_dir):
    config = pretraining_config(tmp_path / "rotary", wordpiece_tokenizer_dir)
    config["model"]["architecture"] = {**TINY_BERT, "position_style": "rotary"}
    config["train"].update(max_steps=30, eval_at_start=False)
    run = train_run(tmp_path, config)
    train = records(run, "train")
    assert train[-1]["mlm_loss"] < train[0]["mlm_loss"] - 1.0, (train[0], train[-1])
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["model_type"] == "tunelab-bert" and saved["position_style"] == "rotary"
    code, out = cli("eval", str(run), "--json")
    assert code == 0, out
    final = json.loads((run / "metrics.json").read_text())
    assert json.loads(out)["nsp_accuracy"] == pytest.approx(final["nsp_accuracy"], abs=1e-6)
    code, out = cli("fill-mask", "--model", str(run), "the lobster is [MASK] in colour .", "--json", "--top-k", "2")
    assert code == 0 and len(json.loads(out)[0]) == 2

    fine_tune = {
        "output_dir": str(tmp_path / "cls"), "model": {"source": str(run)}, "task": {"type": "classification"},
        "data": {"train": str(SST2_DEV), "text_field": "sentence", "max_length": 32, "max_train_examples": 32,
                 "max_validation_examples": 16},
        "train": {"max_steps": 4, "batch_size": 16, "precision": "fp32", "num_threads": 1},
    }
    cls_run = train_run(tmp_path, fine_tune)
    saved = json.loads((cls_run / "model" / "config.json").read_text())
    assert saved["model_type"] == "tunelab-bert" and saved["heads"] == ["classifier"]
    assert len(saved["labels"]) == 2  # SST-2: negative, positive
