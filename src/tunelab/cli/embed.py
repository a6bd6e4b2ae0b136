"""tunelab embed: sentence embeddings (mean-pooled, L2-normalised) as a JSON list of vectors."""

from __future__ import annotations

import argparse
import json
import sys

from tunelab.cli.common import add_model_argument, load_model


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("embed", help="sentence embeddings as JSON", description=__doc__)
    add_model_argument(p)
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed ('-' reads one text per line from stdin)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-normalize", action="store_true", help="skip the L2 normalisation")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.generate.encoders import embed

    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts
    model, tokenizer = load_model(args)
    vectors = embed(model, tokenizer, texts, batch_size=args.batch_size, normalize=not args.no_normalize)
    json.dump([[round(x, 7) for x in row] for row in vectors.tolist()], sys.stdout)
    sys.stdout.write("\n")
    return 0
