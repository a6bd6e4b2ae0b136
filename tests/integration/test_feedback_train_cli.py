"""`tunelab train` on rows built from the feedback store (data.feedback), end to end through the CLI on tiny random
models: chat SFT on corrections (mixed with alpaca), a classifier on relabelled SST-2 sentences, DPO on pairs and
KTO on unpaired verdicts. Each run builds its rows into the run directory, lowers its training loss, and is
evaluated on a normal validation file; bad configs and empty builds are one clear error line."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunelab.cli.main import main
from tunelab.feedback import FeedbackRecord, FeedbackStore

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SST2_DEV = DATA / "sst2" / "dev.tsv"
ALPACA = DATA / "alpaca_demo" / "alpaca_en_demo.json"


def arithmetic_records() -> list[FeedbackRecord]:
    """Sums answered wrongly, each with a person's critique and correction; and two good answers."""
    records = []
    for a, b in [(17, 25), (3, 4), (12, 30), (8, 9), (21, 13), (5, 6), (40, 2), (9, 9), (14, 15), (30, 11)]:
        records.append(FeedbackRecord(input=f"What is {a} + {b}?", output=f"{a + b - 10}", model="tiny",
                                      source="person", task="chat", verdict="bad", critique="The sum is wrong.",
                                      correction=f"{a} + {b} = {a + b}."))
    records += [FeedbackRecord(input="What is 1 + 1?", output="1 + 1 = 2.", model="tiny", source="person",
                               task="chat", verdict="good"),
                FeedbackRecord(input="What is 17 + 25?", output="17 + 25 = 42.", model="other", source="person",
                               task="chat", verdict="good")]
    return records


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def train_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def assert_loss_fell(run: Path, margin: float) -> None:
    losses = train_losses(run)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - margin, losses


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_chat_sft_on_corrections_mixed_with_alpaca(capsys, tmp_path, chat_llama):
    with FeedbackStore(tmp_path / "fb.db") as store:
        store.add_many(arithmetic_records())
    validation = tmp_path / "dev.jsonl"
    validation.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                                           {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]})
                                  + "\n" for a, b in [(2, 2), (6, 7), (10, 5)]))
    config = write(tmp_path / "sft.yaml", {
        "output_dir": str(tmp_path / "run"), "model": {"source": str(chat_llama)}, "task": {"type": "chat"},
        "feedback": {"store": str(tmp_path / "fb.db")},
        "data": {"train": "feedback", "validation": str(validation), "max_length": 96,
                 "feedback": {"build": "corrections", "mix_with": str(ALPACA), "mix_ratio": 0.5}},
        "method": {"type": "full"},
        "train": {"max_steps": 30, "batch_size": 4, "lr": 3e-3, "warmup": 0, "logging_steps": 1, "save_steps": 0,
                  "precision": "fp32", "seed": 3}})
    code, out, err = cli(capsys, "plan", str(config))
    assert code == 0, err
    assert out.startswith(f"corrections (chat rows) from {tmp_path / 'fb.db'}: 12 records read, 10 used, 10 rows\n"
                          f"  skipped 2 records: 2 good, no correction (include_good trains on good outputs)\n"
                          f"  mixed in 5 original examples\n")
    assert not (tmp_path / "run").exists()  # a plan writes nothing to output_dir

    code, out, err = cli(capsys, "train", str(config), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    built = rows(run / "feedback_data.jsonl")
    assert built[0] == {"messages": [{"role": "user", "content": "What is 17 + 25?"},
                                     {"role": "assistant", "content": "17 + 25 = 42."}]}
    assert len(built) == 10 and len(rows(run / "mix_data.jsonl")) == 5
    assert "rows from 15 examples" in out
    assert_loss_fell(run, margin=0.5)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["feedback"]["build"] == "corrections" and saved["data"]["train"] == "feedback"
    code, out, err = cli(capsys, "eval", str(run), "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] > 0
    # the store is not read again on resume (the built rows are the run's)
    code, out, err = cli(capsys, "train", str(config), "--no-progress")
    assert code == 1 and "output_dir already holds a run" in err


def test_classifier_on_relabelled_sentences(capsys, tmp_path, tiny_bert):
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1:25]
    with FeedbackStore(tmp_path / "fb.db") as store:
        for k, line in enumerate(lines):
            sentence, label = line.rsplit("\t", 1)
            wrong = str(1 - int(label))
            if k % 2:  # the model was right
                store.add(FeedbackRecord(input=sentence, output=label, model="tiny", source="gold",
                                         task="classification", verdict="good", reference=label))
            else:  # the model was wrong: a person relabels, or the gold label is the reference
                fields = {"correction": label} if k % 4 else {"reference": label}
                store.add(FeedbackRecord(input=sentence, output=wrong, model="tiny", source="gold",
                                         task="classification", verdict="bad", **fields))
    config = write(tmp_path / "relabel.yaml", {
        "output_dir": str(tmp_path / "run"), "model": {"source": str(tiny_bert)}, "task": {"type": "classification"},
        "feedback": {"store": str(tmp_path / "fb.db")},
        "data": {"validation": str(SST2_DEV), "text_field": "sentence", "max_validation_examples": 32,
                 "max_length": 64, "feedback": {"build": "relabel", "task": "classification"}},
        "train": {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "warmup": 0, "logging_steps": 1, "save_steps": 0,
                  "precision": "fp32"}})
    code, out, err = cli(capsys, "train", str(config), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    built = rows(run / "feedback_data.jsonl")
    assert len(built) == 24 and [row["label"] for row in built] == [line.rsplit("\t", 1)[1] for line in lines]
    assert set(built[0]) == {"sentence", "label"}
    assert yaml.safe_load((run / "config.yaml").read_text())["task"]["labels"] == ["0", "1"]
    assert_loss_fell(run, margin=0.2)
    final = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= final["accuracy"] <= 1.0


def test_dpo_on_pairs_and_kto_on_verdicts(capsys, tmp_path, chat_llama):
    with FeedbackStore(tmp_path / "fb.db") as store:
        store.add_many(arithmetic_records())
        # a second, good answer for some inputs: good over bad pairs as well as correction over output
        store.add_many([FeedbackRecord(input=f"What is {a} + {b}?", output=f"It is {a + b}.", model="other",
                                       source="person", verdict="good") for a, b in [(3, 4), (8, 9), (5, 6)]])
    validation = tmp_path / "pairs.jsonl"
    validation.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.",
                                              "rejected": f"{a + b + 3}"}) + "\n" for a, b in [(2, 2), (6, 7)]))
    base = {"output_dir": str(tmp_path / "dpo"), "model": {"source": str(chat_llama)},
            "task": {"type": "preference", "beta": 0.1}, "feedback": {"store": str(tmp_path / "fb.db")},
            "data": {"validation": str(validation), "max_length": 96, "feedback": {"build": "pairs"}},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["all-linear"]}},
            "train": {"max_steps": 24, "batch_size": 4, "lr": 5e-3, "warmup": 0, "logging_steps": 1,
                      "save_steps": 0, "precision": "fp32"}}
    code, out, err = cli(capsys, "train", str(write(tmp_path / "dpo.yaml", base)), "--no-progress")
    assert code == 0, err
    run = tmp_path / "dpo"
    built = rows(run / "feedback_data.jsonl")
    # 10 corrections over outputs and 3 good answers over bad ones (17 + 25's good answer over its bad one is the
    # correction's pair again)
    assert len(built) == 13
    assert {"prompt": "What is 3 + 4?", "chosen": "It is 7.", "rejected": "-3"} in built
    assert_loss_fell(run, margin=0.1)
    assert json.loads((run / "metrics.json").read_text())["reward_accuracy"] >= 0.5

    kto = {**base, "output_dir": str(tmp_path / "kto"), "task": {"type": "kto", "beta": 0.1},
           "data": {**base["data"], "feedback": {"build": "unpaired"}}, "train": {**base["train"], "max_steps": 6}}
    code, out, err = cli(capsys, "train", str(write(tmp_path / "kto.yaml", kto)), "--no-progress")
    assert code == 0, err
    labelled = rows(tmp_path / "kto" / "feedback_data.jsonl")
    # 10 bad outputs; 10 corrections and 5 good outputs, one of them the same as 17 + 25's correction
    assert sum(row["label"] for row in labelled) == 14 and len(labelled) == 24


