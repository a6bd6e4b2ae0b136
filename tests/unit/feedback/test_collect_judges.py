"""Judges without models: the gold judge per task, span critiques, judge-reply parsing (garbage included),
judge prompts and rubrics, reading examples (fields, references, errors with file and line), the config's
feedback.collect list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config.loading import validate
from tunelab.config.schema import DataSection, TrainConfig
from tunelab.errors import ConfigError, DataError, FeedbackError
from tunelab.feedback.examples import Example, as_examples, read_examples
from tunelab.feedback.judges import (DEFAULT_RUBRIC, PREFILL, GoldJudge, VerifierJudge, judge_prompt, load_rubric,
                                     make_judge, parse_judge_reply, span_critique)
from tunelab.feedback.outputs import Output

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
SST2_DEV = DATA / "sst2" / "dev.tsv"
CONLL_VALID = DATA / "conll2003" / "valid.txt"
ALPACA = DATA / "alpaca_demo" / "alpaca_en_demo.json"
ARITHMETIC = Path(__file__).resolve().parents[3] / "examples" / "data" / "feedback" / "arithmetic.jsonl"


# ---------------------------------------------------------------------------------------------- gold judge


def test_gold_classification_verdicts_and_corrections():
    examples = [Example("fine film", "1"), Example("dull", "0"), Example("meh", "0")]
    outputs = [Output("1", label="1", probability=0.9, metadata={"scores": {"0": 0.1, "1": 0.9}}),
               Output("1", label="1", probability=0.6, metadata={"scores": {"0": 0.4, "1": 0.6}}),
               Output("0", label="0", probability=0.7)]
    verdicts = GoldJudge()(examples, outputs, "classification")
    assert [v.verdict for v in verdicts] == ["good", "bad", "good"]
    assert [v.correction for v in verdicts] == [None, "0", None]
    assert verdicts[1].critique == "The label is '0', not '1'."
    assert verdicts[1].metadata == {"probability": 0.6, "gold_probability": 0.4}


def test_gold_tagging_names_every_wrong_span():
    words = "EU rejects German call to boycott British lamb in New York".split()
    gold = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O", "B-LOC", "I-LOC"]
    predicted = ["O", "B-PER", "B-LOC", "O", "O", "O", "B-MISC", "O", "O", "B-LOC", "O"]
    example = Example(" ".join(words), gold, "valid.txt:3", tokens=words)
    right = GoldJudge()([example], [Output(" ".join(gold), tags=gold)], "tagging")[0]
    assert (right.verdict, right.score, right.correction) == ("good", 1.0, None)
    wrong = GoldJudge()([example], [Output(" ".join(predicted), tags=predicted)], "tagging")[0]
    assert wrong.verdict == "bad" and wrong.correction == " ".join(gold)
    assert wrong.critique == ("Wrong spans: missed ORG 'EU'; 'German' is MISC, not LOC; 'New York' is one LOC entity, "
                              "tagged 'New' as LOC; 'rejects' is not an entity but was tagged PER.")
    # 4 gold entities, 4 predicted, 1 right (British MISC): F1 = 2 * 1 / 8
    assert wrong.score == pytest.approx(0.25)
    # the same spans in other tags (an I- that starts an entity, conlleval's reading) are not an error
    same = ["I-ORG", *gold[1:]]
    assert GoldJudge()([example], [Output(" ".join(same), tags=same)], "tagging")[0].verdict == "good"


def test_span_critique_of_a_split_entity():
    words = ["New", "York", "City"]
    text = span_critique(words, [("LOC", 0, 2)], [("LOC", 0, 0), ("ORG", 1, 2)])
    assert text == "Wrong spans: 'New York City' is one LOC entity, tagged 'New' as LOC and 'York City' as ORG."


def test_gold_generation_scores_against_the_reference():
    examples = [Example([{"role": "user", "content": "Capital of France?"}], "The capital of France is Paris."),
                Example([{"role": "user", "content": "Capital of Italy?"}], "The capital of Italy is Rome.")]
    outputs = [Output("The capital of France is Paris."), Output("I do not know.")]
    verdicts = GoldJudge()(examples, outputs, "chat")  # chat: ROUGE-L, bad below 0.3
    assert [v.verdict for v in verdicts] == ["good", "bad"]
    assert verdicts[0].score == pytest.approx(1.0) and verdicts[1].score < 0.3
    assert verdicts[1].correction == "The capital of Italy is Rome."
    assert verdicts[1].critique.startswith("ROUGE-L against the reference is 0.") and verdicts[1].critique.endswith(
        "below 0.3.")
    bleu = GoldJudge(threshold=50.0)([Example("Ein Hund läuft.", "A dog runs.")], [Output("A dog runs.")], "seq2seq")[0]
    assert bleu.metadata["metric"] == "bleu" and bleu.score == pytest.approx(100.0) and bleu.verdict == "good"
    chrf = GoldJudge("chrf", 99.0)([Example("x", "A dog runs.")], [Output("A dog ran.")], "seq2seq")[0]
    assert chrf.verdict == "bad" and 0 < chrf.score < 99 and "chrF" in chrf.critique


def test_gold_needs_a_reference():
    with pytest.raises(DataError, match=r"data.jsonl:4: the gold judge needs the gold answer"):
        GoldJudge()([Example("hi", None, "data.jsonl:4")], [Output("hello")], "chat")


def test_verifier_from_a_file_and_its_failures(tmp_path):
    checks = tmp_path / "checks.py"
    checks.write_text("def polite(output, example):\n"
                      "    if 'please' in output.lower():\n"
                      "        return 'good', None\n"
                      "    return 'bad', 'It does not say please to ' + example['prompt']\n"
                      "def length(output, example):\n"
                      "    return float(len(output))\n")
    examples = [Example("Ask for salt.", None, "a.jsonl:1"), Example("Ask for pepper.", None, "a.jsonl:2")]
    outputs = [Output("Salt, please."), Output("Pepper now.")]
    verdicts = VerifierJudge(f"{checks}:polite")(examples, outputs, "chat")
    assert [(v.verdict, v.critique) for v in verdicts] == [("good", None),
                                                           ("bad", "It does not say please to Ask for pepper.")]
    scored = VerifierJudge(f"{checks}:length", threshold=12)(examples, outputs, "chat")
    assert [(v.verdict, v.score) for v in scored] == [("good", 13.0), ("bad", 11.0)]
    assert [v.verdict for v in VerifierJudge(f"{checks}:length")(examples, outputs, "chat")] == [None, None]
    # the built-in final_number reads the row's 'answer': a row without it is named by file and line
    with pytest.raises(FeedbackError, match=r"a.jsonl:1: verifier tunelab.evaluate.verifiers:final_number failed: "
                                            r"KeyError: 'answer'"):
        VerifierJudge("tunelab.evaluate.verifiers:final_number")(examples, outputs, "chat")
    with pytest.raises(ConfigError, match="has no function 'nothing'"):
        VerifierJudge(f"{checks}:nothing")


# ---------------------------------------------------------------------------------------------- judge replies


@pytest.mark.parametrize("reply,verdict,score,critique", [
    ("Verdict: good\nCritique: It gives the right number.", "good", None, "It gives the right number."),
    ("**Verdict:** Bad\n**Critique:** The sum is 59, not 122. Also rude.", "bad", None, "The sum is 59, not 122."),
    ("Verdict: Good\n\nThe answer is correct, but terse. More text", "good", None, "The answer is correct, but terse."),
    ("Verdict: not good. It is wrong.", "bad", None, "It is wrong."),
    ("Verdict: PASS - fine.", "good", None, "fine."),
    ("Verdict: incorrect", "bad", None, None),
    ("Bad. The sum is wrong.\nScore: 2", "bad", 2.0, "The sum is wrong."),
    ("Verdict: bad\nScore: 3/10\nThe number is off.", "bad", 0.3, "The number is off."),
    ("Score: 8 out of 10. Reason: mostly right", None, 0.8, "mostly right"),
    ("The answer is not correct. The correct answer is 122.", "bad", None, "The correct answer is 122."),
    ("It meets the criterion of being helpful.", "good", None, "It meets the criterion of being helpful."),
    # the instructions restated are not a verdict
    ("Verdict: good or bad\nCritique: one sentence", None, None, "one sentence"),
    ("Verdict: good|bad", None, None, None),
    # garbage
    ("", None, None, None),
    ("asdf qwer zxcv", None, None, None),
    ("The user's message:\nWhat is 41 plus 18?", None, None, None),
    ("Goodness knows. Verdicts are hard.", None, None, None),
])
def test_parse_judge_reply(reply, verdict, score, critique):
    parsed = parse_judge_reply(reply)
    assert (parsed.verdict, parsed.score, parsed.critique) == (verdict, pytest.approx(score) if score else None,
                                                              critique)
    assert parsed.judged == (verdict is not None or score is not None)


def test_judge_prompt_and_rubrics(tmp_path):
    example = Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}], "4")
    text, prefill = judge_prompt(load_rubric(None), example, "5")
    assert prefill == PREFILL == "Verdict:"
    assert f"criterion: {DEFAULT_RUBRIC}\n" in text and "Question: What is 2 + 2?\n" in text
    assert "Reference answer: 4\nAssistant's answer: 5\n" in text and "Be brief" not in text
    text, _ = judge_prompt("the answer is polite", Example("Hi", None), "Go away.")
    assert "Reference answer" not in text and "criterion: the answer is polite" in text
    # a rubric with placeholders is the whole prompt, without a prefill
    custom = tmp_path / "rubric.txt"
    custom.write_text("Rate 1-10.\nQ: {input}\nA: {output}\nGold: {reference}\nScore:\n")
    text, prefill = judge_prompt(load_rubric(str(custom)), example, "5")
    assert (text, prefill) == ("Rate 1-10.\nQ: What is 2 + 2?\nA: 5\nGold: 4\nScore:", "")
    with pytest.raises(ConfigError, match="no-such-rubric.txt: no such rubric file"):
        load_rubric("no-such-rubric.txt")
    assert load_rubric("Be strict about numbers.") == "Be strict about numbers."


# ---------------------------------------------------------------------------------------------- examples


def test_classification_examples_from_sst2(tmp_path):
    rows = SST2_DEV.read_text(encoding="utf-8").splitlines()[:6]
    path = tmp_path / "dev.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    examples = read_examples(path, "classification", data=DataSection(train=str(path), text_field="sentence"),
                             labels=["0", "1"])
    assert [e.reference for e in examples] == [line.split("\t")[1] for line in rows[1:]]
    assert examples[0].input == rows[1].split("\t")[0] and examples[0].where == f"{path}:2"
    assert examples[0].fields == {"sentence": rows[1].split("\t")[0], "label": rows[1].split("\t")[1]}
    assert examples[0].location() == {"data": str(path), "line": 2}
    # an unlabelled file reads for a verifier, but not for the gold judge
    (tmp_path / "bare.jsonl").write_text('{"text": "good"}\n{"text": "bad"}\n')
    bare = read_examples(tmp_path / "bare.jsonl", "classification", labels=["0", "1"])
    assert [e.reference for e in bare] == [None, None]
    with pytest.raises(DataError, match=r"bare.jsonl:1: missing field 'label'"):
        read_examples(tmp_path / "bare.jsonl", "classification", labels=["0", "1"], need_reference=True)


def test_tagging_examples_from_conll():
    examples = read_examples(CONLL_VALID, "tagging", data=DataSection(train=str(CONLL_VALID), tag_column=1), limit=3)
    assert examples[0].tokens == examples[0].input.split() and len(examples[0].reference) == len(examples[0].tokens)
    assert examples[0].fields == {"tokens": examples[0].tokens, "tags": examples[0].reference}
    assert examples[0].where.startswith(f"{CONLL_VALID}:")


def test_chat_examples_and_their_references(tmp_path):
    alpaca = read_examples(ALPACA, "chat", limit=2)
    record = json.loads(ALPACA.read_text(encoding="utf-8"))[0]
    assert alpaca[0].reference == record["output"] and alpaca[0].input[-1]["role"] == "user"
    assert alpaca[0].where == f"{ALPACA}:#0" and alpaca[0].location() == {"data": str(ALPACA), "index": 0}
    arithmetic = read_examples(ARITHMETIC, "chat")
    first = json.loads(ARITHMETIC.read_text().splitlines()[0])
    assert arithmetic[0].input == first["messages"] and arithmetic[0].reference == first["answer"]
    assert arithmetic[0].verifier_fields()["answer"] == first["answer"]
    assert arithmetic[0].verifier_fields()["prompt"] == first["messages"][0]["content"]
    # no final answer and no reference field: the gold judge cannot work, and says where
    (tmp_path / "q.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n"
                                      + json.dumps({"messages": [{"role": "user", "content": "Yo"}], "answer": 3}) + "\n")
    assert [e.reference for e in read_examples(tmp_path / "q.jsonl", "chat")] == [None, "3"]
    with pytest.raises(DataError, match=r"q.jsonl:1: the gold judge needs a reference answer"):
        read_examples(tmp_path / "q.jsonl", "chat", need_reference=True)


def test_examples_from_the_caller():
    examples = as_examples([{"input": "What is 2 + 2?", "reference": "4", "answer": 4},
                            Example([{"role": "user", "content": "Hi"}])])
    assert examples[0].fields == {"answer": 4} and examples[0].where == "example 0"
    assert examples[0].key == Example("What is 2 + 2?").key != examples[1].key  # the key is the input's
    with pytest.raises(FeedbackError, match="example 1: missing field 'input'"):
        as_examples([{"input": "x"}, {"prompt": "y"}])
    with pytest.raises(FeedbackError, match="collecting feedback works on the outputs of"):
        read_examples(ARITHMETIC, "qa")


# ---------------------------------------------------------------------------------------------- config


def _config(collect) -> dict:
    return {"output_dir": "runs/x", "model": {"source": "minilm-l6"}, "task": {"type": "classification"},
            "data": {"train": "t.tsv"}, "feedback": {"store": "fb.db", "collect": collect}}


def test_collect_section_of_the_config():
    config = validate(TrainConfig, _config([{"type": "gold", "metric": "rouge", "threshold": 0.5},
                                            {"type": "verifier", "function": "tunelab.evaluate.verifiers:exact_match"},
                                            {"type": "judge", "model": "smollm2-135m-instruct", "rubric": "polite"}]),
                      "c.yaml")
    assert [j.type for j in config.feedback.collect] == ["gold", "verifier", "judge"]
    assert isinstance(make_judge(config.feedback.collect[0]), GoldJudge)
    assert validate(TrainConfig, {**_config([]), "feedback": {"store": "fb.db"}}, "c.yaml").feedback.collect == []


@pytest.mark.parametrize("item,message", [
    ({"type": "golden"}, "feedback.collect.0.type: Input should be 'gold', 'verifier', 'reward_model' or 'judge'"),
    ({"type": "gold", "treshold": 1}, "feedback.collect.0.treshold: unknown key; did you mean "
                                      "'feedback.collect.0.threshold'?"),
    ({"type": "gold", "rubric": "x"}, "option 'rubric' applies to judges of type judge, not gold"),
    ({"type": "verifier"}, "a verifier judge needs 'function'"),
    ({"type": "reward_model", "threshold": 0}, "a reward_model judge needs 'model'"),
])
def test_bad_collect_items_are_clear(item, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(TrainConfig, _config([item]), "c.yaml")


def test_make_judge_from_a_mapping():
    assert make_judge({"type": "gold"}).name == "gold"
    with pytest.raises(ConfigError, match="judge: invalid config:\n  type: Input should be"):
        make_judge({"type": "oracle"})
