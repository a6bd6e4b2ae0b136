"""Collecting feedback automatically: run a model over examples, judge every output, store the judgements.

    from tunelab.feedback.collect import collect_feedback
    result = collect_feedback("runs/sst2-minilm", "../shared/data/sst2/dev.tsv", [{"type": "gold"}],
                              "feedback.db", data={"text_field": "sentence"}, limit=200)
    print(result.summary())

Each output gets ONE RECORD PER JUDGE (not one merged record): judges disagree, each record's `source` says who
judged, and training data can be built from the judges one trusts. The records of one output share
metadata["input_key"] (a fingerprint of the input) and the model version; metadata["judge"] names the judge
("gold", "verifier:module:function", "reward_model:RUN", "judge:MODEL"), metadata["data"] and ["line"] the
example's place.

A model is named by its source (a registered name, a path, a run directory) and versioned by a fingerprint of its
weights: a run directory as "step-N-<sha256 of the final weights, 8 hex>", any other model file by its hash.
Examples already judged by a judge for the same model and version are skipped (so a collection can be run
again after a kill, or on a growing pool, and judges only what is new); `skip_judged=False` judges them again.

Outputs are made and judged in chunks; each chunk's records are stored in one transaction, so a killed
collection loses at most one chunk. A judge model's reply with neither a verdict nor a score is not stored:
it is counted in the summary and returned in `CollectResult.unjudged` with its raw text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.schema import CollectJudgeSection, DataSection
from tunelab.errors import ConfigError, FeedbackError
from tunelab.feedback.examples import COLLECT_TASKS, Example, as_examples, read_examples
from tunelab.feedback.judges import Judge, make_judge
from tunelab.feedback.outputs import GenerationOptions, OutputMaker
from tunelab.feedback.record import FeedbackRecord
from tunelab.feedback.store import FeedbackStore

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
SHOWN_UNJUDGED = 3  # replies without a verdict that the summary quotes, per judge
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, for one process


@dataclass
class JudgeSummary:
    """What one judge said over a collection."""

    name: str
    source: str
    records: int = 0
    good: int = 0
    bad: int = 0
    scored: int = 0
    score_total: float = 0.0
    unjudged: int = 0  # replies without a verdict or a score (not stored)
    judged_before: int = 0  # examples skipped: judged earlier for this model version

    @property
    def mean_score(self) -> float | None:
        return self.score_total / self.scored if self.scored else None


@dataclass
class CollectResult:
    """The records a collection made (stored, when it had a store), and its counts per judge."""

    model: str
    model_version: str
    task: str
    examples: int
    records: list[FeedbackRecord] = field(default_factory=list)
    judges: list[JudgeSummary] = field(default_factory=list)
    unjudged: list[dict[str, Any]] = field(default_factory=list)  # {"judge", "where", "output", "reply"}
    store: str | None = None

    def summary(self) -> str:
        """The text `tunelab feedback collect` prints."""
        return format_summary(self)


# ---------------------------------------------------------------------------------------------- versions


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (hex), remembered per (path, size, mtime) within a process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def weights_fingerprint(path: Path) -> str:
    """8 hex digits of the sha256 of a model's weight files (a GGUF file, or a directory's weight files)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FeedbackError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to version the model by")
    if len(files) == 1:
        return file_hash(files[0])[:8]
    digest = hashlib.sha256("".join(f"{f.name}:{file_hash(f)}\n" for f in files).encode())
    return digest.hexdigest()[:8]


def source_version(source: str | Path) -> str:
    """The version of a model source: "step-N-<hash>" for a run directory (N: its last training step), the hash
    of its weights for a model directory, a GGUF file or a registered name."""
    from tunelab.checkpoint.load import resolve_source
    from tunelab.train.run import is_run_dir

    path = Path(source).expanduser()
    if is_run_dir(path):
        weights = path / "model" if (path / "model").is_dir() else path / "adapter"
        if not weights.is_dir():
            raise FeedbackError(f"{path}: the run has no final model yet (no model/ or adapter/)")
        step = _last_step(path)
        return f"step-{step}-{weights_fingerprint(weights)}" if step is not None else weights_fingerprint(weights)
    return weights_fingerprint(resolve_source(source))


def _last_step(run: Path) -> int | None:
    """The step a run's final model was saved at: its final evaluation's, else its last logged step."""
    if (run / "metrics.json").exists():
        step = json.loads((run / "metrics.json").read_text(encoding="utf-8")).get("step")
        if step is not None:
            return int(step)
    steps = []
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line
    return max(steps) if steps else None


