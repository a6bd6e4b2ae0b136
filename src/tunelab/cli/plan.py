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

    plan = make_plan(load_train_config(args.config, args.overrides))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