def test_clear_errors(capsys, tmp_path, chat_llama):
    with FeedbackStore(tmp_path / "fb.db") as store:
        store.add(FeedbackRecord(input="Hi", output="Hello", model="tiny", source="person", verdict="good"))
    config = {"output_dir": str(tmp_path / "run"), "model": {"source": str(chat_llama)}, "task": {"type": "chat"},
              "feedback": {"store": str(tmp_path / "fb.db")}, "data": {"feedback": {"build": "pairs"}}}
    code, out, err = cli(capsys, "train", str(write(tmp_path / "a.yaml", config)))
    assert code == 1 and err == (f"tunelab: error: {tmp_path / 'a.yaml'}: invalid config:\n  (top level): Value error, "
                                 f"data.feedback.build pairs makes rows for task preference or reward_model or kto, not "
                                 f"chat; for task chat build corrections or refine\n")
    code, out, err = cli(capsys, "train", str(write(tmp_path / "a.yaml", config)), "data.feedback.build=corrections")
    assert code == 1 and err == (f"tunelab: error: {tmp_path / 'fb.db'}: build corrections made no training rows from "
                                 f"1 record: skipped 1 record: 1 good, no correction (include_good trains on good "
                                 f"outputs)\n")
    assert not (tmp_path / "run" / "feedback_data.jsonl").exists()


