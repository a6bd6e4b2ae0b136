"""Plots of a run: training curves from the metrics log and a confusion-matrix heatmap.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), without pyplot: no
display is needed, no global backend is switched in the caller's process, and figures are freed when they
go out of scope. Each PNG is written to a temporary file in the target directory and renamed, so a
reader never sees a half-written image.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TRAIN_SPLIT = "train"
# Keys of a metrics record that are bookkeeping, not metrics to plot.
NON_METRIC_KEYS = frozenset({
    "step", "split", "epoch", "lr", "loss", "time", "timestamp", "elapsed", "wall_time", "runtime",
    "samples", "tokens", "masked_tokens", "num_examples", "num_samples", "num_tokens", "prompts", "samples_per_second",
    "tokens_per_second", "steps_per_second",
})


def _save_png(fig: Figure, path: Path) -> Path:
    """Render `fig` to `path` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    # a unique name opened exclusively (not mkstemp, whose 0600 mode would ignore the user's umask)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _series(history: Sequence[dict], key: str, split: str | None) -> dict[str, tuple[list[float], list[float]]]:
    """{split: (steps, values)} of `key` over the records (of `split` only, when given), in step order.

    Records without a numeric step, or whose value is missing, non-numeric or not finite, are skipped.
    """
    out: dict[str, list[tuple[float, float]]] = {}
    for record in history:
        record_split = str(record.get("split", TRAIN_SPLIT))
        if split is not None and record_split != split:
            continue
        step, value = record.get("step"), record.get(key)
        if _is_number(step) and _is_number(value):
            out.setdefault(record_split, []).append((float(step), float(value)))
    return {name: ([s for s, _ in sorted(points)], [v for _, v in sorted(points)]) for name, points in out.items()}


def _line_plot(series: dict[str, tuple[list[float], list[float]]], *, ylabel: str, title: str, path: Path) -> Path:
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    # train first, then the evaluation splits by name: stable colours and legend order
    for name in sorted(series, key=lambda n: (n != TRAIN_SPLIT, n)):
        steps, values = series[name]
        marker = "" if len(steps) > 20 else "o"
        ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.4, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or next(iter(series)) != TRAIN_SPLIT:
        ax.legend()
    return _save_png(fig, path)


def plot_rounds(rounds: Sequence[int], values: Sequence[float], *, metric: str, split: str, title: str,
                path: Path) -> Path:
    """One metric over the rounds of the feedback loop (round 0: before any feedback)."""
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.plot(list(rounds), list(values), marker="o", markersize=4, linewidth=1.4, label=split)
    for r, v in zip(rounds, values):
        ax.annotate(f"{v:.4g}", (r, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save_png(fig, path)


def _file_stem(metric: str) -> str:
    """A safe file name for a metric ("rouge/L" -> "rouge_L")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("._") or "metric"


def plot_curves(history: Sequence[dict], out_dir: Path) -> list[Path]:
    """Training curves from metrics records ({"step", "split", ...} dicts, as read by `read_history`).

    Writes into `out_dir`:
      * loss.png: "loss" against step, one line per split (train and validation);
      * lr.png: the learning rate "lr" against step;
      * <metric>.png for every other numeric key of the evaluation (non-train) records, e.g.
        accuracy.png, f1.png, one line per evaluation split.
    A figure without data is not written; an empty history writes nothing. Returns the written paths
    (loss, lr, then the metrics in name order).
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    loss = _series(history, "loss", None)
    if loss:
        written.append(_line_plot(loss, ylabel="loss", title="Loss", path=out_dir / "loss.png"))
    lr = _series(history, "lr", None)
    if lr:
        merged_steps, merged_values = [], []
        for steps, values in lr.values():
            merged_steps += steps
            merged_values += values
        order = sorted(range(len(merged_steps)), key=merged_steps.__getitem__)
        lr_series = {TRAIN_SPLIT: ([merged_steps[i] for i in order], [merged_values[i] for i in order])}
        written.append(_line_plot(lr_series, ylabel="learning rate", title="Learning rate", path=out_dir / "lr.png"))

    metric_names = sorted({
        key for record in history
        if str(record.get("split", TRAIN_SPLIT)) != TRAIN_SPLIT
        for key, value in record.items()
        if key not in NON_METRIC_KEYS and _is_number(value)
    })
    used_stems = {"loss", "lr"}
    for name in metric_names:
        series = {s: v for s, v in _series(history, name, None).items() if s != TRAIN_SPLIT}
        if not series:
            continue
        stem = _file_stem(name)
        while stem in used_stems:  # two metric names that sanitise alike, or a metric named like loss/lr
            stem += "_"
        used_stems.add(stem)
        written.append(_line_plot(series, ylabel=name, title=name, path=out_dir / f"{stem}.png"))
    return written


def plot_training_panels(history: Sequence[dict], panels: Sequence[Sequence[str]], path: Path, *,
                         title: str = "Training") -> Path | None:
    """One figure of the training records' values, a panel per group of keys (one line per key), e.g. GRPO's
    sampled reward and success rate, KL, completion length: values the evaluation has no counterpart of.
    Nothing is written (None) when no record has any of the keys."""
    found = [[(key, _series(history, key, TRAIN_SPLIT).get(TRAIN_SPLIT)) for key in keys] for keys in panels]
    found = [[(key, series) for key, series in group if series] for group in found]
    found = [group for group in found if group]
    if not found:
        return None
    columns = 2 if len(found) > 1 else 1
    rows = -(-len(found) // columns)
    fig = Figure(figsize=(6.0 * columns, 3.2 * rows))
    for i, group in enumerate(found):
        ax = fig.add_subplot(rows, columns, i + 1)
        for key, (steps, values) in group:
            ax.plot(steps, values, marker="" if len(steps) > 20 else "o", markersize=3, linewidth=1.4, label=key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save_png(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, *, normalize: bool = False
) -> Path:
    """Annotated heatmap of a confusion matrix: reference class on the y axis, prediction on the x axis.

    With `normalize`, each row is divided by its sum (the share of each reference class predicted as
    each class; a row without examples stays 0) and cells show two decimals; otherwise counts.
    """
    rows = [[float(v) for v in row] for row in matrix]
    n = len(rows)
    if n == 0 or any(len(row) != n for row in rows):
        raise ValueError(f"confusion matrix must be square and non-empty, got rows of lengths {[len(r) for r in rows]}")
    labels = [str(label) for label in labels]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for a {n}x{n} confusion matrix")
    if normalize:
        rows = [[v / sum(row) if sum(row) else 0.0 for v in row] for row in rows]

    size = min(4.0 + 0.45 * n, 20.0)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    if n <= 30:  # beyond that the numbers are unreadable anyway
        top = max((v for row in rows for v in row), default=0.0)
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                text = f"{value:.2f}" if normalize else f"{int(value)}"
                color = "white" if top and value > top / 2 else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8 if n > 10 else 10)
    return _save_png(fig, path)
