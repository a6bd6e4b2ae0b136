"""Training data from the feedback store: judged outputs become rows of the training tasks.

    kind         rows (one JSON object per line)                                   for task.type
    corrections  {"messages": [input..., {"role": "assistant", "content": correction}]}  chat
                 {source_field: input, target_field: correction}                  seq2seq
    relabel      {text_field: text, label_field: label}                            classification
                 {tokens_field: words, tags_field: tags}                           tagging
    pairs        {"prompt", "chosen", "rejected"}                                  preference, reward_model, kto
    unpaired     {"prompt", "completion", "label": true | false}                   kto
    refine       a model rewrites each bad output from its critique (Scheurer et al. 2023, "Training
                 Language Models with Language Feedback"); the refinements are stored as the records'
                 corrections, then the rows are built as for corrections                          chat

`tunelab train` reads these rows as it reads any data file of the task (data.feedback in a config), and
`tunelab feedback build KIND --out FILE` writes them. The rules:

- corrections: a record with a correction gives the input and the correction as the assistant's answer.
  With include_good, a good output is kept as it is (training on a model's own good outputs); with
  use_reference, a bad record without a correction takes its reference answer.
- relabel: a classification record's input is the text, its output the predicted label; the label trained on
  is the correction, else (bad records) the reference, the gold label, else (good records) the output. A
  tagging record's words are metadata["tokens"] or its input split at spaces; tags are a list (reference) or
  a text of tags separated by spaces (output, correction), one per word. When one text was judged more than
  once, the newest record decides.
- pairs, for each input: the correction over the output it corrects; every good output over every bad one;
  among the records of one source (the scores of different judges are on different scales), a higher score
  over a lower one when they differ by more than min_margin. A pair seen in both orders is dropped.
- unpaired: good outputs are desirable, bad ones undesirable; a record with a score and no verdict is
  desirable when the score is at least `threshold`; a correction is also a desirable answer.

Inputs are texts (one user turn) or chat messages that end with the user's turn; a record whose input does
not fit its task is an error naming the store, the record and the field. Rows are deduplicated, and the
report counts the records read, the rows made, and every record skipped with the reason.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config.schema import FEEDBACK_BUILD_TASKS
from tunelab.errors import DataError, FeedbackError
from tunelab.feedback.files import write_json_lines
from tunelab.feedback.record import FeedbackRecord, utc_now
from tunelab.feedback.store import FeedbackStore

if TYPE_CHECKING:
    from tunelab.config.schema import DataSection, TrainConfig

KINDS = tuple(FEEDBACK_BUILD_TASKS)
# the task a kind's rows are for when nobody says (relabel: the records' own task)
DEFAULT_TASK = {"corrections": "chat", "relabel": None, "pairs": "preference", "unpaired": "kto", "refine": "chat"}
LABEL_TASKS = ("classification", "tagging", "qa")  # their outputs are labels, tags or spans, not text to learn

REFINE_PROMPT = (
    "Here is a request, an answer to it, and feedback on that answer.\n\n"
    "Request:\n{input}\n\n"
    "Answer:\n{output}\n\n"
    "Feedback:\n{critique}\n\n"
    "Write an improved answer to the request that takes the feedback into account. Reply with the improved "
    "answer only."
)
PLACEHOLDERS = ("input", "output", "critique", "reference")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# a refining model often labels its answer ("Improved answer: ..."): the label is not part of the answer
_ANSWER_LABEL = re.compile(r"^\s*(?:\*\*)?(?:improved|revised|corrected|new)?\s*answer\s*:?\s*(?:\*\*)?\s*:?\s*\n?",
                           re.IGNORECASE)


@dataclass(frozen=True)
class RowFields:
    """The field names of the rows that read them as data (data.text_field, ... of a config)."""

    text: str = "text"
    label: str = "label"
    tokens: str = "tokens"
    tags: str = "tags"
    source: str = "source"
    target: str = "target"

    @classmethod
    def of(cls, data: DataSection) -> RowFields:
        return cls(text=data.text_field, label=data.label_field, tokens=data.tokens_field, tags=data.tags_field,
                   source=data.source_field, target=data.target_field)


@dataclass
class RefineSettings:
    """How a model rewrites bad outputs from their critiques (data.feedback.refine of a config)."""

    model: str | None = None  # a model source; None: each record's own model (the model that answered)
    prompt: str = REFINE_PROMPT  # with {input}, {output}, {critique} and optionally {reference}
    max_new_tokens: int = 256
    batch_size: int = 8
    keep_truncated: bool = False  # keep refinements cut off at max_new_tokens
    verifier: str | None = None  # "module:function": only refinements it passes are kept
    min_score: float = 0.5  # the least score that passes when the verifier gives a score only
    show_progress: bool = True

    def __post_init__(self) -> None:
        check_prompt_template(self.prompt)
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise FeedbackError("refine: max_new_tokens and batch_size must be at least 1")


@dataclass
class BuildReport:
    """What a build did: records read and used, rows made, and why records gave no row."""

    kind: str
    store: str
    task: str | None = None
    records: int = 0  # records that passed the filters
    used: int = 0  # records that gave at least one row
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> records
    duplicates: int = 0  # rows dropped because an equal row came first
    contradictory: int = 0  # rows dropped because the opposite row is there too
    refined: int = 0  # records given a refinement (build refine)
    refine_dropped: Counter = field(default_factory=Counter)  # reason -> refinements not stored
    mixed: int = 0  # original examples mixed in (build_run_data)

    def lines(self) -> list[str]:
        """The report as the CLI prints it."""
        what = f"{self.kind} ({self.task} rows)" if self.task else self.kind
        lines = [f"{what} from {self.store}: {self.records} record{'s' * (self.records != 1)} read, {self.used} used, "
                 f"{self.rows} row{'s' * (self.rows != 1)}"]
        if self.kind == "refine" or self.refine_dropped:
            dropped = sum(self.refine_dropped.values())
            detail = f" ({_counts(self.refine_dropped)})" if dropped else ""
            lines.append(f"  refined {self.refined} bad record{'s' * (self.refined != 1)} from their critiques, "
                         f"stored as corrections; {dropped} refinement{'s' * (dropped != 1)} dropped{detail}")
        skipped = sum(self.skipped.values())
        if skipped:
            lines.append(f"  skipped {skipped} record{'s' * (skipped != 1)}: {_counts(self.skipped)}")
        if self.duplicates:
            lines.append(f"  dropped {self.duplicates} duplicate row{'s' * (self.duplicates != 1)}")
        if self.contradictory:
            lines.append(f"  dropped {self.contradictory} contradictory row{'s' * (self.contradictory != 1)} "
                         f"(each seen with the opposite preference too)")
        if self.mixed:
            lines.append(f"  mixed in {self.mixed} original example{'s' * (self.mixed != 1)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "store": self.store, "task": self.task, "records": self.records, "used": self.used,
                "rows": self.rows, "skipped": dict(self.skipped), "duplicates": self.duplicates,
                "contradictory": self.contradictory, "refined": self.refined,
                "refine_dropped": dict(self.refine_dropped), "mixed": self.mixed}


@dataclass
class BuildResult:
    """The rows of a build, the label names they use (relabel), and the report."""

    rows: list[dict[str, Any]]
    report: BuildReport
    labels: list[str] = field(default_factory=list)

    def write(self, path: str | Path) -> Path:
        """Write the rows as JSON lines (to a temporary name, then renamed)."""
        return write_rows(self.rows, path)


def _counts(counter: Counter) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in counter.most_common())


# ---------------------------------------------------------------------------------------------- the builders


def build_training_data(store: FeedbackStore | str | Path, kind: str, *, task_type: str | None = None,
                        fields: RowFields | None = None, labels: Sequence[str] | None = None,
                        include_good: bool | None = None, use_reference: bool | None = None,
                        min_margin: float = 0.0, max_pairs_per_input: int | None = None,
                        threshold: float | None = None, include_corrections: bool = True,
                        refine: RefineSettings | None = None, refiner: tuple[Any, Any] | None = None,
                        log: Callable[[str], None] = print, **filters: Any) -> BuildResult:
    """Rows for a training task from the records of a store that pass `filters` (FeedbackStore.query's: model,
    model_version, source, verdict, task, since, until, ...).

    kind: corrections, relabel, pairs, unpaired or refine (see the module docstring). task_type: the task the
    rows are for (default: chat for corrections and refine, the records' task for relabel, preference for
    pairs, kto for unpaired). labels: the label (or tag) names a relabel build must use (an unknown one is an
    error naming the record). refine: how to refine, refiner: an already loaded (model, tokenizer) to refine
    with. FeedbackError when no row comes out, naming why the records were skipped.
    """
    if kind not in KINDS:
        raise FeedbackError(f"unknown build kind {kind!r} (known: {', '.join(KINDS)})")
    if isinstance(store, (str, Path)):
        with FeedbackStore(store, create=False) as opened:
            return build_training_data(opened, kind, task_type=task_type, fields=fields, labels=labels,
                                       include_good=include_good, use_reference=use_reference, min_margin=min_margin,
                                       max_pairs_per_input=max_pairs_per_input, threshold=threshold,
                                       include_corrections=include_corrections, refine=refine, refiner=refiner,
                                       log=log, **filters)
    records = store.query(**filters)
    target = task_type or DEFAULT_TASK[kind] or _records_task(records, store.path)
    if target not in FEEDBACK_BUILD_TASKS[kind]:
        raise FeedbackError(f"build {kind} makes rows for task {' or '.join(FEEDBACK_BUILD_TASKS[kind])}, "
                            f"not {target}")
    builder = _Builder(store.path, kind, target, fields or RowFields(), labels=labels,
                       include_good=include_good if include_good is not None else kind == "relabel",
                       use_reference=use_reference if use_reference is not None else kind == "relabel")
    builder.report.records = len(records)
    if kind == "refine":
        settings = refine or RefineSettings()
        records = refine_records(store, records, settings, refiner=refiner, report=builder.report, log=log)
    if kind in ("corrections", "refine"):
        builder.corrections(records)
    elif kind == "relabel":
        builder.relabel(records)
    elif kind == "pairs":
        builder.pairs(records, min_margin=min_margin, max_per_input=max_pairs_per_input)
    else:
        builder.unpaired(records, threshold=threshold, include_corrections=include_corrections)
    result = builder.result()
    if not result.rows:
        shown = ", ".join(f"{k}={v}" for k, v in filters.items() if v is not None)
        why = "; ".join(result.report.lines()[1:]) or "no records"
        raise FeedbackError(f"{store.path}: build {kind} made no training rows from {result.report.records} "
                            f"record{'s' * (result.report.records != 1)}{f' ({shown})' if shown else ''}: "
                            f"{why.strip()}")
    return result


def _records_task(records: Sequence[FeedbackRecord], store: str) -> str:
    """The one label task (classification or tagging) of the records, for a relabel build with no task named."""
    tasks = sorted({r.task for r in records if r.task in ("classification", "tagging")})
    if len(tasks) == 1:
        return tasks[0]
    if not tasks:
        raise FeedbackError(f"{store}: build relabel: no record has task classification or tagging; name the task "
                            f"the rows are for")
    raise FeedbackError(f"{store}: build relabel: the records are of tasks {' and '.join(tasks)}; choose one (filter "
                        f"task, or name the task the rows are for)")


class _Builder:
    """Rows of one build, deduplicated, with the report of what each record gave."""

    def __init__(self, store: str, kind: str, task: str, fields: RowFields, *, labels: Sequence[str] | None,
                 include_good: bool, use_reference: bool):
        self.store, self.kind, self.task, self.fields = store, kind, task, fields
        self.labels = list(labels) if labels is not None else None
        self.include_good, self.use_reference = include_good, use_reference
        self.report = BuildReport(kind, store, task)
        self.rows: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self._used: set[int] = set()
        self.found_labels: list[str] = []

    def where(self, record: FeedbackRecord) -> str:
        return f"{self.store}: record {record.id}"

    def skip(self, reason: str) -> None:
        self.report.skipped[reason] += 1

    def add(self, row: dict[str, Any], *records: FeedbackRecord) -> None:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key in self._seen:
            self.report.duplicates += 1
        else:
            self._seen.add(key)
            self.rows.append(row)
        self._used.update(r.id for r in records)

    def result(self) -> BuildResult:
        self.report.rows = len(self.rows)
        self.report.used = len(self._used)
        return BuildResult(self.rows, self.report, self.found_labels)

    def wrong_task(self, record: FeedbackRecord) -> bool:
        """Skip a record of a task whose rows this build does not make."""
        if self.kind == "relabel":
            wrong = record.task is not None and record.task != self.task
        else:
            wrong = record.task in LABEL_TASKS
        if wrong:
            self.skip(f"task {record.task} (the rows are for {self.task})")
        return wrong

    # -- corrections -------------------------------------------------------------------------------------

    def corrections(self, records: Iterable[FeedbackRecord]) -> None:
        for record in records:
            if self.wrong_task(record):
                continue
            prompt = record_prompt(record, self.where(record))
            answer = _text(record.correction)
            if answer is None and record.correction is not None:
                self.skip("empty correction")
                continue
            if answer is None and self.use_reference and record.verdict == "bad" and isinstance(record.reference, str):
                answer = _text(record.reference)
            if answer is None and self.include_good and record.verdict == "good":
                answer = record.output
            if answer is None:
                self.skip(self._no_correction(record))
                continue
            if self.task == "seq2seq":
                if not isinstance(prompt, str):
                    raise FeedbackError(f"{self.where(record)}: field 'input': a seq2seq row's source is a text, "
                                        f"found chat messages")
                self.add({self.fields.source: prompt, self.fields.target: answer}, record)
            else:
                self.add({"messages": [*as_messages(prompt), {"role": "assistant", "content": answer}]}, record)

    def _no_correction(self, record: FeedbackRecord) -> str:
        if record.verdict == "good":
            return "good, no correction (include_good trains on good outputs)"
        if record.verdict == "bad" and record.critique and self.kind == "refine":
            return "bad, critique not refined"
        if record.verdict == "bad":
            return "bad, no correction"
        return "no verdict and no correction"

    # -- relabel -----------------------------------------------------------------------------------------

    def relabel(self, records: Iterable[FeedbackRecord]) -> None:
        latest: dict[Any, tuple[dict[str, Any], FeedbackRecord]] = {}
        for record in records:
            if self.wrong_task(record):
                continue
            where = self.where(record)
            if not isinstance(record.input, str):
                what = "the text to classify" if self.task == "classification" else "the sentence"
                raise FeedbackError(f"{where}: field 'input': a {self.task} record's input is {what} (a string), "
                                    f"found a list of chat messages")
            value, name = self._label_value(record)
            if value is None:
                self.skip(name)
                continue
            if self.task == "classification":
                label = _label_text(value, where, name)
                self._check_labels([label], where, name)
                key: Any = record.input
                row = {self.fields.text: record.input, self.fields.label: label}
            else:
                words = record_words(record, where)
                tags = _tags(value, where, name, len(words), words)
                self._check_labels(tags, where, name)
                key = tuple(words)
                row = {self.fields.tokens: words, self.fields.tags: tags}
            if key in latest:
                self.skip("superseded by a newer record of the same text")
            latest[key] = (row, record)
        for row, record in sorted(latest.values(), key=lambda item: item[1].id):
            self.add(row, record)
            labels = [row[self.fields.label]] if self.task == "classification" else row[self.fields.tags]
            for label in labels:
                if label not in self.found_labels:
                    self.found_labels.append(label)

    def _label_value(self, record: FeedbackRecord) -> tuple[Any, str]:
        """(the right label or tags, the field it comes from), or (None, why there is none)."""
        if record.correction is not None and record.correction.strip():
            return record.correction, "correction"
        if record.verdict == "bad":
            if self.use_reference and record.reference is not None:
                return record.reference, "reference"
            return None, "bad, no correction" + (" and no reference" if self.use_reference else "")
        if record.verdict == "good":
            if self.include_good:
                return record.output, "output"
            return None, "good, no correction (include_good keeps the label of good outputs)"
        return None, "no verdict and no correction"

    def _check_labels(self, labels: list[str], where: str, name: str) -> None:
        if self.labels is None:
            return
        for label in labels:
            if label not in self.labels:
                known = ", ".join(self.labels[:20]) + (", ..." if len(self.labels) > 20 else "")
                raise FeedbackError(f"{where}: field '{name}': unknown {'label' if self.task == 'classification' else 'tag'} "
                                    f"{label!r} (known: {known})")

    # -- pairs -------------------------------------------------------------------------------------------

    def pairs(self, records: Iterable[FeedbackRecord], *, min_margin: float, max_per_input: int | None) -> None:
        groups: dict[str, list[tuple[FeedbackRecord, Any]]] = {}
        for record in records:
            if self.wrong_task(record):
                continue
            prompt = record_prompt(record, self.where(record))
            groups.setdefault(prompt_key(prompt), []).append((record, prompt))
        for group in groups.values():
            prompt = group[0][1]
            found: list[tuple[str, str, tuple[FeedbackRecord, ...]]] = []
            for record, _ in group:  # a correction over the output it corrects
                better = _text(record.correction)
                if better is None and self.use_reference and record.verdict == "bad" and isinstance(record.reference, str):
                    better = _text(record.reference)
                if better is not None and better != record.output:
                    found.append((better, record.output, (record,)))
            judged = [record for record, _ in group]
            for good in (r for r in judged if r.verdict == "good"):  # every good output over every bad one
                for bad in (r for r in judged if r.verdict == "bad"):
                    if good.output != bad.output:
                        found.append((good.output, bad.output, (good, bad)))
            by_score = []  # a higher score over a lower one, within one source
            for high in judged:
                for low in judged:
                    if (high.score is not None and low.score is not None and high.source == low.source
                            and high.score - low.score > min_margin and high.output != low.output):
                        by_score.append((high.score - low.score, (high.output, low.output, (high, low))))
            found += [pair for _, pair in sorted(by_score, key=lambda item: -item[0])]
            orders = {(chosen, rejected) for chosen, rejected, _ in found}
            kept = 0
            for chosen, rejected, sources in found:
                if (rejected, chosen) in orders:
                    self.report.contradictory += 1
                    continue
                if max_per_input is not None and kept >= max_per_input:
                    continue
                before = len(self.rows)
                self.add({"prompt": prompt, "chosen": chosen, "rejected": rejected}, *sources)
                kept += len(self.rows) - before
        for record in (r for group in groups.values() for r, _ in group):
            if record.id not in self._used:
                self.skip("nothing to pair with: no correction, and no output of the same input judged otherwise")

    # -- unpaired ----------------------------------------------------------------------------------------

    def unpaired(self, records: Iterable[FeedbackRecord], *, threshold: float | None,
                 include_corrections: bool) -> None:
        found: list[tuple[Any, str, bool, FeedbackRecord]] = []
        labelled: list[FeedbackRecord] = []
        for record in records:
            if self.wrong_task(record):
                continue
            prompt = record_prompt(record, self.where(record))
            if record.verdict is not None:
                desirable = record.verdict == "good"
            elif threshold is not None:
                desirable = record.score >= threshold
            else:
                self.skip("a score and no verdict (threshold labels scores)")
                continue
            labelled.append(record)
            found.append((prompt, record.output, desirable, record))
            better = _text(record.correction)
            if include_corrections and better is not None and better != record.output:
                found.append((prompt, better, True, record))
        sides: dict[tuple[str, str], set[bool]] = {}
        for prompt, completion, desirable, _ in found:
            sides.setdefault((prompt_key(prompt), completion), set()).add(desirable)
        for prompt, completion, desirable, record in found:
            if len(sides[(prompt_key(prompt), completion)]) > 1:
                self.report.contradictory += 1
                continue
            self.add({"prompt": prompt, "completion": completion, "label": desirable}, record)
        for record in labelled:
            if record.id not in self._used:
                self.skip("the same answer to the same input is judged both good and bad")


# ---------------------------------------------------------------------------------------------- record shapes


def record_prompt(record: FeedbackRecord, where: str) -> str | list[dict[str, str]]:
    """A record's input as a prompt: its text, or its chat messages, checked to be a conversation that ends
    with the user's turn (the turn the output answers); FeedbackError naming the record otherwise."""
    if isinstance(record.input, str):
        return record.input
    from tunelab.data.chat import validate_conversation

    messages = [{"role": m["role"], "content": m["content"]} for m in record.input]
    try:
        validate_conversation(messages, where, field="input", final_assistant=False)
    except DataError as err:
        raise FeedbackError(str(err)) from None
    if messages[-1]["role"] != "user":
        raise FeedbackError(f"{where}: field 'input': the messages end with a {messages[-1]['role']} message; the "
                            f"output answers the user's turn, so the input must end with one")
    return messages


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A prompt as chat messages (a text is one user turn)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def prompt_key(prompt: str | list[dict[str, str]]) -> str:
    """One key for equal prompts, whether given as a text or as the one user message that holds it."""
    return json.dumps(as_messages(prompt), sort_keys=True, ensure_ascii=False)


