"""What the masked-LM collator draws on the training rows of a masked_lm config: the share of maskable tokens
chosen as targets, how the targets split into [MASK] / random token / unchanged, and the share of NotNext
pairs. The README's masking figures (BERT's default 15%, one cut of the articles) come from

    python benchmarks/masking_stats.py task.mask_probability=0.15 task.dupe_factor=1

Further arguments are config overrides (the config is configs/wikitext2-bert-mlm.yaml). With a masking-rate
schedule (task.final_mask_probability) the shares are those of the last step.
"""

from __future__ import annotations

import sys

import torch

from tunelab.data.collate import pad_collate
from tunelab.train.run import load_train_config, masking_collator, prepare_data, run_tokenizer

CONFIG = "configs/wikitext2-bert-mlm.yaml"


def main(overrides: list[str]) -> None:
    config = load_train_config(CONFIG, overrides)
    tokenizer = run_tokenizer(config, retrain=False, save=False)
    rows = prepare_data(config, tokenizer).train.features
    collate = masking_collator(config, tokenizer)
    special = collate.special_ids  # what the collator never masks
    maskable = chosen = as_mask = unchanged = 0
    for start in range(0, len(rows), 256):
        part = rows[start:start + 256]
        batch = collate(part, 0)  # epoch 0's masks
        original = pad_collate(part, pad_token_id=collate.pad_token_id)["input_ids"]  # before masking
        target = batch["labels"] != -100
        maskable += int((batch["attention_mask"].bool() & ~torch.isin(original, special)).sum())
        chosen += int(target.sum())
        as_mask += int((target & (batch["input_ids"] == tokenizer.mask_token_id)).sum())
        unchanged += int((target & (batch["input_ids"] == original)).sum())
    random_tokens = chosen - as_mask - unchanged  # a random draw equal to the original counts as unchanged
    not_next = sum(int(r.get("next_sentence_label", 0)) for r in rows)
    print(f"{len(rows):,} rows, {maskable:,} maskable tokens: {chosen / maskable:.2%} chosen; of those "
          f"{as_mask / chosen:.2%} [MASK], {random_tokens / chosen:.2%} random, {unchanged / chosen:.2%} unchanged; "
          f"{not_next / len(rows):.2%} of the pairs are NotNext")


if __name__ == "__main__":
    main(sys.argv[1:])
