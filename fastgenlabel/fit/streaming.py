"""Streaming fit: per-class sufficient statistics accumulated batch by batch, all-reduced across ranks.

``StreamingFit(model, K).update(z, y)`` for every batch, then ``.result()`` fits the model. The
statistics (:class:`~fastgenlabel.models.GaussianStats`: count, mean, centred scatter, merged with
Chan et al.'s pairwise rule; :class:`~fastgenlabel.models.KDEStats`: a capped, seeded sample per
class) live on the device of the features, in float64. When ``torch.distributed`` is initialised,
``result()`` combines every rank's statistics (``fastgenlabel.distributed.all_reduce_stats``: sums
for the Gaussians, an all-gather of the kept points for KDE; the same on every rank) before fitting.

Rows are buffered and turned into statistics ``chunk_rows`` at a time: a merge costs O(K d^2)
for full covariances whatever the batch size, so merging every 256-row batch of a K = 1000,
d = 256 stream would spend its time adding 0.5 GB tensors. The result equals a single fit on
all rows up to float64 rounding (tests: 1e-10), and exactly for KDE's kept points.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..functional._arrays import as_tensor, check_float_features, check_labels, check_num_classes
from ..models import ClassModel, GaussianStats, KDEStats
from .sources import InputFeatures, LinearMapFeatures, as_source

# Buffer at most this many feature values (and at least MIN_CHUNK_ROWS rows) before computing statistics.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 4096, 65536


@dataclass(frozen=True)
class FitReport:
    """What a pass over a stream of batches did."""

    samples: int
    batches: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (f"{self.samples} samples in {self.batches} batches, {self.seconds:.2f} s "
                f"({self.samples_per_second:,.0f} samples/s)")


class StreamingFit:
    """Fit a class model from a stream of (z, y) batches.

    Args:
        model: an unfitted (or fitted: it is refitted) ``GaussianClassModel`` or ``KDEClassModel``;
            its options (covariance, reg, bandwidth, cap, seed) decide the statistics kept.
        num_classes: K.
        chunk_rows: rows buffered before they become statistics and are merged (None: automatic,
            4096 to 65536 rows, about 16M values; 1 merges every batch as it comes).

    Example::

        fit = StreamingFit(GaussianClassModel("diag"), num_classes=1000)
        for x, y in batches:
            fit.update(backbone(x), y)
        model = fit.result()          # all-reduced across ranks when torch.distributed is up
    """

    def __init__(self, model: ClassModel, num_classes: int, *, chunk_rows: int | None = None):
        if not isinstance(model, ClassModel):
            raise TypeError(f"model: expected a GaussianClassModel or KDEClassModel, got {type(model).__name__}")
        self.model = model
        self.num_classes = check_num_classes(num_classes)
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError(f"chunk_rows: expected a positive integer or None, got {chunk_rows!r}")
        self.chunk_rows = chunk_rows
        self.dim: int | None = None
        self.device: torch.device | None = None
        self.num_samples = 0
        self.num_batches = 0
        self._stats = None
        self._buf_z: list[torch.Tensor] = []
        self._buf_y: list[torch.Tensor] = []
        self._buf_rows = 0

    def __repr__(self) -> str:
        return (f"StreamingFit({self.model!r}, num_classes={self.num_classes}, dim={self.dim}, "
                f"samples={self.num_samples}, batches={self.num_batches})")

    # ---- accumulation ------------------------------------------------------------------------
    def update(self, z, y) -> StreamingFit:
        """Add one batch.

        Args:
            z: (B, d) finite float features (NumPy or torch, any device; the first batch's device
                is where the statistics live, later batches are moved there). d must not change.
            y: (B,) integer labels in [0, num_classes).

        Returns:
            self.

        Raises:
            ValueError / TypeError naming ``z`` or ``y`` and the batch number.
        """
        b = self.num_batches
        zt = as_tensor(z, "z")
        if zt.ndim != 2:
            raise ValueError(f"z: expected shape (B, d), got {tuple(zt.shape)} in batch {b}")
        if self.dim is None:
            if zt.shape[1] < 1:
                raise ValueError(f"z: expected at least one feature per row, got shape {tuple(zt.shape)} in batch {b}")
            self.dim, self.device = int(zt.shape[1]), zt.device
        elif zt.shape[1] != self.dim:
            raise ValueError(f"z: batch {b} has {zt.shape[1]} features per row, but the earlier batches had "
                             f"{self.dim}; every batch must have the same d")
        zt = zt.to(self.device)
        try:
            check_float_features(zt, "z")
            yt = check_labels(as_tensor(y, "y", device=self.device), "y", self.num_classes, n=zt.shape[0])
        except (ValueError, TypeError) as e:
            raise type(e)(f"{e} (batch {b})") from None
        self.num_batches += 1
        if zt.shape[0] == 0:
            return self
        self.num_samples += int(zt.shape[0])
        if not self._buf_rows and zt.shape[0] >= self._chunk():
            self._merge(zt, yt)  # a large batch: no buffering
            return self
        # Buffered rows are copies: the caller may reuse its batch buffers (NumPy arrays share memory).
        self._buf_z.append(zt.clone())
        self._buf_y.append(yt.clone())
        self._buf_rows += int(zt.shape[0])
        if self._buf_rows >= self._chunk():
            self._flush()
        return self

    def _chunk(self) -> int:
        if self.chunk_rows is not None:
            return self.chunk_rows
        return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, self.dim)))

    def _flush(self) -> None:
        if not self._buf_rows:
            return
        z = self._buf_z[0] if len(self._buf_z) == 1 else torch.cat(self._buf_z)
        y = self._buf_y[0] if len(self._buf_y) == 1 else torch.cat(self._buf_y)
        self._buf_z, self._buf_y, self._buf_rows = [], [], 0
        self._merge(z, y)

    def _merge(self, z: torch.Tensor, y: torch.Tensor) -> None:
        stats = self.model.compute_stats(z, y, self.num_classes)
        self._stats = stats if self._stats is None else self._stats.merge(stats)

    @property
    def stats(self):
        """This process's merged statistics so far (None before the first sample)."""
        self._flush()
        return self._stats

    # ---- result ------------------------------------------------------------------------------
    def result(self, group=None) -> ClassModel:
        """Fit the model on everything seen; across all ranks when ``torch.distributed`` is initialised.

        Every rank of ``group`` must call it (a collective); ranks that saw no samples take part
        with empty statistics. Every rank gets a bit-identical model.

        Raises:
            ValueError: the stream was empty (on every rank), or ranks saw different d.
        """
        stats = self.stats
        if _distributed(group):
            stats = _gather_stats(self, stats, group)
        if stats is None:
            raise ValueError("batches: the stream was empty (no batch had any sample); nothing to fit")
        return self.model.fit_stats(stats)

    # ---- iterables of batches ----------------------------------------------------------------
    def consume(self, batches, *, features=None, progress: bool | None = None, desc: str = "fit",
                shard: tuple[int, int] | None = None) -> FitReport:
        """Add every batch of an iterable; features come from ``features`` (see :func:`as_source`).

        Args:
            batches: an iterable of ``(x, y)`` or ``(x, y, index)`` (tuples or lists), or of
                :class:`fastgenlabel.loader.LoaderBatch` (its thumbnails feed a linear map, its
                images anything else; images must be unmixed: a loader with ``alpha=0``).
            features: the feature source: None (the input itself), a torch module, a fitted
                ThumbnailPCA, stored embeddings (a ``.npy`` path) or any callable.
            progress: a tqdm bar (None: on rank 0 when stderr is a terminal).
            desc: the bar's label.
            shard: ``(rank, world)`` when ``batches`` is one rank's share of an *unshuffled* sharded pass
                (``LoaderConfig(shuffle=False, shard_id=rank, num_shards=world)``, or a
                ``DistributedSampler(shuffle=False)``): keeps sample i only on rank ``i % world``,
                which drops the wrap-around padding that evens out the shards, so that every sample
                counts once in the all-reduced statistics. Needs sample indices.

        Returns:
            a :class:`FitReport` (samples, batches, seconds, samples/s) of this pass.
        """
        from tqdm.auto import tqdm

        source = as_source(features)
        if progress is None:
            progress = _rank() == 0 and sys.stderr.isatty()
        try:
            total = len(batches)
        except TypeError:
            total = None
        bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)
        samples0, batches0 = self.num_samples, self.num_batches
        t0 = time.perf_counter()
        try:
            for item in batches:
                x, y, index = _unpack(item, source)
                if shard is not None:
                    x, y, index = _owned(x, y, index, shard)
                self.update(source(x, index), y)
                bar.update(1)
                if bar.n % 10 == 1 or bar.n == total:
                    dt = time.perf_counter() - t0
                    bar.set_postfix(samples_s=f"{(self.num_samples - samples0) / max(dt, 1e-9):,.0f}", refresh=False)
        finally:
            bar.close()
        self._flush()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return FitReport(self.num_samples - samples0, self.num_batches - batches0, time.perf_counter() - t0)


