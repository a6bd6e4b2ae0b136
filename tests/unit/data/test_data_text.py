"""Causal-LM text: documents from files, packing with document / position ids, unpacked rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from tunelab.data import encode_causal_lm, load_text, pack_documents
from tunelab.errors import DataError
from tunelab.tokenizer import Tokenizer

DATA = Path("/work/shared/data")


@pytest.fixture(scope="module")
def word_tokenizer() -> Tokenizer:
    """Whitespace words with ids from a fixed vocabulary; <eos> = 1."""
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(200)]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, special_tokens={"eos_token": "<eos>", "unk_token": "<unk>"})


def doc(start: int, count: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + count))


def test_load_text_document_modes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a b\nc\n \n\nd e\n\n\nf\n", encoding="utf-8")
    assert load_text(path) == ["a b\nc\n \n\nd e\n\n\nf\n"]
    assert load_text(path, documents="paragraph") == ["a b\nc", "d e", "f"]
    assert load_text(path, documents="line") == ["a b", "c", "d e", "f"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "x y"}\n{"text": ""}\n{"body": "z"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl:3: missing field 'text'"):
        load_text(jsonl)
    jsonl.write_text('{"body": "x y"}\n{"body": " "}\n{"body": "z"}\n', encoding="utf-8")
    assert load_text(jsonl, text_field="body") == ["x y", "z"]  # blank documents left out
    with pytest.raises(ValueError):
        load_text(path, documents="chapter")


def test_real_corpora():
    assert len(load_text(DATA / "tinyshakespeare" / "input.txt")) == 1
    paragraphs = load_text(DATA / "wikitext2" / "valid.txt", documents="paragraph")
    assert paragraphs[0] == " = Homarus gammarus = " and len(paragraphs) > 1000


def test_packing_rows_documents_and_positions(word_tokenizer):
    documents = [doc(0, 5), doc(10, 3), doc(20, 12), doc(40, 2)]  # 6 + 4 + 13 + 3 = 26 tokens with EOS
    dataset = encode_causal_lm(documents, word_tokenizer, max_length=8)
    rows = dataset.features
    assert [row["length"] for row in rows] == [8, 8, 8, 2]
    stream = [t for row in rows for t in row["input_ids"]]
    expected = [t for d in documents for t in word_tokenizer.encode(d) + [word_tokenizer.eos_token_id]]
    assert stream == expected  # no token lost, order kept
    assert rows[0]["document_ids"] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert rows[1]["document_ids"] == [0, 0, 1, 1, 1, 1, 1, 1]  # doc 2 continues, doc 3 starts
    assert rows[1]["position_ids"] == [0, 1, 0, 1, 2, 3, 4, 5]
    assert rows[2]["position_ids"] == [0, 1, 2, 3, 4, 5, 6, 0]
    assert rows[2]["document_ids"] == [0] * 7 + [1]
    # a document that starts inside a row is not predicted from the previous one
    assert rows[0]["labels"] == rows[0]["input_ids"][:6] + [-100] + rows[0]["input_ids"][7:]
    assert rows[1]["labels"] == rows[1]["input_ids"][:2] + [-100] + rows[1]["input_ids"][3:]
    assert rows[3]["labels"] == rows[3]["input_ids"]


def test_packing_invariants_on_shakespeare(word_tokenizer):
    lines = load_text(DATA / "tinyshakespeare" / "input.txt", documents="paragraph")[:300]
    # map characters to the word vocabulary so the tiny tokenizer sees known words
    documents = [" ".join(f"w{ord(c) % 200}" for c in line if not c.isspace()) for line in lines]
    dataset = encode_causal_lm(documents, word_tokenizer, max_length=64)
    rows = dataset.features
    assert all(row["length"] == 64 for row in rows[:-1]) and 0 < rows[-1]["length"] <= 64
    total = sum(len(d.split()) + 1 for d in documents if d)
    assert sum(row["length"] for row in rows) == total
    for row in rows:
        for i in range(1, row["length"]):
            same = row["document_ids"][i] == row["document_ids"][i - 1]
            assert row["document_ids"][i] == row["document_ids"][i - 1] + (0 if same else 1)
            assert row["position_ids"][i] == (row["position_ids"][i - 1] + 1 if same else 0)
            assert (row["labels"][i] == -100) == (not same)
    assert len(encode_causal_lm(documents, word_tokenizer, max_length=64, drop_last=True)) == len(rows) - 1


def test_unpacked_rows_are_truncated_documents(word_tokenizer):
    dataset = encode_causal_lm([doc(0, 3), doc(0, 20), "   "], word_tokenizer, max_length=10, packing=False)
    assert [row["length"] for row in dataset.features] == [4, 10]
    assert dataset.features[0]["input_ids"][-1] == word_tokenizer.eos_token_id
    assert dataset.features[0]["labels"] == dataset.features[0]["input_ids"]
    assert dataset.num_truncated == 1 and dataset.num_examples == 2
    assert "position_ids" not in dataset.features[0]


def test_no_eos_without_add_eos_and_error_without_eos_token(word_tokenizer):
    rows = encode_causal_lm([doc(0, 3)], word_tokenizer, max_length=10, add_eos=False).features
    assert rows[0]["input_ids"] == word_tokenizer.encode(doc(0, 3))
    backend = Backend(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(DataError, match="no EOS token"):
        encode_causal_lm(["a"], Tokenizer(backend), max_length=4)


def test_pack_documents_long_document_spans_rows():
    rows = pack_documents([list(range(10))], 4)
    assert [row["input_ids"] for row in rows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(row["document_ids"] == [0] * row["length"] for row in rows)
    assert rows[1]["position_ids"] == [0, 1, 2, 3]
