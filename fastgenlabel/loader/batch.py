"""What a GenLabelLoader yields."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..functional.pairs import MixPairs
from ..functional.switch import MixDraw


@dataclass
class LoaderBatch:
    """One batch. Reads as the 2-tuple ``(images, targets)``: ``images, targets = batch``,
    ``batch[0]``, ``batch[1]``, ``batch[-1]``, ``batch[:2]``, as a DataLoader's ``(x, y)`` batch
    does; the rest is there on request as attributes. ``len(batch)`` is the number of samples B.

    Attributes:
        images: (B, C, H, W) (or (B, H, W, C) for ``layout="HWC"``) mixed, normalised images,
            float32 or float16, on the loader's device.
        targets: (B, K) float32 training targets (GenLabel's, or mixup's without a model), rows
            summing to 1, on the loader's device.
        labels: (B,) int64 class of every (unmixed) sample; ``labels[pairs.perm]`` are the partners'.
        pairs: the MixPairs (perm, lam) the batch was mixed with (CPU).
        indices: (B,) int64 sample indices into the dataset (None when a torch dataset gives none).
        features: (B, d) float32 features of the unmixed samples, or None without features.
        thumbnails: (B, t*t*C) float32 unmixed thumbnails, when asked for (``return_thumbnails``).
        draw: with timm's options (CutMix, ``prob``, ``mode``): the batch's MixDraw (its pairs,
            CutBoxes with the cut mask, and each sample's kind); None otherwise.
        mixed_features: with timm's options and linear features, (B, d) features of each mixed
            image (the cut-and-pasted image's for cut samples) that the targets were computed from.
    """

    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    pairs: MixPairs
    indices: torch.Tensor | None
    features: torch.Tensor | None = None
    thumbnails: torch.Tensor | None = None
    draw: MixDraw | None = None
    mixed_features: torch.Tensor | None = None

    def __iter__(self):
        yield self.images
        yield self.targets

    def __getitem__(self, i):
        return (self.images, self.targets)[i]

    def __len__(self) -> int:
        return int(self.labels.shape[0])
