"""Build a word-level tokenizer over the words of text files (WikiText-style: line ends become <eos>, words
outside the vocabulary <unk>), for recurrent language models trained from scratch.

    python examples/word_tokenizer.py ../shared/data/wikitext2/valid.txt --out runs/wikitext2-words

The directory it writes (tokenizer.json, tokenizer_config.json, special_tokens_map.json) is what a config's
`model.tokenizer` points to. See tunelab/tokenizer/word_level.py.
"""

from __future__ import annotations

import argparse
import sys

from tunelab.errors import TunelabError
from tunelab.tokenizer.word_level import train_word_level


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="training text files (UTF-8)")
    parser.add_argument("--out", required=True, help="directory to write the tokenizer to")
    parser.add_argument("--min-frequency", type=int, default=1, help="words seen fewer times become <unk> (1)")
    parser.add_argument("--max-vocab", type=int, help="keep at most this many ids, most frequent words first")
    parser.add_argument("--lowercase", action="store_true", help="lower-case the text first")
    args = parser.parse_args()
    try:
        tokenizer = train_word_level(args.files, min_frequency=args.min_frequency, max_vocab=args.max_vocab,
                                     lowercase=args.lowercase)
        tokenizer.save(args.out)
    except TunelabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {tokenizer.vocab_size} ids (<pad> {tokenizer.pad_token_id}, <unk> {tokenizer.unk_token_id}, "
          f"<eos> {tokenizer.eos_token_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
