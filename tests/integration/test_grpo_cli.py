"""`tunelab plan / train / eval` for online GRPO, end to end through the CLI on tests/conftest.py's tiny random chat
Llama (ChatML template), arithmetic prompts made by tunelab.data.arithmetic and a verifier file that rewards a
particular letter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.cli.main import main
from tunelab.data.arithmetic import arithmetic_problems

CHECKS = "def e_share(output, example):\n    return output.count('e') / max(1, len(output))\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-grpo-data")
    train = arithmetic_problems(32, seed=0, kinds=["1+1", "1*1"])
    validation = arithmetic_problems(8, seed=1, kinds=["1+1", "1*1"], exclude={r["problem"] for r in train})
    for name, records in (("train", train), ("validation", validation)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "checks.py").write_text(CHECKS)
    return {"train": root / "train.jsonl", "validation": root / "validation.jsonl", "checks": root / "checks.py"}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def config(tmp_path: Path, model: Path, data: dict, **task) -> Path:
    raw = {"output_dir": str(tmp_path / "run"), "model": {"source": str(model)},
           "task": {"type": "grpo", "rewards": [{"verifier": f"{data['checks']}:e_share", "weight": 1.0}],
                    "num_generations": 4, "max_new_tokens": 6, "temperature": 1.0, "beta": 0.04, **task},
           "data": {"train": str(data["train"]), "validation": str(data["validation"]), "max_length": 64},
           "method": {"type": "full"},
           "train": {"max_steps": 24, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "eval_at_start": True,
                     "eval_steps": 12, "logging_steps": 4, "warmup": 0, "save_steps": 12, "eval_batch_size": 8}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_then_eval_through_the_cli(tmp_path, chat_llama, data, capsys):
    path = config(tmp_path, chat_llama, data)
    code, out, err = cli(capsys, "plan", str(path))
    assert code == 0, err
    assert "task           grpo (full)" in out and "sampling       included" in out and "each evaluation" in out

    code, out, err = cli(capsys, "train", str(path), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    validation = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [0, 12, 24]
    assert train[-1]["reward"] > train[0]["reward"]  # the sampled completions earn more and more
    assert validation[-1]["reward"] > validation[0]["reward"]
    final = json.loads((run / "metrics.json").read_text())
    assert (run / "model" / "model.safetensors").exists() and (run / "samples.jsonl").exists()
    assert "success_rate" in (run / "report.md").read_text()

    code, out, err = cli(capsys, "eval", str(run), "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) >= {"success_rate", "reward", "completion_length", "truncated", "prompts"}
    assert metrics["prompts"] == 8
    assert metrics["reward"] == pytest.approx(final["reward"], abs=1e-6)  # greedy: the final model's own numbers

    # a bare model, with the rewards given on the command line
    code, out, err = cli(capsys, "eval", str(chat_llama), "--data", str(data["validation"]), "--task", "grpo",
                         f"task.rewards=[{{verifier: '{data['checks']}:e_share'}}]", "task.max_new_tokens=6",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["reward"] == pytest.approx(validation[0]["reward"], abs=1e-6)  # the untrained model


def test_config_errors_through_the_cli(tmp_path, chat_llama, data, capsys):
    path = config(tmp_path, chat_llama, data, rewards=[])
    code, _, err = cli(capsys, "train", str(path))
    assert code == 1 and "task grpo needs task.rewards" in err and "Traceback" not in err
    path = config(tmp_path, chat_llama, data, rewards=[{"verifier": "tunelab.evaluate.verifiers:no_such"}])
    code, _, err = cli(capsys, "train", str(path), "--no-progress")
    assert code == 1 and "task.rewards[0].verifier" in err and "has no function 'no_such'" in err
