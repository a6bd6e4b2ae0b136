"""tunelab feedback import | export | stats | review | build | collect | loop: the feedback store from the command
line, and the loop that learns from it."""

from __future__ import annotations

import argparse
import json
import sys

from tunelab.errors import FeedbackError

STORE_HELP = "the feedback store: an SQLite file or sqlite:///path URL (default: feedback.store of --config, " \
             "else feedback.db here)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("feedback", help="the feedback store (import, export, stats, review, build, collect) "
                              "and the feedback loop",
                              description=__doc__)
    commands = p.add_subparsers(dest="feedback_command", metavar="SUBCOMMAND")

    i = commands.add_parser(
        "import", help="add feedback records from jsonl / json / csv / tsv files",
        description="Add the records of feedback files to the store (created if new). All files are checked "
                    "first and stored in one transaction: with one bad record nothing is stored, and every bad "
                    "record is listed with its file, line and field.")
    i.add_argument("files", nargs="+", metavar="FILE")
    i.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "csv", "tsv"],
                   help="file format (default: from the extension)")
    _add_store(i)
    i.set_defaults(run=run_import)

    e = commands.add_parser("export", help="write records as JSON lines",
                            description="Write the records that pass the filters as JSON lines, every field.")
    e.add_argument("--out", "-o", default="-", metavar="FILE", help="output file (default: standard output)")
    _add_store(e)
    _add_filters(e)
    e.set_defaults(run=run_export)

    s = commands.add_parser("stats", help="counts by verdict, source, task and model",
                            description="Counts of the records that pass the filters.")
    s.add_argument("--json", action="store_true", help="print JSON")
    _add_store(s)
    _add_filters(s)
    s.set_defaults(run=run_stats)

    r = commands.add_parser(
        "review", help="judge model outputs in the terminal",
        description="Show each record without a person's verdict, or with a bad one and no correction (oldest "
                    "first; a bad one stays in the queue until it has a correction), and ask: a accept (good), r reject (bad), c write a critique, e write a correction "
                    "(the verdict becomes bad), s skip, q quit. Texts end with an empty line. Every answer is "
                    "saved at once.")
    r.add_argument("--limit", type=int, metavar="N", help="review at most N records")
    r.add_argument("--unjudged", action="store_true", help="only records without a person's verdict (not the "
                   "bad ones that still lack a correction)")
    _add_store(r)
    _add_filters(r, verdict=False)
    r.set_defaults(run=run_review)
    _add_build_parser(commands)

    from tunelab.cli.feedback_collect import add_collect_parser

    add_collect_parser(commands)

    from tunelab.cli.feedback_loop import add_loop_parser

    add_loop_parser(commands)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="PATH", help=STORE_HELP)
    parser.add_argument("--config", metavar="CONFIG", help="a training config whose feedback.store is the store")


def _add_filters(parser: argparse.ArgumentParser, *, verdict: bool = True) -> None:
    f = parser.add_argument_group("filters")
    f.add_argument("--model", help="records of this model")
    f.add_argument("--model-version", help="records of this model version")
    f.add_argument("--source", action="append", choices=["person", "rule", "reward_model", "gold", "judge"],
                   help="records from this source (repeatable)")
    if verdict:
        f.add_argument("--verdict", choices=["good", "bad", "none"], help="records with this verdict (none: "
                       "scored only)")
    f.add_argument("--task", help="records of this task")
    f.add_argument("--since", metavar="TIME", help="created at or after TIME: 2025-01-31, 2025-01-31T09:00, or an "
                   "age: 30m, 24h, 7d")
    f.add_argument("--until", metavar="TIME", help="created before TIME")
    f.add_argument("--with-correction", dest="has_correction", action="store_const", const=True,
                   help="records with a correction")
    f.add_argument("--with-critique", dest="has_critique", action="store_const", const=True,
                   help="records with a critique")


def _filters(args: argparse.Namespace) -> dict:
    names = ("model", "model_version", "source", "verdict", "task", "since", "until", "has_correction",
             "has_critique")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _store_location(args: argparse.Namespace) -> str:
    from tunelab.feedback import DEFAULT_STORE

    if args.store:
        return args.store
    if args.config:
        from tunelab.config.loading import load_config
        from tunelab.config.schema import TrainConfig

        config = load_config(TrainConfig, args.config)
        if config.feedback is None:
            raise FeedbackError(f"{args.config}: no feedback section (feedback: {{store: PATH}}); or give --store")
        return config.feedback.store
    return DEFAULT_STORE


def _open(args: argparse.Namespace, *, create: bool = False):
    from tunelab.feedback import FeedbackStore

    return FeedbackStore(_store_location(args), create=create)


