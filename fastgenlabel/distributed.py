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


def collective_device(group=None, preferred=None) -> torch.device:
    """Where tensors must live for ``group``'s backend: CUDA for NCCL (``preferred`` if it is a CUDA
    device, else the current one), ``preferred`` or the CPU otherwise."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        if preferred is not None and torch.device(preferred).type == "cuda":
            return torch.device(preferred)
        return torch.device("cuda", torch.cuda.current_device())
    if preferred is not None and torch.device(preferred).type == "cuda" and "gloo" in backend \
            and "cuda" not in backend:
        return torch.device("cpu")  # gloo's all_gather takes CPU tensors
    return torch.device(preferred) if preferred is not None else torch.device("cpu")


def all_gather_ints(values, group=None, device=None) -> list[list[int]]:
    """Every rank's list of ints (same length on every rank), in rank order."""
    t = torch.tensor(list(values), dtype=torch.int64, device=device or collective_device(group))
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def _int64(text: str) -> int:
    """A stable signed 64-bit digest of ``text``."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def model_signature(model: ClassModel) -> dict[str, int]:
    """What every rank must agree on before its model's statistics meet another rank's: the
    model's kind and options (as a digest of ``config()``)."""
    import json

    return {"model kind and options": _int64(type(model).__name__ + json.dumps(model.config(), sort_keys=True,
                                                                              default=str))}


_STATS_FIELDS = ("statistics kind (1 full, 2 diag, 3 tied, 4 kde)", "K (classes)", "d (features)",
                 "KDE points kept per class")


def stats_signature(stats) -> dict[str, int]:
    """The shape of a rank's statistics that must match across ranks: kind, covariance, K, d, the
    KDE cap."""
    if isinstance(stats, GaussianStats):
        values = ({"full": 1, "diag": 2, "tied": 3}[stats.covariance], stats.count.shape[0], stats.mean.shape[1], -1)
    elif isinstance(stats, KDEStats):
        values = (4, stats.count.shape[0], stats.points.shape[1], stats.max_points)
    else:
        raise TypeError(f"stats: expected GaussianStats or KDEStats, got {type(stats).__name__}")
    return dict(zip(_STATS_FIELDS, (int(v) for v in values)))


def check_agreement(fields: dict[str, int], group=None, device=None, what: str = "model") -> None:
    """Raise the same ValueError on every rank unless every rank passed the same ``fields``: one
    all-gather instead of a collective of mismatched shapes (which hangs or aborts the job)."""
    names = list(fields)
    values = all_gather_ints([fields[n] for n in names], group, device=device)
    for i, name in enumerate(names):
        seen = [v[i] for v in values]
        if len(set(seen)) > 1:
            raise ValueError(f"{what}: the ranks disagree on {name}: {seen} (rank order); every rank must use "
                             "the same model, classes and features")


def all_gather_stats(stats, group=None):
    """Merge every rank's statistics (in rank order); every rank gets the same result."""
    check_agreement(stats_signature(stats), group, device=collective_device(group, stats.count.device), what="stats")
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


def all_reduce_stats(stats, group=None):
    """Every rank's statistics combined; every rank gets the same result (as :func:`all_gather_stats`).

    Gaussian statistics are summed in place, in three ``all_reduce(SUM)`` calls: the counts, the
    count-weighted means (giving the global means), then each rank's scatter re-centred on the
    global means, ``M2_r + n_r (mean_r - mean)(mean_r - mean)^T`` (Chan's rule, written as a sum).
    Memory: one extra copy of the statistics per rank, where :func:`all_gather_stats` holds every
    rank's copy (world x K d^2 doubles for full covariances). KDE statistics are all-gathered.
    """
    if isinstance(stats, KDEStats):
        return all_gather_stats(stats, group)
    if not isinstance(stats, GaussianStats):
        raise TypeError(f"stats: expected GaussianStats or KDEStats, got {type(stats).__name__}")
    check_agreement(stats_signature(stats), group, device=collective_device(group, stats.count.device), what="stats")
    count = stats.count.clone()
    dist.all_reduce(count, group=group)
    total = stats.mean * stats.count.unsqueeze(1)
    dist.all_reduce(total, group=group)
    mean = torch.where(count.unsqueeze(1) > 0, total / count.clamp(min=1).unsqueeze(1), torch.zeros_like(total))
    delta = stats.mean - mean  # (K, d); weighted by this rank's counts (0 for its empty classes)
    weighted = delta * stats.count.unsqueeze(1)
    m2 = stats.m2.clone()
    if stats.covariance == "diag":
        m2 += weighted * delta
    elif stats.covariance == "tied":
        m2 += weighted.T @ delta
    else:
        m2.baddbmm_(weighted.unsqueeze(2), delta.unsqueeze(1))
    dist.all_reduce(m2, group=group)
    return GaussianStats(stats.covariance, count, mean, m2)


def fit_distributed(model: ClassModel, z, y, num_classes: int, group=None) -> ClassModel:
    """Fit ``model`` on the union of every rank's (z, y); identical on every rank. Ranks that
    disagree on the model's kind and options, K or d get the same ValueError, not a hang."""
    stats = model.compute_stats(z, y, num_classes)
    check_agreement(model_signature(model), group, device=collective_device(group, stats.count.device))
    return model.fit_stats(all_gather_stats(stats, group))


def broadcast_model(model: ClassModel, src: int = 0, group=None) -> ClassModel:
    """Make every rank's fitted ``model`` equal to rank ``src``'s (e.g. after a refit on src).

    Every rank must pass a fitted model of the same kind, options, K and d (pass the previously
    fitted model on the other ranks); otherwise every rank gets the same ValueError, not a hang.
    """
    stats = model.stats
    device = collective_device(group, stats.count.device if stats is not None else None)
    # the same length on every rank: an unfitted receiver sends zeros for the statistics' fields
    shape = list(stats_signature(stats).values()) if stats is not None else [0] * len(_STATS_FIELDS)
    mine = [1 if stats is not None else 0, *model_signature(model).values(), *shape]
    theirs = torch.tensor(mine, dtype=torch.int64, device=device)
    dist.broadcast(theirs, src, group=group)
    ok = torch.tensor([1 if theirs.tolist() == mine else 0], dtype=torch.int64, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not int(ok):
        raise ValueError(f"model: rank {src} broadcasts a model that not every rank can receive: every rank "
                         "needs a fitted model of the same kind, options, K and d")
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
