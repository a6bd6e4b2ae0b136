"""People reviewing model outputs in a terminal: `tunelab feedback review`.

The loop shows each record that needs a person (no person's verdict yet, a bad one without a
correction, which stays in the queue until someone writes one, or a correction a model wrote from the
critique, `tunelab feedback build refine`, that no person has seen): the input, the output, the reference if
there is one, and what was said of it so far. A verdict keeps a model's correction, `e` replaces it. Keys:

    a  accept: verdict good, from a person
    r  reject: verdict bad, from a person
    c  write a critique (then still a, r, e or s for the same record)
    e  write a correction: the output it should have been (the verdict becomes bad)
    s  skip;  q  quit

Each answer is written to the store at once, so quitting (or a kill) loses nothing already answered.
Texts end with an empty line. A verdict replaces the earlier one (a judge model's, say), which stays in
the record's metadata["history"]. Input and output are functions, so tests and other front ends can
script the loop.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.errors import FeedbackError
from tunelab.feedback.record import FeedbackRecord, utc_now
from tunelab.feedback.store import FeedbackStore

PROMPT = "[a]ccept [r]eject [c]ritique [e] correction [s]kip [q]uit > "
_KEYS = {"a": "a", "accept": "a", "r": "r", "reject": "r", "c": "c", "critique": "c", "e": "e",
         "correct": "e", "correction": "e", "s": "s", "skip": "s", "q": "q", "quit": "q"}


@dataclass
class ReviewSummary:
    """What a review session did."""

    shown: int = 0
    accepted: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    critiqued: list[int] = field(default_factory=list)
    corrected: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    quit: bool = False

    def line(self, waiting: int) -> str:
        parts = [f"{len(self.accepted)} accepted", f"{len(self.rejected)} rejected",
                 f"{len(self.corrected)} corrected", f"{len(self.critiqued)} critiqued", f"{len(self.skipped)} skipped"]
        return f"reviewed {self.shown} of {waiting} record{'s' * (waiting != 1)}: {', '.join(parts)}"


def review(store: FeedbackStore, read_line: Callable[[str], str | None], write: Callable[[str], None], *,
           limit: int | None = None, unjudged_only: bool = False, **filters) -> tuple[ReviewSummary, int]:
    """Review the records that need a person (with `unjudged_only`, only those without a person's verdict)
    and pass `filters` (see FeedbackStore.query), oldest first, at most `limit`. `read_line(prompt)` returns a
    line without its newline, or None at the end of input (which quits). Returns the summary and how many
    records were waiting."""
    wanted = {"unjudged": True} if unjudged_only else {"needs_review": True}
    waiting = [record.id for record in store.iter_query(**wanted, **filters)]
    summary = ReviewSummary()
    todo = waiting[:limit] if limit is not None else waiting
    for position, id in enumerate(todo, start=1):
        try:
            record = store.get(id)
        except FeedbackError:
            continue  # deleted meanwhile
        if not _needs_review(record, unjudged_only):
            continue  # someone else (another terminal, the feedback page) has reviewed it meanwhile
        summary.shown += 1
        write(show(record, position, len(todo)))
        if not _ask(store, record, read_line, write, summary):
            summary.quit = True
            break
    return summary, len(waiting)


def _needs_review(record: FeedbackRecord, unjudged_only: bool) -> bool:
    """The store's needs_review / unjudged filters, for one record read again."""
    unjudged = record.source != "person"
    return unjudged or (not unjudged_only and ((record.verdict == "bad" and record.correction is None)
                                               or unreviewed_refinement(record)))


def unreviewed_refinement(record: FeedbackRecord) -> bool:
    """The record's correction was written by a model (feedback/build.py's refine) and no person has seen it."""
    refinement = record.metadata.get("refinement")
    return isinstance(refinement, dict) and refinement.get("reviewed") is False


def _mark_reviewed(store: FeedbackStore, record: FeedbackRecord) -> None:
    """A person answered on a record with a model's refinement: it is reviewed (kept, or replaced by 'e')."""
    if not unreviewed_refinement(record):
        return

    def change(current: FeedbackRecord) -> dict:
        refinement = {**current.metadata.get("refinement", {}), "reviewed": True, "reviewed_at": utc_now()}
        return {"metadata": {**current.metadata, "refinement": refinement}}

    store.modify(record.id, change)


def _ask(store: FeedbackStore, record: FeedbackRecord, read_line: Callable[[str], str | None],
         write: Callable[[str], None], summary: ReviewSummary) -> bool:
    """Ask until the record is done; False when the person quits."""
    while True:
        answer = read_line(PROMPT)
        if answer is None:
            return False
        key = _KEYS.get(answer.strip().lower())
        if key is None:
            write(f"unknown answer {answer.strip()!r}: a, r, c, e, s or q\n" if answer.strip() else "")
            continue
        if key == "q":
            return False
        if key == "s":
            summary.skipped.append(record.id)
            return True
        if key in ("a", "r"):
            _mark_reviewed(store, record)
            record = store.judge(record.id, verdict="good" if key == "a" else "bad")
            (summary.accepted if key == "a" else summary.rejected).append(record.id)
            write(f"  saved: {'good' if key == 'a' else 'bad'}\n")
            return True
        what = "critique" if key == "c" else "correction"
        text = _read_text(read_line, f"{what} (end with an empty line):")
        if text is None:
            write("  nothing written\n")
            continue
        if key == "c":
            record = store.update(record.id, critique=text)
            summary.critiqued.append(record.id)
            write("  saved: critique\n")
            continue
        _mark_reviewed(store, record)
        record = store.judge(record.id, verdict="bad", correction=text)
        summary.corrected.append(record.id)
        write("  saved: correction (verdict bad)\n")
        return True


def _read_text(read_line: Callable[[str], str | None], heading: str) -> str | None:
    """Lines up to an empty one (or the end of input), joined; None if there are none."""
    lines: list[str] = []
    prompt = f"{heading}\n"
    while True:
        line = read_line(prompt)
        prompt = ""
        if line is None or not line.strip():
            break
        lines.append(line.rstrip())
    return "\n".join(lines) if lines else None


def show(record: FeedbackRecord, position: int, total: int) -> str:
    """The record as the reviewer sees it."""
    judged = record.verdict or ""
    if record.score is not None:
        judged += f"{' ' if judged else ''}score {record.score:g}"
    head = [f"record {record.id} ({position} of {total})", f"model {record.model}"
            + (f" {record.model_version}" if record.model_version else "")]
    if record.task:
        head.append(f"task {record.task}")
    head.append(f"{record.source}: {judged}")
    parts = ["", "-" * 72, " | ".join(head), "", "input:", _indent(record.input_text), "output:",
             _indent(record.output)]
    if record.reference is not None:
        parts += ["reference:", _indent(record.reference if isinstance(record.reference, str) else
                                        json.dumps(record.reference, ensure_ascii=False))]
    if record.critique:
        parts += ["critique:", _indent(record.critique)]
    if record.correction:
        refinement = record.metadata.get("refinement")
        by = (f" (refined by {refinement.get('model')}{', not reviewed yet' * (refinement.get('reviewed') is False)};"
              f" e replaces it)") if isinstance(refinement, dict) else ""
        parts += [f"correction{by}:", _indent(record.correction)]
    return "\n".join(parts) + "\n"


def _indent(text: str) -> str:
    return textwrap.indent(text if text.strip() else "(empty)", "    ", lambda line: True)
