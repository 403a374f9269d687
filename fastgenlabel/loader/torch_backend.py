"""The torch backend: any Dataset or DataLoader; mix and relabel after collation, with the same kernels.

Each collated batch ``(images (B, H, W, C) uint8 or float in the units of mean and std, labels
(B,)[, indices (B,)])`` goes to the loader's device, gets its pairs from the same seeded
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
        self._it = None
        self._epoch = 0
        self._batch = 0

    @property
    def sampled_size(self) -> int | None:
        return None if self.dataset is None else len(self.dataset)

    def _epoch_loader(self, epoch: int):
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
        batches = [b.tolist() for b in batch_indices(order, c.batch_size, c.last_batch)]
        workers = int(c.extra.get("num_workers", 0))
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=workers,
                                           collate_fn=collate_skipping_none,
                                           pin_memory=self.device.type == "cuda", persistent_workers=False)

    def start_epoch(self, epoch: int) -> None:
        self._epoch, self._batch = epoch, 0
        self._it = iter(self._epoch_loader(epoch))

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
        images = images.to(self.device, non_blocking=True).contiguous()
        pairs = self.feed.draw(images.shape[0], self._epoch, self._batch)
        self._batch += 1
        thumbs = thumbnails_torch(images, self.thumbnail) if self.thumbnail else None
        c = self.config
        mixed = mix_images(images, pairs, c.mean, c.std, dtype=c.dtype, layout=c.layout)
        return mixed, thumbs, indices, labels, pairs


def _check_images(images) -> None:
    """The torch backend's batches: (B, H, W, C) uint8 or float, in the units of mean and std."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"dataset: expected image batches as torch tensors (items: (H, W, C) uint8 tensors or "
                        f"arrays and int labels), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"dataset: expected (B, H, W, C) image batches, got shape {tuple(images.shape)}")
    if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
        raise ValueError(f"dataset: image batches of shape {tuple(images.shape)} look like (B, C, H, W); the torch "
                         "backend takes (B, H, W, C) (items (H, W, C), as PIL/NumPy images are; drop ToTensor and "
                         "Normalize from the dataset's transform: the loader normalises)")
