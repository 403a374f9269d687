"""Class models across processes: statistics all-gathered and merged, models broadcast.

Every rank merges the gathered statistics in rank order with the same operations, so every
rank ends with a bit-identical model (``model_checksum`` checks it). Works with any
``torch.distributed`` backend that supports ``all_gather`` and ``broadcast`` (NCCL on GPUs, gloo
on CPUs); tensors travel on the device of the rank's statistics.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist

from .models import ClassModel, GaussianStats, KDEStats


def _gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """all_gather for tensors whose first dimension may differ across ranks."""
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [o[:s] for o, s in zip(out, sizes)]


def all_gather_stats(stats, group=None):
    """Merge every rank's statistics (in rank order); every rank gets the same result."""
    if isinstance(stats, GaussianStats):
        parts = [_gather(t, group) for t in (stats.count, stats.mean, stats.m2)]
        ranks = [GaussianStats(stats.covariance, c, m, s) for c, m, s in zip(*parts)]
    elif isinstance(stats, KDEStats):
        parts = [_gather(t, group) for t in (stats.count, stats.points, stats.labels, stats.keys)]
        ranks = [KDEStats(c, p, lab, k, stats.max_points) for c, p, lab, k in zip(*parts)]
    else:
        raise TypeError(f"stats: expected GaussianStats or KDEStats, got {type(stats).__name__}")
    merged = ranks[0]
    for other in ranks[1:]:
        merged = merged.merge(other)
    return merged


def fit_distributed(model: ClassModel, z, y, num_classes: int, group=None) -> ClassModel:
    """Fit ``model`` on the union of every rank's (z, y); identical on every rank."""
    return model.fit_stats(all_gather_stats(model.compute_stats(z, y, num_classes), group))


def broadcast_model(model: ClassModel, src: int = 0, group=None) -> ClassModel:
    """Make every rank's fitted ``model`` equal to rank ``src``'s (e.g. after a refit on src).

    Every rank must pass a model of the same kind and options; non-src ranks may be unfitted
    only if they know K and d, so pass the previously fitted model there.
    """
    stats = model.stats
    if stats is None:
        raise ValueError("model: every rank needs a fitted model of the same kind to receive a broadcast")
    if isinstance(stats, GaussianStats):
        tensors = [_broadcast(t, src, group) for t in (stats.count, stats.mean, stats.m2)]
        return model.fit_stats(GaussianStats(stats.covariance, *tensors))
    tensors = [_broadcast(t, src, group) for t in (stats.count, stats.points, stats.labels, stats.keys)]
    return model.fit_stats(KDEStats(*tensors, stats.max_points))


def _broadcast(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """broadcast for tensors whose first dimension may differ across ranks."""
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    dist.broadcast(n, src, group=group)
    out = t.clone() if int(n) == t.shape[0] else torch.empty((int(n),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.broadcast(out, src, group=group)
    return out


def model_checksum(model: ClassModel) -> str:
    """SHA-256 over the model's kind, options and statistics (equal models, equal checksums)."""
    state = model.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if isinstance(value, np.ndarray):
            a = np.ascontiguousarray(value)
            h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
        else:
            h.update(f"{key}={value!r}|".encode())
    return h.hexdigest()[:16]