def record_words(record: FeedbackRecord, where: str) -> list[str]:
    """A tagging record's words: metadata["tokens"] (a list of strings), else its input split at whitespace."""
    tokens = record.metadata.get("tokens")
    if tokens is None:
        words = record.input.split()
        if not words:
            raise FeedbackError(f"{where}: field 'input': no words")
        return words
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) and t.strip() for t in tokens)):
        raise FeedbackError(f"{where}: field 'metadata.tokens': expected a list of non-empty words")
    return list(tokens)


def _tags(value: Any, where: str, name: str, count: int, words: list[str]) -> list[str]:
    """Tags from a list, a JSON list in a text, or a text of tags separated by spaces; one per word."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise FeedbackError(f"{where}: field '{name}': malformed JSON list of tags at column {err.colno}: "
                                f"{err.msg}") from None
    tags = value.split() if isinstance(value, str) else value
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise FeedbackError(f"{where}: field '{name}': expected tags (a list of names, or names separated by "
                            f"spaces), found {type(value).__name__}")
    if len(tags) != count:
        shown = " ".join(words[:8]) + (" ..." if len(words) > 8 else "")
        raise FeedbackError(f"{where}: field '{name}': {len(tags)} tags for {count} words ({shown})")
    return list(tags)


def _label_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FeedbackError(f"{where}: field '{name}': a label is a name or an integer, found {type(value).__name__}")
    label = str(value).strip()
    if not label:
        raise FeedbackError(f"{where}: field '{name}': empty label")
    return label


def _text(value: Any) -> str | None:
    """A non-empty text, or None."""
    return value if isinstance(value, str) and value.strip() else None


def write_rows(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Rows as JSON lines, written to a temporary name and renamed (a kill never leaves half a file)."""
    write_json_lines(rows, path)
    return Path(path)


