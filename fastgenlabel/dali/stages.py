"""DALI stages any pipeline can use: pairs, the pixel mix in the graph, partner labels.

Randomness apart from compute: :class:`~fastgenlabel.functional.pairs.PairFeed` (re-exported
here) draws the pairing and lambdas of every batch with :func:`fastgenlabel.sample_pairs` from a
generator seeded by (seed, shard, epoch, batch), and hands them to the graph through
``fn.external_source``; the mix stage and the targets both read
those very pairs (the pipeline returns them as outputs), so images and targets always describe
the same mixture.

CPU: :func:`mix_stage` is a batch-processing Numba operator (it sees the whole batch, so the
partner needs no copy). GPU: :func:`mix_stage_gpu` feeds the partner through ``fn.permute_batch``
into a per-sample Numba CUDA kernel; DALI launches it once per sample (``_compat`` defect 3), so
fastgenlabel's own loader mixes GPU batches *after* the pipeline instead (one fused launch).
"""
from __future__ import annotations

import numpy as np

# PairFeed and its helpers live in functional/pairs.py (they need no DALI); re-exported here and
# from fastgenlabel.dali for compatibility.
from ..functional.pairs import PairFeed, pair_generator, split_pairs  # noqa: F401
from . import _compat, _kernels

OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


def _scale_shift(mean, std, channels: int):
    if mean is None and std is None:
        return np.ones(channels, np.float32), np.zeros(channels, np.float32)
    if mean is None or std is None:
        raise ValueError("mean, std: give both or neither")
    m = np.broadcast_to(np.asarray(mean, np.float64), (channels,))
    s = np.broadcast_to(np.asarray(std, np.float64), (channels,))
    if (s <= 0).any() or not (np.isfinite(m).all() and np.isfinite(s).all()):
        raise ValueError(f"std: values must be finite and positive, got {s.tolist()}")
    return (1.0 / s).astype(np.float32), (-m / s).astype(np.float32)


def _check_dtype_layout(dtype: str, layout: str):
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype: expected one of {OUTPUT_DTYPES}, got {dtype!r}")
    if layout not in ("CHW", "HWC"):
        raise ValueError(f"layout: expected 'CHW' or 'HWC', got {layout!r}")


