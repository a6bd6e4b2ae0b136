"""tunelab plan: what a training config will do (data, steps, parameters, memory, time), before it trains."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="pre-flight check of a training config", description=__doc__)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.train.plan import format_plan, make_plan
    from tunelab.train.run import load_train_config

    config = load_train_config(args.config, args.overrides)
    if config.data.feedback is not None:
        plan = _plan_on_feedback(config, quiet=args.json)
    else:
        plan = make_plan(config)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _plan_on_feedback(config, *, quiet: bool):
    """The plan of a run on rows built from the feedback store: built into a temporary directory (a plan writes
    nothing to output_dir, and refines nothing)."""
    import sys
    import tempfile

    from tunelab.feedback.build import build_run_data
    from tunelab.train.plan import make_plan

    log = (lambda line: print(line, file=sys.stderr)) if quiet else print
    with tempfile.TemporaryDirectory(prefix="tunelab-plan-") as directory:
        config, _ = build_run_data(config, directory=directory, refine=False, show_progress=False, log=log)
        return make_plan(config.model_copy(update={"output_dir": directory}))