# ---------------------------------------------------------------------------------------------- refinement


def check_prompt_template(template: str) -> None:
    """FeedbackError for a refine prompt without {critique} or {output}, or with an unknown {placeholder}."""
    names = _PLACEHOLDER.findall(template)
    for name in names:
        if name not in PLACEHOLDERS:
            import difflib

            close = difflib.get_close_matches(name, PLACEHOLDERS, n=1)
            hint = f"; did you mean {{{close[0]}}}?" if close else f" (known: {', '.join('{%s}' % p for p in PLACEHOLDERS)})"
            raise FeedbackError(f"refine prompt: unknown placeholder {{{name}}}{hint}")
    for needed in ("output", "critique"):
        if needed not in names:
            raise FeedbackError(f"refine prompt: it needs {{{needed}}}: the model rewrites the output from the critique")


def refine_prompt(template: str, record: FeedbackRecord) -> str:
    """The refine prompt of one record: the template with its input, output, critique and reference."""
    if isinstance(record.input, list) and len(record.input) == 1 and record.input[0]["role"] == "user":
        shown_input = record.input[0]["content"]
    else:
        shown_input = record.input_text
    reference = record.reference
    values = {"input": shown_input, "output": record.output, "critique": record.critique or "",
              "reference": "" if reference is None else reference if isinstance(reference, str)
              else json.dumps(reference, ensure_ascii=False)}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def clean_refinement(text: str) -> str:
    """A generated refinement without surrounding space and a leading "Improved answer:" label."""
    return _ANSWER_LABEL.sub("", text.strip(), count=1).strip()


