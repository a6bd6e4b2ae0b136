"""tunelab generate: continue a prompt (or answer it as a chat turn), streamed to the terminal; with an
encoder-decoder (a seq2seq run or model), translate or summarize the prompt with beam search."""

from __future__ import annotations

import argparse
import sys

from tunelab.errors import TunelabError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with a decoder or encoder-decoder model",
                              description=__doc__)
    p.add_argument(
        "--model", "-m", required=True,
        help="registered name (see `tunelab models`), HF directory, GGUF file or a run directory",
    )
    p.add_argument("--dtype", default="auto",
                   help="auto (default: bfloat16 when the checkpoint is stored in 16 bits or fewer and this CPU "
                        "computes bf16 natively, else float32), float32, bfloat16 or float16")
    p.add_argument("--prompt", "-p", required=True,
                   help="the prompt text ('-' reads standard input; for an encoder-decoder, one source per line)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 256 (an encoder-decoder: its generation_config.json, else 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--stop", action="append", default=[], help=r"stop string (repeatable; \n and \t are read as newline and tab)"
    )
    p.add_argument("--beam-size", type=int, default=None,
                   help="beam search with this many beams (an encoder-decoder: default from its generation_config.json, "
                   "else 4; a decoder: default 1, sampling or greedy)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="beam search: GNMT's alpha (default from generation_config.json, else 0.6)")
    p.set_defaults(run=run)


def unescape(text: str) -> str:
    """Shell-friendly stop strings: --stop '\\n\\n' means two newlines."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def run(args: argparse.Namespace) -> int:
    from tunelab.generate.decode import Generation, GenerationSettings, encode_prompt
    from tunelab.train.run import load_any

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else 256,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=[unescape(s) for s in args.stop],
        )
    except ValueError as e:
        raise TunelabError(str(e)) from None
    model, tokenizer = load_any(args.model, dtype=args.dtype)
    if model.is_encoder_decoder:
        return _seq2seq(args, model, tokenizer, prompt)
    if not model.is_decoder:
        raise TunelabError(f"{args.model} is an encoder ({model.config.model_type}); generate needs a decoder model")
    try:
        ids = encode_prompt(tokenizer, prompt, chat=args.chat, system=args.system)
        if args.beam_size and args.beam_size > 1:
            from tunelab.generate.beam import BeamSettings, beam_search
            from tunelab.generate.decode import eos_ids

            beam = BeamSettings(beam_size=args.beam_size, max_new_tokens=settings.max_new_tokens,
                                length_penalty=0.6 if args.length_penalty is None else args.length_penalty)
            best = beam_search(model, [ids], beam, eos_token_ids=eos_ids(model, tokenizer))[0]
            sys.stdout.write(tokenizer.decode(best.token_ids, skip_special_tokens=True))
        else:
            for pieces in Generation(model, tokenizer, [ids], settings):
                sys.stdout.write(pieces[0])
                sys.stdout.flush()
    except ValueError as e:
        raise TunelabError(str(e)) from None
    sys.stdout.write("\n")
    return 0


def _seq2seq(args: argparse.Namespace, model, tokenizer, prompt: str) -> int:
    """Each source (the prompt, or each line of standard input) decoded with beam search, one output per line."""
    from tunelab.generate.beam import BeamSettings, beam_search_texts
    from tunelab.tokenizer.pair import source_tokenizer, target_tokenizer

    if args.chat or args.temperature > 0 or args.stop:
        raise TunelabError("an encoder-decoder decodes with beam search: --chat, --temperature and --stop do not apply")
    from tunelab.checkpoint.load import generation_defaults

    defaults = generation_defaults(args.model)
    sources = [line for line in prompt.splitlines() if line.strip()] if args.prompt == "-" else [prompt]
    try:
        beam = BeamSettings(
            beam_size=args.beam_size or defaults.get("num_beams", 4),
            length_penalty=args.length_penalty if args.length_penalty is not None else defaults.get("length_penalty", 0.6),
            max_new_tokens=args.max_new_tokens or defaults.get("max_new_tokens", 256),
        )
        encoded = [source_tokenizer(tokenizer).encode(s) for s in sources]
        for text in beam_search_texts(model, target_tokenizer(tokenizer), encoded, beam):
            print(text.strip())
    except ValueError as e:
        raise TunelabError(str(e)) from None
    return 0
