"""Collecting feedback with tiny random models on real data: the gold judge on a classifier over SST-2 rows and
a tagger over CoNLL sentences, verifiers and a judge model on a chat model's answers, a tiny trained reward model,
a model given in memory, skipping what was judged before, and the errors. The chat model is the tiny ChatML Llama
of tests/conftest.py (chat_llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunelab.errors import ConfigError, DataError
from tunelab.evaluate.metrics import tag_entities
from tunelab.feedback import FeedbackStore
from tunelab.feedback.collect import collect_feedback, source_version, weights_fingerprint
from tunelab.feedback.judges import parse_judge_reply
from tunelab.feedback.outputs import GenerationOptions

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
SST2_DEV = DATA / "sst2" / "dev.tsv"
CONLL_VALID = DATA / "conll2003" / "valid.txt"
HH = DATA / "hh_rlhf" / "harmless-base-pairs.jsonl"
MULTI30K = DATA / "multi30k_en_de"
ARITHMETIC = Path(__file__).resolve().parents[3] / "examples" / "data" / "feedback" / "arithmetic.jsonl"
CONLL_TAGS = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
SHORT = GenerationOptions(max_new_tokens=6)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny) -> Path:
    return tiny.minilm_bert(tmp_path_factory.mktemp("collect") / "cls", "BertForSequenceClassification", ["0", "1"])


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory, tiny) -> Path:
    return tiny.minilm_bert(tmp_path_factory.mktemp("collect") / "tagger", "BertForTokenClassification", CONLL_TAGS)


@pytest.fixture
def sst2_rows(tmp_path) -> Path:
    """The header and the first 40 rows of SST-2's dev split."""
    path = tmp_path / "dev40.tsv"
    path.write_text("\n".join(SST2_DEV.read_text(encoding="utf-8").splitlines()[:41]) + "\n", encoding="utf-8")
    return path


def _predictions(model: Path, data: Path, tmp_path: Path, *overrides: str) -> list[dict]:
    """What `tunelab predict` writes for the model and data (both compute with precision auto)."""
    from tunelab.evaluate.runner import predict_source

    out = tmp_path / "predictions.jsonl"
    predict_source(str(model), [str(data)], str(out), overrides=list(overrides))
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------- gold


def test_gold_judge_on_a_classifier_over_sst2(classifier_dir, sst2_rows, tmp_path):
    store = tmp_path / "fb.db"
    result = collect_feedback(str(classifier_dir), sst2_rows, [{"type": "gold"}], store,
                              data={"text_field": "sentence"}, batch_size=16, progress=False)
    labels = [line.split("\t")[1] for line in sst2_rows.read_text().splitlines()[1:]]
    predicted = [p["label"] for p in _predictions(classifier_dir, sst2_rows, tmp_path, "data.text_field=sentence")]
    with FeedbackStore(store) as opened:
        records = opened.query()
    assert len(records) == 40 and [r.id for r in result.records] == [r.id for r in records]
    assert [r.output for r in records] == predicted
    assert [r.verdict for r in records] == ["good" if p == gold else "bad" for p, gold in zip(predicted, labels)]
    assert {"good", "bad"} <= {r.verdict for r in records}  # the random classifier gets some right, some wrong
    for line, (record, gold) in enumerate(zip(records, labels), start=2):
        assert (record.source, record.task, record.reference, record.model) == ("gold", "classification", gold,
                                                                                str(classifier_dir))
        assert record.correction == (gold if record.verdict == "bad" else None)
        assert record.metadata["data"] == str(sst2_rows) and record.metadata["line"] == line
        assert record.metadata["judge"] == "gold" and 0.5 <= record.metadata["probability"] <= 1.0
        assert record.model_version == weights_fingerprint(classifier_dir)
    summary = result.judges[0]
    assert (summary.records, summary.good + summary.bad) == (40, 40)
    assert result.summary().splitlines()[0] == (f"judged 40 examples with {classifier_dir} (classification, version "
                                                f"{weights_fingerprint(classifier_dir)}): 40 records added into {store}")

    # again: every example was judged for this version already; with skip_judged=False they are judged again
    again = collect_feedback(str(classifier_dir), sst2_rows, [{"type": "gold"}], store,
                             data={"text_field": "sentence"}, progress=False)
    assert again.records == [] and again.judges[0].judged_before == 40
    assert "gold: 40 examples skipped, judged before for this model version" in again.summary()
    forced = collect_feedback(str(classifier_dir), sst2_rows, [{"type": "gold"}], store, limit=5,
                              data={"text_field": "sentence"}, skip_judged=False, progress=False)
    assert [r.verdict for r in forced.records] == [r.verdict for r in records[:5]]
    with FeedbackStore(store) as opened:
        assert opened.count() == 45


