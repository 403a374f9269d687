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

from ..kernels.pixel import cpu as _pixel_cpu

# the pixel kernel's row functions (kernels/pixel/cpu.py, arithmetic from kernels/pixel/math.py)
_pixel_row = _pixel_cpu._mix_row
_pixel_store_row = _pixel_cpu._store_row
_pixel_tiled = _pixel_cpu._tiled
_OUT_F16 = _pixel_cpu.OUT_F16


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


@numba.njit
def _flip_row(src, start, W, C, dst):
    """Pixels ``src[start:start + W * C]`` of an HWC row in reverse order (channels kept), into ``dst``.

    Indices are unsigned: Numba adds no wrap-around select for negative indices, so LLVM turns the
    loop into vector shuffles (about 5x faster than signed indexing when W is not a constant).
    """
    row = src[start:start + W * C]
    u1 = np.uint64(1)
    if C == 3:
        last = np.uint64(3 * W - 3)
        for x in range(W):
            d = np.uint64(3 * x)
            s = last - d
            dst[d] = row[s]
            dst[d + u1] = row[s + u1]
            dst[d + u1 + u1] = row[s + u1 + u1]
    else:
        uc = np.uint64(C)
        last = np.uint64(C * (W - 1))
        for x in range(W):
            d = np.uint64(C * x)
            s = last - d
            for c in range(uc):
                dst[d + c] = row[s + c]


@numba.njit
def _thumb_row(r, ri, y, H, n, t, cols):
    """Add HWC row ``y`` (``r[ri:ri + n]``) to the column sums ``cols`` (t, n) of every row bin holding it.

    Row bins as in :func:`thumbnail_into` (they may overlap). Integer sums are exact; a vectorised
    add per element, the column bins are summed once per sample by :func:`_thumb_finish`.
    """
    row = r[ri:ri + n]  # indices known non-negative: no wrap-around selects, the loop vectorises
    for i in range(t):
        if (i * H) // t <= y < ((i + 1) * H + t - 1) // t:
            ci = cols[i]
            for k in range(n):
                ci[k] += row[k]


