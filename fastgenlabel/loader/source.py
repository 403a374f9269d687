"""The DALI backend's external source: encoded images (files or tar members), sample indices and pairs, batch by batch."""
from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..functional.pairs import PairFeed, split_pairs
from ..functional.switch import box_rows
from .crops import crop_windows
from .encoded import upright_size
from .files import DEFAULT_MAX_IMAGE_PIXELS, CorruptImageError, ImageFiles, check_encoded
from .sampling import batch_indices, shard_order


class EpochSource:
    """An iterable for ``fn.external_source(num_outputs=4, batch=True)``; one pass = one epoch.

    Each item is (encoded images, indices, perm, lam) for one batch (see
    ``fastgenlabel.dali.pipelines.image_pipeline``), followed by the crop windows and flips
    (start, shape, flip) with ``crops``. DALI calls ``iter`` once, at build, and
    ``next`` across epochs: after an epoch's StopIteration the next call starts a pass over epoch
    ``self.epoch``, whose batches are computed then (``pass_epoch`` says which epoch the pass in
    progress belongs to, None before its first batch). The first pass starts at batch
    ``self.start`` (a resumed loader: the batches before it are neither read nor decoded).

    Args:
        files: the dataset.
        feed: draws each batch's pairs.
        batch_size, last_batch, shuffle, seed, shard_id, num_shards: see LoaderConfig.
        on_bad_image: "error" or "skip".
        max_image_pixels: images declaring more pixels are refused before decoding (None: no limit).
        warned: the set of files already warned about (the backend keeps one across rebuilt
            sources, so that a file is warned about once per loader).
        read_ahead: batches read by background threads (one per batch in flight) ahead of the one
            DALI asks for (0: each is read when asked). Each sample's encoded-file checks
            (:func:`~fastgenlabel.loader.files.check_encoded`) run on its first read in the
            process. DALI calls ``next`` on the thread that runs the pipeline, which also turns
            the outputs into the user's batch: reading 256 files there took about a quarter of
            that thread's budget per batch at GPU speeds. The files' reads release the GIL. What
            comes out, and where errors surface, is the same either way.
        checked: which samples passed their checks (the backend keeps one across rebuilt sources).
        crops: None (DALI draws crops and flips itself, or no random crop), or ``dict(scale=,
            ratio=, flip=)``: each batch also carries its random resized crop windows and flips,
            pure functions of (seed, epoch, sample index) (:func:`~.crops.crop_windows`).
        sizes: (N, 2) int32 upright (width, height) per sample, 0 until first read (shared
            across rebuilds, like ``checked``).
        switch: a :class:`~fastgenlabel.functional.switch.MixFeed` (timm's CutMix / switched draws
            for ``image_size`` squares) used instead of ``feed``; each item then ends with one more
            array, the (B, 6) int64 box rows (:func:`~fastgenlabel.functional.switch.box_rows`).
        image_size: the crops' side (the boxes are drawn for it).
    """

    def __init__(self, files: ImageFiles, feed: PairFeed, *, batch_size: int, last_batch: str, shuffle: bool,
                 seed: int, shard_id: int, num_shards: int, on_bad_image: str = "error", history: int = 8,
                 read_ahead: int = 2, warned: set | None = None, checked: np.ndarray | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, crops: dict | None = None,
                 sizes: np.ndarray | None = None, switch=None, image_size: int = 0):
        self.files, self.feed = files, feed
        self.switch, self.image_size = switch, image_size
        self.batch_size, self.last_batch, self.shuffle = batch_size, last_batch, shuffle
        self.seed, self.shard_id, self.num_shards = seed, shard_id, num_shards
        self.on_bad_image, self.max_image_pixels = on_bad_image, max_image_pixels
        self.epoch = 0
        self.start = 0
        self.crops = crops
        self._sizes = np.zeros((len(files), 2), np.int32) if sizes is None else sizes
        self.recent = deque(maxlen=history)  # (epoch, batch, sample indices) of the batches handed out last
        self._batches = None
        self._pass_epoch = 0
        self._next = 0
        self._warned = set() if warned is None else warned  # files warned about (shared across rebuilds)
        # samples that passed check_encoded, shared across rebuilds: each is checked once per process
        self._checked = np.zeros(len(files), bool) if checked is None else checked
        self.read_ahead = read_ahead
        self._pending: dict = {}  # batch number of this pass -> Future of _read_batch
        self._reader: ThreadPoolExecutor | None = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The sample indices of every batch of ``epoch`` on this shard."""
        order = shard_order(len(self.files), seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                            shard_id=self.shard_id, num_shards=self.num_shards)
        return batch_indices(order, self.batch_size, self.last_batch)

    @property
    def pass_epoch(self) -> int | None:
        return None if self._batches is None else self._pass_epoch

    def __iter__(self):
        self._drop_pending()
        self._batches = None
        self._next = 0
        return self

    def __next__(self):
        if self._batches is None:
            self._drop_pending()
            self._pass_epoch = self.epoch
            self._batches = self.batches(self.epoch)
            self._next, self.start = self.start, 0
        if self._next >= len(self._batches):
            self._batches = None
            raise StopIteration
        b = self._next
        self._next += 1
        if self.read_ahead > 0:
            for ahead in range(b, min(b + 1 + self.read_ahead, len(self._batches))):
                if ahead not in self._pending:
                    self._pending[ahead] = self._executor().submit(self._read_batch, self._batches[ahead])
            encoded, kept, skipped = self._pending.pop(b).result()
        else:
            encoded, kept, skipped = self._read_batch(self._batches[b])
        for path, why in skipped:
            if path not in self._warned:
                self._warned.add(path)
                # called from DALI's machinery: no caller frame of the user's to point at
                warnings.warn(f"skipping {why} (on_bad_image='skip')", stacklevel=1)
        self.recent.append((self._pass_epoch, b, kept))
        index = np.asarray(kept, np.int64).reshape(-1, 1)
        extra = ()  # CutMix: the (B, 6) box rows come last
        if self.switch is not None:
            draw = self.switch.draw(len(kept), self._pass_epoch, b, self.image_size, self.image_size)
            perm, lam = split_pairs(draw.pairs)
            extra = (box_rows(draw),)
        else:
            perm, lam = split_pairs(self.feed.draw(len(kept), self._pass_epoch, b))
        out = (encoded, index, perm, lam)
        if self.crops is not None:
            size = self._sizes[kept]
            c = self.crops
            out = out + crop_windows(size[:, 0], size[:, 1], seed=self.seed, epoch=self._pass_epoch, indices=kept,
                                     scale=c["scale"], ratio=c["ratio"], flip=c["flip"])
        return out + extra

    def _read_batch(self, idx) -> tuple[list, list, list]:
        """(encoded images, their sample indices, (name, error) of the skipped bad samples) of one batch."""
        encoded, kept, skipped = [], [], []
        for i in idx:
            path = self.files.name(i)
            data = self.files.read(i)
            try:
                if not self._checked[i]:  # once per sample and process: the JPEG code walk costs up to a decode
                    check_encoded(data, path, max_pixels=self.max_image_pixels)
                    self._checked[i] = True
            except CorruptImageError as e:
                if self.on_bad_image == "error":
                    raise
                skipped.append((path, str(e)))
                continue
            if self.crops is not None and self._sizes[i, 0] == 0:
                self._sizes[i] = upright_size(data)
            encoded.append(data)
            kept.append(i)
        if not kept:
            raise CorruptImageError(self.files.name(idx[0]), "every image of the batch is corrupt")
        return encoded, kept, skipped

    def _executor(self) -> ThreadPoolExecutor:
        if self._reader is None:
            # one thread per batch in flight: the checks of a first epoch (the JPEG code walk, GIL
            # released) run side by side
            self._reader = ThreadPoolExecutor(max_workers=self.read_ahead + 1, thread_name_prefix="fastgenlabel-read")
        return self._reader

    def _drop_pending(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        """Stop reading ahead (a pass abandoned half-way, or the loader closed)."""
        self._drop_pending()
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None