def refine_records(store: FeedbackStore, records: Sequence[FeedbackRecord], settings: RefineSettings, *,
                   refiner: tuple[Any, Any] | None = None, report: BuildReport | None = None,
                   log: Callable[[str], None] = print) -> list[FeedbackRecord]:
    """Refine every bad record with a critique and no correction: a model (settings.model, else the record's own
    model; or `refiner`, a loaded (model, tokenizer)) is given the input, the output and the critique and
    writes an improved output, by batched greedy decoding. Each refinement that passes (not empty, not the
    output again, not cut off, and passed by the verifier if there is one) is stored as the record's correction,
    with metadata["refinement"] saying which model wrote it, so that `tunelab feedback review` shows it to a
    person. Returns `records` with the stored refinements."""
    report = report if report is not None else BuildReport("refine", store.path)
    pending = [r for r in records if r.verdict == "bad" and _text(r.critique) and r.correction is None
               and r.task not in LABEL_TASKS]
    if not pending:
        return list(records)
    for record in pending:
        record_prompt(record, f"{store.path}: record {record.id}")  # a bad input is an error before any decoding
    verifier = None
    if settings.verifier is not None:
        from tunelab.evaluate.verifiers import load_verifier

        verifier = load_verifier(settings.verifier)
    groups: dict[str, list[FeedbackRecord]] = {}
    for record in pending:
        groups.setdefault(settings.model or record.model, []).append(record)
    updated: dict[int, FeedbackRecord] = {}
    for name, group in groups.items():
        model, tokenizer = refiner if refiner is not None else _load_refiner(name, log)
        texts = _generate_refinements(model, tokenizer, group, settings, name)
        for record, (text, finish) in zip(group, texts):
            reason = _refinement_problem(record, text, finish, settings, verifier)
            if reason is not None:
                report.refine_dropped[reason] += 1
                continue
            stored = _store_refinement(store, record, text, name, settings)
            if stored is not None:
                updated[record.id] = stored
                report.refined += 1
    return [updated.get(r.id, r) for r in records]