def fit_batches(model: ClassModel, batches, num_classes: int, *, features=None, progress: bool | None = None,
                group=None, chunk_rows: int | None = None, shard: tuple[int, int] | None = None,
                log=None) -> ClassModel:
    """Fit ``model`` on a stream of batches (all ranks' batches when torch.distributed is up).

    Args:
        model: the class model to fit.
        batches: iterable of ``(x, y)``, ``(x, y, index)`` or LoaderBatch (see :meth:`StreamingFit.consume`).
        num_classes: K.
        features: feature source (see :func:`fastgenlabel.fit.as_source`).
        progress: show a tqdm bar (None: on rank 0 when stderr is a terminal).
        group: the process group (None: the default group, when initialised).
        chunk_rows: see :class:`StreamingFit`.
        shard: ``(rank, world)`` of an unshuffled sharded pass: drop its padding (see :meth:`StreamingFit.consume`).
        log: a callable (e.g. ``print``) that receives one line with the throughput.

    Returns:
        the fitted model.
    """
    fit = StreamingFit(model, num_classes, chunk_rows=chunk_rows)
    report = fit.consume(batches, features=features, progress=progress, shard=shard)
    if log is not None:
        log(f"fit: {report}")
    return fit.result(group)


# ---- helpers ---------------------------------------------------------------------------------------

