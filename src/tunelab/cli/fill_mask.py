"""tunelab fill-mask: the most likely tokens for each mask token, with their probabilities."""

from __future__ import annotations

import argparse
import json

from tunelab.cli.common import add_model_argument, load_model
from tunelab.errors import TunelabError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fill-mask", help="predict masked tokens", description=__doc__)
    add_model_argument(p)
    p.add_argument("text", help='text with the tokenizer\'s mask token, e.g. "Paris is the [MASK] of France."')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.generate.encoders import fill_mask

    model, tokenizer = load_model(args)
    try:
        results = fill_mask(model, tokenizer, args.text, top_k=args.top_k)
    except (TypeError, ValueError) as e:
        raise TunelabError(f"{args.model}: {e}") from None
    if args.json:
        print(json.dumps([[vars(p) for p in preds] for preds in results], ensure_ascii=False))
        return 0
    for i, preds in enumerate(results):
        if len(results) > 1:
            print(f"mask {i + 1}:")
        width = max(len(p.token) for p in preds)
        for p in preds:
            print(f"  {p.token:<{width}}  {p.probability:.4f}  {p.sequence}")
    return 0