def _load_refiner(name: str, log: Callable[[str], None]):
    """The refining model and tokenizer of a model source (a name, directory, GGUF file or run)."""
    from tunelab.train.run import load_any

    log(f"refine: loading {name}")
    model, tokenizer = load_any(name)
    return model.eval(), tokenizer


def _generate_refinements(model, tokenizer, records: Sequence[FeedbackRecord], settings: RefineSettings,
                          name: str) -> list[tuple[str, str]]:
    """(refinement text, finish reason) of each record, decoded greedily in batches of similar length."""
    from tqdm.auto import tqdm

    from tunelab.generate import GenerationSettings, generate

    if not tokenizer.chat_template:
        raise FeedbackError(f"refine: {name} has no chat template; refinements need a chat model (name one as the "
                            f"refining model)")
    if not getattr(model, "is_decoder", False) or "lm" not in model.heads:
        raise FeedbackError(f"refine: {name} cannot generate text (no language-model head); name a chat model")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": refine_prompt(settings.prompt, r)}],
                                             add_generation_prompt=True, tokenize=True) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    results: list[tuple[str, str]] = [("", "")] * len(records)
    decoding = GenerationSettings(max_new_tokens=settings.max_new_tokens, temperature=0.0)
    with tqdm(total=len(records), desc=f"refine ({name})", unit="record", disable=not settings.show_progress) as bar:
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            for i, completion in zip(batch, generate(model, tokenizer, [prompts[i] for i in batch], decoding)):
                results[i] = (clean_refinement(completion.text), completion.finish_reason)
            bar.update(len(batch))
    return results


