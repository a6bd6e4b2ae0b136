"""tunelab export: write a model as a merged Hugging Face directory, a PEFT adapter or a GGUF file."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a model: merged HF directory, PEFT adapter or GGUF file", description=__doc__
    )
    p.add_argument("model", help="run directory, HF directory, GGUF file or registered name")
    p.add_argument("--format", required=True, choices=("hf", "peft", "gguf"),
                   help="hf: merged HF directory; peft: the LoRA/DoRA adapter; gguf: a llama.cpp file")
    p.add_argument("--out", required=True, help="output directory (hf, peft) or file (gguf); must not exist yet")
    p.add_argument("--quant", default=None, choices=("f32", "f16", "bf16", "q8_0"),
                   help="weights: hf f32/f16/bf16 (default: as loaded); gguf f32/f16/bf16/q8_0 (default f16)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.export import export_model

    result = export_model(args.model, args.format, args.out, quant=args.quant)
    kind = result.format + (f" {result.quant}" if result.quant else "")
    print(f"wrote {result.path} ({kind}, {result.model_type}, {result.parameters / 1e6:.1f}M parameters, "
          f"{result.bytes / 1e6:.1f} MB) in {result.seconds:.1f} s")
    return 0
