"""The DALI backend: the ready image pipeline, outputs turned into torch tensors, targets computed.

CPU (no GPU, or ``device="cpu"``): the graph mixes and writes thumbnails; the outputs are copied
once into torch tensors (DALI recycles its output buffers on the next run, so a view would be
overwritten under the user's feet). GPU: the graph decodes ("mixed") and crops on the device; the
crops are copied once into a torch CUDA tensor on torch's current stream, then one fused
``mix_images`` launch mixes, normalises and changes the layout (``dali/_compat.py``, defect 3).
"""
from __future__ import annotations

import numpy as np
import torch

from ..dali import pipelines
from ..features import thumbnails_torch
from ..functional.pairs import MixPairs, PairFeed
from ..functional.switch import draw_from_rows
from ..kernels.pixel import mix_images
from .files import CorruptImageError, find_undecodable
from .source import EpochSource
from .targets import cut_thumbnails, switch_feed


def _cpu_tensor(node) -> torch.Tensor:
    return torch.from_numpy(np.array(node.as_tensor(), copy=True))


class DaliBackend:
    """Runs one pipeline for a loader; rebuilt when an epoch is abandoned half-way."""

    def __init__(self, config, files, *, device: torch.device, thumbnail: int):
        self.config, self.files, self.device, self.thumbnail = config, files, device, thumbnail
        c = config
        self.feed = PairFeed(c.alpha, pairing=c.pairing, lam_mode=c.lam_mode, seed=c.seed, shard_id=c.shard_id,
                             batch_size=c.batch_size)
        self._source_args = dict(batch_size=c.batch_size, last_batch=c.last_batch, shuffle=c.shuffle, seed=c.seed,
                                 shard_id=c.shard_id, num_shards=c.num_shards, on_bad_image=c.on_bad_image,
                                 warned=set(), checked=np.zeros(len(files), bool),
                                 max_image_pixels=c.max_image_pixels, switch=switch_feed(c),
                                 image_size=c.image_size)
        if c.train:  # crop windows and flips drawn on the host: a pass can start at any batch
            self._source_args.update(crops=dict(scale=c.crop_scale, ratio=c.crop_ratio, flip=c.flip),
                                     sizes=np.zeros((len(files), 2), np.int32))
        self.source = EpochSource(files, self.feed, **self._source_args)
        self.pipe = None
        self._clean = False  # the pipeline sits at the start of an epoch

    @property
    def sampled_size(self) -> int:
        """N, the number of samples the shards are cut from."""
        return len(self.files)

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        """(B,) int64 CPU labels of the given sample indices."""
        return torch.from_numpy(self.files.labels[indices.numpy()])

    def _build(self):
        c = self.config
        gpu = self.device.type == "cuda"
        self.pipe = pipelines.image_pipeline(
            self.source, batch_size=c.batch_size, image_size=c.image_size,
            device_id=(self.device.index or 0) if gpu else None, num_threads=c.num_threads, seed=c.seed,
            prefetch=c.prefetch, train=c.train, crop_scale=c.crop_scale, crop_ratio=c.crop_ratio, mean=c.mean,
            std=c.std, dtype=c.dtype, layout=c.written_layout, thumbnail=self.thumbnail, flip=c.flip,
            mix=not c.extra.get("baseline", False),
            per_sample=c.mix_mode == "sample" or (c.mix_mode == "auto" and c.num_threads >= 4),
            windows="crops" in self._source_args, cut=self.source.switch is not None)
        self.pipe.build()
        self._clean = True

    def start_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin a pass over ``epoch`` at its batch ``start`` (> 0: a resumed loader; the pipeline
        is rebuilt, since DALI may have asked for the next pass's first batches already)."""
        started = self.source.pass_epoch
        if self.pipe is None or not self._clean or start or (started is not None and started != epoch):
            self.close()
            self.source = EpochSource(self.files, self.feed, **self._source_args)
            self.source.epoch, self.source.start = epoch, start
            self._build()
        self.source.epoch = epoch
        self._clean = False

    def finished_epoch(self, next_epoch: int) -> None:
        self.source.epoch = next_epoch  # DALI may ask for the next epoch's first batches at once
        self.pipe.reset()
        self._clean = True

    def close(self) -> None:
        self.pipe = None  # DALI frees the pipeline when its last reference goes
        self.source.close()

    def next_raw(self):
        """(images, thumbnails or None, indices, labels, MixPairs) of the next batch; StopIteration at the end."""
        try:
            out = self.pipe.run()
        except StopIteration:
            raise
        except CorruptImageError:
            self._clean = False
            raise
        except RuntimeError as e:
            self._clean = False
            recent = [i for _, _, kept in self.source.recent for i in kept]
            bad = find_undecodable(self.files, recent)
            if bad is not None:
                raise CorruptImageError(bad[0], f"cannot be decoded ({bad[1]})") from e
            raise
        gpu = self.device.type == "cuda"
        size = self.config.image_size
        if self.source.switch is not None:  # the box rows come last: rebuild the batch's MixDraw
            *out, rows = out
            draw = draw_from_rows(MixPairs(_cpu_tensor(out[-2]).reshape(-1), _cpu_tensor(out[-1]).reshape(-1)),
                                  _cpu_tensor(rows).numpy(), size, size)
        else:
            draw = None
        if gpu:
            images, index, perm, lam = out
            crops = self._to_cuda(images, torch.uint8)
            idx = _cpu_tensor(index).reshape(-1)
            pairs = MixPairs(_cpu_tensor(perm).reshape(-1), _cpu_tensor(lam).reshape(-1))
            thumbs = thumbnails_torch(crops, self.thumbnail) if self.thumbnail else None
            if thumbs is not None and draw is not None and draw.boxes is not None:
                thumbs = (thumbs, cut_thumbnails(crops, draw, self.thumbnail))
            c = self.config
            mixed = mix_images(crops, pairs, c.mean, c.std, dtype=c.dtype, layout=c.written_layout,
                               boxes=None if draw is None else draw.boxes)
            return mixed, thumbs, idx, self.labels_of(idx), pairs if draw is None else draw
        if self.thumbnail:
            images, thumbs, index, perm, lam = out
            thumbs = _cpu_tensor(thumbs)
            if draw is not None:  # the stage wrote each sample's own thumbnail, then its cut-and-pasted one
                thumbs = (thumbs[:, :thumbs.shape[1] // 2], thumbs[:, thumbs.shape[1] // 2:])
        else:
            images, index, perm, lam = out
            thumbs = None
        pairs = MixPairs(_cpu_tensor(perm).reshape(-1), _cpu_tensor(lam).reshape(-1)) if draw is None else draw
        idx = _cpu_tensor(index).reshape(-1)
        images = _cpu_tensor(images)
        if self.config.dtype == "bfloat16":  # the stage's UINT16 bit patterns (DALI has no bfloat16)
            images = images.view(torch.bfloat16)
        return images, thumbs, idx, self.labels_of(idx), pairs

    def _to_cuda(self, node, dtype):  # pragma: no cover - needs a GPU
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = node.as_tensor()
        out = torch.empty(t.shape(), dtype=dtype, device=self.device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out