def mix_stage(images, perm, lam, *, mean=None, std=None, channels: int = 3, layout: str = "CHW",
              dtype: str = "float32", thumbnail: int = 0, per_sample: bool = False, flip=None, boxes=None):
    """The pixel mix of a CPU pipeline: ``(lam x + (1 - lam) x[perm] - mean) / std``, fused.

    Args:
        images: DataNode, per sample (H, W, C) uint8 on the CPU, one size per batch (after a
            resize/crop).
        perm, lam: DataNodes of per-sample (1,) int64 and float32 (from :class:`PairFeed`).
        mean, std: per-channel constants in pixel units (0-255), or both None to only mix.
        channels: C, the images' channel count.
        layout: "CHW" or "HWC" per output sample.
        dtype: "float32", "float16" (written as bit patterns, then reinterpreted: defect 2) or
            "bfloat16" (DALI has no such type: the stage's output stays UINT16 bit patterns, which
            the reader views as ``torch.bfloat16``).
        thumbnail: t > 0 also returns each *unmixed* sample's (t * t * C,) float32 thumbnail
            (adaptive average pooling; the input of linear feature maps).
        per_sample: False (default): one batch-processing call per batch, on one of DALI's
            threads, reading each partner in place. True: the partners are gathered by
            ``fn.permute_batch`` (a uint8 copy of the batch) and the mix runs per sample on all of
            DALI's threads: the choice for many threads and large images, where one thread per
            batch becomes the bottleneck.
        flip: optional DataNode of per-sample int32 flags (e.g. ``fn.random.coin_flip()``): flip
            those samples horizontally while mixing (a partner enters the mix flipped by its own
            flag), instead of a separate ``fn.flip`` pass. The thumbnails are of the flipped
            samples.
        boxes: optional DataNode of per-sample (6,) int64 ``(y0, y1, x0, x1, cut, kind)`` rows
            (:func:`~fastgenlabel.functional.switch.box_rows`): the samples with ``cut`` set are cut
            and pasted (CutMix: the partner inside the box, ``lam`` unused), the others mixed by
            ``lam``, in the same pass. The thumbnails are then (2 t t C,): the sample's own
            followed by the cut-and-pasted image's (the sample's own again where it is not cut),
            both summed in the pass.

    Returns:
        The mixed images, or (mixed images, thumbnails) with ``thumbnail > 0``.
    """
    from nvidia.dali import fn, types

    _check_dtype_layout(dtype, layout)
    if isinstance(thumbnail, bool) or not isinstance(thumbnail, int) or thumbnail < 0:
        raise ValueError(f"thumbnail: expected a side length >= 0, got {thumbnail!r}")
    scale, shift = _scale_shift(mean, std, channels)
    has_flip, has_boxes = flip is not None, boxes is not None
    key = ("mix-cpu", tuple(scale.tolist()), tuple(shift.tolist()), layout, dtype, thumbnail, per_sample, has_flip,
           has_boxes)
    run_fn, setup_fn = _compat.memo(key, lambda: _kernels.mix_cfuncs(scale, shift, layout == "CHW", dtype, thumbnail,
                                                                      per_sample, has_flip, has_boxes))
    box_in = [] if boxes is None else [boxes]
    # the thumbnail output always exists (empty without thumbnails): one run function per mode
    out_types = [types.FLOAT if dtype == "float32" else types.UINT16, types.FLOAT]
    flags = [] if not has_flip else [fn.reshape(fn.cast(flip, dtype=types.INT32), shape=[1])]
    if per_sample:
        partner = fn.permute_batch(images, indices=_perm_indices(perm))
        if has_flip:
            flags.append(fn.permute_batch(flags[0], indices=_perm_indices(perm)))
        inputs = [images, partner, lam, *box_in, *flags]
        in_types = [types.UINT8, types.UINT8, types.FLOAT] + [types.INT64] * len(box_in) + [types.INT32] * len(flags)
        ins_ndim = [3, 3, 1] + [1] * (len(box_in) + len(flags))
        batch_processing = False
    else:
        inputs = [images, perm, lam, *box_in, *flags]
        in_types = [types.UINT8, types.INT64, types.FLOAT] + [types.INT64] * len(box_in) + [types.INT32] * len(flags)
        ins_ndim = [3, 1, 1] + [1] * (len(box_in) + len(flags))
        batch_processing = True
    mixed, thumbs = _compat.cached_numba_function(
        key, *inputs, run_fn=run_fn, setup_fn=setup_fn, out_types=out_types, in_types=in_types,
        outs_ndim=[3, 1], ins_ndim=ins_ndim, batch_processing=batch_processing)
    if dtype == "float16":
        mixed = _compat.float16_output(mixed)
    return (mixed, thumbs) if thumbnail else mixed


def _perm_indices(perm):
    """Per-sample (1,) int64 partners -> the int32 scalars ``fn.permute_batch`` takes."""
    from nvidia.dali import fn, types

    return fn.cast(fn.reshape(perm, shape=[]), dtype=types.INT32)


def partner_labels(labels, perm, *, dtype=None):
    """Each sample's partner label, ``labels[perm]``, in the graph (CPU).

    Args:
        labels: DataNode of per-sample (1,) labels (INT32 by default, as readers emit).
        perm: DataNode of per-sample (1,) int64 partners.
        dtype: the DALI type of ``labels`` (default ``types.INT32``): an integer type, FLOAT or FLOAT64.
    """
    from nvidia.dali import types

    dtype = types.INT32 if dtype is None else dtype
    np_dtype = {types.INT8: np.int8, types.INT16: np.int16, types.INT32: np.int32, types.INT64: np.int64,
                types.UINT8: np.uint8, types.UINT16: np.uint16, types.UINT32: np.uint32, types.UINT64: np.uint64,
                types.FLOAT: np.float32, types.FLOAT64: np.float64}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"dtype: expected a DALI integer or FLOAT/FLOAT64 type, got {dtype!r}")
    key = ("partner", int(dtype))
    run_fn, setup_fn = _compat.memo(key, lambda: _kernels.partner_cfuncs(np_dtype))
    return _compat.cached_numba_function(
        key, labels, perm, run_fn=run_fn, setup_fn=setup_fn, out_types=[dtype],
        in_types=[dtype, types.INT64], outs_ndim=[1], ins_ndim=[1, 1], batch_processing=True)


