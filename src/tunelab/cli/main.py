"""`tunelab` and its subcommands. Each subcommand module has add_parser(subparsers) and run(args)."""

from __future__ import annotations

import argparse
import os
import sys

from tunelab import __version__
from tunelab.errors import TunelabError

SUBCOMMANDS = ("train", "plan", "eval", "predict", "generate", "embed", "fill_mask", "convert", "export", "models",
               "tokenizer", "feedback", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune language models, from raw data to a deployed model.",
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from importlib import import_module

    for name in SUBCOMMANDS:
        import_module(f"tunelab.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may come after options (tunelab eval RUN --data F data.text_field=x)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except TunelabError as e:
        print(f"tunelab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: exit quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
