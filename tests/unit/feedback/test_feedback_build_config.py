"""data.feedback in a training config (validation, the rows built into the run directory, mixing with the original
data, label names) and `tunelab feedback build` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.cli.main import main
from tunelab.config.loading import validate
from tunelab.config.schema import FeedbackSource, TrainConfig
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.feedback import SOURCES, FeedbackRecord, FeedbackStore, build_run_data
from tunelab.train.run import FEEDBACK_DATA_FILE, MIX_DATA_FILE, with_feedback_rows

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
ALPACA = DATA / "alpaca_demo" / "alpaca_en_demo.json"
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "data" / "feedback" / "smollm2_answers.jsonl"


def rec(input, output, verdict=None, **fields) -> FeedbackRecord:
    return FeedbackRecord(input=input, output=output, model=fields.pop("model", "m"),
                          source=fields.pop("source", "person"), verdict=verdict, **fields)


def config(tmp_path: Path, task: str = "chat", **data) -> TrainConfig:
    raw = {"output_dir": str(tmp_path / "run"), "model": {"source": "some-model"}, "task": {"type": task},
           "feedback": {"store": str(tmp_path / "fb.db")},
           "data": {"feedback": {"build": "corrections"}, "validation_split": 0.0, **data}}
    return validate(TrainConfig, raw, "test config")


def invalid(tmp_path: Path, message: str, task: str = "chat", store: bool = True, **data) -> None:
    raw = {"output_dir": "run", "model": {"source": "m"}, "task": {"type": task}, "data": data}
    if store:
        raw["feedback"] = {"store": "fb.db"}
    with pytest.raises(ConfigError) as error:
        validate(TrainConfig, raw, "cfg.yaml")
    assert message in str(error.value)


def test_config_errors(tmp_path):
    build = {"build": "corrections"}
    invalid(tmp_path, "data.feedback.build pairs makes rows for task preference or reward_model or kto, not chat; "
            "for task chat build corrections or refine", feedback={"build": "pairs"})
    invalid(tmp_path, "data.feedback.build corrections makes rows for task chat or seq2seq, not classification; for "
            "task classification build relabel", task="classification", feedback=build)
    invalid(tmp_path, "task causal_lm cannot train on feedback", task="causal_lm", feedback=build)
    invalid(tmp_path, "say which store with feedback.store", store=False, feedback=build)
    invalid(tmp_path, "data.train and data.feedback both give the training data; to train on the feedback rows and "
            "x.jsonl, give the file as data.feedback.mix_with", train="x.jsonl", feedback=build)
    invalid(tmp_path, "data.train: feedback builds the training rows from the feedback store: it needs a "
            "data.feedback section", train="feedback")
    invalid(tmp_path, "data.train: give the training file(s), or data.feedback")
    invalid(tmp_path, "data.format 'alpaca': with data.feedback the rows are jsonl", format="alpaca", feedback=build)
    invalid(tmp_path, "data.feedback.refine configures build refine, not corrections",
            feedback={**build, "refine": {"model": "x"}})
    invalid(tmp_path, "data.feedback.threshold labels scored records for build unpaired, not pairs", task="kto",
            feedback={"build": "pairs", "threshold": 0.5})
    invalid(tmp_path, "data.feedback.mix_ratio samples data.feedback.mix_with", feedback={**build, "mix_ratio": 1})
    invalid(tmp_path, "data.feedback.source: Value error, unknown source 'me' (known: person, rule, reward_model, "
            "gold, judge)", feedback={**build, "source": ["gold", "me"]})
    invalid(tmp_path, "data.feedback.bulid: unknown key; did you mean 'data.feedback.build'?",
            feedback={**build, "bulid": "pairs"})
    assert set(FeedbackSource.__args__) == set(SOURCES)
    # "data.train: feedback" reads as what it is
    assert validate(TrainConfig, {"output_dir": "r", "model": {"source": "m"}, "task": {"type": "chat"},
                                  "feedback": {"store": "fb.db"}, "data": {"train": "feedback", "feedback": build}},
                    "c").data.feedback.build == "corrections"


def test_rows_are_built_into_the_run_directory_and_mixed(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        store.import_(EXAMPLE)
        store.judge(3, verdict="bad", correction="42")
        store.judge(4, verdict="bad", correction="Bonjour")
    cfg = config(tmp_path)
    with pytest.raises(DataError, match=f"{FEEDBACK_DATA_FILE}: the training rows of data.feedback are not built yet"):
        with_feedback_rows(cfg)
    lines = []
    built, report = build_run_data(cfg, log=lines.append)
    assert built == cfg and report.rows == 2
    assert lines == [f"corrections (chat rows) from {tmp_path / 'fb.db'}: 8 records read, 2 used, 2 rows",
                     "  skipped 6 records: 3 good, no correction (include_good trains on good outputs); "
                     "3 bad, no correction"]
    rows = [json.loads(line) for line in (tmp_path / "run" / FEEDBACK_DATA_FILE).read_text().splitlines()]
    assert rows[1] == {"messages": [{"role": "user", "content": "Translate 'good morning' into French."},
                                    {"role": "assistant", "content": "Bonjour"}]}
    reading = with_feedback_rows(cfg)
    assert reading.data.train == [str(tmp_path / "run" / FEEDBACK_DATA_FILE)] and reading.data.feedback is None

    # mixed with alpaca: 1.5 original examples per feedback row, sampled with the seed, in the file's order
    raw = cfg.model_dump(mode="json")
    raw["output_dir"] = str(tmp_path / "run2")
    raw["data"]["feedback"].update(mix_with=str(ALPACA), mix_ratio=1.5)
    mixed = validate(TrainConfig, raw, "c")
    _, report = build_run_data(mixed, log=lambda line: None)
    mix = [json.loads(line) for line in (tmp_path / "run2" / MIX_DATA_FILE).read_text().splitlines()]
    assert report.mixed == 3 and len(mix) == 3 and all(row["messages"][-1]["role"] == "assistant" for row in mix)
    alpaca = json.loads(ALPACA.read_text())
    assert all(any(row["messages"][-1]["content"] == a["output"] for a in alpaca) for row in mix)
    assert with_feedback_rows(mixed).data.train == [str(tmp_path / "run2" / FEEDBACK_DATA_FILE),
                                                    str(tmp_path / "run2" / MIX_DATA_FILE)]
    # a run directory that holds a run is not overwritten
    (tmp_path / "run2" / "metrics.jsonl").write_text("")
    with pytest.raises(TunelabError, match="output_dir already holds a run"):
        build_run_data(mixed, log=lambda line: None)


def test_a_relabel_run_keeps_the_label_names_of_the_model_it_starts_from(tmp_path):
    previous = tmp_path / "previous-run"
    previous.mkdir()
    (previous / "labels.json").write_text(json.dumps(["billing", "shipping", "account"]))
    with FeedbackStore(tmp_path / "fb.db") as store:
        store.add_many([rec("Where is my parcel?", "billing", "bad", correction="shipping", task="classification"),
                        rec("Refund me", "billing", "good", task="classification"),
                        rec("Is it vegan?", "account", "bad", correction="product", task="classification")])
    raw = {"output_dir": str(tmp_path / "run"), "model": {"source": str(previous)}, "task": {"type": "classification"},
           "feedback": {"store": str(tmp_path / "fb.db")}, "data": {"feedback": {"build": "relabel"}}}
    lines = []
    built, _ = build_run_data(validate(TrainConfig, raw, "c"), log=lines.append)
    assert built.task.labels == ["billing", "shipping", "account", "product"]
    assert lines[-1] == f"  labels not in the head of {previous}: product; the head starts afresh"
    # with no head to keep, the names of the rows and of the validation file, sorted
    validation = tmp_path / "dev.jsonl"
    validation.write_text('{"text": "hello", "label": "greeting"}\n')
    raw.update(model={"source": "minilm-l6"}, output_dir=str(tmp_path / "run2"))
    raw["data"]["validation"] = str(validation)
    built, _ = build_run_data(validate(TrainConfig, raw, "c"), log=lambda line: None)
    assert built.task.labels == ["billing", "greeting", "product", "shipping"]


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FeedbackStore("feedback.db") as store:
        store.import_(EXAMPLE)
        store.judge(3, verdict="bad", correction="42")
    return tmp_path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["feedback", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_build(here, capsys):
    code, out, err = cli(capsys, "build", "pairs", "--out", "pairs.jsonl")
    assert code == 0, err
    assert out == ("pairs (preference rows) from feedback.db: 8 records read, 1 used, 1 row\n"
                   "  skipped 7 records: 7 nothing to pair with: no correction, and no output of the same input "
                   "judged otherwise\n"
                   "wrote 1 row to pairs.jsonl\n")
    assert json.loads((here / "pairs.jsonl").read_text()) == {
        "prompt": [{"role": "user", "content": "What is 17 + 25? Answer with the number only."}],
        "chosen": "42", "rejected": "17 + 25 = 32."}

    code, out, err = cli(capsys, "build", "unpaired", "--out", "-", "--source", "gold", "--no-corrections")
    assert code == 0 and err.startswith("unpaired (kto rows) from feedback.db: 5 records read, 5 used, 5 rows")
    assert [json.loads(line)["label"] for line in out.splitlines()] == [True, True, False, False, True]

    code, out, err = cli(capsys, "build", "corrections", "--out", "sft.jsonl", "--include-good", "--verdict", "good")
    assert code == 0 and "wrote 3 rows to sft.jsonl" in out

    code, out, err = cli(capsys, "build", "relabel", "--out", "x.jsonl", "--for", "classification")
    assert code == 1 and err == ("tunelab: error: feedback.db: build relabel made no training rows from 8 records: "
                                 "skipped 8 records: 8 task chat (the rows are for classification)\n")


def test_cli_build_with_a_config(here, capsys):
    (here / "cfg.yaml").write_text(yaml.safe_dump({
        "output_dir": "run", "model": {"source": "m"}, "task": {"type": "kto"}, "feedback": {"store": "feedback.db"},
        "data": {"feedback": {"build": "unpaired", "source": "rule"}}}))
    code, out, err = cli(capsys, "build", "unpaired", "--config", "cfg.yaml", "--out", "kto.jsonl")
    assert code == 0, err
    assert out.splitlines()[0] == "unpaired (kto rows) from feedback.db: 2 records read, 2 used, 2 rows"
    code, out, err = cli(capsys, "build", "pairs", "--config", "cfg.yaml", "--out", "p.jsonl", "--for", "chat")
    assert code == 1 and "build pairs makes rows for task preference or reward_model or kto, not chat" in err


@pytest.mark.parametrize("name", ["feedback-smollm2-sft.yaml", "feedback-smollm2-dpo.yaml"])
def test_example_configs_are_valid(name):
    from tunelab.train.run import load_train_config

    path = Path(__file__).resolve().parents[3] / "configs" / name
    config = load_train_config(path)
    assert config.data.feedback is not None and config.feedback.store == "feedback.db"
    for mixed in config.data.feedback.mix_paths():
        assert (path.parents[1] / mixed).is_file()


def test_a_plan_of_a_refine_run_refines_nothing(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        store.add_many([rec("2 + 2?", "5", "bad", critique="Off by one."),
                        rec("3 + 3?", "7", "bad", critique="Off by one.", correction="6")])
    raw = config(tmp_path).model_dump(mode="json")
    raw["data"]["feedback"] = {"build": "refine", "refine": {"model": "no-such-model"}}
    lines = []
    built, report = build_run_data(validate(TrainConfig, raw, "c"), directory=tmp_path / "plan", refine=False,
                                   log=lines.append)
    assert lines[0] == "refine: 1 bad record with a critique and no correction would be refined by no-such-model " \
                       "first (not now)"
    assert report.rows == 1 and not (tmp_path / "run").exists()
    with FeedbackStore(tmp_path / "fb.db") as store:
        assert store.get(1).correction is None
