"""Which training images each process sees, and in what order.

Every process gets a FIXED shard of the training set (indices `rank::world` of the range padded to
a multiple of `world`, wrapping around like `DistributedSampler`, so every process runs the same
number of steps) and shuffles it anew each epoch. Two reasons to shard this way instead of letting
Accelerate re-deal the whole set every epoch:

- the feature cache (`--cache_features`) of a process then holds only its own shard: 1/N of the
  memory, and nothing to share between machines;
- with and without the cache the batches are exactly the same, so the two paths give the same
  losses (tested).

The permutation of an epoch comes from its own generator seeded by (seed, epoch, rank), not from
the global RNG, so a resumed run sees the same order as an uninterrupted one. Each optimisation
step still averages the gradients of all processes' batches (DDP), i.e. a global batch of
`batch_size x world` images.
"""

from __future__ import annotations

import math

import torch


def shard_indices(num_samples: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """The dataset indices of one process: `rank::world` of the range padded to a multiple of `world`."""
    if num_samples < 1:
        raise ValueError("cannot shard an empty training set")
    total = math.ceil(num_samples / num_processes) * num_processes
    padded = [i % num_samples for i in range(total)]
    return padded[process_index::num_processes]


def epoch_order(num_local: int, seed: int, epoch: int, process_index: int = 0) -> list[int]:
    """A permutation of the local positions 0..num_local-1 for one epoch, independent of global RNG."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_009 + process_index)
    return torch.randperm(num_local, generator=generator).tolist()


def batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive chunks of `order` (the last one may be smaller)."""
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


class ShardSampler(torch.utils.data.Sampler):
    """Local positions of this process's shard in the order of `epoch_order`; call `set_epoch` each epoch
    (a sampler object, so a DataLoader can keep persistent workers across epochs)."""

    def __init__(self, num_local: int, seed: int, process_index: int = 0):
        self.num_local, self.seed, self.process_index, self.epoch = num_local, seed, process_index, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_order(self.num_local, self.seed, self.epoch, self.process_index))

    def __len__(self) -> int:
        return self.num_local
