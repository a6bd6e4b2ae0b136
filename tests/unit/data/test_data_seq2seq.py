"""Parallel text: line-aligned files and source/target records, their errors, encoding and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from tunelab.data.seq2seq import (collate_seq2seq, encode_seq2seq, load_pairs, pairs_to_conversations,
                                  read_parallel, target_special_ids)
from tunelab.errors import DataError
from tunelab.tokenizer import Tokenizer
from tunelab.tokenizer.pair import TokenizerPair

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
MULTI30K = DATA / "multi30k_en_de"
DIALOGSUM = DATA / "dialogsum" / "dialogsum.dev.jsonl"


def bpe(lines: list[str], vocab_size: int = 300) -> Tokenizer:
    """A small BPE tokenizer (Metaspace, as examples/seq2seq_tokenizer.py builds it) with </s> after each text."""
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                           special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return Tokenizer(backend, special_tokens={"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                                              "unk_token": "<unk>"})


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    lines = (MULTI30K / "val.en").read_text().splitlines()[:300] + (MULTI30K / "val.de").read_text().splitlines()[:300]
    return bpe(lines)


def test_multi30k_files_pair_line_by_line():
    pairs = read_parallel(MULTI30K / "val.en", MULTI30K / "val.de")
    assert len(pairs) == 1014
    assert pairs[0].source == (MULTI30K / "val.en").read_text().splitlines()[0]
    assert pairs[-1].target == (MULTI30K / "val.de").read_text().splitlines()[-1]
    assert pairs[5].where == f"{MULTI30K / 'val.en'}:6"
    assert load_pairs([MULTI30K / "val.en", MULTI30K / "val.de"], format="parallel")[3] == pairs[3]


def test_unequal_line_counts_name_both_files_and_the_line(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    with pytest.raises(DataError) as error:
        read_parallel(tmp_path / "a.en", tmp_path / "a.de")
    message = str(error.value)
    assert f"{tmp_path / 'a.en'} has 3 lines but {tmp_path / 'a.de'} has 2" in message
    assert f"{tmp_path / 'a.de'} ends after line 2; {tmp_path / 'a.en'}:3 has no partner" in message


def test_a_blank_line_is_an_error_with_its_line(tmp_path):
    (tmp_path / "b.en").write_text("one\ntwo\n")
    (tmp_path / "b.de").write_text("eins\n \n")
    with pytest.raises(DataError, match=rf"{tmp_path / 'b.de'}:2: blank line"):
        read_parallel(tmp_path / "b.en", tmp_path / "b.de")


def test_parallel_needs_two_files_to_train(tmp_path):
    (tmp_path / "c.en").write_text("one\n")
    with pytest.raises(DataError, match="format parallel reads two line-aligned files"):
        load_pairs([tmp_path / "c.en"], format="parallel")
    assert load_pairs([tmp_path / "c.en"], format="parallel", require_target=False)[0].target is None


def test_records_with_configurable_fields():
    pairs = load_pairs(DIALOGSUM, source_field="dialogue", target_field="summary")
    first = json.loads(DIALOGSUM.read_text().splitlines()[0])
    assert len(pairs) == 500 and pairs[0].source == first["dialogue"] and pairs[0].target == first["summary"]


def test_a_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n{"source": "c", "summary": "d"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'target' \(fields: 'source', 'summary'\)"):
        load_pairs(path)
    path.write_text('{"source": "a", "target": ""}\n')
    with pytest.raises(DataError, match=rf"{path}:1: field 'target' is empty"):
        load_pairs(path)
    path.write_text('{"source": 3, "target": "x"}\n')
    with pytest.raises(DataError, match=rf"{path}:1: field 'source': expected str, found a number"):
        load_pairs(path)


def test_encoding_frames_the_target_for_teacher_forcing(tokenizer):
    pairs = read_parallel(MULTI30K / "val.en", MULTI30K / "val.de")[:3]
    data = encode_seq2seq(pairs, tokenizer, max_source_length=64, max_target_length=64)
    start, eos, pad = target_special_ids(tokenizer)
    assert (start, eos, pad) == (1, 2, 0)
    feature = data.features[0]
    target = tokenizer.encode(pairs[0].target, add_special_tokens=False)
    assert feature["input_ids"] == tokenizer.encode(pairs[0].source) and feature["input_ids"][-1] == eos
    assert feature["decoder_input_ids"] == [start, *target]
    assert feature["labels"] == [*target, eos]
    assert tokenizer.decode(feature["labels"]) == pairs[0].target  # decoding gives the text back exactly
    assert feature["length"] == len(feature["input_ids"]) + len(feature["labels"])
    assert data.num_truncated == 0


def test_long_pairs_are_cut_keeping_the_special_tokens(tokenizer):
    pairs = read_parallel(MULTI30K / "val.en", MULTI30K / "val.de")[:20]
    data = encode_seq2seq(pairs, tokenizer, max_source_length=8, max_target_length=6)
    assert data.num_truncated == 20
    for feature in data.features:
        assert len(feature["input_ids"]) == 8 and feature["input_ids"][-1] == 2  # </s> kept
        assert len(feature["decoder_input_ids"]) == len(feature["labels"]) == 6 and feature["labels"][-1] == 2


def test_separate_vocabularies_encode_each_side_with_its_own_tokenizer():
    en = (MULTI30K / "val.en").read_text().splitlines()[:200]
    de = (MULTI30K / "val.de").read_text().splitlines()[:200]
    pair = TokenizerPair(bpe(en, 200), bpe(de, 250))
    pairs = read_parallel(MULTI30K / "val.en", MULTI30K / "val.de")[:2]
    feature = encode_seq2seq(pairs, pair, 64, 64).features[1]
    assert feature["input_ids"] == pair.source.encode(pairs[1].source)
    assert feature["labels"][:-1] == pair.target.encode(pairs[1].target, add_special_tokens=False)
    assert pair.decode(feature["labels"]) == pairs[1].target


def test_collate_pads_source_and_target_separately():
    features = [{"input_ids": [5, 6, 2], "decoder_input_ids": [1, 7], "labels": [7, 2]},
                {"input_ids": [5, 2], "decoder_input_ids": [1, 8, 9, 10], "labels": [8, 9, 10, 2]}]
    batch = collate_seq2seq(features, pad_token_id=0, target_pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 2], [5, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["decoder_input_ids"].tolist() == [[1, 7, 3, 3], [1, 8, 9, 10]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[7, 2, -100, -100], [8, 9, 10, 2]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pairs_become_instructed_chat_turns():
    pairs = load_pairs(DIALOGSUM, source_field="dialogue", target_field="summary")[:2]
    chats = pairs_to_conversations(pairs, "Summarize the dialogue:")
    assert chats[1].messages == [
        {"role": "user", "content": f"Summarize the dialogue:\n\n{pairs[1].source}"},
        {"role": "assistant", "content": pairs[1].target},
    ]
    assert chats[1].source == f"{DIALOGSUM}:2"
