"""Token streams for truncated back-propagation through time (data/stream.py) and the word-level tokenizer
that WikiText needs (tokenizer/word_level.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunelab.data.stream import (StreamBatchSampler, collate_stream_chunks, encode_stream, evaluation_rows,
                                 stream_chunks)
from tunelab.errors import DataError, TokenizerError
from tunelab.tokenizer import Tokenizer
from tunelab.tokenizer.word_level import train_word_level

WIKITEXT = Path(__file__).resolve().parents[4] / "shared" / "data" / "wikitext2"


def test_chunks_are_consecutive_pieces_of_parallel_streams():
    tokens = list(range(25))  # the docstring's a .. y
    rows = stream_chunks(tokens, num_streams=2, bptt=5).features
    sampler = StreamBatchSampler.for_features(rows, 2)
    batches = [[rows[i] for i in batch] for batch in sampler]
    assert [[r["input_ids"] for r in b] for b in batches] == [
        [[0, 1, 2, 3, 4], [12, 13, 14, 15, 16]],
        [[5, 6, 7, 8, 9], [17, 18, 19, 20, 21]],
        [[10, 11], [22, 23]],
    ]
    for batch in batches:  # labels are the next tokens, across chunk boundaries
        for row in batch:
            assert row["labels"] == [t + 1 for t in row["input_ids"]]
    assert [b[0]["chunk"] for b in batches] == [0, 1, 2]
    # features in index order are the stream itself (minus the tail): they double as evaluation data
    assert [t for r in rows for t in r["input_ids"]] == tokens[:24]


def test_the_sampler_resumes_mid_epoch_and_repeats_every_epoch():
    sampler = StreamBatchSampler(num_streams=3, num_chunks=4)
    assert len(sampler) == 4 and list(sampler)[1] == [1, 5, 9]
    sampler.set_epoch(1, start_batch=2)
    assert len(sampler) == 2 and list(sampler) == [[2, 6, 10], [3, 7, 11]]
    with pytest.raises(ValueError, match="start_batch 5 is not in"):
        sampler.set_epoch(0, 5)
    with pytest.raises(ValueError, match="do not split into 3 streams"):
        StreamBatchSampler.for_features([{}] * 7, 3)


def test_collate_keeps_the_chunk_index():
    rows = stream_chunks(list(range(41)), num_streams=4, bptt=4).features
    batch = collate_stream_chunks([rows[1], rows[4]])  # chunk 1 of streams 0 and 1 (3 chunks per stream)
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7], [14, 15, 16, 17]]
    assert batch["labels"].tolist() == [[5, 6, 7, 8], [15, 16, 17, 18]]
    assert batch["chunk"] == 1 and batch["attention_mask"].all()
    with pytest.raises(ValueError, match="one length"):
        collate_stream_chunks([rows[0], rows[2]])


@pytest.mark.parametrize("length,streams", [(2, 1), (11, 3), (12, 3), (13, 3), (100, 7), (5, 10)])
def test_evaluation_rows_score_every_token_but_the_first_once(length, streams):
    tokens = list(range(1, length + 1))
    inputs, labels = evaluation_rows(tokens, streams, pad_token_id=0)
    assert inputs.shape[0] <= streams
    scored = sorted(labels[labels != -100].tolist())
    assert scored == tokens[1:]
    real = labels != -100
    assert torch.equal(labels[real], inputs[real] + 1)  # each label follows its input
    assert (inputs[~real] == 0).all()


def test_too_little_text_is_a_clear_error():
    with pytest.raises(DataError, match="3 tokens are too few for 4 parallel streams"):
        stream_chunks([1, 2, 3], num_streams=4, bptt=5)
    with pytest.raises(DataError, match="nothing to predict"):
        evaluation_rows([7], 2, 0)


@pytest.fixture(scope="module")
def wikitext_words() -> Tokenizer:
    return train_word_level([WIKITEXT / "valid.txt"])


def test_word_level_vocabulary_of_wikitext(wikitext_words, tmp_path):
    tok = wikitext_words
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [tok.id_to_token(i) for i in range(3, 8)] == ["the", ",", ".", "of", "and"]  # most frequent first
    # every line ends with <eos> (blank lines too), unknown words are <unk>
    ids = tok.encode(" = Homarus gammarus = \n \n zzzqqq the <unk>\n")
    words = [tok.id_to_token(i) for i in ids]
    assert words == ["=", "Homarus", "gammarus", "=", "<eos>", "<eos>", "<unk>", "the", "<unk>", "<eos>"]
    # the standard token count of WikiText-2's validation and test files (words + one <eos> per line)
    stream = encode_stream([(WIKITEXT / "test.txt").read_text(encoding="utf-8")], tok)
    assert len(stream) == 245569
    # transformers reads the saved tokenizer and gives the same ids
    import transformers

    tok.save(tmp_path / "words")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "words")
    text = "The game began in 1990 , and <unk> won .\n"
    assert reference(text)["input_ids"] == tok.encode(text) == Tokenizer.from_dir(tmp_path / "words").encode(text)


def test_word_level_options_and_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("b a b C c\nb a\n", encoding="utf-8")
    tok = train_word_level([corpus], min_frequency=2)
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == ["<pad>", "<unk>", "<eos>", "b", "a"]
    lower = train_word_level([corpus], lowercase=True)
    assert lower.encode("C") == lower.encode("c") != [lower.unk_token_id]
    assert train_word_level([corpus], max_vocab=4).vocab_size == 4
    with pytest.raises(TokenizerError, match="no such training file"):
        train_word_level([tmp_path / "missing.txt"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(TokenizerError, match="latin1.txt: not UTF-8"):
        train_word_level([tmp_path / "latin1.txt"])
