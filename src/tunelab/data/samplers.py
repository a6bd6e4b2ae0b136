"""Batch samplers: shuffled batches, or batches of similar lengths so that little compute goes to padding.

Both are deterministic for (seed, epoch), so a run resumed from a checkpoint sees the same batches, and
both can start mid-epoch (`start_batch`) to skip the batches a checkpoint has already trained on. Pass one
to a DataLoader as `batch_sampler=`. With torchrun, give `num_replicas` and `rank`: every rank computes the
same batch order and takes every num_replicas-th batch (the order is padded by repeating its first
batches so that all ranks get the same number of batches).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class _SeededBatchSampler(Sampler[list[int]]):
    """Common part: epoch / start_batch bookkeeping, sharding over ranks, lengths."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (its shuffle) and the first batch to yield (to resume mid-epoch)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.num_batches}]")
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank (whatever start_batch is)."""
        total = self.num_samples // self.batch_size if self.drop_last else -(-self.num_samples // self.batch_size)
        return -(-total // self.num_replicas)

    def __len__(self) -> int:
        """Batches still to come in this epoch: num_batches - start_batch."""
        return self.num_batches - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start_batch:]

    def batches(self) -> list[list[int]]:
        """Every batch of this epoch on this rank, in order (start_batch not applied)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = self._all_batches(generator)
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        if self.num_replicas > 1 and batches:
            per_rank = -(-len(batches) // self.num_replicas)
            padded = batches + batches[:per_rank * self.num_replicas - len(batches)]
            batches = padded[self.rank::self.num_replicas]
        return batches

    def _all_batches(self, generator: torch.Generator) -> list[list[int]]:
        raise NotImplementedError


class RandomBatchSampler(_SeededBatchSampler):
    """Batches of a random permutation of the indices (seeded with seed + epoch); the last may be partial."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(num_samples, batch_size, seed=seed, drop_last=drop_last, num_replicas=num_replicas,
                         rank=rank)

    def _all_batches(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        return [order[i:i + self.batch_size] for i in range(0, self.num_samples, self.batch_size)]


class LengthGroupedSampler(_SeededBatchSampler):
    """Batches of similar lengths in random order, so that padding (and its wasted compute) stays small.

    Per epoch: shuffle the indices (seed + epoch), cut them into mega-batches of mega_batch_mult *
    batch_size, sort each mega-batch by length (longest first), cut it into batches, and shuffle the order of
    all batches. Only the last batch can be partial (it is kept unless drop_last).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, mega_batch_mult: int = 50,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(len(lengths), batch_size, seed=seed, drop_last=drop_last, num_replicas=num_replicas,
                         rank=rank)
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult must be positive, got {mega_batch_mult}")
        self.lengths = [int(length) for length in lengths]
        self.mega_batch_mult = mega_batch_mult

    def _all_batches(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        mega = self.mega_batch_mult * self.batch_size
        batches = []
        for start in range(0, self.num_samples, mega):
            group = sorted(order[start:start + mega], key=self.lengths.__getitem__, reverse=True)
            batches.extend(group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size))
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]