def test_gold_judge_on_a_tagger_names_the_wrong_spans(tagger_dir, tmp_path):
    sentences = CONLL_VALID.read_text(encoding="utf-8").split("\n\n")[:12]
    data = tmp_path / "valid12.txt"
    data.write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
    result = collect_feedback(str(tagger_dir), data, [{"type": "gold"}], None, data={"tag_column": 1},
                              progress=False)
    predicted = [p["tags"] for p in _predictions(tagger_dir, data, tmp_path, "data.tag_column=1")]
    records = result.records
    assert len(records) == len(predicted) >= 11 and [r.output.split() for r in records] == predicted
    bad = 0
    for record, tags in zip(records, predicted):
        words, gold = record.metadata["tokens"], record.reference
        assert record.input == " ".join(words) and len(gold) == len(words)
        wrong = set(tag_entities(gold)) != set(tag_entities(tags))
        assert record.verdict == ("bad" if wrong else "good")
        if wrong:
            bad += 1
            assert record.correction == " ".join(gold) and record.critique.startswith("Wrong spans: ")
            for kind, start, end in set(tag_entities(gold)) - set(tag_entities(tags)):
                assert f"'{' '.join(words[start:end + 1])}'" in record.critique and kind in record.critique
            for kind, start, end in set(tag_entities(tags)) - set(tag_entities(gold)):
                assert f"'{' '.join(words[start:end + 1])}'" in record.critique
    assert bad >= 6  # a random tagger gets most sentences wrong


def test_gold_judge_on_a_seq2seq_run_scores_sentences(seq2seq_run, tmp_path):
    from tunelab.evaluate.metrics import sentence_score

    sources, targets = tmp_path / "val.en", tmp_path / "val.de"
    for side, path in (("en", sources), ("de", targets)):
        path.write_text("\n".join((MULTI30K / f"val.{side}").read_text().splitlines()[:8]) + "\n", encoding="utf-8")
    result = collect_feedback(str(seq2seq_run), [sources, targets], [{"type": "gold", "metric": "chrf",
                                                                      "threshold": 5.0}], None, progress=False)
    predicted = [p["prediction"] for p in _predictions(seq2seq_run, sources, tmp_path)]  # beam 2, as the run says
    references = targets.read_text().splitlines()
    assert [r.output for r in result.records] == predicted and [r.reference for r in result.records] == references
    for record in result.records:
        assert record.score == pytest.approx(sentence_score("chrf", record.output, record.reference))
        assert record.verdict == ("good" if record.score >= 5.0 else "bad") and record.metadata["metric"] == "chrf"
        assert record.correction == (record.reference if record.verdict == "bad" else None)
    assert result.records[0].model_version.startswith("step-3-")


# ---------------------------------------------------------------------------------------------- verifiers, judge


