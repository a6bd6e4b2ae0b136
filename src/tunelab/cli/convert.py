"""tunelab convert: write any loadable model (HF directory, GGUF file, registered name) as an HF directory."""

from __future__ import annotations

import argparse

from tunelab.errors import TunelabError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a model to a Hugging Face directory", description=__doc__)
    p.add_argument("source", help="registered name, HF directory or GGUF file")
    p.add_argument("out_dir", help="output directory (created)")
    p.add_argument("--dtype", default=None, help="weights dtype to write: float32 (default), bfloat16, float16")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunelab.checkpoint.load import load, save_pretrained

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"{out}: output directory exists and is not empty")
    model, tokenizer = load(args.source)
    save_pretrained(model, tokenizer, out, dtype=args.dtype)
    params = model.num_parameters()
    print(f"wrote {out} ({model.config.model_type}, {params / 1e6:.1f}M parameters, heads: {', '.join(model.heads) or 'none'})")
    return 0
