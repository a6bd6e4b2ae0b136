"""`tunelab plan / train / eval` for learning from preferences, end to end through the CLI on a tiny random Llama
with a ChatML template and real preference data (hh-rlhf transcripts, dpo_demo's sharegpt pairs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.cli.main import main

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
HH = DATA / "hh_rlhf" / "harmless-base-pairs.jsonl"
PREFERENCE_KEYS = {"loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward"}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    records = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()]
    short = [r for r in records if max(len(r["chosen"]), len(r["rejected"])) < 260][:16]
    path = tmp_path_factory.mktemp("cli-pref-data") / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in short), encoding="utf-8")
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def config(tmp_path: Path, model: Path, data: Path, **task) -> Path:
    raw = {"output_dir": str(tmp_path / "run"), "model": {"source": str(model)},
           "task": {"type": "preference", "beta": 0.1, **task},
           "data": {"train": str(data), "format": "hh-rlhf", "validation_split": 0.25, "max_length": 160},
           "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["all-linear"]}},
           "train": {"epochs": 2, "batch_size": 4, "lr": 5e-3, "precision": "fp32", "eval_at_start": True,
                     "eval_steps": 3, "logging_steps": 1, "warmup": 0}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def test_plan_train_and_eval_json(capsys, tmp_path, chat_llama, pairs_file):
    path = config(tmp_path, chat_llama, pairs_file)
    code, out, err = cli(capsys, "plan", str(path))
    assert code == 0, err
    assert "task           preference (lora)" in out and "12 examples -> 12 rows" in out
    assert "reference      about" in out and "once before training" in out

    code, out, err = cli(capsys, "train", str(path), "--no-progress")
    assert code == 0, err
    assert "reference log-probabilities: 24 train rows, computed once" in out
    final = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert PREFERENCE_KEYS <= final.keys()
    run = tmp_path / "run"

    code, out, err = cli(capsys, "eval", str(run), "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert PREFERENCE_KEYS <= metrics.keys() and metrics["pairs"] == 4
    assert metrics["reward_accuracy"] == final["reward_accuracy"]
    assert metrics["margin"] == pytest.approx(final["margin"], abs=1e-6)

    # the run on another file: dpo_demo's sharegpt pairs (the first 6), reference = adapters off
    demo = json.loads((DATA / "dpo_demo" / "dpo_en_demo.json").read_text(encoding="utf-8"))[:6]
    other = tmp_path / "demo.json"
    other.write_text(json.dumps(demo), encoding="utf-8")
    code, out, err = cli(capsys, "eval", str(run), "--data", str(other), "data.format=sharegpt", "data.max_length=512",
                         "--json")
    assert code == 0, err
    assert PREFERENCE_KEYS <= json.loads(out).keys() and json.loads(out)["pairs"] == 6

    # a bare model: its implicit rewards against a named reference (here itself: every reward is 0)
    code, out, err = cli(capsys, "eval", str(chat_llama), "--data", str(pairs_file), "--task", "preference",
                         f"task.reference={chat_llama}", "--json")
    assert code == 0, err
    bare = json.loads(out)
    assert PREFERENCE_KEYS <= bare.keys() and bare["margin"] == 0.0 and bare["reward_accuracy"] == 0.0

    code, out, err = cli(capsys, "eval", str(chat_llama), "--data", str(pairs_file), "--task", "preference", "--json")
    assert code == 1 and "task.reference=SOURCE" in err and "Traceback" not in err


def test_reward_model_and_bad_data(capsys, tmp_path, chat_llama, pairs_file):
    path = config(tmp_path, chat_llama, pairs_file)
    code, out, err = cli(capsys, "train", str(path), "task.type=reward_model", "task.beta=null", "--no-progress")
    assert code == 0, err
    code, out, err = cli(capsys, "eval", str(tmp_path / "run"), "--json")
    assert code == 0, err
    assert PREFERENCE_KEYS <= json.loads(out).keys()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": 5, "rejected": "b"}\n')
    code, out, err = cli(capsys, "train", str(path), f"data.train={bad}", "data.format=auto",
                         f"output_dir={tmp_path / 'bad-run'}", "--no-progress")
    assert code == 1
    assert f"{bad}:2: field 'chosen': expected a string or an assistant message" in err
