"""tunelab generate: continue a prompt (or answer it as a chat turn), streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

from tunelab.cli.common import add_model_argument, load_model
from tunelab.errors import TunelabError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with a decoder model", description=__doc__)
    add_model_argument(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt text ('-' reads standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--stop", action="append", default=[], help=r"stop string (repeatable; \n and \t are read as newline and tab)"
    )
    p.set_defaults(run=run)


def unescape(text: str) -> str:
    """Shell-friendly stop strings: --stop '\\n\\n' means two newlines."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def run(args: argparse.Namespace) -> int:
    from tunelab.generate.decode import Generation, GenerationSettings, encode_prompt

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=[unescape(s) for s in args.stop],
        )
    except ValueError as e:
        raise TunelabError(str(e)) from None
    model, tokenizer = load_model(args)
    if not model.is_decoder:
        raise TunelabError(f"{args.model} is an encoder ({model.config.model_type}); generate needs a decoder model")
    try:
        ids = encode_prompt(tokenizer, prompt, chat=args.chat, system=args.system)
        for pieces in Generation(model, tokenizer, [ids], settings):
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
    except ValueError as e:
        raise TunelabError(str(e)) from None
    sys.stdout.write("\n")
    return 0
