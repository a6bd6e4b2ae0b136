"""tunelab train: fine-tune a model as a YAML config says, or resume a run where it stopped."""

from __future__ import annotations

import argparse
import json
import os

from tunelab.errors import TunelabError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from a YAML config", description=__doc__,
        epilog="example: tunelab train configs/sst2-minilm.yaml train.lr=3e-5 output_dir=runs/try2",
    )
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=2")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.train.run import load_train_config, resume_config, train

    if args.resume:
        if args.config:
            raise TunelabError("give either a config or --resume RUN_DIR, not both")
        config = resume_config(args.resume)
        final = train(config, resume=True, show_progress=not args.no_progress)
    else:
        if not args.config:
            raise TunelabError("give a config file (tunelab train CONFIG.yaml) or --resume RUN_DIR")
        config = load_train_config(args.config, args.overrides)
        if config.data.feedback is not None:  # rows built from the feedback store into the run directory first
            from tunelab.feedback.build import build_run_data

            config, _ = build_run_data(config, show_progress=not args.no_progress)
        final = train(config, show_progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    shown = {k: v for k, v in final.items() if isinstance(v, (int, float))}
    print(json.dumps(shown, indent=2))
    print(f"run directory: {config.output_dir}")
    return 0