def parameters_fingerprint(model) -> str:
    """8 hex digits of the sha256 of a loaded model's parameters (the version of a model given in memory)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:8]


# ---------------------------------------------------------------------------------------------- tasks


def task_of_model(model, tokenizer, source: str | None = None) -> str:
    """The task whose outputs a model gives: a run's own task, else what its heads do (a classifier head:
    classification, a tagger: tagging, an encoder-decoder: seq2seq, a decoder's language-model head: chat)."""
    from tunelab.train.run import is_run_dir, resume_config

    if source is not None and is_run_dir(source):
        task = resume_config(source).task.type
        task = "chat" if task == "causal_lm" else task
        if task not in COLLECT_TASKS:
            raise ConfigError(f"{source}: a {task} run; collecting feedback judges the outputs of "
                              f"{', '.join(COLLECT_TASKS)} models")
        return task
    if model.is_encoder_decoder:
        return "seq2seq"
    if "classifier" in model.heads:
        return "classification"
    if "tagger" in model.heads:
        return "tagging"
    if "lm" in model.heads and model.is_decoder:
        return "chat"
    name = source or "the model"
    raise ConfigError(f"{name} has no head that gives task outputs (classifier, tagger, or a decoder's language-"
                      f"model head); say which task with task= (--task)")


def _check_task_fits(task: str, model, name: str) -> None:
    needs = {"classification": "classifier", "tagging": "tagger"}
    if task not in COLLECT_TASKS:
        raise ConfigError(f"task {task!r}: collecting feedback works on {', '.join(COLLECT_TASKS)} outputs")
    if task in needs and needs[task] not in model.heads:
        raise ConfigError(f"{name}: task {task} needs a model with a {needs[task]} head (a fine-tuned {task} run)")
    if task == "seq2seq" and not model.is_encoder_decoder:
        raise ConfigError(f"{name}: task seq2seq needs an encoder-decoder model; a decoder answers with task chat")
    if task == "chat" and ("lm" not in model.heads or not model.is_decoder or model.is_encoder_decoder):
        raise ConfigError(f"{name}: task chat needs a decoder with a language-model head")


# ---------------------------------------------------------------------------------------------- collecting


def collect_feedback(
    model: Any,
    examples: str | Path | Sequence[str | Path] | Iterable[Example | Mapping[str, Any]],
    judges: Sequence[CollectJudgeSection | Mapping[str, Any] | Judge],
    store: FeedbackStore | str | Path | None = None,
    *,
    tokenizer: Any = None,
    task: str | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    data: DataSection | Mapping[str, Any] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    generation: GenerationOptions | Mapping[str, Any] | None = None,
    precision: str = "auto",
    chunk_size: int | None = None,
    skip_judged: bool = True,
    progress: bool = True,
) -> CollectResult:
    """Run `model` over `examples`, judge every output with every judge, add one record per output and judge to
    `store` (None: make the records without storing them), and return them with the counts.

    model: a source (registered name, model path, run directory) or a loaded model with `tokenizer` (then
      `model_name` names it in the records; `model_version` defaults to a hash of its parameters).
    examples: data files (read for the task with `data`'s field options: a DataSection or a dict such as
      {"text_field": "sentence"}; a run's own data options by default), or Example objects / mappings with
      `input` (and `reference`, other fields) from the caller, e.g. a pool the feedback loop keeps.
    judges: config items ({"type": "gold"}, {"type": "verifier", "function": "mod:fn"}, {"type": "reward_model",
      "model": RUN}, {"type": "judge", "model": "smollm2-135m-instruct", "rubric": ...}) or Judge objects.
    task: classification, tagging, chat or seq2seq (default: the run's task, or the model's head).
    generation: how chat and seq2seq outputs are decoded: GenerationOptions, or a dict of its fields over the
      run's task.generation (as `tunelab predict` decodes) or, for a model that is not a run, greedy with at
      most 128 new tokens.
    precision: the models' autocast: auto (bf16 where the hardware computes it natively, as `tunelab predict`
      and `tunelab eval`), fp32, bf16 or fp16.
    skip_judged: leave out the examples each judge has judged already for this model and version.
    """
    from tqdm.auto import tqdm

    from tunelab.train.run import is_run_dir, load_any, resume_config

    if not judges:
        raise ConfigError("no judges: give at least one (gold, verifier, reward_model or judge)")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    loaded: dict[str, tuple[Any, Any]] = {}
    run_config = None
    if isinstance(model, (str, Path)):
        source = str(model)
        model_name = model_name or source.rstrip("/")
        model, tokenizer = load_any(source)
        loaded[source] = (model, tokenizer)
        if is_run_dir(source):
            run_config = resume_config(source)
        model_version = model_version or source_version(source)
    else:
        source = None
        if tokenizer is None:
            raise ConfigError("a loaded model needs its tokenizer (tokenizer=...)")
        if not model_name:
            raise ConfigError("a loaded model needs a name for its records (model_name=...)")
        model_version = model_version or f"params-{parameters_fingerprint(model)}"
    task = task or task_of_model(model, tokenizer, source)
    _check_task_fits(task, model, model_name)
    model.eval()

    # cheap checks first: the judges' options and the data, before any judge model is loaded
    specs = [_judge_spec(spec) for spec in judges]
    needs_reference = any(spec.needs_reference if isinstance(spec, Judge) else spec.type == "gold" for spec in specs)
    data_section = _data_section(data, run_config, examples)
    generation = _generation(generation, run_config)
    labels = list(model.config.labels or [])
    if isinstance(examples, (str, Path)) or _are_paths(examples):
        items = read_examples(examples, task, data=data_section, labels=labels or None, need_reference=needs_reference,
                              limit=limit)
    else:
        items = as_examples(examples)[:limit]
        missing = next((e for e in items if e.reference is None), None)
        if missing is not None and needs_reference:
            raise FeedbackError(f"{missing.where}: the gold judge needs the gold answer ('reference') of every example")

    def loader(name: str):
        if name not in loaded:
            loaded[name] = load_any(name)
        return loaded[name]

    opened = None
    if store is not None and not isinstance(store, FeedbackStore):
        store = opened = FeedbackStore(store)
    try:
        judge_list = [make_judge(spec, batch_size=batch_size, precision=precision, loader=loader) for spec in specs]
        names = [j.name for j in judge_list]
        if len(set(names)) != len(names):
            raise ConfigError(f"the judge {next(n for n in names if names.count(n) > 1)} is given twice")
        return _collect(model, tokenizer, task, items, judge_list, store, model_name, model_version, labels,
                        data_section, batch_size, generation, precision, chunk_size, skip_judged, progress, tqdm)
    finally:
        if opened is not None:
            opened.close()


