"""From a batch's features, pairs and labels to its training targets (both backends share this)."""
from __future__ import annotations

import contextlib

import torch

from ..features import NoFeatures, StoredEmbeddings, ThumbnailPCA
from ..functional import mixup_target
from ..functional._arrays import to_device
from ..kernels.relabel import relabel


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with ``n`` torch and Numba threads on the CPU (None: leave them as they are).

    The per-batch projection and relabel are a fraction of a millisecond of work; while DALI's
    threads decode the next batches on the same cores, letting them fan out over every core
    makes their thread pools spin-wait for descheduled workers (measured: 2 ms for a (64 x 192) x
    (192 x 32) product on 2 busy cores instead of 15 us). Numba's setting is per thread; torch's
    is restored on exit.
    """
    if n is None:
        yield
        return
    import numba

    old_torch, old_numba = torch.get_num_threads(), numba.get_num_threads()
    n_numba = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        if old_torch != n:
            torch.set_num_threads(n)
        if old_numba != n_numba:
            numba.set_num_threads(n_numba)
        yield
    finally:
        if old_torch != n:
            torch.set_num_threads(old_torch)
        if old_numba != n_numba:
            numba.set_num_threads(old_numba)


class TargetMaker:
    """Targets of a mixed batch: ``relabel`` with the class model, or mixup targets without one.

    Args:
        model: a fitted class model, or None.
        features: a ThumbnailPCA, StoredEmbeddings or NoFeatures.
        num_classes, gamma, smoothing: GenLabel's K, gamma and label smoothing.
        backend: :func:`fastgenlabel.relabel`'s backend.
        mixing: False (alpha = 0: the images are not mixed): one-hot targets, as without a
            model; GenLabel relabels mixtures, not clean samples.
    """

    def __init__(self, model, features, *, num_classes: int, gamma: float, smoothing: float, backend: str = "auto",
                 mixing: bool = True):
        self.model, self.features = model, features
        self.num_classes, self.gamma, self.smoothing, self.backend = num_classes, gamma, smoothing, backend
        self.mixing = mixing

    @property
    def uses_features(self) -> bool:
        return self.model is not None and not isinstance(self.features, NoFeatures)

    @property
    def needs_indices(self) -> bool:
        return isinstance(self.features, StoredEmbeddings)

    def features_of(self, thumbnails, indices) -> torch.Tensor | None:
        """(B, d) float32 features of the unmixed samples, or None.

        Args:
            thumbnails: (B, t*t*C) float32 thumbnails (linear maps), or None.
            indices: (B,) int64 CPU sample indices (stored embeddings).
        """
        if isinstance(self.features, ThumbnailPCA):
            return self.features.transform(thumbnails).contiguous()
        if isinstance(self.features, StoredEmbeddings):
            return self.features.lookup(indices.numpy())
        return None

    def __call__(self, z, pairs, labels: torch.Tensor) -> torch.Tensor:
        """(B, K) float32 targets on ``labels``' device.

        Args:
            z: (B, d) float32 features of the unmixed samples (on labels' device), or None.
            pairs: the batch's MixPairs (moved to labels' device here).
            labels: (B,) int64 labels.
        """
        pairs = pairs.to(labels.device)
        if z is None or not self.uses_features or not self.mixing:
            return mixup_target(labels, pairs, self.num_classes, smoothing=self.smoothing)
        # Labels come from the dataset's index and features from a finite map or from checked rows
        # (StoredEmbeddings.lookup), so a GPU batch skips relabel's check and the device sync it
        # costs (a sync here would wait for the training step the GPU is running).
        return relabel(self.model, to_device(z, labels.device), pairs, labels, self.gamma, num_classes=self.num_classes,
                       smoothing=self.smoothing, backend=self.backend, validate=not labels.is_cuda)
