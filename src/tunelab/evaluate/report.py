"""The run report: report.md in the run directory, with metric tables and the plots of the run.

`read_history` reads the metrics log (metrics.jsonl: one JSON object per line). `write_report` draws the
training curves from it and, for classification, the confusion matrix into ``run_dir/plots/``, and
writes a Markdown report that links those images by relative path, so the directory can be moved or
viewed on a code host as it is.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

PLOTS_DIR = "plots"
REPORT_FILE = "report.md"
CONFUSION_PLOT = "confusion_matrix.png"
_TABLE_KEYS = ("per_class", "per_type", "confusion_matrix")
_MAX_MATRIX_TABLE = 20  # larger confusion matrices are shown as an image only


class MetricsLogError(DataError, ValueError):
    """A metrics log line is not a JSON object (the message names the file and line)."""


def read_history(path: Path) -> list[dict]:
    """The records of a metrics JSONL file, in file order; blank lines are skipped.

    A line that is not a JSON object raises MetricsLogError (a ValueError) naming the file and the
    1-based line number.
    """
    path = Path(path)
    records: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MetricsLogError(f"{path}:{number}: malformed metrics line, not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise MetricsLogError(
                    f"{path}:{number}: malformed metrics line, expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    """Numbers to 4 significant digits (integers as they are), anything else as short text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Integral):  # numbers.* also covers numpy scalars
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value)


def _cell(value: Any) -> str:
    """A Markdown table cell: formatted, with pipes escaped and line breaks flattened."""
    return _format_value(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(mapping: Mapping[str, Any], prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """Nested dicts as (dotted.key, value) pairs, in insertion order; keys in `skip` (top level) left out."""
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if not prefix and key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flatten(value, prefix=f"{name}.")
        else:
            out.append((name, value))
    return out


def _image(path: Path, run_dir: Path) -> str:
    relative = path.relative_to(run_dir).as_posix()
    return f"![{path.stem}]({relative})"


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _metrics_section(final_metrics: Mapping[str, Any]) -> list[str]:
    scalars = [(k, v) for k, v in _flatten(final_metrics, skip=_TABLE_KEYS) if not isinstance(v, (list, tuple))]
    if not scalars:
        return ["## Final metrics", "", "No metrics were recorded.", ""]
    return ["## Final metrics", "", _table(["metric", "value"], scalars), ""]


def _per_class_sections(final_metrics: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, heading, first in (("per_class", "Per-class metrics", "class"), ("per_type", "Per-type metrics", "type")):
        table = final_metrics.get(key)
        if not isinstance(table, Mapping) or not table:
            continue
        columns = [c for c in ("precision", "recall", "f1", "support")
                   if any(isinstance(row, Mapping) and c in row for row in table.values())]
        rows = [[name, *(row.get(c, "") for c in columns)] for name, row in table.items() if isinstance(row, Mapping)]
        lines += [f"## {heading}", "", _table([first, *columns], rows), ""]
    return lines


def _confusion_labels(final_metrics: Mapping[str, Any], size: int) -> list[str]:
    """Class names for the matrix rows: the per_class names when they cover every row, else the ids."""
    per_class = final_metrics.get("per_class")
    if isinstance(per_class, Mapping) and len(per_class) == size:
        return [str(name) for name in per_class]
    return [str(i) for i in range(size)]


def _confusion_section(final_metrics: Mapping[str, Any], plots_dir: Path, run_dir: Path) -> list[str]:
    matrix = final_metrics.get("confusion_matrix")
    if not matrix or not isinstance(matrix, (list, tuple)):
        return []
    labels = _confusion_labels(final_metrics, len(matrix))
    from tunelab.evaluate.plots import plot_confusion_matrix

    image = plot_confusion_matrix(matrix, labels, plots_dir / CONFUSION_PLOT)
    lines = ["## Confusion matrix", "", "Rows are reference classes, columns predicted classes.", ""]
    if len(matrix) <= _MAX_MATRIX_TABLE:
        rows = [[f"**{label}**", *row] for label, row in zip(labels, matrix)]
        lines += [_table(["reference \\ predicted", *labels], rows), ""]
    lines += [_image(image, run_dir), ""]
    return lines


def _best_section(best: Mapping[str, Any] | None) -> list[str]:
    if not best:
        return []
    lines = ["## Best checkpoint", ""]
    metric, step = best.get("metric"), best.get("step")
    value = best.get("value", best.get(str(metric)) if metric is not None else None)
    if metric is not None and step is not None:
        summary = f"Step {_format_value(step)}: {metric}"
        lines += [summary + (f" = {_format_value(value)}" if value is not None else "") + ".", ""]
    lines += [_table(["field", "value"], _flatten(best)), ""]
    return lines


def _curves_section(plots_dir: Path, run_dir: Path) -> list[str]:
    """Every PNG in the plots directory except the confusion matrix: loss and lr first, then by name."""
    if not plots_dir.is_dir():
        return []
    images = [p for p in plots_dir.glob("*.png") if p.name != CONFUSION_PLOT and p.is_file()]
    if not images:
        return []
    order = {"loss": 0, "lr": 1}
    images.sort(key=lambda p: (order.get(p.stem, 2), p.name))
    lines = ["## Training curves", ""]
    for image in images:
        lines += [_image(image, run_dir), ""]
    return lines


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file under a temporary name, then rename it: a reader never sees half of it."""
    # a unique name opened exclusively (not mkstemp, whose 0600 mode would ignore the user's umask)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(
    run_dir: Path,
    *,
    title: str,
    task: str,
    final_metrics: Mapping[str, Any],
    best: Mapping[str, Any] | None,
    config_summary: Mapping[str, Any],
    history_path: Path | None,
    extra_sections: Iterable[tuple[str, str]] = (),
) -> Path:
    """Write ``run_dir/report.md`` atomically and return its path.

    Contents: the title and task; a table of the final metrics (nested dicts as dotted keys, numbers to
    4 significant digits); per-class (classification) or per-type (span) tables; the confusion matrix as
    a table and a heatmap when the metrics hold one; the best checkpoint (e.g. {"step", "metric",
    "value"}); the training curves drawn from `history_path` (a metrics JSONL file) into
    ``run_dir/plots/``, plus any other PNG already there; the config summary (dotted keys); then each
    (heading, Markdown body) of `extra_sections`. Images are linked by paths relative to `run_dir`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plots_dir = run_dir / PLOTS_DIR
    if history_path is not None and Path(history_path).is_file():
        from tunelab.evaluate.plots import plot_curves

        plot_curves(read_history(Path(history_path)), plots_dir)

    lines = [f"# {title}", "", f"**Task:** {task}", ""]
    lines += _metrics_section(final_metrics)
    lines += _per_class_sections(final_metrics)
    lines += _confusion_section(final_metrics, plots_dir, run_dir)
    lines += _best_section(best)
    lines += _curves_section(plots_dir, run_dir)
    if config_summary:
        lines += ["## Configuration", "", _table(["key", "value"], _flatten(config_summary)), ""]
    for heading, body in extra_sections:
        lines += [f"## {heading}", "", body.rstrip(), ""]

    path = run_dir / REPORT_FILE
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path
