"""tunelab feedback loop: rounds of predict, collect feedback, build training data, train and evaluate."""

from __future__ import annotations

import argparse

DESCRIPTION = """Round 0 trains the config as it is. Each further round runs the last round's model over the next
feedback.loop.per_round examples of the pool, judges every output with the judges of feedback.collect (into
feedback.store), builds training rows from the judgements (feedback.loop.build; by default the bad outputs with
their gold answers, with round 0's examples and earlier rows replayed), trains the next model and scores it on
data.validation. Writes OUTPUT_DIR/round-N/ (runs), loop.jsonl, report.md and loop.png. Run it again to go on
after a kill, or with feedback.loop.rounds=N to add rounds."""


def add_loop_parser(commands) -> None:
    """The `loop` subcommand of `tunelab feedback`."""
    c = commands.add_parser("loop", help="rounds of collect feedback, train on it, evaluate", description=DESCRIPTION)
    c.add_argument("config", metavar="CONFIG", help="a training config with feedback.store, feedback.collect and "
                   "feedback.loop")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. feedback.loop.rounds=5")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(run=run_loop_command)


def run_loop_command(args: argparse.Namespace) -> int:
    from tunelab.feedback.loop import REPORT_FILE, run_loop
    from tunelab.train.run import load_train_config

    config = load_train_config(args.config, args.overrides)
    if config.train.num_threads:
        import torch

        torch.set_num_threads(config.train.num_threads)
    result = run_loop(config, show_progress=not args.no_progress)
    print(result.table())
    verdict = "rose every round" if result.improved_every_round else "did not improve every round"
    print(f"{result.metric} {verdict}; report: {result.output_dir}/{REPORT_FILE}")
    return 0