def _refinement_problem(record: FeedbackRecord, text: str, finish: str, settings: RefineSettings,
                        verifier) -> str | None:
    """Why a refinement is not kept, or None."""
    if not text:
        return "empty"
    if text.strip() == record.output.strip():
        return "the output again"
    if finish == "length" and not settings.keep_truncated:
        return f"cut off at {settings.max_new_tokens} tokens"
    if verifier is not None:
        from tunelab.evaluate.verifiers import judge

        example = {k: v for k, v in record.metadata.items() if k not in ("history", "refinement")}
        example.update(input=record.input, prompt=record.input_text, output=record.output, critique=record.critique)
        if record.reference is not None:
            example.update(reference=record.reference, answer=record.reference)
        try:
            judgement = judge(verifier, text, example, name=settings.verifier)
        except Exception as err:
            raise FeedbackError(f"refine: verifier {settings.verifier} failed on record {record.id}: "
                                f"{type(err).__name__}: {err}") from err
        passed = judgement.verdict == "good" if judgement.verdict is not None else judgement.score >= settings.min_score
        if not passed:
            return "failed the verifier"
    return None


def _store_refinement(store: FeedbackStore, record: FeedbackRecord, text: str, model: str,
                      settings: RefineSettings) -> FeedbackRecord | None:
    """Write the refinement as the record's correction, unless someone wrote a correction meanwhile."""
    now = utc_now()
    written = False

    def change(current: FeedbackRecord) -> dict[str, Any]:
        nonlocal written
        if current.correction is not None:
            return {"updated_at": current.updated_at}
        written = True
        refinement = {"model": model, "created_at": now, "critique": current.critique, "reviewed": False}
        if settings.prompt != REFINE_PROMPT:
            refinement["prompt"] = settings.prompt
        if settings.verifier is not None:
            refinement["verifier"] = settings.verifier
        return {"correction": text, "metadata": {**current.metadata, "refinement": refinement}, "updated_at": now}

    stored = store.modify(record.id, change)
    return stored if written else None


