"""A byte-level BPE tokenizer trained here, saved with Tokenizer.save and loaded by transformers: same ids, same
decoded text, same chat prompts. Also the GPT-2 style vocab.json + merges.txt rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from tunelab.tokenizer import Tokenizer, load_tokenizer

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{% if tools %}{{ eos_token }}{% endif %}"
)

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading spaces and trailing   ",
    "Héllo wörld — naïve café",
    "中文字符和表情 😀🎉🚀",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "tabs\tand\nnewlines\r\nand <|endoftext|> in the middle",
    "Numbers 12345 and symbols #@$%^&*()",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What light through yonder window breaks?"}],
    [{"role": "system", "content": "Answer in verse."},
     {"role": "user", "content": "Who art thou?"},
     {"role": "assistant", "content": "  A humble servant.  "},
     {"role": "user", "content": "Wherefore? 😀 中文"}],
]


def train_bpe(lines: int = 400, vocab_size: int = 500) -> Backend:
    """A byte-level BPE trained on the first lines of tinyshakespeare (read in place)."""
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is not available")
    with open(SHAKESPEARE, encoding="utf-8") as handle:
        text = [next(handle) for _ in range(lines)]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(text, trainer)
    return backend


@pytest.fixture(scope="module")
def chat_tokenizer() -> Tokenizer:
    return Tokenizer(train_bpe(), special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                     chat_template=CHATML, model_max_length=256, padding_side="left")


@pytest.fixture(scope="module")
def saved(chat_tokenizer, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bpe-chat")
    chat_tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def hf(saved):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved))


def test_save_writes_hf_files(saved, chat_tokenizer):
    assert sorted(p.name for p in saved.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                       "tokenizer_config.json"]
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["chat_template"] == CHATML and config["padding_side"] == "left"
    assert config["model_max_length"] == 256
    assert {entry["content"] for entry in config["added_tokens_decoder"].values()} == set(SPECIALS)
    assert json.loads((saved / "special_tokens_map.json").read_text()) == {"eos_token": "<|im_end|>",
                                                                          "pad_token": "<|endoftext|>"}


def test_transformers_loads_saved_tokenizer_identically(chat_tokenizer, hf):
    assert len(hf) == chat_tokenizer.vocab_size
    assert hf.eos_token_id == chat_tokenizer.eos_token_id and hf.pad_token_id == chat_tokenizer.pad_token_id
    assert hf.padding_side == "left" and hf.model_max_length == 256
    for text in TEXTS:
        ids = chat_tokenizer.encode(text)
        assert ids == hf(text)["input_ids"], text
        for skip in (True, False):
            assert chat_tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    # special tokens written in text are single ids
    assert chat_tokenizer.encode("<|im_start|>")[0] == chat_tokenizer.token_to_id("<|im_start|>")
    got = chat_tokenizer.encode_batch(TEXTS, padding=True, truncation=True, max_length=12)
    want = hf(TEXTS, padding=True, truncation=True, max_length=12)
    assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"]
    assert got["input_ids"][-1][0] == chat_tokenizer.pad_token_id  # left padding with the pad token


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(chat_tokenizer, hf, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    text = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert ("You are a helpful assistant." in text) == (messages[0]["role"] != "system")
    ids = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=False)
    tools = [{"type": "function", "function": {"name": "now"}}]
    with_tools = chat_tokenizer.apply_chat_template(messages, tools=tools)
    assert with_tools.endswith("<|im_end|>")  # the template saw tools and the eos_token variable
    assert with_tools == hf.apply_chat_template(messages, tools=tools, tokenize=False)


def test_reload_roundtrip_and_stale_jinja_file(chat_tokenizer, saved, tmp_path):
    again = load_tokenizer(saved)
    assert again.chat_template == CHATML and again.padding_side == "left" and again.model_max_length == 256
    assert [again.encode(t) for t in TEXTS] == [chat_tokenizer.encode(t) for t in TEXTS]
    assert again.all_special_ids == chat_tokenizer.all_special_ids
    # a chat_template.jinja wins over the config entry (as in transformers), so save() must not leave a stale one
    target = tmp_path / "with-jinja"
    target.mkdir()
    (target / "chat_template.jinja").write_text("stale {{ messages }}")
    again.save(target)
    assert load_tokenizer(target).chat_template == CHATML
    assert load_tokenizer(target / "tokenizer.json").chat_template == CHATML  # a tokenizer.json path works too


def test_vocab_json_merges_txt_rebuild(tmp_path):
    transformers = pytest.importorskip("transformers")
    backend = train_bpe()
    backend.model.save(str(tmp_path))  # writes vocab.json and merges.txt
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    rebuilt = load_tokenizer(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [t for t in TEXTS if "<|" not in t]
    for text in texts:
        assert rebuilt.encode(text) == backend.encode(text).ids == reference(text)["input_ids"], text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert rebuilt.eos_token == "<|endoftext|>" and rebuilt.eos_token_id == reference.eos_token_id