def _unpack(item, source):
    if hasattr(item, "labels") and hasattr(item, "images") and hasattr(item, "pairs"):  # a LoaderBatch
        if isinstance(source, LinearMapFeatures) and item.thumbnails is not None:
            x = item.thumbnails
        elif isinstance(source, InputFeatures) and item.features is not None:
            x = item.features
        else:
            if not bool((item.pairs.lam == 1).all()):
                raise ValueError("batches: the loader's images are mixed (alpha > 0); fit on an unmixed pass "
                                 "(LoaderConfig(alpha=0))")
            x = item.images
        return x, item.labels, item.indices
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise ValueError(f"batches: expected items (x, y) or (x, y, index), got {type(item).__name__}"
                         + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
    return item[0], item[1], (item[2] if len(item) == 3 else None)


def owned_mask(index, rank: int, world: int) -> torch.Tensor:
    """(B,) bool: the samples of an unshuffled sharded pass that belong to ``rank`` (``i % world == rank``).

    ``fastgenlabel.loader`` and ``DistributedSampler`` deal the positions of ``arange(N)`` round-robin
    and pad with the first samples to even out the shards; sample i's own position is on rank
    ``i % world``, its padding copies elsewhere.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: expected (rank, world) with 0 <= rank < world, got {(rank, world)!r}")
    if index is None:
        raise ValueError("shard: dropping the padding of a sharded pass needs sample indices; batches must "
                         "be (x, y, index) or LoaderBatch")
    idx = torch.as_tensor(np.asarray(index) if not isinstance(index, torch.Tensor) else index)
    return (idx % world) == rank


def _owned(x, y, index, shard):
    keep = owned_mask(index, *shard)
    if bool(keep.all()):
        return x, y, index

    def take(a):
        if a is None:
            return None
        if isinstance(a, torch.Tensor):
            return a[keep.to(a.device)]
        return np.asarray(a)[keep.cpu().numpy()]

    return take(x), take(y), take(index)


def _distributed(group) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def empty_stats(model: ClassModel, num_classes: int, dim: int, device):
    """Statistics of no samples (a rank whose shard was empty takes part in the all-reduce with these)."""
    z = torch.zeros(num_classes, dtype=torch.float64, device=device)
    if isinstance(model, ClassModel) and model._stats_type() is GaussianStats:
        model.check_memory(num_classes, dim, device)
        cov = model.covariance
        shape = {"full": (num_classes, dim, dim), "diag": (num_classes, dim), "tied": (dim, dim)}[cov]
        return GaussianStats(cov, z, torch.zeros(num_classes, dim, dtype=torch.float64, device=device),
                             torch.zeros(shape, dtype=torch.float64, device=device))
    if isinstance(model, ClassModel) and model._stats_type() is KDEStats:
        return KDEStats(z, torch.zeros(0, dim, dtype=torch.float64, device=device),
                        torch.zeros(0, dtype=torch.int64, device=device),
                        torch.zeros(0, dtype=torch.float64, device=device), int(model.max_points_per_class or 0))
    raise TypeError(f"model: no empty statistics for {type(model).__name__}")


def _gather_stats(fit: StreamingFit, stats, group):
    from .. import distributed

    device = distributed.collective_device(group, stats.count.device if stats is not None else None)
    distributed.check_agreement({**distributed.model_signature(fit.model), "K (classes)": fit.num_classes}, group,
                                device=device)
    dims = distributed.all_gather_ints([fit.dim or 0], group, device=device)
    seen = sorted({d[0] for d in dims if d[0]})
    if not seen:
        return None
    if len(seen) > 1:
        raise ValueError(f"z: the ranks streamed features of different d: {[d[0] for d in dims]} (0 = no samples)")
    if stats is None:
        stats = empty_stats(fit.model, fit.num_classes, seen[0], device)
    elif stats.count.device != device:
        stats = _stats_to(stats, device)
    return distributed.all_reduce_stats(stats, group)


def _stats_to(stats, device):
    if isinstance(stats, GaussianStats):
        return GaussianStats(stats.covariance, stats.count.to(device), stats.mean.to(device), stats.m2.to(device))
    return KDEStats(stats.count.to(device), stats.points.to(device), stats.labels.to(device), stats.keys.to(device),
                    stats.max_points)