@numba.njit
def _thumb_finish(cols, H, W, C, t, out):
    """Column sums of each row bin -> bin means, written flat into ``out`` as :func:`thumbnail_into` does.

    The sums are exact integers, so the result equals :func:`thumbnail_into`'s float32 sums while a
    bin's sum stays below 2**24 (bins of up to 65,793 pixels).
    """
    for i in range(t):
        y0 = (i * H) // t
        y1 = ((i + 1) * H + t - 1) // t
        ci = cols[i]
        for j in range(t):
            x0 = (j * W) // t
            x1 = ((j + 1) * W + t - 1) // t
            inv = np.float32(1.0) / np.float32((y1 - y0) * (x1 - x0))
            for c in range(C):
                s = 0
                for x in range(x0, x1):
                    s += ci[x * C + c]
                out[(i * t + j) * C + c] = np.float32(s) * inv


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

    # One pass over each sample, a row at a time, with the pixel kernel's own row function
    # (kernels/pixel/cpu.py: flat indexing, the 3-channel case unrolled, vectorised by LLVM):
    # a flipped row (sample or partner) is first copied backwards, pixel by pixel, into a small
    # scratch row, so that the mix always reads forwards; float16 output is mixed into a float32
    # scratch row and then encoded. The thumbnail of the (flipped) sample is summed from the same
    # rows while they are in the L1 cache, in exact integer arithmetic.
    if out_f16:
        def mix_row(xa, ai, xb, bi, ka, kb, scale_t, shift_t, of, oi, W, C, plane, d_buf):
            _pixel_row(xa, ai, xb, bi, ka, kb, sc, sh, scale_t, shift_t, d_buf, 0, W, C, 0, W, False, out_chw)
            _pixel_store_row(d_buf, of, oi, W, C, plane, out_chw, _OUT_F16)
    else:
        def mix_row(xa, ai, xb, bi, ka, kb, scale_t, shift_t, of, oi, W, C, plane, d_buf):
            _pixel_row(xa, ai, xb, bi, ka, kb, sc, sh, scale_t, shift_t, of, oi, W, C, 0, plane, False, out_chw)

    mix_row = numba.njit(inline="always")(mix_row)

    def mix_sample(o, a, b, ka, fa, fb, th):
        kb = np.float32(1.0) - ka
        H, W, C = a.shape
        n = W * C
        af = a.reshape(H * n)
        bf = b.reshape(H * n)
        of = o.reshape(H * n)
        plane = H * W
        ra = np.empty(n, np.uint8)
        rb = np.empty(n, np.uint8)
        d_buf = np.empty(n if out_f16 else 0, np.float32)
        scale_t = _pixel_tiled(sc, C, W)
        shift_t = _pixel_tiled(sh, C, W)
        cols = np.zeros((thumb, n if thumb else 0), np.int32)
        for y in range(H):
            if fa:
                _flip_row(af, y * n, W, C, ra)
                xa, ai = ra, 0
            else:
                xa, ai = af, y * n
            if fb:
                _flip_row(bf, y * n, W, C, rb)
                xb, bi = rb, 0
            else:
                xb, bi = bf, y * n
            mix_row(xa, ai, xb, bi, ka, kb, scale_t, shift_t, of, y * W if out_chw else y * n, W, C, plane, d_buf)
            if thumb:
                _thumb_row(xa, ai, y, H, n, thumb, cols)
        if thumb:
            _thumb_finish(cols, H, W, C, thumb, th)

    mix_sample = numba.njit(mix_sample)

    if per_sample and flip:
        def run_fn(out_image, out_thumb, image, partner, lam, fa, fb):
            mix_sample(out_image, image, partner, lam[0], fa[0] != 0, fb[0] != 0, out_thumb)
    elif per_sample:
        def run_fn(out_image, out_thumb, image, partner, lam):
            mix_sample(out_image, image, partner, lam[0], False, False, out_thumb)
    elif flip:
        def run_fn(out_images, out_thumbs, images, perm, lam, flips):
            for s in range(len(images)):
                p = perm[s][0]
                mix_sample(out_images[s], images[s], images[p], lam[s][0], flips[s][0] != 0, flips[p][0] != 0,
                           out_thumbs[s])
    else:
        def run_fn(out_images, out_thumbs, images, perm, lam):
            for s in range(len(images)):
                mix_sample(out_images[s], images[s], images[perm[s][0]], lam[s][0], False, False, out_thumbs[s])

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

    Leading/trailing whitespace is skipped; anything else that is not a digit (whitespace between
    digits included), and more than 18 digits (past int64), gives -1, which the loader reports as
    an error naming the sample. The same rule as the tar index's labels (``tar_index.py``).
    """
    for s in range(len(text)):
        t = text[s]
        value = 0
        digits = 0
        bad = False
        ended = False  # whitespace after the digits: only more whitespace may follow
        for i in range(t.shape[0]):
            ch = np.int64(t[i])  # int64 arithmetic in Numba and in plain Python alike
            if ch >= 48 and ch <= 57:
                if ended:
                    bad = True
                value = value * 10 + (ch - 48)
                digits += 1
            elif ch == 32 or ch == 10 or ch == 13 or ch == 9:
                if digits > 0:
                    ended = True
            else:
                bad = True
        out[s][0] = value if 0 < digits <= 18 and not bad else -1


def scalar_setup_fn(outs, ins):
    """Setup function: output 0 of every sample has shape (1,)."""
    for s in range(len(outs[0])):
        outs[0][s][0] = 1


def same_shape_setup_fn(outs, ins):
    """Setup function: output 0 of every sample has the shape of input 0."""
    for s in range(len(outs[0])):
        for i in range(len(outs[0][s])):
            outs[0][s][i] = ins[0][s][i]
