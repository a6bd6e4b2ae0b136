"""Bad tokenizer input gets a TokenizerError whose message names the file or the problem, never a raw traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from tunelab.errors import TokenizerError
from tunelab.tokenizer import Tokenizer, load_tokenizer


def word_level() -> Backend:
    backend = Backend(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "<eos>": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return backend


@pytest.fixture
def good_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    Tokenizer(word_level(), special_tokens={"eos_token": "<eos>", "unk_token": "[UNK]"}).save(directory)
    return directory


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match=r"nope: no such tokenizer directory"):
        load_tokenizer(missing)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"no tokenizer files \(expected tokenizer.json.*config.json"):
        load_tokenizer(tmp_path)


def test_truncated_or_invalid_tokenizer_json(good_dir):
    path = good_dir / "tokenizer.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: malformed JSON at line \d+, column \d+"):
        load_tokenizer(good_dir)
    path.write_text(json.dumps({"model": {"type": "NoSuchModel"}}))  # valid JSON, not a tokenizer
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(good_dir)


@pytest.mark.parametrize("content, message", [
    ('{"eos_token": "<eos>",', r"tokenizer_config\.json: malformed JSON at line 1"),
    ('["a list"]', r"tokenizer_config\.json: expected a JSON object, found list"),
    ('{"padding_side": "middle"}', r"tokenizer_config\.json: padding_side must be 'left' or 'right'"),
    ('{"model_max_length": "long"}', r"tokenizer_config\.json: model_max_length must be a positive integer"),
    ('{"eos_token": 7}', r"tokenizer_config\.json: eos_token must be a string"),
    ('{"chat_template": 3}', r"tokenizer_config\.json: chat_template must be a string"),
])
def test_malformed_tokenizer_config(good_dir, content, message):
    (good_dir / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(good_dir)


def test_bad_vocab_txt(tmp_path):
    (tmp_path / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(TokenizerError, match=r"vocab\.txt: the unknown token '\[UNK\]' is not in the vocabulary"):
        load_tokenizer(tmp_path)


def test_apply_chat_template_errors(good_dir):
    tokenizer = load_tokenizer(good_dir)
    assert tokenizer.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    tokenizer = Tokenizer(word_level(), chat_template="{% if %}")
    with pytest.raises(TokenizerError, match="syntax error"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    rejecting = Tokenizer(word_level(), chat_template="{{ raise_exception('system role not supported') }}")
    with pytest.raises(TokenizerError, match="system role not supported"):
        rejecting.apply_chat_template([{"role": "system", "content": "x"}])


def test_bad_encode_arguments(good_dir):
    tokenizer = load_tokenizer(good_dir)
    assert tokenizer.encode("hello world") == [1, 2]
    with pytest.raises(TokenizerError, match="text must be a string, got NoneType"):
        tokenizer.encode(None)
    with pytest.raises(TokenizerError, match=r"texts\[1\] must be a string"):
        tokenizer.encode_batch(["hello", 3])
    with pytest.raises(TokenizerError, match="2 texts but 1 pairs"):
        tokenizer.encode_batch(["hello", "world"], ["x"])
    with pytest.raises(TokenizerError, match="padding=True"):
        tokenizer.encode_batch(["hello", "hello world"], return_tensors="pt")
    with pytest.raises(TokenizerError, match="return_tensors must be None or 'pt'"):
        tokenizer.encode_batch(["hello"], return_tensors="np")
    with pytest.raises(TokenizerError, match="negative token id"):
        tokenizer.decode([1, -5])
    # padding without a pad token falls back to the eos id
    assert tokenizer.encode_batch(["hello", "hello world"], padding=True)["input_ids"] == [[1, 3], [1, 2]]
