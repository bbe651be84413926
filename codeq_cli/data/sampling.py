"""Data order: a pure function of ``(seed, epoch)``, whatever the number of processes.

Each epoch's permutation is cut into *global* batches; every rank takes its
slice of each, and every sample's augmentation seed is derived from
``(seed, epoch, index)``. Evaluation shards the set without padding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


class GlobalBatchSampler(Sampler):
    """This rank's share of each global batch of the epoch's permutation.

    Yields lists of ``(index, sample_seed)``. The permutation depends only on
    ``(seed, epoch)``, global batch ``j`` is ``perm[j*B:(j+1)*B]`` and rank
    ``r`` of ``W`` takes the ``r``-th of ``W`` equal slices, so the data
    stream does not depend on the number of processes.
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.local = global_batch // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return max(0, self.n // self.global_batch - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        for j in range(self.start, self.n // self.global_batch):
            chunk = perm[j * self.global_batch : (j + 1) * self.global_batch]
            mine = chunk[self.rank * self.local : (self.rank + 1) * self.local]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in mine]


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``: evaluation without padded duplicates."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
