"""From a batch's features, pairs and labels to its training targets (both backends share this)."""
from __future__ import annotations

import contextlib

import torch

from ..features import NoFeatures, StoredEmbeddings, ThumbnailPCA, thumbnails_torch
from ..functional import mixup_target
from ..functional._arrays import to_device
from ..functional.pairs import MixPairs
from ..functional.switch import UNMIXED, MixDraw, MixFeed
from ..kernels.relabel import relabel


def switch_feed(config) -> MixFeed | None:
    """The loader's source of timm's CutMix / switched draws (``LoaderConfig.switch_options``), or
    None when the pairs come from the ``PairFeed`` (``pairing``, ``lam_mode``)."""
    options = config.switch_options()
    if options is None:
        return None
    return MixFeed(seed=config.seed, shard_id=config.shard_id, batch_size=config.batch_size, **options)


def cut_thumbnails(images_hwc: torch.Tensor, draw: MixDraw, size: int) -> torch.Tensor:
    """(B, t*t*C) float32 thumbnails of the cut-and-pasted images (the sample's own where it is not
    cut), in the images' units: what the DALI stage sums in its pass (docs/MATH.md section 8).

    The pasted batch is formed here (one pass over the batch on the torch backend)."""
    b, h, w, _ = images_hwc.shape
    boxes = draw.boxes.boxes.to(images_hwc.device)
    cut = (torch.ones(b, dtype=torch.bool) if draw.boxes.cut is None else draw.boxes.cut).to(images_hwc.device)
    ys = torch.arange(h, device=images_hwc.device).view(1, h, 1)
    xs = torch.arange(w, device=images_hwc.device).view(1, 1, w)
    y0, y1, x0, x1 = (boxes[:, i].view(b, 1, 1) for i in range(4))
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1) & cut.view(b, 1, 1)
    pasted = torch.where(inside.unsqueeze(-1), images_hwc[draw.pairs.perm.to(images_hwc.device)], images_hwc)
    return thumbnails_torch(pasted, size)


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

    def switched(self, z, z_cut, draw: MixDraw, labels: torch.Tensor):
        """(targets, mixed features) of a batch drawn by timm's rules (docs/MATH.md section 8).

        Unmixed samples keep their smoothed one-hot targets. Without a model: mixup targets with
        the (box-corrected) lambda. Stored embeddings: interpolated by that lambda (relabel with
        the pairs, an approximation for cut samples). Linear features: each sample's mixed
        features, ``z_cut`` (the cut-and-pasted image's) for cut samples and
        ``lam z + (1 - lam) z[perm]`` for the others, relabeled with identity pairs (gamma 1)
        and blended with the mixup label, then smoothed.

        Args:
            z: (B, d) features of the unmixed samples, or None; z_cut: (B, d) features of the
                cut-and-pasted images (linear features with boxes), or None.
            draw: the batch's MixDraw; labels: (B,) int64.

        Returns:
            (B, K) float32 targets and the (B, d) mixed features (None unless linear features).
        """
        dev, k, eps = labels.device, self.num_classes, self.smoothing
        pairs = draw.pairs.to(dev)
        lam = pairs.lam
        keep = ((draw.kind.to(dev) == UNMIXED) | (lam == 1)).reshape(-1, 1)
        b = len(labels)
        ident = MixPairs(torch.arange(b, device=dev), torch.ones(b, device=dev))
        one_hot = mixup_target(labels, ident, k, smoothing=eps)
        if z is None or not self.uses_features:
            return mixup_target(labels, pairs, k, smoothing=eps), None
        z = to_device(z, dev)
        if isinstance(self.features, StoredEmbeddings):
            if bool(keep.all()):
                return one_hot, None
            t = relabel(self.model, z, pairs, labels, self.gamma, num_classes=k, smoothing=eps, backend=self.backend,
                        validate=not labels.is_cuda)
            return torch.where(keep, one_hot, t), None
        w = lam.reshape(-1, 1)
        z_mix = w * z + (1 - w) * z[pairs.perm]
        if z_cut is not None and draw.boxes is not None:
            cut = (torch.ones(b, dtype=torch.bool) if draw.boxes.cut is None else draw.boxes.cut).to(dev)
            z_mix = torch.where(cut.reshape(-1, 1), to_device(z_cut, dev), z_mix)
        z_mix = z_mix.contiguous()
        if bool(keep.all()):  # nothing mixed: nothing to relabel
            return one_hot, z_mix
        y_gen = relabel(self.model, z_mix, ident, labels, 1.0, num_classes=k, backend=self.backend,
                        validate=not labels.is_cuda)
        t = self.gamma * y_gen + (1 - self.gamma) * mixup_target(labels, pairs, k)
        t = t * (1 - eps) + eps / k if eps else t
        return torch.where(keep, one_hot, t.to(torch.float32)), z_mix


def deep_targets(model, features: torch.Tensor, batch, gamma: float = 1.0, *, smoothing: float = 0.0,
                 backend: str = "auto") -> torch.Tensor:
    """GenLabel targets from the network's own features of the mixed batch (the deep variant).

    ``features`` (B, d) are what the network computed from ``batch.images``, the mixed images
    themselves, so they are the mixed samples' features for mixup and CutMix alike (docs/MATH.md
    section 8): ``t = gamma * softmax_c(log p_c(h) + log pi_c) + (1 - gamma) * y_mix``, smoothed,
    ``y_mix`` with the batch's (box-corrected) lambda. Samples the batch's draw left unmixed keep
    their smoothed one-hot targets.

    Args:
        model: a class model fitted on those features; features: (B, d), detached here.
        batch: the LoaderBatch the features are of (its labels, pairs and draw).
        gamma, smoothing: GenLabel's weight and label smoothing; backend: ``relabel``'s.
    """
    labels = batch.labels
    if features.ndim != 2 or features.shape[0] != len(labels):
        raise ValueError(f"features: expected ({len(labels)}, d), one row per sample of the batch, got "
                         f"{tuple(features.shape)}")
    dev, k, b = labels.device, model.num_classes, len(labels)
    pairs = batch.pairs.to(dev)
    ident = MixPairs(torch.arange(b, device=dev), torch.ones(b, device=dev))
    h = features.detach().to(device=dev, dtype=torch.float32).contiguous()
    y_gen = torch.as_tensor(relabel(model, h, ident, labels, 1.0, num_classes=k, backend=backend))
    t = gamma * y_gen + (1 - gamma) * mixup_target(labels, pairs, k)
    t = t * (1 - smoothing) + smoothing / k if smoothing else t
    draw = getattr(batch, "draw", None)
    if draw is None:
        return t.to(torch.float32)
    keep = ((draw.kind.to(dev) == UNMIXED) | (pairs.lam == 1)).reshape(-1, 1)
    return torch.where(keep, mixup_target(labels, ident, k, smoothing=smoothing), t.to(torch.float32))
