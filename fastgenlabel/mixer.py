"""``fastgenlabel.Mixup``: timm's ``Mixup`` (mixup, CutMix, switched per batch, pair or sample), fused and relabeled.

``images, targets = mixer(images, labels[, features])`` after any DataLoader: the draws are
timm's (:func:`~fastgenlabel.functional.switch.sample_mix`, NumPy's global state by default),
the images go through the fused pixel stage in one pass (mix or cut-and-paste, optional
normalisation, layout and dtype), and the targets are timm's (no ``model``) or GenLabel's
(docs/MATH.md section 8): the class likelihoods of each mixed sample's features, blended with
weight ``gamma`` with the mixed label and smoothed; unmixed samples keep their smoothed one-hot.
"""
from __future__ import annotations

import numpy as np
import torch

from .features import ThumbnailPCA, thumbnails_torch
from .functional._arrays import check_num_classes, check_unit_interval
from .functional.pairs import CutBoxes, MixPairs, _check_minmax, check_alpha
from .functional.switch import MIX_MODES, UNMIXED, MixDraw, _check_probability, sample_mix
from .kernels.pixel import mix_images
from .kernels.relabel import relabel

__all__ = ["Mixup"]


class Mixup:
    """Mixup and CutMix with timm's arguments and meanings, in the fused pixel stage.

    Args:
        mixup_alpha, cutmix_alpha: Beta parameters; a kind is active when its alpha is > 0.
        cutmix_minmax: ``(min, max)`` box side ratios instead of boxes from lambda (as timm, it
            makes CutMix active with ``cutmix_alpha = 1``).
        prob: probability of mixing a batch / pair / sample at all; switch_prob: of CutMix
            rather than mixup when both are active.
        mode: "batch", "pair" or "elem". Odd batches work (timm asserts even ones): the middle
            sample, its own partner, stays unmixed.
        correct_lam: lambda from the clipped box (timm's default, True).
        label_smoothing, num_classes: timm's (defaults as timm 1.0: 0.1 and 1000).
        model: a fitted class model for GenLabel targets, or None for timm's targets.
        gamma: weight of the GenLabel label in [0, 1] (0: timm's targets with a model too).
        features: with a model, a fitted ThumbnailPCA (features of each mixed image, exact up to
            the output dtype's rounding: they are computed from the output batch), or
            None: then the call's third argument gives (B, d) stored embeddings, interpolated by
            each sample's lambda (an approximation for CutMix and mixup alike; MATH.md section 8).
        mean, std: per-channel normalisation in the input's units (0-255 for uint8); None: none.
        dtype: output dtype ("float32", "float16", "bfloat16"); None: float32 for uint8 input,
            the input's dtype otherwise.
        input_layout, layout: "CHW" (torch's (B, C, H, W), the default) or "HWC", in and out. A
            (B, C, H, W) batch in channels-last memory is read as it lies (no copy).
        generator: None (NumPy's global state, as timm: seeding ``np.random`` seeds the draws),
            a RandomState, a NumPy or torch Generator, or an int seed (a NumPy Generator seeded
            once from it).
        backend: the pixel stage's backend ("auto", "numba-cpu", "numba-cuda", "reference").

    Attributes:
        mixup_enabled: set False to stop mixing (timm's train loop does at ``--mixup-off-epoch``);
            the targets are then the smoothed one-hot labels.
    """

    def __init__(self, mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode="batch", correct_lam=True, label_smoothing=0.1, num_classes=1000, *, model=None, gamma=1.0,
                 features=None, mean=None, std=None, dtype=None, input_layout="CHW", layout="CHW", generator=None,
                 backend="auto"):
        self.mixup_alpha = check_alpha(mixup_alpha)
        self.cutmix_alpha = check_alpha(cutmix_alpha)
        self.cutmix_minmax = None if cutmix_minmax is None else _check_minmax(cutmix_minmax)
        if self.cutmix_minmax is not None:
            self.cutmix_alpha = 1.0  # as timm: minmax makes CutMix active
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup_alpha, cutmix_alpha: at least one must be > 0 (or cutmix_minmax set)")
        self.mix_prob = _check_probability(prob, "prob")
        self.switch_prob = _check_probability(switch_prob, "switch_prob")
        if mode not in MIX_MODES:
            raise ValueError(f"mode: expected one of {MIX_MODES}, got {mode!r}")
        self.mode = mode
        self.correct_lam = bool(correct_lam)
        self.label_smoothing = check_unit_interval(label_smoothing, "label_smoothing")
        self.num_classes = check_num_classes(num_classes)
        self.gamma = check_unit_interval(gamma, "gamma")
        if model is not None and model.num_classes != self.num_classes:
            raise ValueError(f"num_classes: {self.num_classes}, but the model was fitted for {model.num_classes} "
                             "classes")
        if features is not None:
            if model is None:
                raise ValueError("features: a feature map is only used with a model (GenLabel targets)")
            if not isinstance(features, ThumbnailPCA) or not features.fitted:
                raise TypeError(f"features: expected a fitted ThumbnailPCA (a map linear in the image) or None "
                                f"(stored embeddings passed per call), got {features!r}")
            if features.dim != model.dim:
                raise ValueError(f"features: {features.dim} components, but the model takes {model.dim} features")
        self.model, self.features = model, features
        self.mean, self.std, self.dtype = mean, std, dtype
        self.input_layout, self.layout = input_layout, layout
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            if generator < 0:
                raise ValueError(f"generator: an int seed must be >= 0, got {generator!r}")
            generator = np.random.default_rng(int(generator))  # seeded once: each batch draws anew
        self.generator, self.backend = generator, backend
        self.mixup_enabled = True

    def draw(self, batch_size: int, height: int, width: int) -> MixDraw:
        """The next batch's choices (advances the generator as timm's ``Mixup`` would)."""
        if not self.mixup_enabled:
            return unmixed(batch_size, height, width)
        return sample_mix(batch_size, height, width, mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                          cutmix_minmax=self.cutmix_minmax, prob=self.mix_prob, switch_prob=self.switch_prob,
                          mode=self.mode, correct_lam=self.correct_lam, generator=self.generator)

    def __call__(self, images, labels, features=None):
        """Mix a batch: ``(images, targets)``, images as the pixel stage writes them (a new tensor)
        and (B, num_classes) float32 targets on the images' device."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a torch tensor batch, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images: expected a batch of 4 dimensions ({self.input_layout}), got shape "
                             f"{tuple(images.shape)}")
        b = images.shape[0]
        input_layout = self.input_layout
        chw = input_layout.upper() in ("CHW", "NCHW")
        h, w = images.shape[2:] if chw else images.shape[1:3]
        if chw and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
            images, input_layout = images.permute(0, 2, 3, 1), "HWC"  # the same memory, read as it lies
        labels = _labels(labels, b, self.num_classes, images.device)
        draw = self.draw(b, int(h), int(w))
        dtype = self.dtype
        if dtype is None:
            dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
        out = mix_images(images, draw.pairs, self.mean, self.std, dtype=dtype, layout=self.layout,
                         input_layout=input_layout, boxes=draw.boxes, backend=self.backend)
        return out, self.targets(draw, labels, features=features, mixed=out)

    def targets(self, draw: MixDraw, labels: torch.Tensor, *, features=None, mixed=None) -> torch.Tensor:
        """(B, K) float32 targets of a drawn batch: timm's without a model, GenLabel's with one.

        ``features``: (B, d) stored embeddings of the unmixed samples (model without a feature
        map); ``mixed``: the pixel stage's output (model with a feature map)."""
        device = labels.device
        lam = draw.pairs.lam.to(device)
        if self.model is None or self.gamma == 0:
            if features is not None:
                raise ValueError("features: per-sample embeddings are only used with a model and gamma > 0")
            return timm_targets(labels, lam, self.num_classes, self.label_smoothing)
        eps, k = self.label_smoothing, self.num_classes
        keep = ((draw.kind.to(device) == UNMIXED) | (lam == 1)).reshape(-1, 1)  # incl. cut by an empty box
        one_hot = timm_targets(labels, torch.ones_like(lam), k, eps)
        if bool(keep.all()):  # nothing mixed (e.g. mixup_enabled off): nothing to relabel
            return one_hot
        pairs = draw.pairs.to(device)
        if self.features is not None:
            if features is not None:
                raise ValueError("features: the mixer computes features with its ThumbnailPCA; pass no embeddings")
            z = self._linear_features(mixed)  # each mixed image's own features: exact
            ident = MixPairs(torch.arange(len(labels), device=device), torch.ones(len(labels), device=device))
            y_gen = relabel(self.model, z, ident, labels, 1.0, num_classes=k)  # softmax of the log-joints
            y_mix = timm_targets(labels, lam, k, 0.0)
            t = self.gamma * y_gen + (1 - self.gamma) * y_mix
            t = t * (1 - eps) + eps / k if eps else t
        else:
            if features is None:
                raise ValueError("features: a model without a feature map needs the batch's (B, d) embeddings as "
                                 "the third argument, mixer(images, labels, features)")
            z = torch.as_tensor(features).to(device=device, dtype=torch.float32).contiguous()
            t = relabel(self.model, z, pairs, labels, self.gamma, num_classes=k, smoothing=eps)
            t = torch.as_tensor(t)
        return torch.where(keep, one_hot, t.to(torch.float32))

    def _linear_features(self, mixed: torch.Tensor) -> torch.Tensor:
        """The feature map of the mixed images in the input's units (the normalisation undone:
        the thumbnail is affine per channel, so this is the map of the cut-and-pasted input)."""
        x = mixed.to(torch.float32)
        if self.layout.upper() in ("CHW", "NCHW"):
            x = x.permute(0, 2, 3, 1)
        if self.mean is not None:
            c = x.shape[-1]
            mean = torch.as_tensor(np.broadcast_to(np.asarray(self.mean, np.float64), (c,)).copy(), device=x.device)
            std = torch.as_tensor(np.broadcast_to(np.asarray(self.std, np.float64), (c,)).copy(), device=x.device)
            thumbs = thumbnails_torch(x, self.features.thumbnail).reshape(x.shape[0], -1, c)
            thumbs = (thumbs * std.float() + mean.float()).reshape(x.shape[0], -1)
        else:
            thumbs = thumbnails_torch(x, self.features.thumbnail)
        return self.features.transform(thumbs).contiguous()

    def __repr__(self) -> str:
        return (f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"cutmix_minmax={self.cutmix_minmax}, prob={self.mix_prob}, switch_prob={self.switch_prob}, "
                f"mode={self.mode!r}, label_smoothing={self.label_smoothing}, num_classes={self.num_classes}, "
                f"model={type(self.model).__name__ if self.model is not None else None}, gamma={self.gamma})")


