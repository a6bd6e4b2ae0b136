"""Language feedback: a store of judged model outputs (verdicts, scores, critiques, corrections).

    from tunelab.feedback import FeedbackRecord, FeedbackStore
    with FeedbackStore("feedback.db") as store:
        store.add(FeedbackRecord(input="2 + 3?", output="6", model="smollm2", verdict="bad", source="rule"))
        print(store.stats())

The store is SQLite (store.py), its schema versioned with migrations (migrations.py); records are
validated when made (record.py); files are read and written by files.py; `tunelab feedback review`'s
terminal loop is review.py; build.py turns records into training rows (corrections, relabel, pairs,
unpaired, refine):

    rows = build_training_data(store, "pairs", source="person").rows

Feedback is collected automatically (a model's outputs judged against gold answers, by verifiers, a reward
model or a judge model) by collect.py with examples.py, outputs.py and judges.py:
`from tunelab.feedback.collect import collect_feedback`.
"""

from __future__ import annotations

from tunelab.feedback.build import (
    BuildReport,
    BuildResult,
    RefineSettings,
    RowFields,
    build_run_data,
    build_training_data,
    train_from_feedback,
)
from tunelab.feedback.files import FeedbackImportError, read_feedback_file, write_jsonl
from tunelab.feedback.record import FIELDS, SOURCES, VERDICTS, FeedbackRecord, FeedbackRecordError
from tunelab.feedback.store import DEFAULT_STORE, FeedbackStore, store_path

__all__ = ["BuildReport", "BuildResult", "RefineSettings", "RowFields", "build_run_data", "build_training_data",
           "train_from_feedback", "DEFAULT_STORE", "FIELDS", "SOURCES", "VERDICTS", "FeedbackImportError", "FeedbackRecord",
           "FeedbackRecordError", "FeedbackStore", "read_feedback_file", "store_path", "write_jsonl"]