def _judge_spec(spec: Any) -> CollectJudgeSection | Judge:
    """A judge's config item, validated (a Judge object as it is)."""
    from tunelab.config.loading import validate

    if isinstance(spec, (Judge, CollectJudgeSection)):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a judge is a Judge or a mapping such as {{'type': 'gold'}}, not {type(spec).__name__}")
    return validate(CollectJudgeSection, dict(spec), "judge")


def _data_section(data, run_config, examples) -> DataSection:
    """The field options the data files are read with: given ones over a run's own (or the defaults)."""
    from tunelab.config.loading import validate

    if isinstance(examples, (str, Path)):
        files = [str(examples)]
    elif _are_paths(examples):
        files = [str(path) for path in examples]
    else:
        files = ["(given examples)"]
    if isinstance(data, DataSection):
        return data
    base = run_config.data.model_dump(mode="json") if run_config is not None else {}
    base.update(train=files, validation=None)
    base.update(dict(data or {}))
    return validate(DataSection, base, "data options")


def _generation(given: GenerationOptions | Mapping[str, Any] | None, run_config) -> GenerationOptions:
    """Decoding options: given ones over a run's task.generation, or over greedy decoding of 128 tokens."""
    if isinstance(given, GenerationOptions):
        return given
    options: dict[str, Any] = {}
    if run_config is not None:
        g = run_config.task.generation
        options = {"max_new_tokens": g.max_new_tokens, "beam_size": g.beam_size, "length_penalty": g.length_penalty}
    options.update(given or {})
    try:
        return GenerationOptions(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"generation options: {error}") from None


def _are_paths(examples: Any) -> bool:
    return (isinstance(examples, Sequence) and not isinstance(examples, str) and bool(examples)
            and all(isinstance(e, (str, Path)) for e in examples))


def _judged_before(store: FeedbackStore | None, model: str, version: str) -> set[tuple[str, str]]:
    """(input key, judge name) of the records already in the store for this model and version."""
    if store is None:
        return set()
    seen = set()
    for record in store.iter_query(model=model, model_version=version):
        key, judge = record.metadata.get("input_key"), record.metadata.get("judge")
        if key and judge:
            seen.add((key, judge))
    return seen