def unmixed(batch_size: int, height: int, width: int) -> MixDraw:
    """A batch left as it is: every sample cut with an empty box (reads no partner), lambda 1."""
    b = int(batch_size)
    pairs = MixPairs(torch.arange(b - 1, -1, -1, dtype=torch.int64), torch.ones(b))
    boxes = CutBoxes(torch.zeros(b, 4, dtype=torch.int64), int(height), int(width), torch.ones(b, dtype=torch.bool))
    return MixDraw(pairs, boxes, torch.full((b,), UNMIXED, dtype=torch.int8))


def timm_targets(labels: torch.Tensor, lam: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's ``mixup_target`` with the partner ``B - 1 - i``: smoothed one-hots, mixed by lambda."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = torch.full((len(labels), num_classes), off, device=labels.device).scatter_(1, labels.view(-1, 1), on)
    lam = lam.to(device=labels.device, dtype=torch.float32).reshape(-1, 1)
    return y1 * lam + y1.flip(0) * (1.0 - lam)


def _labels(labels, b: int, k: int, device) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"labels: expected integer class labels, got dtype {t.dtype}")
    if t.shape != (b,):
        raise ValueError(f"labels: expected shape ({b},), one per image, got {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.int64)
    if b and not bool(((t >= 0) & (t < k)).all()):
        raise ValueError(f"labels: must lie in [0, {k}) for num_classes={k}, got [{int(t.min())}, {int(t.max())}]")
    return t


