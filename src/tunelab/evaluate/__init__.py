"""Evaluation: metrics as pure functions (`metrics`), run reports (`report`) and plots (`plots`).

The metric functions are imported here; the report and plot helpers are loaded on first use, so that
importing the package does not import matplotlib.
"""

from __future__ import annotations

from typing import Any

from tunelab.evaluate.metrics import (
    bleu,
    chrf,
    classification_metrics,
    confusion_matrix,
    perplexity,
    preference_metrics,
    qa_metrics,
    rouge,
    span_metrics,
    squad_exact_match,
    squad_f1,
    squad_normalize,
)

_LAZY = {
    "write_report": "tunelab.evaluate.report",
    "read_history": "tunelab.evaluate.report",
    "MetricsLogError": "tunelab.evaluate.report",
    "plot_curves": "tunelab.evaluate.plots",
    "plot_confusion_matrix": "tunelab.evaluate.plots",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "bleu", "chrf", "classification_metrics", "confusion_matrix", "perplexity", "preference_metrics",
    "qa_metrics", "rouge", "span_metrics", "squad_exact_match", "squad_f1", "squad_normalize",
    *_LAZY,
]
