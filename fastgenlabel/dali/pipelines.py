"""Ready ImageNet-style DALI pipelines: encoded files in; crops, mixed or not, out.

``image_pipeline`` reads encoded images, their sample indices and the batch's pairs from one
external source (so the loader owns the order, the shards, the last batch and the pairs: all
pure functions of (seed, epoch, shard, batch)), decodes (``"mixed"`` on a GPU, the CPU otherwise),
random-resized-crops, flips (with ``windows``, at the windows and flags the source hands in), and then:

- CPU (``device_id=None``): the in-graph mix stage normalises, mixes, changes the layout and
  writes the unmixed thumbnails in one pass (``stages.mix_stage``). Outputs:
  ``images (B, C, H, W) float, [thumbnails (B, t*t*C) float32,] index (B, 1) int64, perm, lam``
  (with ``cut=True``: then the (B, 6) box rows, and thumbnails (B, 2 t t C), see ``mix_stage``).
- GPU: the uint8 (B, H, W, C) crops leave the graph and the loader mixes them with one fused
  :func:`fastgenlabel.mix_images` launch (``_compat`` defect 3). Outputs:
  ``crops (B, H, W, C) uint8, index, perm, lam``.

``mix=False`` builds the same pipeline without the mix stage (DALI's ``crop_mirror_normalize``
instead): the baseline of the throughput benchmark.

``webdataset_pipeline`` reads WebDataset tar shards with ``fn.readers.webdataset`` instead
(DALI owns the order, the shards and the epochs there; the pairs come from a
:class:`~fastgenlabel.functional.pairs.PairFeed` keyed by DALI's epoch and iteration).
:class:`fastgenlabel.GenLabelLoader` does not use it for shards: it indexes the tar members
itself and feeds their bytes to ``image_pipeline``, so that shards get the folder path's exact
order, per-rank shards, last-batch policy and errors naming the sample.
"""
from __future__ import annotations

from ..functional.pairs import PairFeed
from . import _compat, stages


def _decode_crop(jpegs, *, gpu: bool, image_size: int, train: bool, crop_scale, crop_ratio, window=None):
    from nvidia.dali import fn, types

    device = "mixed" if gpu else "cpu"
    if train and window is not None:  # (start, shape) in pixels of the upright image, "WH" order
        images = fn.decoders.image_slice(jpegs, device=device, output_type=types.RGB, start=window[0],
                                         shape=window[1])
        return fn.resize(images, resize_x=image_size, resize_y=image_size)
    if train:
        images = fn.decoders.image_random_crop(jpegs, device=device, output_type=types.RGB,
                                               random_area=list(crop_scale), random_aspect_ratio=list(crop_ratio),
                                               num_attempts=10)
        return fn.resize(images, resize_x=image_size, resize_y=image_size)
    images = fn.decoders.image(jpegs, device=device, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=round(image_size / 0.875))
    return fn.crop(images, crop=(image_size, image_size))


def _finish(images, perm, lam, *, gpu, train, flip, mean, std, dtype, layout, thumbnail, per_sample=False,
            flips=None, boxes=None):
    from nvidia.dali import fn

    coin = (flips if flips is not None else fn.random.coin_flip()) if train and flip else None
    if gpu:
        return (images if coin is None else fn.flip(images, horizontal=coin),)
    out = stages.mix_stage(images, perm, lam, mean=mean, std=std, layout=layout, dtype=dtype, thumbnail=thumbnail,
                           per_sample=per_sample, flip=coin, boxes=boxes)
    return out if thumbnail else (out,)