# ---------------------------------------------------------------------------------------------- training runs


def build_options(config: TrainConfig) -> dict[str, Any]:
    """build_training_data's keyword arguments for a config's data.feedback (without the store and labels)."""
    spec = config.data.feedback
    options: dict[str, Any] = dict(task_type=config.task.type, fields=RowFields.of(config.data),
                                   include_good=spec.include_good, use_reference=spec.use_reference,
                                   min_margin=spec.min_margin, max_pairs_per_input=spec.max_pairs_per_input,
                                   threshold=spec.threshold, include_corrections=spec.include_corrections,
                                   **spec.filters())
    if spec.build == "refine":
        given = spec.refine
        options["refine"] = RefineSettings(
            model=(given.model if given and given.model else config.model.source),
            prompt=given.prompt if given and given.prompt else REFINE_PROMPT,
            **({} if given is None else dict(max_new_tokens=given.max_new_tokens, batch_size=given.batch_size,
                                             keep_truncated=given.keep_truncated, verifier=given.verifier,
                                             min_score=given.min_score)))
    return options


def model_labels(source: str | None) -> list[str] | None:
    """The label names of a model source's task head, read without loading weights: a run's labels.json, or an
    HF config.json's id2label (unless its names are the generic LABEL_0, ...). None when there are none."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if (path / "labels.json").is_file():
        labels = json.loads((path / "labels.json").read_text(encoding="utf-8"))
        return [str(label) for label in labels] or None
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        id2label = config.get("id2label") or {}
        try:
            names = [str(id2label[key]) for key in sorted(id2label, key=int)]
        except (KeyError, ValueError):
            return None
        if names and not all(re.fullmatch(r"LABEL_\d+", name) for name in names):
            return names
    return None


def build_run_data(config: TrainConfig, *, directory: str | Path | None = None, refine: bool = True,
                   show_progress: bool = True, log: Callable[[str], None] = print) -> tuple[TrainConfig, BuildReport]:
    """Build the training rows of config.data.feedback into the run directory (or `directory`): feedback_data.jsonl,
    and with mix_with, mix_data.jsonl with the original examples mixed in. `tunelab train` then reads them
    (tunelab.train.run.with_feedback_rows). Returns the config to train with (a classification or tagging
    run keeps the label names of the model it starts from, so that its head is kept) and the report.

    refine=False (`tunelab plan`): build refine writes no refinement; the rows are the corrections there are."""
    from tunelab.train.run import FEEDBACK_DATA_FILE, MIX_DATA_FILE, check_new_run_dir

    spec = config.data.feedback
    if spec is None:
        raise FeedbackError("the config has no data.feedback section: nothing to build")
    run_dir = Path(directory if directory is not None else config.output_dir)
    if directory is None:
        check_new_run_dir(run_dir)
    options = build_options(config)
    if "refine" in options:
        options["refine"].show_progress = show_progress
    kind = spec.build
    with FeedbackStore(config.feedback.store, create=False) as store:
        if kind == "refine" and not refine:
            settings = options.pop("refine")
            waiting = store.count(verdict="bad", has_critique=True, has_correction=False, **spec.filters())
            log(f"refine: {waiting} bad record{'s' * (waiting != 1)} with a critique and no correction would be "
                f"refined by {settings.model} first (not now)")
            kind = "corrections"
        result = build_training_data(store, kind, labels=config.task.labels, log=log, **options)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_rows(result.rows, run_dir / FEEDBACK_DATA_FILE)
    mixed: list[dict[str, Any]] = []
    if spec.mix_with is not None:
        mixed = mix_rows(config, len(result.rows))
        write_rows(mixed, run_dir / MIX_DATA_FILE)
        result.report.mixed = len(mixed)
    for line in result.report.lines():
        log(line)
    if config.task.labels is None and config.task.type in ("classification", "tagging"):
        labels = resolve_labels(config, [*result.labels, *_row_labels(config, mixed)], log=log)
        config = config.model_copy(update={"task": config.task.model_copy(update={"labels": labels})})
    return config, result.report


def resolve_labels(config: TrainConfig, found: Sequence[str], *, log: Callable[[str], None] = print) -> list[str]:
    """The label (tag) names of a classification or tagging run on feedback rows: the names of the head of the
    model it starts from, then any new ones (the head is kept only when the names are the same); for a model
    without a head, the names of the rows and of the validation files, ordered as tunelab orders found names."""
    from tunelab.data.classification import discover_labels

    d = config.data
    names = list(dict.fromkeys(found))
    if d.validation_paths():
        if config.task.type == "classification":
            from tunelab.data.classification import load_classification

            names += load_classification(d.validation_paths(), text_field=d.text_field, label_field=d.label_field)[1]
        else:
            from tunelab.data.tagging import load_tagging

            names += load_tagging(d.validation_paths(), tokens_field=d.tokens_field, tags_field=d.tags_field,
                                  token_column=d.token_column, tag_column=d.tag_column)[1]
    names = list(dict.fromkeys(names))
    base = model_labels(config.model.source)
    if base:
        new = [name for name in names if name not in base]
        if new:
            log(f"  labels not in the head of {config.model.source}: {', '.join(new)}; the head starts afresh")
        return [*base, *new]
    if config.task.type == "classification":
        return discover_labels(names)
    return (["O"] if "O" in names else []) + sorted(set(names) - {"O"})


def _row_labels(config: TrainConfig, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The label (tag) names used by rows of a classification (tagging) run."""
    fields = RowFields.of(config.data)
    if config.task.type == "classification":
        return [row[fields.label] for row in rows]
    return [tag for row in rows for tag in row[fields.tags]]


