"""Count-based language-model baselines over token ids: an add-k unigram model and an interpolated
Kneser-Ney n-gram model (pure Python, no torch), scored on the same token stream as a neural LM.

Both read the corpus as one stream, like the recurrent LMs (data/stream.py): token i is predicted from the
tokens before it, every token but the first is scored, and the vocabulary is the tokenizer's ids
0 .. vocab_size - 1 (out-of-vocabulary words are already <unk>). So their perplexities compare directly with
`tunelab eval`'s for a recurrent model.

Interpolated Kneser-Ney (Kneser & Ney 1995; interpolated, with the modified discounts of Chen & Goodman
1998, sec. 3.5 / 4.1.6), for a context h = (u, v) of the highest order n:

    P_n(w | h) = max(c(h w) - D(c(h w)), 0) / c(h .) + gamma(h) P_{n-1}(w | v)
    gamma(h)   = (D_1 N_1(h .) + D_2 N_2(h .) + D_3+ N_3+(h .)) / c(h .)

with P_n(w | h) = P_{n-1}(w | v) when h was never seen. Lower orders use continuation counts
c'(v w) = N_1+(. v w), the number of different words seen before v w, instead of raw counts; the lowest
order interpolates with the uniform distribution 1 / V, so that every id has a probability. N_k(h .) counts
the words seen k times after h. Discounts per order, from the counts-of-counts n_k of that order's counts:

    Y = n_1 / (n_1 + 2 n_2);  D_1 = 1 - 2 Y n_2 / n_1;  D_2 = 2 - 3 Y n_3 / n_2;  D_3+ = 3 - 4 Y n_4 / n_3

(`modified=False`: one discount D = Y for every count, Ney et al. 1994's estimate, the original interpolated KN).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence


class UnigramLM:
    """P(w) = (c(w) + k) / (N + k V): add-k smoothing (k = 1: Laplace's add-one; k = 0: maximum likelihood)."""

    def __init__(self, tokens: Sequence[int], vocab_size: int, *, add: float = 1.0) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if add < 0:
            raise ValueError(f"add must be >= 0, got {add}")
        _check_ids(tokens, vocab_size, "training")
        self.vocab_size, self.add = vocab_size, add
        self.counts = Counter(tokens)
        self.total = len(tokens)
        if self.total + add * vocab_size <= 0:
            raise ValueError("an empty training stream needs add > 0")

    def prob(self, word: int, context: Sequence[int] = ()) -> float:
        return (self.counts.get(word, 0) + self.add) / (self.total + self.add * self.vocab_size)


class KneserNeyLM:
    """An interpolated (modified) Kneser-Ney n-gram model of `order` (3: trigram) over ids < vocab_size."""

    def __init__(self, tokens: Sequence[int], vocab_size: int, *, order: int = 3, modified: bool = True) -> None:
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        _check_ids(tokens, vocab_size, "training")
        self.order, self.vocab_size, self.modified = order, vocab_size, modified
        tokens = list(tokens)
        # counts[n]: n-gram (a tuple of n ids) -> raw count for the highest order, continuation count below
        top = Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))
        self.counts: dict[int, Counter] = {order: top}
        for n in range(order - 1, 0, -1):
            self.counts[n] = Counter(gram[1:] for gram in self.counts[n + 1])  # N_1+(. gram): distinct left words
        self.discounts = {n: _discounts(self.counts[n], modified) for n in self.counts}
        # per order and context h (n - 1 ids): [c(h .), N_1(h .), N_2(h .), N_3+(h .)]
        self.context_stats: dict[int, dict[tuple, list[int]]] = {}
        for n, grams in self.counts.items():
            stats: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
            for gram, count in grams.items():
                row = stats[gram[:-1]]
                row[0] += count
                row[min(count, 3)] += 1
            self.context_stats[n] = dict(stats)

    def prob(self, word: int, context: Sequence[int] = ()) -> float:
        """P(word | the last order - 1 ids of context)."""
        context = tuple(context[-(self.order - 1):]) if self.order > 1 else ()
        return self._prob(word, context, len(context) + 1)

    def _prob(self, word: int, context: tuple, n: int) -> float:
        lower = self._prob(word, context[1:], n - 1) if n > 1 else 1.0 / self.vocab_size
        stats = self.context_stats[n].get(context)
        if stats is None:  # context never seen: all the mass goes to the lower order
            return lower
        total, n1, n2, n3 = stats
        d1, d2, d3 = self.discounts[n]
        count = self.counts[n].get(context + (word,), 0)
        discounted = max(count - (d1, d2, d3)[min(count, 3) - 1], 0.0) if count else 0.0
        gamma = (d1 * n1 + d2 * n2 + d3 * n3) / total
        return discounted / total + gamma * lower


def _discounts(counts: Counter, modified: bool) -> tuple[float, float, float]:
    """(D_1, D_2, D_3+) from the counts-of-counts n_1 .. n_4 (Chen & Goodman 1998, eq. 26). Where a small or
    skewed corpus makes one fall outside (0, k), all three become Ney's single discount Y (Y = 0.5 when n_1 or
    n_2 is 0), so that every discount is positive and every id keeps a probability."""
    n = Counter(c for c in counts.values() if c <= 4)
    n1, n2, n3, n4 = (n.get(k, 0) for k in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5
    if not modified or not (n1 and n2 and n3 and n4):
        return (y, y, y)
    d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    if not all(0 < dk < k for k, dk in enumerate(d, start=1)):
        return (y, y, y)
    return d


def _check_ids(tokens: Sequence[int], vocab_size: int, what: str) -> None:
    for i, token in enumerate(tokens):
        if not 0 <= token < vocab_size:
            raise ValueError(f"{what} stream: token {i} has id {token}, outside the vocabulary 0 .. {vocab_size - 1}")


def stream_perplexity(model, tokens: Sequence[int]) -> dict[str, float]:
    """loss (mean nats per token) and perplexity of `model` on a stream: tokens 1 .. N-1, each predicted from
    the tokens before it (what RecurrentLMStep.evaluate scores)."""
    vocab_size = model.vocab_size
    _check_ids(tokens, vocab_size, "test")
    if len(tokens) < 2:
        raise ValueError("a stream needs at least 2 tokens to score one")
    history = max(0, getattr(model, "order", 1) - 1)
    total = 0.0
    for i in range(1, len(tokens)):
        p = model.prob(tokens[i], tokens[max(0, i - history) : i])
        if p <= 0.0:
            return {"loss": math.inf, "perplexity": math.inf, "tokens": len(tokens) - 1}
        total -= math.log(p)
    loss = total / (len(tokens) - 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": len(tokens) - 1}
