"""Recurrent LMs end to end through the command line, with the example configs shrunk by overrides: the word
vocabulary step, `tunelab plan / train / eval / generate` for an LSTM LM on a WikiText-2 slice, the GRU and
RNN variants, and sentiment fine-tuning of the pretrained LSTM against the same network from scratch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2"
# tiny sizes and a slice of the data (rows = bptt chunks), so that each run takes seconds
SMALL_LM = ["model.architecture.hidden_size=24", "model.architecture.embedding_size=16", "data.bptt=12",
            "model.architecture.input_dropout=0.1", "model.architecture.hidden_dropout=0.1",
            "model.architecture.output_dropout=0.1", "model.architecture.embedding_dropout=0.0",
            "data.max_train_examples=48", "data.max_validation_examples=20", "train.batch_size=4", "train.epochs=3",
            "train.eval_batch_size=2", "train.lr=0.02", "train.warmup=0", "train.save_steps=0", "train.logging_steps=4",
            "train.precision=fp32"]


@pytest.fixture(autouse=True)
def from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the example configs name ../shared/data/... from the repository root


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(capsys, *argv: str) -> str:
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vocab") / "words"
    done = subprocess.run([sys.executable, "-m", "tunelab", "tokenizer", "train", "--type", "word", "--data",
                           str(WIKITEXT / "valid.txt"), "--vocab-size", "3000", "--out", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: word tokenizer, vocabulary size 3000 (special tokens: <pad> <unk> <eos>)" in done.stdout
    return out


@pytest.fixture(scope="module")
def lm_run(words, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lm") / "run"
    code = main(["train", "configs/wikitext2-lstm.yaml", f"output_dir={run}", f"model.tokenizer={words}",
                 *SMALL_LM, "train.eval_at_start=true", "--no-progress"])
    assert code == 0
    return run


def records(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_plan_counts_chunks_and_streams(words, capsys):
    out = ok(capsys, "plan", "configs/wikitext2-lstm.yaml", f"model.tokenizer={words}", *SMALL_LM, "--json")
    plan = json.loads(out)
    assert plan["task"] == "recurrent_lm" and plan["train_rows"] == 48
    assert plan["steps_per_epoch"] == 12 and plan["total_steps"] == 36  # 48 chunks in 4 streams, 3 epochs


def test_lstm_language_model_train_eval_generate(lm_run, words, capsys, tmp_path):
    final = json.loads((lm_run / "metrics.json").read_text())
    start = records(lm_run, "validation")[0]
    assert start["step"] == 0 and start["loss"] == pytest.approx(math.log(3000), abs=0.05)
    assert final["loss"] < start["loss"] - 1.0
    assert final["tokens"] == 20 * 12 and final["perplexity"] == pytest.approx(math.exp(final["loss"]), rel=1e-6)
    losses = [r["loss"] for r in records(lm_run, "train")]
    assert losses[-1] < losses[0] - 1.0, losses

    # eval of the run: the same figures as the end of training
    metrics = json.loads(ok(capsys, "eval", str(lm_run), "--json"))
    assert metrics["loss"] == pytest.approx(final["loss"], abs=1e-6) and metrics["tokens"] == final["tokens"]

    # eval of the saved model on another file: the whole stream is scored, whatever the number of streams
    test_slice = tmp_path / "test-slice.txt"
    test_slice.write_text("".join((WIKITEXT / "test.txt").read_text(encoding="utf-8").splitlines(True)[:30]))
    one = json.loads(ok(capsys, "eval", str(lm_run / "model"), "--data", str(test_slice), "--batch-size", "1", "--json"))
    three = json.loads(ok(capsys, "eval", str(lm_run / "model"), "--data", str(test_slice), "--batch-size", "3",
                          "--json"))
    n = len(test_slice.read_text().split()) + 30  # words + one <eos> per line
    assert one["tokens"] == three["tokens"] == n - 1
    assert abs(one["loss"] - three["loss"]) < 0.1  # only the starts of the 3 streams lose their context

    out = ok(capsys, "generate", "-m", str(lm_run / "model"), "-p", "The game", "--max-new-tokens", "12",
             "--temperature", "0.9", "--seed", "3")
    assert out.strip()

    code, _, err = cli(capsys, "eval", str(lm_run / "model"), "--data", str(test_slice), "--task", "causal_lm")
    assert code == 1 and "task recurrent_lm" in err


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_gru_and_elman_variants_by_override(cell, words, tmp_path, capsys):
    run = tmp_path / cell
    ok(capsys, "train", "configs/wikitext2-lstm.yaml", f"output_dir={run}", f"model.tokenizer={words}", *SMALL_LM,
       f"model.architecture.cell={cell}", "--no-progress")
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["cell"] == cell
    losses = [r["loss"] for r in records(run, "train")]
    assert losses[-1] < losses[0] - 1.0, losses


def test_sentiment_pretrained_and_from_scratch(lm_run, words, tmp_path, capsys):
    # 160 training rows, 10 batches an epoch, 8 epochs: enough steps to fit them
    small = ["data.max_train_examples=160", "data.max_validation_examples=64", "data.max_length=32", "train.epochs=8",
             "train.batch_size=16", "train.lr=0.01", "train.save_steps=0", "train.logging_steps=10",
             "train.precision=fp32"]
    pretrained, scratch = tmp_path / "pretrained", tmp_path / "scratch"
    ok(capsys, "train", "configs/sst2-lstm.yaml", f"output_dir={pretrained}", f"model.source={lm_run}", *small,
       "--no-progress")
    ok(capsys, "train", "configs/sst2-lstm-scratch.yaml", f"output_dir={scratch}", f"model.tokenizer={words}",
       *[o for o in SMALL_LM if o.startswith("model.")], *small, "--no-progress")  # the same network
    for run in (pretrained, scratch):
        final = json.loads((run / "metrics.json").read_text())
        assert 0.0 <= final["accuracy"] <= 1.0 and len(final["confusion_matrix"]) == 2
        losses = [r["loss"] for r in records(run, "train")]
        assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses
        config = json.loads((run / "model" / "config.json").read_text())
        assert config["heads"] == ["classifier"] and config["hidden_size"] == 24 and config["output_dropout"] == 0.1
    out = tmp_path / "predictions.jsonl"
    sentences = tmp_path / "new.tsv"
    sentences.write_text("sentence\na gripping , beautifully shot film .\na dull , lifeless mess .\n")
    ok(capsys, "predict", str(pretrained), "--data", str(sentences), "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] in ("0", "1") for r in rows] == [True, True]
