"""Options and helpers shared by subcommands."""

from __future__ import annotations

import argparse


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", required=True, help="registered name (see `tunelab models`), HF directory or GGUF file"
    )
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")


def load_model(args: argparse.Namespace):
    from tunelab.checkpoint.load import load

    return load(args.model, dtype=args.dtype)
