"""How much a single lexical feature tells about next-sentence prediction on the WikiText-2 pairs of
configs/wikitext2-bert-mlm.yaml: the idf-weighted overlap of the word pieces of segment A and segment B (idf from
the training rows). A threshold is chosen on the training pairs and NSP accuracy is measured on the 1,000
validation pairs, at 64-, 128- and 256-token pairs (the config's).

    python benchmarks/nsp_overlap.py
"""

from __future__ import annotations

import math
from collections import Counter

from tunelab.train.run import load_train_config, prepare_data, run_tokenizer

CONFIG = "configs/wikitext2-bert-mlm.yaml"


def overlap_scores(rows: list[dict], idf: dict[int, float]) -> tuple[list[float], list[int]]:
    """(sum of the idf of the pieces both segments have, label 0 IsNext / 1 NotNext) per row."""
    scores, labels = [], []
    for row in rows:
        a = {i for i, t in zip(row["input_ids"], row["token_type_ids"]) if t == 0}
        b = {i for i, t in zip(row["input_ids"], row["token_type_ids"]) if t == 1}
        scores.append(sum(idf.get(i, 0.0) for i in a & b))
        labels.append(int(row["next_sentence_label"]))
    return scores, labels


def accuracy(scores: list[float], labels: list[int], threshold: float) -> float:
    return sum((s >= threshold) == (y == 0) for s, y in zip(scores, labels)) / len(labels)


def main() -> None:
    for length in (64, 128, 256):
        config = load_train_config(CONFIG, [f"data.max_length={length}",
                                            f"model.architecture.max_position_embeddings={length}"])
        data = prepare_data(config, run_tokenizer(config, retrain=False, save=False))
        train, validation = data.train.features, data.validation.features
        df = Counter(i for row in train for i in set(row["input_ids"]))
        idf = {i: math.log(len(train) / (1 + n)) for i, n in df.items()}
        train_scores, train_labels = overlap_scores(train, idf)
        threshold = max(sorted(set(train_scores)), key=lambda t: accuracy(train_scores, train_labels, t))
        scores, labels = overlap_scores(validation, idf)
        print(f"{length}-token pairs: overlap >= {threshold:.2f} means IsNext; NSP accuracy {accuracy(scores, labels, threshold):.3f} "
              f"on {len(labels)} validation pairs ({accuracy(train_scores, train_labels, threshold):.3f} on "
              f"{len(train_labels)} training pairs)")


if __name__ == "__main__":
    main()