def mix_rows(config: TrainConfig, feedback_rows: int) -> list[dict[str, Any]]:
    """The examples of data.feedback.mix_with as rows like the feedback rows: all of them, or with mix_ratio
    that many per feedback row, sampled (seeded with train.seed) in the files' order."""
    from tunelab.train import run

    spec, data, task = config.data.feedback, config.data, config.task.type
    fields = RowFields.of(data)
    paths = spec.mix_paths()
    reading = config.model_copy(update={"data": data.model_copy(update={"train": paths, "feedback": None})})
    if task == "chat":
        rows = [{"messages": c.messages} for c in run.read_conversations(reading, paths)]
    elif task == "seq2seq":
        rows = [{fields.source: p.source, fields.target: p.target} for p in run.read_pairs(reading, paths)]
    elif task == "classification":
        from tunelab.data.classification import load_classification

        examples, names = load_classification(paths, format=data.format, text_field=data.text_field,
                                              label_field=data.label_field, labels=config.task.labels)
        rows = [{fields.text: e.text, fields.label: names[e.label]} for e in examples]
    elif task == "tagging":
        from tunelab.data.tagging import load_tagging

        examples, _ = load_tagging(paths, format=data.format, tokens_field=data.tokens_field, tags_field=data.tags_field,
                                   token_column=data.token_column, tag_column=data.tag_column,
                                   labels=config.task.labels)
        rows = [{fields.tokens: e.tokens, fields.tags: e.tags} for e in examples]
    elif task == "kto":
        examples, _ = run.read_labeled(reading, paths)
        rows = _labeled_rows(examples)
    else:  # preference, reward_model
        pairs, _ = run.read_preferences(reading, paths)
        rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    if spec.mix_ratio is not None:
        wanted = round(spec.mix_ratio * feedback_rows)
        if wanted < len(rows):
            chosen = sorted(random.Random(config.train.seed).sample(range(len(rows)), wanted))
            rows = [rows[i] for i in chosen]
    return rows


def _labeled_rows(examples: Sequence) -> list[dict[str, Any]]:
    """KTO examples as rows; the desirable and undesirable answer of one pair (same record, same prompt) stay one
    pair row, so that they stay on one side of a validation split."""
    rows, k = [], 0
    while k < len(examples):
        first = examples[k]
        second = examples[k + 1] if k + 1 < len(examples) else None
        if (second is not None and second.source == first.source and second.prompt == first.prompt
                and first.desirable and not second.desirable):
            rows.append({"prompt": first.prompt, "chosen": first.completion, "rejected": second.completion})
            k += 2
            continue
        rows.append({"prompt": first.prompt, "completion": first.completion, "label": first.desirable})
        k += 1
    return rows


def train_from_feedback(config: TrainConfig, *, show_progress: bool = True,
                        log: Callable[[str], None] = print) -> dict:
    """Build the rows of config.data.feedback into the run directory and train on them; the final metrics."""
    from tunelab.train.run import train

    config, _ = build_run_data(config, show_progress=show_progress, log=log)
    return train(config, show_progress=show_progress, log=log)
