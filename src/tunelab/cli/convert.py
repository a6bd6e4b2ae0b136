"""tunelab convert: write any loadable model as an HF directory (the same as `tunelab export --format hf`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a model to a Hugging Face directory (= export --format hf)",
                              description=__doc__)
    p.add_argument("source", help="registered name, HF directory, GGUF file or run directory")
    p.add_argument("out_dir", help="output directory (created)")
    p.add_argument("--dtype", default=None, help="weights dtype to write: float32 (default), bfloat16, float16")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.checkpoint.load import parse_dtype
    from tunelab.export import export_hf
    from tunelab.export.files import check_new_output
    from tunelab.train.run import load_any

    out = check_new_output(args.out_dir)
    dtype = parse_dtype(args.dtype)
    model, tokenizer = load_any(args.source)
    export_hf(model, tokenizer, out, dtype=dtype)
    params = model.num_parameters()
    print(f"wrote {out} ({model.config.model_type}, {params / 1e6:.1f}M parameters, heads: {', '.join(model.heads) or 'none'})")
    return 0
