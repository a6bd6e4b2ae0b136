"""Train the subword tokenizer an encoder-decoder from scratch reads (the step before
`tunelab train configs/multi30k-transformer.yaml`).

    python examples/seq2seq_tokenizer.py --out runs/tokenizers/multi30k-bpe8k --vocab-size 8000 \\
        ../shared/data/multi30k_en_de/train.en ../shared/data/multi30k_en_de/train.de

One BPE vocabulary (Sennrich et al. 2016) learned on all the given files, so source and target share it
(and the model ties its three embedding matrices). Text is NFKC-normalised and split SentencePiece-style on
spaces, which become the "▁" that starts a word: decoding gives back the text exactly (what sacreBLEU must
score). Special tokens: <pad> 0, <s> 1 (the decoder's start), </s> 2 (appended to every source and ending
every target), <unk> 3. With --separate, one tokenizer per file is written to OUT/source and OUT/target
(`model.tokenizer` and `model.target_tokenizer`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from tunelab.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def train_bpe(files: list[str], vocab_size: int) -> Tokenizer:
    """A BPE tokenizer learned on `files` (one sentence per line), with the special tokens above."""
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    backend.train(files, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return Tokenizer(backend, special_tokens={"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                                              "unk_token": "<unk>"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="training text, one sentence per line (source and target files)")
    parser.add_argument("--out", required=True, help="output directory (tokenizer.json and its config)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--separate", action="store_true", help="one tokenizer per file: OUT/source, OUT/target")
    args = parser.parse_args()
    out = Path(args.out)
    if args.separate:
        if len(args.files) != 2:
            parser.error("--separate takes two files: the source and the target")
        for name, path in zip(("source", "target"), args.files):
            tokenizer = train_bpe([path], args.vocab_size)
            tokenizer.save(out / name)
            print(f"wrote {out / name} ({tokenizer.vocab_size} tokens from {path})")
        return
    tokenizer = train_bpe(args.files, args.vocab_size)
    tokenizer.save(out)
    print(f"wrote {out} ({tokenizer.vocab_size} tokens from {', '.join(args.files)})")


if __name__ == "__main__":
    main()
