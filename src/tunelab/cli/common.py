"""Options and helpers shared by subcommands."""

from __future__ import annotations

import argparse


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", required=True,
        help="registered name (see `tunelab models`), HF directory, GGUF file or a tunelab run directory",
    )
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")


def load_model(args: argparse.Namespace):
    """The model and tokenizer of --model (a run directory gives its final model)."""
    from tunelab.train.run import load_any

    return load_any(args.model, dtype=args.dtype)
