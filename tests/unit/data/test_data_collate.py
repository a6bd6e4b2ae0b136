"""pad_collate: shapes, pad values, both padding sides, scalar vs sequence labels, dropped keys."""

from __future__ import annotations

import pickle

import pytest
import torch

from tunelab.data import PadCollator, pad_collate


def test_classification_batch_right_padding():
    features = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "labels": 1, "length": 3},
                {"input_ids": [8], "token_type_ids": [0], "labels": 0, "length": 1}]
    batch = pad_collate(features, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert all(t.dtype == torch.long for t in batch.values())


def test_sequence_labels_left_padding_and_multiple():
    features = [{"input_ids": [5, 6], "labels": [-100, 3], "word_ids": [None, 0]},
                {"input_ids": [7, 8, 9], "labels": [1, 2, -100], "word_ids": [None, 0, None]}]
    batch = pad_collate(features, pad_token_id=2, padding_side="left", pad_to_multiple_of=4)
    assert "word_ids" not in batch
    assert batch["input_ids"].tolist() == [[2, 2, 5, 6], [2, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 3], [-100, 1, 2, -100]]


def test_packed_rows_keep_positions_and_documents():
    features = [{"input_ids": [1, 2, 3], "labels": [1, -100, 3], "position_ids": [0, 0, 1], "document_ids": [0, 1, 1]},
                {"input_ids": [4], "labels": [4], "position_ids": [0], "document_ids": [0]}]
    batch = pad_collate(features, pad_token_id=0, label_pad=-1)
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["document_ids"].tolist() == [[0, 1, 1], [0, -1, -1]]
    assert batch["labels"].tolist() == [[1, -100, 3], [4, -1, -1]]


def test_qa_positions_and_regression_labels():
    features = [{"input_ids": [1, 2], "start_positions": 1, "end_positions": 1, "offsets": [None, (0, 3)],
                 "example_id": "q"},
                {"input_ids": [1, 2, 3], "start_positions": 0, "end_positions": 0, "offsets": [None] * 3,
                 "example_id": "r"}]
    batch = pad_collate(features, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "start_positions", "end_positions"}
    assert batch["start_positions"].tolist() == [1, 0] and batch["input_ids"].shape == (2, 3)
    regression = pad_collate([{"input_ids": [1], "labels": 0.5}, {"input_ids": [1], "labels": 1}], pad_token_id=0)
    assert regression["labels"].dtype == torch.float32


def test_existing_attention_mask_is_padded_and_mismatches_rejected():
    batch = pad_collate([{"input_ids": [1, 2], "attention_mask": [1, 0]}, {"input_ids": [3], "attention_mask": [1]}],
                        pad_token_id=0)
    assert batch["attention_mask"].tolist() == [[1, 0], [1, 0]]
    with pytest.raises(ValueError, match="lacks 'labels'"):
        pad_collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], pad_token_id=0)
    with pytest.raises(ValueError, match="2 labels for 1 input_ids"):
        pad_collate([{"input_ids": [1], "labels": [1, 2]}], pad_token_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        pad_collate([], pad_token_id=0)


def test_collator_pickles_for_workers():
    collator = pickle.loads(pickle.dumps(PadCollator(3, padding_side="left")))
    assert collator([{"input_ids": [1]}, {"input_ids": [1, 2]}])["input_ids"].tolist() == [[3, 1], [1, 2]]
