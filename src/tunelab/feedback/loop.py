"""The feedback loop: predict, collect feedback, build training data, train, evaluate; round after round.

    from tunelab.feedback.loop import run_loop
    from tunelab.train.run import load_train_config
    result = run_loop(load_train_config("configs/sst2-minilm-loop.yaml"))
    print(result.table())

Round 0 trains the config as it is (its data.train; when the pool is data.train, the first
data.max_train_examples rows). Each round r >= 1 then:
  1. predicts and collects: the model of round r-1 runs over the r-th slice of feedback.loop.pool (per_round
     examples) and every output is judged by the judges of feedback.collect, into feedback.store;
  2. builds: that model version's judgements become training rows (feedback.loop.build, data.feedback's options;
     by default the bad outputs, relabelled or corrected with the gold answer); with replay, round 0's examples
     and the earlier rounds' rows are mixed in;
  3. trains: on from the weights of round r-1 (start_from previous) or afresh from model.source (start_from base);
  4. evaluates on data.validation: the same data every round, so that the scores compare (round 0's is the
     score before any feedback).

Everything is written under output_dir: round-0/ ... round-R/ (ordinary run directories), seed_data.jsonl (round
0's examples as rows, for replay), loop_config.yaml, loop.jsonl (a line per finished round), report.md and
loop.png. A killed loop goes on where it stopped when run again: finished rounds are read back from loop.jsonl, a
round that was training resumes from its last checkpoint, and collection skips what that model version has judged
already. Raising feedback.loop.rounds and running again adds rounds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.loading import dump_config, read_yaml, validate
from tunelab.config.schema import DataSection, TrainConfig
from tunelab.errors import ConfigError, DataError, FeedbackError
from tunelab.feedback.examples import COLLECT_TASKS, Example, read_examples

LOOP_FILE = "loop.jsonl"
LOOP_CONFIG_FILE = "loop_config.yaml"
REPORT_FILE = "report.md"
PLOT_FILE = "loop.png"
SEED_FILE = "seed_data.jsonl"  # round 0's training examples as rows: what it trained on, replayed later
# how a round's judgements become rows when feedback.loop.build is not given: the bad outputs, with the gold answer
DEFAULT_BUILD = {
    "classification": {"build": "relabel", "verdict": "bad"},
    "tagging": {"build": "relabel", "verdict": "bad"},
    "chat": {"build": "corrections", "verdict": "bad", "use_reference": True},
    "seq2seq": {"build": "corrections", "verdict": "bad", "use_reference": True},
}
FREE_KEYS = ("feedback.loop.rounds", "train.num_threads")  # may change when a loop goes on: more rounds, other threads
METRIC_OF_TASK = {"classification": "accuracy", "tagging": "f1"}  # the steps' main metrics (train/tasks.py)
GENERATION_METRIC_KEYS = {"bleu": "bleu", "chrf": "chrf", "rouge": "rougeL"}


@dataclass
class Round:
    """One round of the loop: the model it trained, what it learned from, and its score on data.validation."""

    round: int
    run: str  # the run directory of the round's model
    metric: str
    score: float
    metrics: dict[str, Any] = field(default_factory=dict)
    judged_model: str | None = None  # rounds >= 1: the model whose outputs were judged (round r-1's)
    judged_version: str | None = None
    pool: list[int] | None = None  # [first, end) of the pool examples judged
    records: int = 0  # feedback records of the judged outputs (one per output and judge)
    good: int = 0
    bad: int = 0
    rows: int = 0  # training rows: round 0's examples, or the rows built from the feedback
    replayed: int = 0  # earlier rows mixed in
    trained: bool = True  # False: no feedback rows, the round keeps the model of round r-1
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Round":
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class LoopResult:
    """The rounds of a loop, oldest first, and where its files are."""

    output_dir: str
    metric: str
    greater_is_better: bool
    rounds: list[Round]

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self.rounds]

    @property
    def improved_every_round(self) -> bool:
        """Each round scored better than the one before it."""
        pairs = zip(self.scores, self.scores[1:])
        return all((b > a) if self.greater_is_better else (b < a) for a, b in pairs)

    def table(self) -> str:
        """The rounds as a Markdown table (report.md's, printed by `tunelab feedback loop`)."""
        rows = ["| round | judged (pool rows) | bad | good | training rows | replayed | "
                f"{self.metric} | change |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        first = self.rounds[0].score if self.rounds else None
        for r in self.rounds:
            pool = "-" if r.pool is None else f"{r.pool[1] - r.pool[0]} ({r.pool[0]}-{r.pool[1] - 1})"
            change = "" if r.round == 0 or first is None else f"{r.score - first:+.4f}"
            rows_cell = f"{r.rows}" if r.trained else "0 (model kept)"
            rows.append(f"| {r.round} | {pool} | {r.bad if r.round else '-'} | {r.good if r.round else '-'} | "
                        f"{rows_cell} | {r.replayed if r.round else '-'} | {r.score:.4f} | {change} |")
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- the loop


def run_loop(config: TrainConfig, *, show_progress: bool = True, log: Callable[[str], None] = print) -> LoopResult:
    """Run (or go on with) the feedback loop of config.feedback.loop; returns every round's score."""
    from tunelab.feedback.build import build_run_data
    from tunelab.feedback.collect import collect_feedback

    loop = config.feedback.loop if config.feedback is not None else None
    if loop is None:
        raise ConfigError("the config has no feedback.loop section: say how many rounds and which pool, e.g. "
                          "feedback: {store: feedback.db, collect: [{type: gold}], loop: {rounds: 3, per_round: 1000}}")
    task = config.task.type
    if task not in COLLECT_TASKS:
        raise ConfigError(f"the feedback loop judges the outputs of {', '.join(COLLECT_TASKS)} models, not task {task}")
    out = Path(config.output_dir)
    metric, greater = loop_metric(config)
    round_config(config, 1, out / "round-0", "unknown")  # a mistake in the rounds' options shows before round 0
    pool, skip = read_pool(config)
    needed = skip + loop.rounds * loop.per_round
    if len(pool) < needed:
        raise DataError(f"{', '.join(pool_paths(config))}: {len(pool)} pool examples; {loop.rounds} rounds of "
                        f"{loop.per_round} after the first {skip} need {needed} (lower feedback.loop.per_round or "
                        f"rounds, or give a larger pool)")
    check_loop_dir(out, config)
    done = read_rounds(out / LOOP_FILE)
    result = LoopResult(str(out), metric, greater, [done[r] for r in sorted(done)])

    if 0 not in done:
        log(f"== round 0: {config.model.name} on {', '.join(config.data.train_paths())}")
        started = time.perf_counter()
        first = config.model_copy(update={"output_dir": str(out / "round-0"),
                                          "feedback": config.feedback.model_copy(update={"loop": None})})
        seeds = write_seed_rows(config, out / SEED_FILE)
        final = _train(first, out / "round-0", show_progress=show_progress, log=log)
        done[0] = Round(0, str(out / "round-0"), metric, _score(final, metric, out / "round-0"), _numbers(final),
                        rows=seeds, seconds=round(time.perf_counter() - started, 1))
        _finish_round(result, done[0], out, config, log)

    for r in range(1, loop.rounds + 1):
        if r in done:
            continue
        previous = done[r - 1]
        run = out / f"round-{r}"
        started = time.perf_counter()
        first_example, end = skip + (r - 1) * loop.per_round, skip + r * loop.per_round
        log(f"== round {r}: judge {previous.run} on pool examples {first_example}-{end - 1}")
        collected = collect_feedback(previous.run, pool[first_example:end], config.feedback.collect,
                                     config.feedback.store, model_name=previous.run, data=pool_data(config),
                                     batch_size=loop.batch_size, progress=show_progress)
        for line in collected.summary().splitlines():
            log(f"  {line}")
        counts = _counts(config.feedback.store, previous.run, collected.model_version)
        entry = Round(r, str(run), metric, previous.score, dict(previous.metrics), previous.run,
                      collected.model_version, [first_example, end], **counts)
        cfg = round_config(config, r, Path(previous.run), collected.model_version)
        finished = (run / "metrics.json").is_file()
        if not finished and not _started(run):
            cfg, report = build_run_data(cfg, directory=run, show_progress=show_progress, log=log)
            entry.rows, entry.replayed = report.rows, report.mixed
        else:
            entry.rows, entry.replayed = _rows_in(run)
        if entry.rows == 0:
            log(f"  no training rows from round {r}'s feedback: the model of round {r - 1} is kept")
            entry.run, entry.trained = previous.run, False
        else:
            final = _train(cfg, run, show_progress=show_progress, log=log)
            entry.score, entry.metrics = _score(final, metric, run), _numbers(final)
        entry.seconds = round(time.perf_counter() - started, 1)
        done[r] = entry
        _finish_round(result, entry, out, config, log)
    return result


def _finish_round(result: LoopResult, entry: Round, out: Path, config: TrainConfig, log: Callable[[str], None]) -> None:
    """Keep the round: a line of loop.jsonl (appended, so a kill loses at most the round at hand), then the report."""
    result.rounds.append(entry)
    with open(out / LOOP_FILE, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")
    write_loop_report(result, config)
    before = result.rounds[0].score
    change = "" if entry.round == 0 else f" ({entry.score - before:+.4f} since round 0)"
    log(f"   round {entry.round}: {entry.metric} {entry.score:.4f}{change}")


def _train(config: TrainConfig, run: Path, *, show_progress: bool, log: Callable[[str], None]) -> dict:
    """Train a round's run: read back a finished one, resume a started one, else start it."""
    from tunelab.train.run import resume_config, train

    if (run / "metrics.json").is_file():
        log(f"  {run} has finished already")
        return json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    if _started(run):
        log(f"  resuming {run}")
        return train(resume_config(run), resume=True, show_progress=show_progress, log=log)
    return train(config, show_progress=show_progress, log=log)


def _started(run: Path) -> bool:
    return any(run.glob("checkpoint-*")) or (run / "metrics.jsonl").exists()


def _score(final: dict, metric: str, run: Path) -> float:
    value = final.get(metric)
    if not isinstance(value, (int, float)):
        found = ", ".join(k for k, v in final.items() if isinstance(v, (int, float)))
        raise FeedbackError(f"{run}: its evaluation has no {metric} (it has {found}); set train.metric")
    return float(value)


def _numbers(final: dict) -> dict[str, float]:
    return {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _rows_in(run: Path) -> tuple[int, int]:
    """(feedback rows, replayed rows) of a round whose rows were built before (a resumed round)."""
    from tunelab.train.run import FEEDBACK_DATA_FILE, MIX_DATA_FILE

    def lines(path: Path) -> int:
        return sum(1 for line in open(path, encoding="utf-8") if line.strip()) if path.is_file() else 0

    return lines(run / FEEDBACK_DATA_FILE), lines(run / MIX_DATA_FILE)


def _counts(store_location: str, model: str, version: str) -> dict[str, int]:
    """The records of a model version in the store: all of them, the good and the bad ones."""
    from tunelab.feedback.store import FeedbackStore

    with FeedbackStore(store_location, create=False) as store:
        return {"records": store.count(model=model, model_version=version),
                "good": store.count(model=model, model_version=version, verdict="good"),
                "bad": store.count(model=model, model_version=version, verdict="bad")}


# ---------------------------------------------------------------------------------------------- configs and data


def loop_metric(config: TrainConfig) -> tuple[str, bool]:
    """The metric the rounds are compared by, and whether higher is better: train.metric, else the task's own."""
    name = config.train.metric
    if name is None:
        metrics = config.task.metrics
        name = METRIC_OF_TASK.get(config.task.type) or (GENERATION_METRIC_KEYS[metrics[0]] if metrics else "loss")
    greater = config.train.greater_is_better
    if greater is None:
        greater = not name.endswith(("loss", "perplexity"))
    return name, greater


def pool_paths(config: TrainConfig) -> list[str]:
    pool = config.feedback.loop.pool
    if pool is None:
        return config.data.train_paths()
    return [pool] if isinstance(pool, str) else list(pool)


def pool_data(config: TrainConfig) -> DataSection:
    """The data options the pool is read with: the config's own fields, the pool's files."""
    raw = config.data.model_dump(mode="json")
    raw.update(train=pool_paths(config), validation=None, max_train_examples=None, feedback=None)
    return validate(DataSection, raw, f"{config.output_dir}: the pool's data options")


def read_pool(config: TrainConfig) -> tuple[list[Example], int]:
    """The pool's examples (each with its gold answer where a judge needs it) and how many lead ones are skipped."""
    loop = config.feedback.loop
    paths = pool_paths(config)
    resolved = lambda files: [str(Path(p).resolve()) for p in files]  # noqa: E731
    same_as_train = resolved(paths) == resolved(config.data.train_paths())
    skip = loop.pool_skip
    if skip is None:
        if same_as_train and config.data.max_train_examples is None:
            raise ConfigError("feedback.loop.pool is data.train, all of which round 0 trains on: set "
                              "data.max_train_examples (round 0 trains on the first N rows, the pool starts after "
                              "them) or give another feedback.loop.pool")
        skip = config.data.max_train_examples if same_as_train else 0
    need_reference = any(judge.type == "gold" for judge in config.feedback.collect)
    examples = read_examples(paths, config.task.type, data=pool_data(config), labels=config.task.labels,
                             need_reference=need_reference)
    return examples, skip


def write_seed_rows(config: TrainConfig, path: Path) -> int:
    """Round 0's training examples as rows like the feedback rows (for replay): data.train's first
    data.max_train_examples examples, as the trainer takes them."""
    from tunelab.config.schema import FeedbackDataSection
    from tunelab.feedback.build import mix_rows, write_rows

    kind = DEFAULT_BUILD[config.task.type]["build"]
    reading = config.model_copy(update={"data": config.data.model_copy(update={
        "feedback": FeedbackDataSection(build=kind, mix_with=config.data.train_paths())})})
    rows = mix_rows(reading, 0)
    if config.data.max_train_examples is not None:
        rows = rows[: config.data.max_train_examples]
    write_rows(rows, path)
    return len(rows)


def round_config(config: TrainConfig, r: int, previous: Path, version: str) -> TrainConfig:
    """The training config of round r >= 1: rows built from the judgements of `previous` (its `version`), the
    replayed rows, the start weights and feedback.loop.train's options."""
    from tunelab.train.run import FEEDBACK_DATA_FILE

    loop, out = config.feedback.loop, Path(config.output_dir)
    raw = config.model_dump(mode="json")
    raw["output_dir"] = str(out / f"round-{r}")
    raw["feedback"]["loop"] = None
    if loop.build is not None:
        build = loop.build.model_dump(mode="json", exclude_none=True)
    else:
        build = dict(DEFAULT_BUILD[config.task.type])
    build.update(model=str(previous), model_version=version)
    if loop.replay:
        earlier = [out / f"round-{k}" / FEEDBACK_DATA_FILE for k in range(1, r)]
        build["mix_with"] = [str(out / SEED_FILE)] + [str(p) for p in earlier if _has_rows(p)]
        if loop.replay_ratio is not None:
            build["mix_ratio"] = loop.replay_ratio
    raw["data"].update(train=None, feedback=build, format="auto", max_train_examples=None)
    if loop.start_from == "previous":
        raw["model"].update(source=str(previous), architecture=None, tokenizer=None, train_tokenizer=None,
                            target_tokenizer=None, warm_start=None)
    raw["train"].update(loop.train)
    raw["train"]["eval_at_start"] = False
    return validate(TrainConfig, raw, f"{config.output_dir}: round {r}'s config (from feedback.loop)")


def _has_rows(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


# ---------------------------------------------------------------------------------------------- files


def check_loop_dir(out: Path, config: TrainConfig) -> None:
    """Keep the loop's config in output_dir; a later run must have the same one, except for feedback.loop.rounds."""
    path = out / LOOP_CONFIG_FILE
    if not path.is_file():
        if out.exists() and any(out.iterdir()) and not (out / LOOP_FILE).exists():
            raise FeedbackError(f"{out}: output_dir holds other files; the loop needs a new directory")
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, path)
        return
    kept = validate(TrainConfig, read_yaml(path), str(path)).model_dump(mode="json")
    given = config.model_dump(mode="json")
    changed = [key for key in _changed_keys(kept, given) if key not in FREE_KEYS]
    if changed:
        raise FeedbackError(f"{out} holds a loop of another config ({', '.join(changed[:5])} changed; only "
                            f"{' and '.join(FREE_KEYS)} may change): choose another output_dir")
    dump_config(config, path)


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def read_rounds(path: Path) -> dict[int, Round]:
    """The finished rounds of loop.jsonl, by number (a later line of the same round wins)."""
    rounds: dict[int, Round] = {}
    if not path.is_file():
        return rounds
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = Round.from_dict(json.loads(line))
        except (json.JSONDecodeError, TypeError) as err:
            raise FeedbackError(f"{path}, line {number}: not a round of the loop ({err})") from None
        rounds[entry.round] = entry
    return rounds


def write_loop_report(result: LoopResult, config: TrainConfig) -> Path:
    """report.md (the table of rounds, the plot, what each round did) and loop.png in output_dir."""
    from tunelab.evaluate.plots import plot_rounds
    from tunelab.evaluate.report import write_text_atomic

    out = Path(result.output_dir)
    loop = config.feedback.loop
    validation = ", ".join(config.data.validation_paths())
    if len(result.rounds) > 1:
        plot_rounds([r.round for r in result.rounds], result.scores, metric=result.metric, split="validation",
                    title=f"feedback loop: {result.metric} on {validation}", path=out / PLOT_FILE)
    judges = ", ".join(judge.type + (f" {judge.function or judge.model}" if judge.function or judge.model else "")
                       for judge in config.feedback.collect)
    lines = [f"# Feedback loop: {out}", "",
             f"- model: {config.model.name}, task {config.task.type}, method {config.method.type}; rounds start from "
             f"{'the last round' if loop.start_from == 'previous' else 'model.source'}",
             f"- round 0 trained on {', '.join(config.data.train_paths())}"
             + (f" (first {config.data.max_train_examples} examples)" if config.data.max_train_examples else ""),
             f"- pool: {', '.join(pool_paths(config))}, {loop.per_round} examples a round; judges: {judges}; "
             f"store: {config.feedback.store}",
             f"- scored by {result.metric} on {validation}"
             + (f" (first {config.data.max_validation_examples})" if config.data.max_validation_examples else ""),
             "", result.table(), ""]
    if (out / PLOT_FILE).is_file():
        lines += [f"![{result.metric} by round]({PLOT_FILE})", ""]
    for r in result.rounds:
        took = f"{r.seconds / 60:.1f} min"
        if r.round == 0:
            lines.append(f"- round 0: {r.run}, {took}")
        else:
            lines.append(f"- round {r.round}: {r.records} records on {r.judged_model} ({r.judged_version}); "
                         f"{'trained ' + r.run if r.trained else 'nothing to train on'}, {took}")
    write_text_atomic(out / REPORT_FILE, "\n".join(lines) + "\n")
    return out / REPORT_FILE
