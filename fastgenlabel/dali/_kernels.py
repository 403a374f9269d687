"""Run and setup functions of the DALI Numba stages (compiled by DALI's ``numba_function``).

The pixel arithmetic is the pixel kernels' (:mod:`fastgenlabel.kernels.pixel.math`), so the
in-graph mix matches :func:`fastgenlabel.mix_images` element by element. Factories return plain
Python functions; DALI compiles them (once per process, see ``_compat.cached_numba_function``).

CPU batch-processing contract (DALI passes lists of per-sample arrays):

    out_images[s]  (C, H, W) or (H, W, C) float32 or uint16 (float16 bits)
    out_thumbs[s]  (t * t * C,) float32, the thumbnail of the *unmixed* sample s (optional)
    images[s]      (H, W, C) uint8, one size for the batch
    perm[s]        (1,) int64 partner of sample s;  lam[s]  (1,) float32 its own weight
"""
from __future__ import annotations

import numba
import numpy as np

from ..kernels.pixel import math as _pixel_math

_mix = numba.njit(_pixel_math.mix_normalize)
_to_f16 = numba.njit(_pixel_math.f32_to_f16_bits)


@numba.njit
def thumbnail_into(img, t, out, flipped=False):
    """Adaptive average pooling of an (H, W, C) image to (t, t, C), written flat into ``out``.

    Bins are those of ``torch.nn.functional.adaptive_avg_pool2d``: rows ``floor(i H / t)`` to
    ``ceil((i + 1) H / t)``. The map is linear in the pixels, so thumbnails of mixed images are the
    mixed thumbnails. ``out[(i * t + j) * C + c]`` holds bin (i, j) of channel c. ``flipped``
    gives the thumbnail of the horizontally flipped image (the bins are mirror-symmetric, so
    that is the thumbnail with its columns reversed).
    """
    H, W, C = img.shape
    for i in range(t):
        y0 = (i * H) // t
        y1 = ((i + 1) * H + t - 1) // t
        for j in range(t):
            x0 = (j * W) // t
            x1 = ((j + 1) * W + t - 1) // t
            inv = np.float32(1.0) / np.float32((y1 - y0) * (x1 - x0))
            for c in range(C):
                acc = np.float32(0.0)
                for y in range(y0, y1):
                    for x in range(x0, x1):
                        acc += np.float32(img[y, x, c])
                jo = t - 1 - j if flipped else j
                out[(i * t + jo) * C + c] = acc * inv


@numba.njit(inline="always")
def _row(flat, start, n, C, flipped, scratch):
    """Row ``flat[start:start + n]`` of an HWC image, or (flipped) its pixels in reverse order in ``scratch``."""
    if not flipped:
        return flat[start:start + n]
    W = n // C
    for x in range(W):
        src = start + (W - 1 - x) * C
        for c in range(C):
            scratch[x * C + c] = flat[src + c]
    return scratch


