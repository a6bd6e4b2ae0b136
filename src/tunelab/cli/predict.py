"""tunelab predict: write a run's or model's predictions for a data file as JSON lines."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="write predictions for a data file", description=__doc__)
    p.add_argument("source", metavar="RUN_OR_MODEL")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data options, e.g. data.text_field=sentence")
    p.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="input file (same formats as training; labels not needed; parallel text: the source file)")
    p.add_argument("--out", required=True, help="output .jsonl, one prediction per input example")
    p.add_argument("--task", choices=["classification", "tagging", "qa", "seq2seq"])
    p.add_argument("--batch-size", type=int)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.evaluate.runner import predict_source

    count = predict_source(args.source, args.data, args.out, task=args.task, overrides=args.overrides,
                           batch_size=args.batch_size)
    print(f"wrote {count} predictions to {args.out}")
    return 0
