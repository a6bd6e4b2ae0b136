"""read_records over every format, its errors (file and line named), require, split_train_validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.data import Record, read_records, require, split_train_validation
from tunelab.data.readers import optional
from tunelab.errors import DataError

DATA = Path("/work/shared/data")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_records_with_line_sources(tmp_path):
    path = write(tmp_path, "train.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    records = read_records(path)
    assert [r.data for r in records] == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]


def test_json_array_records_with_index_sources(tmp_path):
    path = write(tmp_path, "data.json", '[{"x": 1},\n {"x": 2}]')
    records = read_records(path)
    assert [r.data["x"] for r in records] == [1, 2]
    assert [r.source for r in records] == [f"{path}:#0", f"{path}:#1"]


def test_csv_with_quotes_and_multiline_fields(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label\n"hello, world",pos\n"two\nlines",neg\nplain,neg\n')
    records = read_records(path)
    assert [r.data for r in records] == [
        {"text": "hello, world", "label": "pos"}, {"text": "two\nlines", "label": "neg"},
        {"text": "plain", "label": "neg"},
    ]
    assert [r.source for r in records] == [f"{path}:2", f"{path}:3", f"{path}:5"]


def test_tsv_keeps_quotes_literally_and_columns_without_header(tmp_path):
    path = write(tmp_path, "d.tsv", 'he said "hi\t1\nok\t0\n')
    records = read_records(path, columns=["sentence", "label"])
    assert records[0].data == {"sentence": 'he said "hi', "label": "1"}
    assert records[1].source == f"{path}:2"


def test_txt_one_record_per_non_empty_line(tmp_path):
    path = write(tmp_path, "t.txt", "first\n\n  \nsecond\r\n")
    records = read_records(path)
    assert [(r.data, r.source) for r in records] == [({"text": "first"}, f"{path}:1"),
                                                      ({"text": "second"}, f"{path}:4")]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1], "extra": [1.5, 2.5]}), path)
    records = read_records(path)
    assert [r.data for r in records] == [{"text": "a", "label": 0, "extra": 1.5},
                                         {"text": "b", "label": 1, "extra": 2.5}]
    assert records[1].source == f"{path}:#1"
    assert read_records(path, columns=["label"])[0].data == {"label": 0}
    with pytest.raises(DataError, match="no column 'nope'"):
        read_records(path, columns=["nope"])


def test_explicit_format_overrides_extension(tmp_path):
    path = write(tmp_path, "data.dat", '{"a": 1}\n')
    assert read_records(path, "jsonl")[0].data == {"a": 1}


def test_real_sst2_dev():
    records = read_records(DATA / "sst2" / "dev.tsv")
    assert len(records) == 6735
    assert set(records[0].data) == {"sentence", "label"}
    assert records[0].source.endswith("dev.tsv:2")


def test_real_alpaca_demo():
    assert len(read_records(DATA / "alpaca_demo" / "alpaca_en_demo.json")) == 999


# ------------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.csv", "e.tsv", "e.txt"])
def test_empty_file(tmp_path, name):
    path = write(tmp_path, name, "\n  \n")
    with pytest.raises(DataError, match=rf"{name}: the file is empty"):
        read_records(path)


def test_malformed_json_line_names_line_and_column(tmp_path):
    path = write(tmp_path, "train.jsonl", '{"a": 1}\n{"a": 2}\n{"a": 3,, }\n')
    with pytest.raises(DataError, match=r"train\.jsonl:3: malformed JSON at column 9"):
        read_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path, "train.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: expected a JSON object, found an array"):
        read_records(path)


def test_malformed_json_array_names_line(tmp_path):
    path = write(tmp_path, "d.json", '[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(DataError, match=r"d\.json:3: malformed JSON at column"):
        read_records(path)


def test_json_array_element_not_an_object(tmp_path):
    path = write(tmp_path, "d.json", '[{"a": 1}, "x"]')
    with pytest.raises(DataError, match=r"d\.json:#1: expected a JSON object, found a string"):
        read_records(path)


def test_squad_json_is_pointed_at_read_squad():
    with pytest.raises(DataError, match="read_squad"):
        read_records(DATA / "xquad_en" / "xquad.en.train.json")


def test_wrong_column_count_names_line(tmp_path):
    path = write(tmp_path, "d.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(DataError, match=r"d\.tsv:3: expected 2 columns \(sentence, label\), found 3"):
        read_records(path)
    path = write(tmp_path, "d.csv", "text,label\nonly one\n")
    with pytest.raises(DataError, match=r"d\.csv:2: expected 2 columns \(text, label\), found 1"):
        read_records(path)


def test_unclosed_csv_quote(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label\n"open,1\n')
    with pytest.raises(DataError, match=r"d\.csv:\d+: "):
        read_records(path)


def test_duplicate_header(tmp_path):
    path = write(tmp_path, "d.csv", "a,a\n1,2\n")
    with pytest.raises(DataError, match=r"d\.csv:1: header: duplicate column names a"):
        read_records(path)


def test_unknown_format(tmp_path):
    path = write(tmp_path, "d.xml", "<a/>")
    with pytest.raises(DataError, match=r"d\.xml: cannot tell the data format"):
        read_records(path)
    with pytest.raises(DataError, match="unknown data format 'xml'"):
        read_records(path, "xml")


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"ok\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"d\.txt:2: not valid UTF-8"):
        read_records(path)


def test_columns_rejected_for_jsonl(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"a": 1}\n')
    with pytest.raises(DataError, match="columns= applies"):
        read_records(path, columns=["a"])


# ------------------------------------------------------------------------------------------------ require


def test_require_and_optional():
    record = Record({"text": "hi", "label": True, "n": 3, "none": None}, "f.jsonl:4")
    assert require(record, "text", str) == "hi"
    assert require(record, "n", (int, float)) == 3
    with pytest.raises(DataError, match=r"f\.jsonl:4: missing field 'txt'"):
        require(record, "txt")
    with pytest.raises(DataError, match=r"f\.jsonl:4: null value for field 'none'"):
        require(record, "none")
    with pytest.raises(DataError, match=r"f\.jsonl:4: field 'n': expected str, found a number"):
        require(record, "n", str)
    with pytest.raises(DataError, match=r"f\.jsonl:4: field 'label': expected int, found a boolean"):
        require(record, "label", int)
    assert optional(record, "none", str, "x") == "x"
    assert optional(record, "missing", str) is None


# ---------------------------------------------------------------------------------------------------- split


def test_split_train_validation_is_deterministic_and_disjoint():
    items = list(range(100))
    train, validation = split_train_validation(items, 0.1, seed=3)
    assert len(validation) == 10 and len(train) == 90
    assert sorted(train + validation) == items
    assert train == sorted(train) and validation == sorted(validation)  # original order kept
    assert split_train_validation(items, 0.1, seed=3) == (train, validation)
    assert split_train_validation(items, 0.1, seed=4)[1] != validation
    assert split_train_validation(items[:3], 0.01, seed=0)[1] != []  # at least one held out
    assert split_train_validation(items, 0.0, seed=0) == (items, [])
    with pytest.raises(ValueError):
        split_train_validation(items, 1.0, seed=0)


def test_header_only_and_empty_array_have_no_records(tmp_path):
    with pytest.raises(DataError, match=r"h\.tsv: no records below the header"):
        read_records(write(tmp_path, "h.tsv", "sentence\tlabel\n"))
    with pytest.raises(DataError, match=r"a\.json: no records"):
        read_records(write(tmp_path, "a.json", "[]"))