def ascii_labels(text):
    """WebDataset class members (decimal ASCII bytes, e.g. ``b"3\\n"``) -> per-sample (1,) int64, in the graph.

    Unparsable members give -1 (the caller raises, naming the sample).
    """
    from nvidia.dali import types

    key = ("ascii-label",)
    run_fn, setup_fn = _compat.memo(key, _kernels.ascii_label_cfuncs)
    return _compat.cached_numba_function(
        key, text, run_fn=run_fn, setup_fn=setup_fn, out_types=[types.INT64], in_types=[types.UINT8],
        outs_ndim=[1], ins_ndim=[1], batch_processing=True)


def mix_stage_gpu(images, perm, lam, *, mean=None, std=None, channels: int = 3, layout: str = "CHW",
                  dtype: str = "float32", blocks=(64, 1, 1), threads_per_block=(256, 1, 1)):
    """The pixel mix of a GPU pipeline, in the graph (not tested on this project's CI; see tests/test_dali_gpu.py).

    The partner comes from ``fn.permute_batch(images, indices=perm)`` and a per-sample Numba CUDA
    kernel mixes (DALI launches one kernel per sample: ``_compat`` defect 3, about 3.5 ms per
    batch of 256 on an H200 on top of 3.2 ms for permute_batch). Prefer mixing after the pipeline
    with :func:`fastgenlabel.mix_images` (what :class:`fastgenlabel.GenLabelLoader` does).

    Args:
        images: DataNode, per sample (H, W, C) uint8 on the GPU.
        perm: DataNode of per-sample (1,) int64 partners on the CPU (an argument input).
        lam: DataNode of per-sample (1,) float32 on the CPU (moved to the GPU here).
        mean, std, channels, layout, dtype: as for :func:`mix_stage`.
        blocks, threads_per_block: each per-sample launch's grid.
    """
    from nvidia.dali import fn, types

    _check_dtype_layout(dtype, layout)
    if dtype == "bfloat16":
        raise ValueError("dtype: the in-graph GPU stage writes float32 or float16; mix after the pipeline "
                         "(fastgenlabel.mix_images) for bfloat16")
    f16 = dtype == "float16"
    scale, shift = _scale_shift(mean, std, channels)
    chw = layout == "CHW"
    partner = fn.permute_batch(images, indices=_perm_indices(perm))
    from . import _kernels_cuda

    run_fn = _kernels_cuda.make_mix_gpu(scale, shift, chw, f16)

    def setup_fn(outs, ins):
        for s in range(len(outs[0])):
            h, w, c = ins[0][s][0], ins[0][s][1], ins[0][s][2]
            _kernels._set_image_shape(outs[0][s], h, w, c, chw)

    key = ("mix-gpu", tuple(scale.tolist()), tuple(shift.tolist()), layout, dtype, tuple(blocks),
           tuple(threads_per_block))
    mixed = _compat.cached_numba_function(
        key, images, partner, lam.gpu(), run_fn=run_fn, setup_fn=setup_fn,
        out_types=[types.UINT16 if f16 else types.FLOAT], in_types=[types.UINT8, types.UINT8, types.FLOAT],
        outs_ndim=[3], ins_ndim=[3, 3, 1], device="gpu", blocks=list(blocks), threads_per_block=list(threads_per_block))
    return _compat.float16_output(mixed) if f16 else mixed