# ---------------------------------------------------------------------------------------------- the loop

SST2_TRAIN = DATA / "sst2" / "train.tsv"


def loop_config(tmp_path: Path, tiny_bert: Path, **loop) -> Path:
    """A loop over 200 SST-2 training rows: round 0 on the first 40, rounds of 40 pool rows after them."""
    train = tmp_path / "train.tsv"
    train.write_text("\n".join(SST2_TRAIN.read_text(encoding="utf-8").splitlines()[:201]) + "\n", encoding="utf-8")
    return write(tmp_path / "loop.yaml", {
        "output_dir": str(tmp_path / "loop"), "model": {"source": str(tiny_bert)}, "task": {"type": "classification"},
        "data": {"train": str(train), "validation": str(SST2_DEV), "text_field": "sentence", "max_length": 64,
                 "max_train_examples": 40, "max_validation_examples": 48},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "save_steps": 0, "precision": "fp32"},
        "feedback": {"store": str(tmp_path / "fb.db"), "collect": [{"type": "gold"}],
                     "loop": {"rounds": 2, "per_round": 40, **loop}}})


def test_the_loop_collects_builds_trains_and_scores_every_round(capsys, tmp_path, tiny_bert):
    config = loop_config(tmp_path, tiny_bert)
    code, out, err = cli(capsys, "feedback", "loop", str(config), "--no-progress")
    assert code == 0, err
    loop = tmp_path / "loop"
    rounds = rows(loop / "loop.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["rows"] == 40 and len(rows(loop / "seed_data.jsonl")) == 40
    pool = [line.rsplit("\t", 1) for line in SST2_TRAIN.read_text(encoding="utf-8").splitlines()[1:201]]
    with FeedbackStore(tmp_path / "fb.db") as store:
        for r in (1, 2):
            judged = str(loop / f"round-{r - 1}")
            assert rounds[r]["judged_model"] == judged and rounds[r]["pool"] == [40 * r, 40 * r + 40]
            records = store.query(model=judged)
            assert len(records) == 40 == rounds[r]["good"] + rounds[r]["bad"]
            assert {rec.input for rec in records} == {sentence for sentence, _ in pool[40 * r: 40 * r + 40]}
            # the wrong answers become rows with the gold label; nothing else does
            gold = dict(pool)
            wrong = {rec.input for rec in records if rec.verdict == "bad"}
            built = rows(loop / f"round-{r}" / "feedback_data.jsonl")
            assert len(built) == rounds[r]["rows"] == rounds[r]["bad"] == len(wrong) > 0
            assert {row["sentence"] for row in built} == wrong
            assert all(row["label"] == gold[row["sentence"]] for row in built)
            run_config = yaml.safe_load((loop / f"round-{r}" / "config.yaml").read_text())
            assert run_config["model"]["source"] == judged  # start_from previous
            assert json.loads((loop / f"round-{r}" / "metrics.json").read_text())["accuracy"] == rounds[r]["score"]
    # replay: round 0's rows, then round 1's too
    assert rounds[1]["replayed"] == 40 and rounds[2]["replayed"] == 40 + rounds[1]["rows"]
    assert len(rows(loop / "round-2" / "mix_data.jsonl")) == rounds[2]["replayed"]
    report = (loop / "report.md").read_text()
    assert "| 2 | 40 (80-119) |" in report and "![accuracy by round](loop.png)" in report
    assert (loop / "loop.png").stat().st_size > 1000
    assert "| round | judged (pool rows) |" in out and "report: " in out

    # run again: nothing is done twice; one round more is added
    code, out, err = cli(capsys, "feedback", "loop", str(config), "--no-progress", "feedback.loop.rounds=3")
    assert code == 0, err
    assert [r["round"] for r in rows(loop / "loop.jsonl")] == [0, 1, 2, 3]
    assert rows(loop / "loop.jsonl")[:3] == rounds
    with FeedbackStore(tmp_path / "fb.db") as store:
        assert store.count() == 120
    assert "== round 0" not in out and "== round 3" in out


def test_loop_errors(capsys, tmp_path, tiny_bert):
    config = loop_config(tmp_path, tiny_bert, per_round=100)
    code, out, err = cli(capsys, "feedback", "loop", str(config))
    assert code == 1 and err == (f"tunelab: error: {tmp_path / 'train.tsv'}: 200 pool examples; 2 rounds of 100 "
                                 f"after the first 40 need 240 (lower feedback.loop.per_round or rounds, or give a "
                                 f"larger pool)\n")
    assert not (tmp_path / "loop").exists()  # nothing is written before the checks
    code, out, err = cli(capsys, "feedback", "loop", str(config), "data.max_train_examples=null")
    assert code == 1 and "set data.max_train_examples (round 0 trains on the first N rows" in err
    code, out, err = cli(capsys, "feedback", "loop", str(config), "method.type=lora")
    assert code == 1 and "start_from previous continues the weights of method full or freeze" in err
    code, out, err = cli(capsys, "feedback", "loop", str(config), "feedback.loop.train.epoch=2")
    assert code == 1 and "round 1's config (from feedback.loop)" in err and "train.epoch" in err
    code, out, err = cli(capsys, "feedback", "loop", str(config), "feedback.loop.build.build=relabel",
                         "feedback.loop.build.model=x")
    assert code == 1 and "feedback.loop.build.model is set by the loop" in err
    # a loop directory keeps its config
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "loop_config.yaml").write_text(yaml.safe_dump(yaml.safe_load(config.read_text())))
    code, out, err = cli(capsys, "feedback", "loop", str(config), "feedback.loop.per_round=50", "train.lr=0.01")
    assert code == 1 and "holds a loop of another config (feedback.loop.per_round, train.lr changed" in err