def run_import(args: argparse.Namespace) -> int:
    from tunelab.feedback import read_feedback_file

    records = []
    for path in args.files:
        records += [(path, record) for record in read_feedback_file(path, args.format)]
    with _open(args, create=True) as store:
        store.add_many(record for _, record in records)
        total = store.count()
    files = args.files[0] if len(args.files) == 1 else f"{len(args.files)} files"
    print(f"imported {len(records)} record{'s' * (len(records) != 1)} from {files} into {store.path} "
          f"({total} in the store)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    with _open(args) as store:
        count = store.export(sys.stdout if args.out == "-" else args.out, **_filters(args))
    if args.out != "-":
        print(f"exported {count} record{'s' * (count != 1)} to {args.out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    with _open(args) as store:
        stats = store.stats(**_filters(args))
        stats = {"store": store.path, "schema_version": store.schema_version, **stats}
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        print(format_stats(stats, filtered=bool(_filters(args))))
    return 0


def format_stats(stats: dict, *, filtered: bool = False) -> str:
    """The text of `tunelab feedback stats`."""
    total = stats["records"]
    head = (f"{stats['store']}: {total} record{'s' * (total != 1)}{' (filtered)' * filtered}, "
            f"schema v{stats['schema_version']}")
    if total == 0:
        return head
    lines = [f"{head}, created {stats['first'][:16].replace('T', ' ')} to {stats['last'][:16].replace('T', ' ')} UTC"]

    def share(counts: dict) -> str:
        return ", ".join(f"{name} {n} ({100 * n / total:.1f}%)" for name, n in counts.items() if n)

    score = stats["score"]
    lines += [f"  verdicts     {share(stats['verdict'])}",
              f"  sources      {share(stats['source'])}",
              f"  tasks        {share(stats['task'])}"]
    if score["count"]:
        lines.append(f"  scores       {score['count']} scored, mean {score['mean']:.3f} "
                     f"(min {score['min']:g}, max {score['max']:g})")
    lines.append(f"  critiques    {stats['critiques']}")
    lines.append(f"  corrections  {stats['corrections']}")
    rows = [(m["model"], m["model_version"] or "-", str(m["records"]), str(m["good"]), str(m["bad"]),
             f"{m['mean_score']:.3f}" if m["mean_score"] is not None else "-") for m in stats["models"]]
    header = ("model", "version", "records", "good", "bad", "mean score")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for row in [header, *rows]:
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def run_review(args: argparse.Namespace) -> int:
    from tunelab.feedback.review import review

    if args.limit is not None and args.limit < 1:
        raise FeedbackError("--limit must be at least 1")

    echo = not sys.stdin.isatty()  # answers piped in are shown, so that the transcript reads as in a terminal

    def read_line(prompt: str) -> str | None:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return None
        if echo:
            print(line)
        return line

    def write(text: str) -> None:
        print(text, end="", flush=True)

    with _open(args) as store:
        summary, waiting = review(store, read_line, write, limit=args.limit, unjudged_only=args.unjudged,
                                  **_filters(args))
        if not waiting:
            print(f"nothing to review in {store.path}: each of its {store.count()} records has a person's verdict "
                  f"(and a correction if bad)" + (" among those the filters select" * bool(_filters(args))))
            return 0
    print(summary.line(waiting))
    return 0


# ---------------------------------------------------------------------------------------------- build

BUILD_KINDS = ("corrections", "relabel", "pairs", "unpaired", "refine")
ROW_TASKS = ("chat", "seq2seq", "classification", "tagging", "preference", "reward_model", "kto")


def _add_build_parser(commands) -> None:
    b = commands.add_parser(
        "build", help="turn records into training rows (corrections, relabel, pairs, unpaired, refine)",
        description="Build training rows from the records that pass the filters: corrections (chat SFT rows: the "
                    "input and the correction as the answer), relabel (classification / tagging rows with the "
                    "corrected labels), pairs (prompt / chosen / rejected), unpaired (KTO: prompt / completion / "
                    "label), refine (a model rewrites each bad output from its critique; the refinements are stored "
                    "as corrections, then rows as for corrections). With --config, the store, the task, the field "
                    "names and the config's data.feedback options are the defaults.")
    b.add_argument("kind", choices=BUILD_KINDS, metavar="KIND", help=f"one of {', '.join(BUILD_KINDS)}")
    b.add_argument("--out", "-o", required=True, metavar="FILE", help="the rows as JSON lines ('-': standard output)")
    b.add_argument("--for", dest="task_type", choices=ROW_TASKS, metavar="TASK",
                   help="the training task the rows are for (default: chat for corrections and refine, the records' "
                        "task for relabel, preference for pairs, kto for unpaired; with --config its task.type)")
    _add_store(b)
    _add_filters(b)
    o = b.add_argument_group("rows")
    o.add_argument("--include-good", action=argparse.BooleanOptionalAction, default=None,
                   help="train on good outputs as they are (default: yes for relabel, no otherwise)")
    o.add_argument("--use-reference", action=argparse.BooleanOptionalAction, default=None,
                   help="a bad record without a correction takes its reference (default: yes for relabel)")
    o.add_argument("--labels", metavar="A,B,...", help="relabel: the label names; another one is an error")
    o.add_argument("--min-margin", type=float, metavar="X", help="pairs from scores: differ by more than X (0)")
    o.add_argument("--max-pairs-per-input", type=int, metavar="N", help="pairs: at most N of one input")
    o.add_argument("--threshold", type=float, metavar="T", help="unpaired: a score without a verdict of at least "
                   "T is desirable")
    o.add_argument("--no-corrections", dest="include_corrections", action="store_false", default=None,
                   help="unpaired: corrections are not added as desirable answers")
    f = b.add_argument_group("refine")
    f.add_argument("--refine-model", metavar="MODEL", help="the model that refines (default: with --config its "
                   "model.source, else each record's own model)")
    f.add_argument("--refine-prompt", metavar="FILE", help="a prompt template with {input}, {output}, {critique} "
                   "(and {reference})")
    f.add_argument("--max-new-tokens", type=int, metavar="N", help="longest refinement (256)")
    f.add_argument("--batch-size", type=int, metavar="N", help="prompts decoded at once (8)")
    f.add_argument("--keep-truncated", action="store_true", default=None, help="keep refinements cut off at "
                   "--max-new-tokens")
    f.add_argument("--verifier", metavar="MODULE:FUNCTION", help="keep only refinements this verifier passes")
    f.add_argument("--min-score", type=float, metavar="X", help="verifier with scores only: the least that passes "
                   "(0.5)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(run=run_build)


def _build_options(args: argparse.Namespace) -> dict:
    """build_training_data's keyword arguments: the config's (with --config), then the options given."""
    from dataclasses import replace
    from pathlib import Path

    from tunelab.feedback.build import RefineSettings, RowFields, build_options

    options: dict = {}
    config = None
    if args.config:
        from tunelab.config.loading import load_config
        from tunelab.config.schema import TrainConfig

        config = load_config(TrainConfig, args.config)
        if config.data.feedback is not None and config.data.feedback.build == args.kind:
            options = build_options(config)
        else:
            options = {"task_type": config.task.type, "fields": RowFields.of(config.data)}
        if config.task.labels is not None:
            options["labels"] = config.task.labels
    options.update(_filters(args))
    given = {"task_type": args.task_type, "include_good": args.include_good, "use_reference": args.use_reference,
             "min_margin": args.min_margin, "max_pairs_per_input": args.max_pairs_per_input,
             "threshold": args.threshold, "include_corrections": args.include_corrections,
             "labels": [name.strip() for name in args.labels.split(",") if name.strip()] if args.labels else None}
    options.update({key: value for key, value in given.items() if value is not None})
    if args.kind == "refine":
        settings = options.get("refine") or RefineSettings(model=config.model.source if config else None)
        prompt = None
        if args.refine_prompt:
            try:
                prompt = Path(args.refine_prompt).read_text(encoding="utf-8")
            except OSError as err:
                raise FeedbackError(f"{args.refine_prompt}: cannot read the refine prompt: {err.strerror or err}") \
                    from None
        changes = {"model": args.refine_model, "prompt": prompt, "max_new_tokens": args.max_new_tokens,
                   "batch_size": args.batch_size, "keep_truncated": args.keep_truncated, "verifier": args.verifier,
                   "min_score": args.min_score}
        options["refine"] = replace(settings, show_progress=not args.no_progress,
                                    **{key: value for key, value in changes.items() if value is not None})
    return options


def run_build(args: argparse.Namespace) -> int:
    from tunelab.feedback.build import build_training_data

    options = _build_options(args)
    to_stdout = args.out == "-"
    report = (lambda line: print(line, file=sys.stderr)) if to_stdout else print
    with _open(args) as store:
        result = build_training_data(store, args.kind, log=report, **options)
    if to_stdout:
        for row in result.rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        result.write(args.out)
    for line in result.report.lines():
        report(line)
    if not to_stdout:
        print(f"wrote {len(result.rows)} row{'s' * (len(result.rows) != 1)} to {args.out}")
    return 0