def test_verifiers_on_a_chat_model(chat_llama, tmp_path):
    checks = tmp_path / "checks.py"
    checks.write_text("def has_digit(output, example):\n"
                      "    if any(c.isdigit() for c in output):\n"
                      "        return 'good', None\n"
                      "    return 'bad', f'No number in the answer to: {example[\"prompt\"]}'\n")
    judges = [{"type": "verifier", "function": f"{checks}:has_digit"},
              {"type": "verifier", "function": "tunelab.evaluate.verifiers:final_number"}]
    result = collect_feedback(str(chat_llama), ARITHMETIC, judges, tmp_path / "fb.db", limit=6, generation=SHORT,
                              progress=False)
    rows = [json.loads(line) for line in ARITHMETIC.read_text().splitlines()[:6]]
    assert len(result.records) == 12
    for record in result.records:
        row = rows[record.metadata["line"] - 1]
        assert record.source == "rule" and record.task == "chat" and record.input == row["messages"]
        assert record.reference == row["answer"]
        if record.metadata["judge"] == f"verifier:{checks}:has_digit":
            has_digit = any(c.isdigit() for c in record.output)
            assert record.verdict == ("good" if has_digit else "bad") and record.score is None
            assert record.critique == (None if has_digit else f"No number in the answer to: {row['messages'][0]['content']}")
        else:
            assert record.metadata["verifier"] == "tunelab.evaluate.verifiers:final_number"
            assert record.score == (1.0 if record.verdict == "good" else 0.0) and record.verdict == "bad"
    # the two judges' records of one output share its input key
    keys = [r.metadata["input_key"] for r in result.records]
    assert all(keys.count(key) == 2 for key in keys)


def test_judge_model_replies_parsed_or_kept(chat_llama, tmp_path, monkeypatch):
    import tunelab.train.run as run_module

    loads = []
    real = run_module.load_any
    monkeypatch.setattr(run_module, "load_any", lambda source, **kw: (loads.append(source), real(source, **kw))[1])
    judge = {"type": "judge", "model": str(chat_llama), "rubric": "the answer is a number", "max_new_tokens": 12}
    result = collect_feedback(str(chat_llama), ARITHMETIC, [judge], tmp_path / "fb.db", limit=5, generation=SHORT,
                              batch_size=4, progress=False)
    assert loads == [str(chat_llama)]  # the judge is the policy model: loaded once
    summary = result.judges[0]
    assert summary.records + summary.unjudged == 5 and len(result.unjudged) == summary.unjudged
    for record in result.records:  # whatever the random model said was read as parse_judge_reply reads it
        reply = record.metadata["judge_reply"]
        assert reply.startswith("Verdict:") and record.source == "judge"
        parsed = parse_judge_reply(reply)
        assert (record.verdict, record.score, record.critique) == (parsed.verdict, parsed.score, parsed.critique)
    for item in result.unjudged:  # not understood: nothing stored, the raw reply kept in the result
        assert item["reply"].startswith("Verdict:") and not parse_judge_reply(item["reply"]).judged
        assert item["where"].startswith(f"{ARITHMETIC}:")
    if result.unjudged:
        assert "without a verdict or a score, not stored" in result.summary()


# ---------------------------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_run(chat_llama, tmp_path_factory) -> Path:
    """A reward model trained for 3 steps from the tiny chat Llama on 12 short hh-rlhf pairs."""
    from tunelab.config.loading import validate
    from tunelab.config.schema import TrainConfig
    from tunelab.train.run import train

    records = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()]
    short = [r for r in records if max(len(r["chosen"]), len(r["rejected"])) < 260][:12]
    root = tmp_path_factory.mktemp("reward")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short), encoding="utf-8")
    raw = {"output_dir": str(root / "run"), "model": {"source": str(chat_llama)}, "task": {"type": "reward_model"},
           "data": {"train": str(root / "pairs.jsonl"), "max_length": 160, "validation_split": 0.25},
           "method": {"type": "full"}, "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "precision": "fp32",
                                                 "save_steps": 0, "logging_steps": 1}}
    train(validate(TrainConfig, raw, "test"), show_progress=False, log=lambda *a: None)
    return root / "run"


