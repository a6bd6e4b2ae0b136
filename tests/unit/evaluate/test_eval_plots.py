"""plot_curves, plot_confusion_matrix and read_history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.evaluate.plots import plot_confusion_matrix, plot_curves
from tunelab.evaluate.report import read_history

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def history() -> list[dict]:
    records = []
    for step in range(10, 110, 10):
        records.append({"step": step, "split": "train", "loss": 1.0 / step, "lr": 1e-4 * step / 100,
                        "grad_norm": 1.0})
        if step % 50 == 0:
            records.append({"step": step, "split": "validation", "loss": 2.0 / step, "accuracy": step / 120,
                            "f1": step / 130, "per_class": {"a": {"f1": 0.5}}, "note": "text"})
    return records


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_curves_writes_pngs(tmp_path):
    written = plot_curves(history(), tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "lr.png", "accuracy.png", "f1.png"]
    for path in written:
        assert_png(path)
    # nothing but the PNGs: no temporary files left behind, no plot of train-only or non-numeric keys
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png", "f1.png", "loss.png", "lr.png"]


def test_plot_curves_writes_nothing_without_data(tmp_path):
    assert plot_curves([], tmp_path / "plots") == []
    assert plot_curves([{"split": "train", "note": "no step"}], tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()


def test_plot_confusion_matrix(tmp_path):
    matrix = [[5, 1, 0], [2, 3, 1], [0, 0, 4]]
    labels = ["neg", "neu", "pos"]
    assert_png(plot_confusion_matrix(matrix, labels, tmp_path / "cm.png"))
    assert_png(plot_confusion_matrix(matrix + [], labels, tmp_path / "sub" / "cm_norm.png", normalize=True))
    # a class with no reference examples must not divide by zero when normalising
    assert_png(plot_confusion_matrix([[0, 0], [1, 1]], ["a", "b"], tmp_path / "zero.png", normalize=True))
    with pytest.raises(ValueError, match="2 labels for a 3x3"):
        plot_confusion_matrix(matrix, ["a", "b"], tmp_path / "bad.png")


def test_read_history_roundtrip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in history()) + "\n\n", encoding="utf-8")
    assert read_history(path) == history()


def test_read_history_names_the_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n\n{"step": 2, "loss": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: malformed"):
        read_history(path)
    path.write_text('{"step": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: .*JSON object"):
        read_history(path)
