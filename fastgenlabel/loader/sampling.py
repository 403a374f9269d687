"""Which samples make up each batch of an epoch: shuffling, sharding, the last-batch policy.

Pure functions of (N, seed, epoch, shard): every rank computes its own share without talking.
"""
from __future__ import annotations

import numpy as np

LAST_BATCH_POLICIES = ("drop", "partial", "fill")


def shard_order(n: int, *, seed: int, epoch: int, shuffle: bool, shard_id: int, num_shards: int) -> np.ndarray:
    """The sample indices of one shard for one epoch.

    All N indices are shuffled with a generator seeded by (seed, epoch) (the same on every rank),
    padded by wrapping around to a multiple of ``num_shards`` and dealt out round-robin, so every
    shard has ``ceil(N / num_shards)`` samples (like ``torch.utils.data.DistributedSampler``).
    """
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else np.arange(n)
    per_shard = -(-n // num_shards)
    if per_shard * num_shards > n:  # wrap around, as often as needed (more shards than samples)
        order = np.resize(order, per_shard * num_shards)
    return order[shard_id::num_shards]


def num_batches(n: int, batch_size: int, last_batch: str) -> int:
    """Batches per epoch for n samples: ``drop`` floors, ``partial`` and ``fill`` round up."""
    return n // batch_size if last_batch == "drop" else -(-n // batch_size)


def batch_indices(order: np.ndarray, batch_size: int, last_batch: str) -> list[np.ndarray]:
    """Cut an epoch's order into batches.

    ``drop``: only full batches. ``partial``: the last batch is shorter (possibly one sample).
    ``fill``: the last batch is completed with samples from the start of the order (wrapping
    around as often as needed), so every batch has ``batch_size`` samples.
    """
    n = len(order)
    out = [order[i:i + batch_size] for i in range(0, n - n % batch_size, batch_size)]
    rest = n % batch_size
    if rest and last_batch != "drop":
        tail = order[n - rest:]
        if last_batch == "fill":
            need = batch_size - rest
            tail = np.concatenate([tail, np.resize(order, need)])
        out.append(tail)
    return out