def make_mix_cpu(scale, shift, out_chw: bool, out_f16: bool, thumb: int, per_sample: bool = False,
                 flip: bool = False):
    """The run function and setup function of the CPU mix stage.

    Args:
        scale, shift: (C,) per-channel ``1 / std`` and ``-mean / std`` (floats).
        out_chw: write (C, H, W) samples, else (H, W, C).
        out_f16: write float16 bit patterns as uint16, else float32.
        thumb: thumbnail side t, or 0 for no thumbnail output.
        per_sample: False: for ``numba_function(images, perm, lam[, flips], batch_processing=True)``
            (one call per batch, on one thread, the partner read in place). True: for
            ``numba_function(images, partners, lam[, flips, partner_flips])`` (one call per sample,
            spread over DALI's threads; the partners come from ``fn.permute_batch``).
        flip: the stage also takes per-sample (1,) int32 horizontal-flip flags and flips while it
            mixes (each sample and its partner by their own flag), saving a pass over the batch.

    Returns:
        (run_fn, setup_fn).
    """
    sc = np.asarray(scale, np.float32)
    sh = np.asarray(shift, np.float32)

    def mix_sample(o, a, b, ka, fa, fb):
        # One image row at a time: a flipped row (sample or partner) is first copied backwards,
        # pixel by pixel, into a small scratch row, so that the inner loops always read forwards
        # with a constant stride (3 for RGB), which LLVM vectorises. Each output row is written
        # once: one contiguous plane row per channel (CHW) or interleaved (HWC).
        kb = np.float32(1.0) - ka
        H, W, C = a.shape
        n = W * C
        af = a.reshape(H * n)
        bf = b.reshape(H * n)
        of = o.reshape(H * n)
        plane = H * W
        ra = np.empty(n, np.uint8)
        rb = np.empty(n, np.uint8)
        for y in range(H):
            ar = _row(af, y * n, n, C, fa, ra)
            br = _row(bf, y * n, n, C, fb, rb)
            if out_chw:
                if C == 3:
                    o0 = of[y * W:y * W + W]
                    o1 = of[plane + y * W:plane + y * W + W]
                    o2 = of[2 * plane + y * W:2 * plane + y * W + W]
                    for x in range(W):
                        _put(o0, x, _mix(ar[3 * x], br[3 * x], ka, kb, sc[0], sh[0]))
                        _put(o1, x, _mix(ar[3 * x + 1], br[3 * x + 1], ka, kb, sc[1], sh[1]))
                        _put(o2, x, _mix(ar[3 * x + 2], br[3 * x + 2], ka, kb, sc[2], sh[2]))
                else:
                    for c in range(C):
                        oc = of[c * plane + y * W:c * plane + y * W + W]
                        for x in range(W):
                            _put(oc, x, _mix(ar[x * C + c], br[x * C + c], ka, kb, sc[c], sh[c]))
            else:
                orow = of[y * n:y * n + n]
                for i in range(n):
                    c = i % C
                    _put(orow, i, _mix(ar[i], br[i], ka, kb, sc[c], sh[c]))

    def put(out, i, v):
        if out_f16:
            out[i] = np.uint16(_to_f16(v))
        else:
            out[i] = v

    _put = numba.njit(inline="always")(put)

    mix_sample = numba.njit(mix_sample)

    if per_sample and flip:
        def run_fn(out_image, out_thumb, image, partner, lam, fa, fb):
            mix_sample(out_image, image, partner, lam[0], fa[0] != 0, fb[0] != 0)
            if thumb:
                thumbnail_into(image, thumb, out_thumb, fa[0] != 0)
    elif per_sample:
        def run_fn(out_image, out_thumb, image, partner, lam):
            mix_sample(out_image, image, partner, lam[0], False, False)
            if thumb:
                thumbnail_into(image, thumb, out_thumb, False)
    elif flip:
        def run_fn(out_images, out_thumbs, images, perm, lam, flips):
            for s in range(len(images)):
                p = perm[s][0]
                fa = flips[s][0] != 0
                mix_sample(out_images[s], images[s], images[p], lam[s][0], fa, flips[p][0] != 0)
                if thumb:
                    thumbnail_into(images[s], thumb, out_thumbs[s], fa)
    else:
        def run_fn(out_images, out_thumbs, images, perm, lam):
            for s in range(len(images)):
                mix_sample(out_images[s], images[s], images[perm[s][0]], lam[s][0], False, False)
                if thumb:
                    thumbnail_into(images[s], thumb, out_thumbs[s], False)

    def setup_fn(outs, ins):
        for s in range(len(outs[0])):
            h, w, c = ins[0][s][0], ins[0][s][1], ins[0][s][2]
            _set_image_shape(outs[0][s], h, w, c, out_chw)
            outs[1][s][0] = thumb * thumb * c  # an empty output when there is no thumbnail

    return run_fn, setup_fn


@numba.njit
def _set_image_shape(shape, h, w, c, chw):
    if chw:
        shape[0], shape[1], shape[2] = c, h, w
    else:
        shape[0], shape[1], shape[2] = h, w, c


def partner_run_fn(out, labels, perm):
    """Batch-processing run function: ``out[s] = labels[perm[s]]`` (any per-sample 1-D labels)."""
    for s in range(len(labels)):
        src = labels[perm[s][0]]
        dst = out[s]
        for i in range(dst.shape[0]):
            dst[i] = src[i]


def ascii_label_run_fn(out, text):
    """Batch-processing run function: decimal ASCII bytes (a WebDataset ``.cls`` member) -> (1,) int64.

    Leading/trailing whitespace is skipped; anything else that is not a digit gives -1, which the
    loader reports as an error naming the sample.
    """
    for s in range(len(text)):
        t = text[s]
        value = 0
        digits = 0
        bad = False
        for i in range(t.shape[0]):
            ch = t[i]
            if ch >= 48 and ch <= 57:
                value = value * 10 + (ch - 48)
                digits += 1
            elif ch == 32 or ch == 10 or ch == 13 or ch == 9:
                continue
            else:
                bad = True
        out[s][0] = value if digits > 0 and not bad else -1


def scalar_setup_fn(outs, ins):
    """Setup function: output 0 of every sample has shape (1,)."""
    for s in range(len(outs[0])):
        outs[0][s][0] = 1


def same_shape_setup_fn(outs, ins):
    """Setup function: output 0 of every sample has the shape of input 0."""
    for s in range(len(outs[0])):
        for i in range(len(outs[0][s])):
            outs[0][s][i] = ins[0][s][i]
