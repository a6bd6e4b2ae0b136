"""write_report: report.md with the metric values, tables and links to the plots."""

from __future__ import annotations

import json

from tunelab.evaluate.metrics import classification_metrics, span_metrics
from tunelab.evaluate.report import write_report


def write_history(path):
    records = [
        {"step": 10, "split": "train", "loss": 0.9, "lr": 1e-4},
        {"step": 20, "split": "train", "loss": 0.6, "lr": 2e-4},
        {"step": 20, "split": "validation", "loss": 0.7, "accuracy": 0.6, "f1": 0.55},
        {"step": 40, "split": "train", "loss": 0.4, "lr": 1e-4},
        {"step": 40, "split": "validation", "loss": 0.5, "accuracy": 0.8, "f1": 0.75},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_classification_report(tmp_path):
    run_dir = tmp_path / "run"
    history = write_history(tmp_path / "metrics.jsonl")
    metrics = classification_metrics([0, 0, 1, 1, 0, 2], [0, 1, 1, 2, 0, 2], labels=["neg", "neu", "pos"])
    metrics["loss"] = 0.123456789
    path = write_report(
        run_dir, title="Sentiment run", task="sequence classification", final_metrics=metrics,
        best={"step": 40, "metric": "accuracy", "value": 0.8, "path": "checkpoints/step-40"},
        config_summary={"model": "bert-tiny", "optim": {"lr": 1e-4, "name": "adamw"}},
        history_path=history, extra_sections=[("Notes", "Trained on *toy* data.")],
    )
    assert path == run_dir / "report.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Sentiment run\n")
    assert "**Task:** sequence classification" in text
    # final metrics to 4 significant digits
    assert "| accuracy | 0.6667 |" in text
    assert "| loss | 0.1235 |" in text
    assert f"| f1 | {metrics['f1']:.4g} |" in text
    # per-class table and confusion matrix
    assert "## Per-class metrics" in text and "| neg | 0.6667 | 1 | 0.8 | 2 |" in text
    assert "| **pos** | 0 | 1 | 1 |" in text  # ref pos: predicted neu once, pos once
    # best checkpoint and config
    assert "Step 40: accuracy = 0.8." in text
    assert "| optim.lr | 0.0001 |" in text and "| model | bert-tiny |" in text
    assert "## Notes\n\nTrained on *toy* data." in text
    # images: written, and linked by relative path
    for name in ("loss", "lr", "accuracy", "f1", "confusion_matrix"):
        assert f"![{name}](plots/{name}.png)" in text
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 0
    assert text.index("plots/loss.png") < text.index("plots/lr.png") < text.index("plots/accuracy.png")
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_span_report_without_history(tmp_path):
    metrics = span_metrics([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "B-ORG"]])
    path = write_report(
        tmp_path, title="NER", task="token classification", final_metrics=metrics, best=None,
        config_summary={}, history_path=None,
    )
    text = path.read_text(encoding="utf-8")
    assert "## Per-type metrics" in text and "| PER | 1 | 1 | 1 | 1 |" in text
    assert "| f1 | 0.5 |" in text
    assert "Training curves" not in text and "Best checkpoint" not in text and "![" not in text
    assert not (tmp_path / "plots").exists()


def test_report_links_existing_plots_only(tmp_path):
    write_report(tmp_path, title="t", task="causal LM", final_metrics={"perplexity": float("inf")}, best=None,
                 config_summary={"a": "x|y"}, history_path=tmp_path / "missing.jsonl")
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| perplexity | inf |" in text
    assert "| a | x\\|y |" in text  # pipes escaped inside table cells
    assert "![" not in text