def test_reward_model_judge_scores_as_the_reward_model_was_trained(chat_llama, reward_run, tmp_path):
    from tunelab.data.preference import PreferencePair, encode_preferences
    from tunelab.train.preference import RewardModelStep, _rows
    from tunelab.train.run import load_run

    judge = {"type": "reward_model", "model": str(reward_run)}
    result = collect_feedback(str(chat_llama), ARITHMETIC, [judge], None, limit=4, generation=SHORT, precision="fp32",
                              progress=False)
    assert [r.verdict for r in result.records] == [None] * 4 and all(r.source == "reward_model" for r in result.records)
    # the same rewards from the training step's own pair scoring (each output as the chosen answer)
    model, tokenizer, _ = load_run(reward_run)
    pairs = [PreferencePair(r.input, r.output, "other", "x") for r in result.records]
    features = encode_preferences(pairs, tokenizer, 160, special_tokens=True).features
    step = RewardModelStep(tokenizer.pad_token_id)
    with torch.inference_mode():
        for record, feature in zip(result.records, features):
            batch = _rows([feature["prompt_ids"]], [feature["chosen_ids"]], step.pad_token_id, labels=False)
            expected = model(batch["input_ids"], batch["attention_mask"], heads=("classifier",)).logits["classifier"]
            assert record.score == pytest.approx(float(expected[0, 0]), abs=1e-5)
    # with a threshold, a verdict: good at or above it
    middle = sorted(r.score for r in result.records)[2]
    judged = collect_feedback(str(chat_llama), ARITHMETIC, [{**judge, "threshold": middle}], None, limit=4,
                              generation=SHORT, precision="fp32", progress=False)
    assert [r.verdict for r in judged.records] == ["good" if r.score >= middle else "bad" for r in result.records]
    assert result.records[0].model_version == source_version(chat_llama)
    with pytest.raises(ConfigError, match="not a reward model"):
        collect_feedback(str(chat_llama), ARITHMETIC, [{"type": "reward_model", "model": str(chat_llama)}], None, limit=1)


# ---------------------------------------------------------------------------------------------- Python API


def test_a_loaded_model_and_examples_from_the_caller(classifier_dir, tmp_path):
    import tunelab

    model, tokenizer = tunelab.load(classifier_dir)
    pool = [{"input": "a gorgeous , witty film", "reference": "1"}, {"input": "a dull mess", "reference": "0"}]
    store = FeedbackStore(tmp_path / "fb.db")
    first = collect_feedback(model, pool, [{"type": "gold"}], store, tokenizer=tokenizer, model_name="tiny",
                             progress=False)
    assert first.task == "classification" and first.model_version.startswith("params-")
    assert [r.metadata["judge"] for r in first.records] == ["gold", "gold"]
    assert first.records[0].metadata.get("data") is None  # examples in memory have no file
    more = collect_feedback(model, pool + [{"input": "fine", "reference": "1"}], [{"type": "gold"}], store,
                            tokenizer=tokenizer, model_name="tiny", progress=False)
    assert [r.input for r in more.records] == ["fine"] and more.model_version == first.model_version
    with torch.no_grad():
        model.heads["classifier"].out.bias.add_(1.0)  # another version of the model: judged again
    changed = collect_feedback(model, pool, [{"type": "gold"}], store, tokenizer=tokenizer, model_name="tiny",
                               progress=False)
    assert len(changed.records) == 2 and changed.model_version != first.model_version
    assert store.count() == 5
    with pytest.raises(ConfigError, match="a loaded model needs a name"):
        collect_feedback(model, pool, [{"type": "gold"}], store, tokenizer=tokenizer)
    store.close()


def test_clear_errors(classifier_dir, chat_llama, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "answer": "Hello"}) + "\n"
                         + json.dumps({"messages": [{"role": "user", "content": "Yo"}]}) + "\n")
    with pytest.raises(DataError, match=r"questions.jsonl:2: the gold judge needs a reference answer"):
        collect_feedback(str(chat_llama), questions, [{"type": "gold"}], None)
    with pytest.raises(ConfigError, match="type: Input should be 'gold', 'verifier', 'reward_model' or 'judge'"):
        collect_feedback(str(chat_llama), questions, [{"type": "oracle"}], None)
    with pytest.raises(ConfigError, match="no judges"):
        collect_feedback(str(chat_llama), questions, [], None)
    with pytest.raises(ConfigError, match="task tagging needs a model with a tagger head"):
        collect_feedback(str(classifier_dir), questions, [{"type": "gold"}], None, task="tagging")
    with pytest.raises(DataError, match=r"dev.tsv:2: missing field 'text'"):
        collect_feedback(str(classifier_dir), SST2_DEV, [{"type": "gold"}], None, limit=2)
