"""tunelab tokenizer train: train a tokenizer (bpe, byte-bpe, wordpiece, char, word) on data files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunelab.errors import TunelabError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a tokenizer", description=__doc__)
    commands = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    t = commands.add_parser(
        "train", help="train a tokenizer on text files", description=(
            "Train a tokenizer and write tokenizer.json, tokenizer_config.json and special_tokens_map.json, which "
            "tunelab (model.tokenizer, --model) and transformers (AutoTokenizer) load. Types: bpe (character BPE, "
            "spaces marked '▁'), byte-bpe (GPT-2 byte-level BPE, lossless), wordpiece (BERT, [CLS] ... [SEP]), "
            "char (one id per character seen), word (one id per whitespace-separated word, line ends are <eos>: WikiText "
            "style, for recurrent LMs)."),
        epilog="example: tunelab tokenizer train --data ../shared/data/tinyshakespeare/input.txt --type char "
               "--out runs/tokenizers/shakespeare-char",
    )
    t.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="text files: .txt (line by line) or jsonl/json/csv/tsv/parquet (--text-field)")
    t.add_argument("--type", required=True, choices=["bpe", "byte-bpe", "wordpiece", "char", "word"])
    t.add_argument("--vocab-size", type=int, help="ids in the vocabulary, special tokens included "
                                                  "(required except for char and word, where it is an upper bound)")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    t.add_argument("--min-frequency", type=int, help="least count of a merge (default 2) or of a character "
                                                     "(char: default 1, every character)")
    case = t.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=None,
                      help="lower-case the text (the default for wordpiece)")
    case.add_argument("--no-lowercase", dest="lowercase", action="store_false", help="keep the case (cased BERT)")
    t.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                   help="another special token to reserve an id for (repeatable)")
    t.add_argument("--limit-alphabet", type=int, help="bpe, wordpiece: keep only the N most frequent characters")
    t.add_argument("--max-length", type=int, help="model_max_length written to tokenizer_config.json")
    t.add_argument("--format", default="auto", help="data format (default: from the extension)")
    t.add_argument("--text-field", default="text", help="field of the text in record files (default: text)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(run=run_train)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    from tunelab.tokenizer.training import iter_texts, train_tokenizer

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunelabError(f"{out}: output directory exists and is not empty")
    summary: list = []
    tokenizer = train_tokenizer(
        args.data, type=args.type, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
        lowercase=args.lowercase, special_tokens=args.special_token, limit_alphabet=args.limit_alphabet,
        model_max_length=args.max_length, format=args.format, text_field=args.text_field,
        show_progress=not args.no_progress and sys.stderr.isatty(), summary=summary,
    )
    tokenizer.save(out)
    s = summary[0]
    specials = sorted(set(tokenizer.special_tokens.values()), key=lambda t: tokenizer.token_to_id(t))
    print(f"wrote {out}: {args.type} tokenizer, vocabulary size {tokenizer.vocab_size} "
          f"(special tokens: {' '.join(specials)})")
    print(f"trained on {s.characters:,} characters ({s.texts:,} texts in {s.files} file{'s' * (s.files != 1)}) "
          f"in {s.seconds:.1f} s")
    example = next((text.strip() for text in iter_texts(args.data, format=args.format, text_field=args.text_field)
                    if text.strip()), "")[:60]
    ids = tokenizer.encode(example)
    tokens = [tokenizer.id_to_token(i) for i in ids]
    print(f"example: {example!r}")
    print(f"  {len(ids)} tokens: {tokens}")
    print(f"  ids: {ids}")
    return 0