def image_pipeline(source, *, batch_size: int, image_size: int, device_id=None, num_threads: int = 2,
                   seed: int = 0, prefetch: int = 2, train: bool = True, crop_scale=(0.08, 1.0),
                   crop_ratio=(3 / 4, 4 / 3), mean=None, std=None, dtype: str = "float32", layout: str = "CHW",
                   thumbnail: int = 0, mix: bool = True, flip: bool = True, per_sample: bool = False,
                   windows: bool = False, cut: bool = False):
    """Build (not yet built) the pipeline; see the module docstring for its outputs.

    Args:
        source: an iterable for ``fn.external_source(num_outputs=4, batch=True)``: each item is
            (encoded images, indices, perm, lam): a list of B uint8 byte arrays, then (B, 1) int64,
            (B, 1) int64 and (B, 1) float32 arrays (lists of B (1,) arrays work too, slower).
            StopIteration ends an epoch. With ``windows``, each item also has the crop windows
            and flips: (B, 2) int32 starts (left, top) and shapes (w, h) in pixels of the upright
            image, and (B,) int32 flip flags (``loader.crops.crop_windows``).
        batch_size: the largest B (shorter batches are allowed: a partial last batch).
        image_size: side of the square crops.
        device_id: None for a CPU-only pipeline, else the GPU.
        num_threads, seed, prefetch: DALI's; ``seed`` drives crops and flips unless ``windows``.
        train: random resized crop + random flip (with ``flip``); else resize + centre crop.
        crop_scale, crop_ratio: random resized crop's area and aspect-ratio ranges.
        mean, std, dtype, layout, thumbnail: the CPU mix stage's (``stages.mix_stage``).
        mix: False replaces the mix stage by ``crop_mirror_normalize`` (CPU; the baseline).
        per_sample: the CPU mix stage's mode (``stages.mix_stage``).
        windows: crops and flips come from the source (``decoders.image_slice`` and the given
            flags), not from DALI's generator: then every batch is a pure function of what the
            source hands in, and a pass can start at any batch (the loader's exact resume).
        cut: the source yields one more item, last, (B, 6) int64 box rows
            (:func:`~fastgenlabel.functional.switch.box_rows`): CutMix and mixup per sample in the
            stage (CPU; on a GPU they leave the graph with the crops), returned as a last output.

    Returns:
        A ``nvidia.dali.Pipeline``.
    """
    _compat.require_dali()
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch)
    def pipe():
        window = flips = None
        dtypes = [types.UINT8, types.INT64, types.INT64, types.FLOAT]
        dtypes += [types.INT32] * (3 * windows) + [types.INT64] * cut
        jpegs, index, perm, lam, *rest = fn.external_source(source=source, num_outputs=len(dtypes), batch=True,
                                                            dtype=dtypes)
        if windows:
            start, shape, flips = rest[:3]
            window = (start, shape)
        boxes = rest[3 * windows:]
        images = _decode_crop(jpegs, gpu=gpu, image_size=image_size, train=train, crop_scale=crop_scale,
                              crop_ratio=crop_ratio, window=window)
        if not mix and not gpu:
            if dtype == "bfloat16":
                raise ValueError("dtype: the unmixed baseline (crop_mirror_normalize) has no bfloat16 output")
            out_dtype = types.FLOAT16 if dtype == "float16" else types.FLOAT
            m = [0.0, 0.0, 0.0] if mean is None else list(mean)
            s = [1.0, 1.0, 1.0] if std is None else list(std)
            images = fn.crop_mirror_normalize(images, mean=m, std=s, dtype=out_dtype, output_layout=layout,
                                              mirror=(flips if windows else fn.random.coin_flip())
                                              if train and flip else 0)
            return images, index, perm, lam
        outs = _finish(images, perm, lam, gpu=gpu, train=train, flip=flip, mean=mean, std=std, dtype=dtype,
                       layout=layout, thumbnail=thumbnail, per_sample=per_sample, flips=flips,
                       boxes=boxes[0] if boxes else None)
        return (*outs, index, perm, lam, *boxes)

    return pipe()


def webdataset_pipeline(paths, feed: PairFeed, *, batch_size: int, image_size: int, index_paths=None,
                        image_ext: str = "jpg;jpeg;png", label_ext: str = "cls", device_id=None, num_threads: int = 2,
                        seed: int = 0, prefetch: int = 2, shard_id: int = 0, num_shards: int = 1,
                        shuffle: bool = True, train: bool = True, flip: bool = True, crop_scale=(0.08, 1.0),
                        crop_ratio=(3 / 4, 4 / 3), mean=None, std=None, dtype: str = "float32", layout: str = "CHW",
                        thumbnail: int = 0, reader_name: str = "Reader"):
    """A pipeline over WebDataset tar shards (``fn.readers.webdataset``), with the mix in the graph.

    Args:
        paths: tar shard paths; ``index_paths``: their DALI index files (``wds2idx``), optional.
        feed: the pairs of every batch (its batch_size must equal ``batch_size``).
        image_ext, label_ext: the members holding the encoded image and the decimal class label.
        shard_id, num_shards, shuffle, seed: the reader's sharding and shuffling
            (``random_shuffle`` with a buffer; ``pad_last_batch`` so that every batch is full: the
            reader's ``epoch_size`` tells how many samples are real).
        Other arguments: as for :func:`image_pipeline`.

    Returns:
        A pipeline whose outputs are, on the CPU: ``images, [thumbnails,] labels (B, 1) int64, perm,
        lam``; on a GPU: ``crops (B, H, W, C) uint8, labels, perm, lam`` (mix after the pipeline).
        Labels are -1 where a label member is not a decimal number.
    """
    _compat.require_dali()
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    if feed.batch_size != batch_size:
        raise ValueError(f"feed: drawn for batches of {feed.batch_size}, but batch_size is {batch_size}")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch)
    def pipe():
        jpegs, text = fn.readers.webdataset(
            paths=[str(p) for p in paths], index_paths=None if index_paths is None else [str(p) for p in index_paths],
            ext=[image_ext, label_ext], missing_component_behavior="error", dtypes=[types.UINT8, types.UINT8],
            shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle, seed=seed, pad_last_batch=True,
            name=reader_name)
        perm, lam = fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True)
        labels = stages.ascii_labels(text)
        images = _decode_crop(jpegs, gpu=gpu, image_size=image_size, train=train, crop_scale=crop_scale,
                              crop_ratio=crop_ratio)
        outs = _finish(images, perm, lam, gpu=gpu, train=train, flip=flip, mean=mean, std=std, dtype=dtype,
                       layout=layout, thumbnail=thumbnail)
        return (*outs, labels, perm, lam)

    return pipe()
