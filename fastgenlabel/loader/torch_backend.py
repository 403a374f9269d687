"""The torch backend: any Dataset or DataLoader; mix and relabel after collation, with the same kernels.

Each collated batch ``(images (B, H, W, C) uint8, or float in the units ``float_range`` names,
labels (B,)[, indices (B,)])`` goes to the loader's device, gets its pairs from the same seeded
:class:`~fastgenlabel.functional.pairs.PairFeed` as the DALI backend, and is mixed, normalised and
laid out by one :func:`fastgenlabel.mix_images` call (numba-cpu on the CPU, numba-cuda on a GPU).
With a Dataset the loader samples itself (epochs, shards and the last-batch policy as in the DALI
backend); a DataLoader is used as given.
"""
from __future__ import annotations

import torch

from ..features import thumbnails_torch
from ..functional.pairs import PairFeed
from ..kernels.pixel import mix_images
from .images import ImageFileDataset, collate_skipping_none
from .sampling import batch_indices, shard_order
from .targets import cut_thumbnails, switch_feed


class TorchBackend:
    def __init__(self, config, files, dataset, *, device: torch.device, thumbnail: int):
        c = config
        self.config, self.device, self.thumbnail = c, device, thumbnail
        if dataset is None:
            dataset = ImageFileDataset(files, c.image_size, train=c.train, crop_scale=c.crop_scale,
                                       crop_ratio=c.crop_ratio, flip=c.flip, seed=c.seed,
                                       skip_bad=c.on_bad_image == "skip", max_image_pixels=c.max_image_pixels)
        self.loader = dataset if isinstance(dataset, torch.utils.data.DataLoader) else None
        self.dataset = None if self.loader is not None else dataset
        self.feed = PairFeed(c.alpha, pairing=c.pairing, lam_mode=c.lam_mode, seed=c.seed, shard_id=c.shard_id,
                             batch_size=c.batch_size)
        self.switch = switch_feed(c)  # timm's CutMix / switched draws, or None for the feed's pairs
        self._it = None
        self._epoch = 0
        self._batch = 0
        self._float_checked = False

    @property
    def sampled_size(self) -> int | None:
        return None if self.dataset is None else len(self.dataset)

    def _epoch_loader(self, epoch: int, start: int = 0):
        if self.loader is not None:
            sampler = getattr(self.loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            return self.loader
        c = self.config
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        order = shard_order(len(self.dataset), seed=c.seed, epoch=epoch, shuffle=c.shuffle, shard_id=c.shard_id,
                            num_shards=c.num_shards)
        batches = [b.tolist() for b in batch_indices(order, c.batch_size, c.last_batch)[start:]]
        workers = int(c.extra.get("num_workers", 0))
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=workers,
                                           collate_fn=collate_skipping_none,
                                           pin_memory=self.device.type == "cuda", persistent_workers=False)

    def start_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin a pass over ``epoch`` at its batch ``start`` (the batches before it are not loaded)."""
        if start and self.loader is not None:
            raise ValueError("dataset: a DataLoader given as the dataset cannot start a pass part-way without "
                             "replaying it; pass its Dataset (the loader then samples it and resumes exactly)")
        self._epoch, self._batch = epoch, start
        self._it = iter(self._epoch_loader(epoch, start))

    def finished_epoch(self, next_epoch: int) -> None:
        self._it = None

    def close(self) -> None:
        self._it = None

    def next_raw(self):
        """(images, thumbnails or None, indices or None, labels, MixPairs) of the next batch."""
        item = next(self._it)
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
            raise ValueError("dataset: batches must be (images, labels) or (images, labels, indices)")
        images, labels = item[0], torch.as_tensor(item[1]).to(torch.int64)
        indices = torch.as_tensor(item[2]).to(torch.int64) if len(item) == 3 else None
        _check_images(images)
        c = self.config
        unit = c.float_range == "0-1" and images.dtype.is_floating_point
        if images.dtype.is_floating_point and not self._float_checked:
            _check_float_range(images, c.float_range)  # before the copy to a GPU: no device sync
            self._float_checked = True
        images = images.to(self.device, non_blocking=True).contiguous()
        draw = None
        if self.switch is not None:
            draw = self.switch.draw(images.shape[0], self._epoch, self._batch, images.shape[1], images.shape[2])
            pairs = draw.pairs
        else:
            pairs = self.feed.draw(images.shape[0], self._epoch, self._batch)
        self._batch += 1
        thumbs = thumbnails_torch(images, self.thumbnail) if self.thumbnail else None
        if thumbs is not None and draw is not None and draw.boxes is not None:
            thumbs = (thumbs, cut_thumbnails(images, draw, self.thumbnail))
        mean, std = c.mean, c.std
        if unit:  # (255 x - mean) / std: mean and std and the thumbnails stay in 0-255 units
            channels = images.shape[-1]
            mean = tuple(m / 255 for m in mean) if mean is not None else (0.0,) * channels
            std = tuple(s / 255 for s in std) if std is not None else (1 / 255,) * channels
            if isinstance(thumbs, tuple):
                thumbs = tuple(t * 255 for t in thumbs)
            elif thumbs is not None:
                thumbs = thumbs * 255
        mixed = mix_images(images, pairs, mean, std, dtype=c.dtype, layout=c.written_layout,
                           boxes=None if draw is None else draw.boxes)
        return mixed, thumbs, indices, labels, pairs if draw is None else draw


def _check_float_range(images: torch.Tensor, float_range) -> None:
    """Refuse a first float batch whose values contradict the units ``float_range`` names."""
    lo, hi = (float(v) for v in torch.aminmax(images.detach().float()))
    if float_range is None and 0 <= lo and hi <= 1:
        raise ValueError(f"float_range: the dataset's float images lie in [{lo:.3g}, {hi:.3g}], as 0-1 images "
                         "(torchvision's ToTensor) do, but float images are read as 0-255 pixel units; pass "
                         "float_range='0-1' (or give uint8 images; float_range='0-255' if these are 0-255 values)")
    if float_range == "0-1" and not (0 <= lo and hi <= 1):
        raise ValueError(f"float_range: '0-1', but the dataset's float images lie in [{lo:.3g}, {hi:.3g}]; give "
                         "unnormalised images in [0, 1] (drop Normalize from the transform: the loader "
                         "normalises), or float_range='0-255' for images in 0-255 units")


def _check_images(images) -> None:
    """The torch backend's batches: (B, H, W, C) uint8, or float in 0-255 or 0-1 units (``float_range``)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"dataset: expected image batches as torch tensors (items: (H, W, C) uint8 tensors or "
                        f"arrays and int labels), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"dataset: expected (B, H, W, C) image batches, got shape {tuple(images.shape)}")
    if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
        raise ValueError(f"dataset: image batches of shape {tuple(images.shape)} look like (B, C, H, W); the torch "
                         "backend takes (B, H, W, C) (items (H, W, C), as PIL/NumPy images are; drop ToTensor and "
                         "Normalize from the dataset's transform: the loader normalises)")
