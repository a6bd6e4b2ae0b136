"""Count-based LM baselines (evaluate/ngram.py): probabilities by hand on a toy stream, normalisation over the
vocabulary, discounts, perplexity over a stream, errors, and the real WikiText-2 figures."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from tunelab.evaluate.ngram import KneserNeyLM, UnigramLM, _discounts, stream_perplexity

WIKITEXT = Path(__file__).resolve().parents[4] / "shared" / "data" / "wikitext2"

# a b a b c a b  ->  ids 0 1 0 1 2 0 1, vocabulary of 4 (id 3 is never seen)
TOY = [0, 1, 0, 1, 2, 0, 1]


def test_unigram_add_one_and_maximum_likelihood():
    add_one = UnigramLM(TOY, 4)
    assert add_one.prob(0) == pytest.approx((3 + 1) / (7 + 4))
    assert add_one.prob(3) == pytest.approx(1 / 11)
    mle = UnigramLM(TOY, 4, add=0.0)
    assert mle.prob(1) == pytest.approx(3 / 7) and mle.prob(3) == 0.0
    assert sum(add_one.prob(w) for w in range(4)) == pytest.approx(1.0)


def test_interpolated_kneser_ney_by_hand():
    kn = KneserNeyLM(TOY, 4, order=2, modified=False)
    # bigram counts (0,1) x3, (1,0), (1,2), (2,0): n_1 = 3, n_2 = 0, so D falls back to 0.5
    # continuation counts N1+(. w): 0 <- {1, 2}: 2; 1 <- {0}: 1; 2 <- {1}: 1; 3: 0 (n_1 = 2, n_2 = 1: D = 2/4)
    assert kn.discounts == {2: (0.5, 0.5, 0.5), 1: (0.5, 0.5, 0.5)}
    gamma1 = 0.5 * 3 / 4  # three word types with a continuation count, 4 continuations in all
    p1 = {0: 1.5 / 4 + gamma1 / 4, 1: 0.5 / 4 + gamma1 / 4, 2: 0.5 / 4 + gamma1 / 4, 3: gamma1 / 4}
    for w, p in p1.items():
        assert kn.prob(w, []) == pytest.approx(p)
    # after 0: only "0 1" was seen, 3 times; gamma(0) = 0.5 * 1 / 3
    assert kn.prob(1, [0]) == pytest.approx(2.5 / 3 + (0.5 / 3) * p1[1])
    assert kn.prob(0, [0]) == pytest.approx((0.5 / 3) * p1[0])
    # an unseen context gives all its mass to the lower order
    assert kn.prob(2, [3]) == pytest.approx(p1[2])


def test_modified_discounts_follow_chen_and_goodman():
    # counts-of-counts n1 = 4, n2 = 2, n3 = 1, n4 = 1 -> Y = 4 / 8
    counts = Counter({"a": 1, "b": 1, "c": 1, "d": 1, "e": 2, "f": 2, "g": 3, "h": 4})
    d1, d2, d3 = _discounts(counts, modified=True)
    assert (d1, d2, d3) == pytest.approx((1 - 2 * 0.5 * 2 / 4, 2 - 3 * 0.5 * 1 / 2, 3 - 4 * 0.5 * 1 / 1))
    assert _discounts(counts, modified=False) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("modified", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_sum_to_one_over_the_vocabulary(order, modified):
    import random

    rng = random.Random(order)
    stream = [rng.choice([0, 1, 1, 2, 3, 3, 3, 4, 5, 6]) for _ in range(400)]
    vocab = 9  # ids 7 and 8 never occur
    kn = KneserNeyLM(stream, vocab, order=order, modified=modified)
    for context in ([], [3], [1, 3], [8, 8, 8], [0, 1, 2], stream[-3:]):
        total = sum(kn.prob(w, context) for w in range(vocab))
        assert total == pytest.approx(1.0, abs=1e-12), (context, total)
        assert all(kn.prob(w, context) > 0 for w in range(vocab))


def test_stream_perplexity_scores_every_token_but_the_first():
    uniform = UnigramLM([], 5, add=1.0)  # no counts: 1/5 for every id
    result = stream_perplexity(uniform, [0, 1, 2, 3])
    assert result["tokens"] == 3
    assert result["loss"] == pytest.approx(math.log(5)) and result["perplexity"] == pytest.approx(5.0)
    assert stream_perplexity(UnigramLM(TOY, 4, add=0.0), [0, 3])["perplexity"] == math.inf


def test_ids_outside_the_vocabulary_are_errors():
    with pytest.raises(ValueError, match="training stream: token 2 has id 7, outside the vocabulary 0 .. 3"):
        KneserNeyLM([0, 1, 7], 4)
    with pytest.raises(ValueError, match="test stream: token 1 has id -1"):
        stream_perplexity(UnigramLM(TOY, 4), [0, -1])
    with pytest.raises(ValueError, match="order must be at least 1"):
        KneserNeyLM(TOY, 4, order=0)


def test_wikitext2_baselines():
    """The baselines of the WikiText-2 benchmark: trained on valid.txt, scored on test.txt (word level)."""
    from tunelab.data.stream import encode_stream
    from tunelab.data.text import load_text
    from tunelab.tokenizer.word_level import train_word_level

    tokenizer = train_word_level([WIKITEXT / "valid.txt"])
    train = encode_stream(load_text(WIKITEXT / "valid.txt"), tokenizer)
    test = encode_stream(load_text(WIKITEXT / "test.txt"), tokenizer)
    assert (len(train), len(test), tokenizer.vocab_size) == (217646, 245569, 13778)
    unigram = stream_perplexity(UnigramLM(train, tokenizer.vocab_size), test)
    trigram = stream_perplexity(KneserNeyLM(train, tokenizer.vocab_size, order=3), test)
    assert unigram["perplexity"] == pytest.approx(562.03, abs=0.01)
    assert trigram["perplexity"] == pytest.approx(231.40, abs=0.01)