def test_a_chat_loop_learns_from_a_verifiers_verdicts(capsys, tmp_path, chat_llama):
    """A chat model trained on answered sums, judged by the final_number verifier on a pool of questions; its wrong
    answers become SFT rows with the reference answer."""
    arithmetic = Path(__file__).resolve().parents[2] / "examples" / "data" / "feedback" / "arithmetic.jsonl"
    lines = arithmetic.read_text(encoding="utf-8").splitlines()
    answered = [json.loads(line) for line in lines]
    for row in answered:
        row["messages"].append({"role": "assistant", "content": row.pop("answer")})
    train, validation = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in answered[:6]), encoding="utf-8")
    validation.write_text("".join(json.dumps(row) + "\n" for row in answered[-6:]), encoding="utf-8")
    config = write(tmp_path / "chat-loop.yaml", {
        "output_dir": str(tmp_path / "loop"), "model": {"source": str(chat_llama)},
        "task": {"type": "chat", "generation": {"max_new_tokens": 6}},
        "data": {"train": str(train), "validation": str(validation), "max_length": 64},
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "save_steps": 0, "precision": "fp32"},
        "feedback": {"store": str(tmp_path / "fb.db"),
                     "collect": [{"type": "verifier", "function": "tunelab.evaluate.verifiers:final_number"}],
                     "loop": {"rounds": 2, "per_round": 8, "pool": str(arithmetic)}}})
    code, out, err = cli(capsys, "feedback", "loop", str(config), "--no-progress")
    assert code == 0, err
    loop = tmp_path / "loop"
    rounds = rows(loop / "loop.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[0]["metric"] == "loss"
    assert rounds[1]["pool"] == [0, 8] and rounds[2]["pool"] == [8, 16]  # another pool: nothing skipped
    answers = {json.dumps(row["messages"]): row["answer"] for row in map(json.loads, lines)}
    for r in (1, 2):
        built = rows(loop / f"round-{r}" / "feedback_data.jsonl")
        assert len(built) == rounds[r]["bad"] == rounds[r]["rows"] > 0
        for row in built:  # the user turn as it was asked, the reference as the answer
            *prompt, answer = row["messages"]
            assert answer == {"role": "assistant", "content": answers[json.dumps(prompt)]}
        assert rounds[r]["score"] == json.loads((loop / f"round-{r}" / "metrics.json").read_text())["loss"]