def _collect(model, tokenizer, task, items, judges, store, model_name, version, labels, data, batch_size,
             generation, precision, chunk_size, skip_judged, progress, tqdm) -> CollectResult:
    result = CollectResult(model_name, version, task, len(items), store=store.path if store is not None else None)
    summaries = {j.name: JudgeSummary(j.name, j.source) for j in judges}
    result.judges = list(summaries.values())
    seen = _judged_before(store, model_name, version) if skip_judged else set()
    todo: list[tuple[Example, list[Judge]]] = []
    for example in items:
        wanted = [j for j in judges if (example.key, j.name) not in seen]
        for judge in judges:
            if judge not in wanted:
                summaries[judge.name].judged_before += 1
        if wanted:
            todo.append((example, wanted))
    maker = OutputMaker(model, tokenizer, task, labels=labels, max_length=data.max_length, batch_size=batch_size,
                        generation=generation, precision=precision, context_tokens=data.context_tokens)
    chunk_size = chunk_size or max(16, 4 * batch_size)
    bar = tqdm(total=len(todo), desc="collect", unit="example", disable=not progress or not todo)
    try:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            examples = [example for example, _ in chunk]
            outputs = maker.outputs(examples)
            records: list[FeedbackRecord] = []
            for judge in judges:
                picked = [i for i, (_, wanted) in enumerate(chunk) if judge in wanted]
                if not picked:
                    continue
                verdicts = judge([examples[i] for i in picked], [outputs[i] for i in picked], task)
                for i, verdict in zip(picked, verdicts):
                    example, output = examples[i], outputs[i]
                    if not verdict.judged:
                        summaries[judge.name].unjudged += 1
                        result.unjudged.append({"judge": judge.name, "where": example.where, "output": output.text,
                                                "reply": verdict.metadata.get("judge_reply")})
                        continue
                    records.append(_record(example, output, verdict, judge, model_name, version, task))
            if store is not None and records:
                records = store.add_many(records)
            for record in records:
                _count(summaries[record.metadata["judge"]], record)
            result.records += records
            bar.update(len(chunk))
    finally:
        bar.close()
    return result


def _record(example: Example, output, verdict, judge: Judge, model: str, version: str, task: str) -> FeedbackRecord:
    metadata = {"judge": judge.name, **example.location(), "input_key": example.key}
    if example.text_pair is not None:
        metadata["text_pair"] = example.text_pair
    if example.tokens is not None:
        metadata["tokens"] = list(example.tokens)
    if output.cut_off:
        metadata["cut_off"] = True
    metadata.update({k: v for k, v in verdict.metadata.items() if v is not None})
    return FeedbackRecord(input=example.input, output=output.text, model=model, model_version=version,
                          source=judge.source, verdict=verdict.verdict, score=verdict.score, critique=verdict.critique,
                          correction=verdict.correction, task=task, reference=example.reference, metadata=metadata)


def _count(summary: JudgeSummary, record: FeedbackRecord) -> None:
    summary.records += 1
    summary.good += record.verdict == "good"
    summary.bad += record.verdict == "bad"
    if record.score is not None:
        summary.scored += 1
        summary.score_total += record.score


def format_summary(result: CollectResult) -> str:
    """Records added, good / bad counts and mean score per judge, and what was skipped."""
    added = len(result.records)
    where = f" into {result.store}" if result.store else ""
    lines = [f"judged {result.examples} example{'s' * (result.examples != 1)} with {result.model} "
             f"({result.task}, version {result.model_version}): {added} record{'s' * (added != 1)} added{where}"]
    header = ("judge", "source", "records", "good", "bad", "mean score")
    rows = [(j.name, j.source, str(j.records), str(j.good), str(j.bad),
             f"{j.mean_score:.3f}" if j.mean_score is not None else "-") for j in result.judges]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    for j in result.judges:
        if j.judged_before:
            lines.append(f"  {j.name}: {j.judged_before} example{'s' * (j.judged_before != 1)} skipped, judged "
                         f"before for this model version")
        if j.unjudged:
            lines.append(f"  {j.name}: {j.unjudged} repl{'ies' if j.unjudged != 1 else 'y'} without a verdict or a "
                         f"score, not stored; e.g.")
            for item in [u for u in result.unjudged if u["judge"] == j.name][:SHOWN_UNJUDGED]:
                reply = " ".join(str(item["reply"]).split())
                reply = reply if len(reply) <= 100 else reply[:97] + "..."
                lines.append(f"    {item['where']}: {json.dumps(reply, ensure_ascii=False)}")
    return "\n".join(lines)
