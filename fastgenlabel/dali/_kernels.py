"""The C functions DALI's CPU Numba operator calls for fastgenlabel's stages, cached on disk.

The pixel arithmetic is the pixel kernels' (:mod:`fastgenlabel.kernels.pixel.math`), so the
in-graph mix matches :func:`fastgenlabel.mix_images` element by element. The work is done by
module-level ``numba.njit(cache=True)`` functions (:func:`mix_sample`, :func:`ascii_label`); the
factories (:func:`mix_cfuncs`, :func:`partner_cfuncs`, :func:`ascii_label_cfuncs`) return the
run and setup functions as compiled C callbacks that read DALI's pointer tables themselves, each
stored in Numba's disk cache (``_compat.cached_cfunc``), so that a process that builds a pipeline
loads them instead of compiling them (``_compat`` defect 5).
"""
from __future__ import annotations

import numba
import numpy as np
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..kernels.compat import key_disk_cache_on
from ..kernels.pixel import cpu as _pixel_cpu
from ..kernels.pixel import math as _pixel_math
from . import _compat

# the pixel kernel's row functions (kernels/pixel/cpu.py, arithmetic from kernels/pixel/math.py)
_pixel_row = _pixel_cpu._mix_row
_pixel_cut_row = _pixel_cpu._cut_row
_pixel_store_row = _pixel_cpu._store_row
_pixel_tiled = _pixel_cpu._tiled
_OUT_F16 = _pixel_cpu.OUT_F16
_OUT_BF16 = _pixel_cpu.OUT_BF16


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


@numba.njit
def _thumb_delta_row(xa, ai, xb, bi, lo, hi, y, H, t, cols):
    """Add ``b - a`` over the row's elements [lo, hi) (a CutMix box's columns) to the column sums
    ``cols`` (t, n) of every row bin holding row ``y``: the pasted image's sums minus the sample's."""
    for i in range(t):
        if (i * H) // t <= y < ((i + 1) * H + t - 1) // t:
            ci = cols[i]
            for k in range(lo, hi):
                ci[k] += np.int32(xb[bi + k]) - np.int32(xa[ai + k])


@numba.njit(cache=True)
def mix_sample(o, a, b, ka, fa, fb, th, sc, sh, out_chw, thumb, out_kind, box, th_cut):
    """Mix one sample into ``o``: ``(ka a + (1 - ka) b) * sc + sh``, each flipped by its flag first;
    or, with a CutMix box, ``b`` inside the box and ``a`` outside it.

    One pass over the sample, a row at a time, with the pixel kernel's own row functions
    (kernels/pixel/cpu.py: flat indexing, the 3-channel case unrolled, vectorised by LLVM): a
    flipped row (sample or partner) is first copied backwards, pixel by pixel, into a small
    scratch row, so that the mix always reads forwards; float16 or bfloat16 output (``o`` uint16,
    ``out_kind`` the pixel kernel's OUT_F16 or OUT_BF16) is mixed into a float32 scratch row and
    then encoded. With ``thumb`` > 0 the thumbnail of the (flipped)
    sample is summed into ``th`` from the same rows while they are in the L1 cache, in exact
    integer arithmetic.

    Args:
        o: (C, H, W) if ``out_chw`` else (H, W, C), float32 or uint16 (float16 or bfloat16 bits).
        a, b: (H, W, C) uint8, the sample and its partner; ``ka`` the sample's weight.
        fa, fb: flip the sample / the partner horizontally.
        th: (thumb * thumb * C,) float32, or anything when ``thumb`` is 0.
        sc, sh: (C,) float32 ``1 / std`` and ``-mean / std``.
        box: (0,) (mixup) or (>= 5,) int64 ``(y0, y1, x0, x1, cut, ...)``: where ``cut`` is
            nonzero the sample is cut and pasted (``ka`` unused), else mixed by ``ka``.
        th_cut: with a box and ``thumb`` > 0, (thumb * thumb * C,) float32: the thumbnail of the
            cut-and-pasted image (of the sample itself when it is not cut), summed in the same pass
            (the box's rows add ``b - a`` over its columns to the sample's integer sums).
    """
    kb = np.float32(1.0) - ka
    H, W, C = a.shape
    n = W * C
    af = a.reshape(H * n)
    bf = b.reshape(H * n)
    of = o.reshape(H * n)
    plane = H * W
    ra = np.empty(n, np.uint8)
    rb = np.empty(n, np.uint8)
    d_buf = np.empty(n, np.float32)
    scale_t = _pixel_tiled(sc, C, W)
    shift_t = _pixel_tiled(sh, C, W)
    cut = box.shape[0] >= 5 and box[4] != 0
    cols = np.zeros((thumb, n if thumb else 0), np.int32)
    dcols = np.zeros((thumb if cut else 0, n if thumb and cut else 0), np.int32)
    for y in range(H):
        if fa:
            _flip_row(af, y * n, W, C, ra)
            xa, ai = ra, 0
        else:
            xa, ai = af, y * n
        x0 = x1 = 0
        if cut and box[0] <= y < box[1]:
            x0, x1 = box[2], box[3]
        if fb and (not cut or x1 > x0):  # a cut row outside the box reads no partner
            _flip_row(bf, y * n, W, C, rb)
            xb, bi = rb, 0
        else:
            xb, bi = bf, y * n
        _emit_row(xa, ai, xb, bi, ka, kb, sc, sh, scale_t, shift_t, of, y * W if out_chw else y * n, W, C, plane,
                  out_chw, d_buf, out_kind, cut, x0, x1)
        if thumb:
            _thumb_row(xa, ai, y, H, n, thumb, cols)
            if x1 > x0:
                _thumb_delta_row(xa, ai, xb, bi, x0 * C, x1 * C, y, H, thumb, dcols)
    if thumb:
        _thumb_finish(cols, H, W, C, thumb, th)
        if box.shape[0] >= 5:
            if cut:
                _thumb_finish(cols + dcols, H, W, C, thumb, th_cut)
            else:
                th_cut[:] = th


def _emit_row(xa, ai, xb, bi, ka, kb, sc, sh, scale_t, shift_t, of, oi, W, C, plane, out_chw, d_buf, out_kind,
              cut, x0, x1):
    """Mix (or cut and paste) one row into the output row at ``of[oi]``; typed on ``of``'s element type."""


@overload(_emit_row)
def _emit_row_for(xa, ai, xb, bi, ka, kb, sc, sh, scale_t, shift_t, of, oi, W, C, plane, out_chw, d_buf, out_kind,
                  cut, x0, x1):
    if of.dtype == numba.types.uint16:  # 16-bit floats: mix into the float32 scratch row, then encode
        def emit(xa, ai, xb, bi, ka, kb, sc, sh, scale_t, shift_t, of, oi, W, C, plane, out_chw, d_buf, out_kind,
                 cut, x0, x1):
            if cut:
                _pixel_cut_row(xa, ai, xb, bi, x0, x1, sc, sh, scale_t, shift_t, d_buf, 0, W, C, 0, W, False, out_chw)
            else:
                _pixel_row(xa, ai, xb, bi, ka, kb, sc, sh, scale_t, shift_t, d_buf, 0, W, C, 0, W, False, out_chw)
            _pixel_store_row(d_buf, of, oi, W, C, plane, out_chw, out_kind)
    else:
        def emit(xa, ai, xb, bi, ka, kb, sc, sh, scale_t, shift_t, of, oi, W, C, plane, out_chw, d_buf, out_kind,
                 cut, x0, x1):
            if cut:
                _pixel_cut_row(xa, ai, xb, bi, x0, x1, sc, sh, scale_t, shift_t, of, oi, W, C, 0, plane, False,
                               out_chw)
            else:
                _pixel_row(xa, ai, xb, bi, ka, kb, sc, sh, scale_t, shift_t, of, oi, W, C, 0, plane, False, out_chw)
    return emit


@numba.njit
def _set_image_shape(shape, h, w, c, chw):
    if chw:
        shape[0], shape[1], shape[2] = c, h, w
    else:
        shape[0], shape[1], shape[2] = h, w, c


def ascii_label_run_fn(out, text):
    """Batch-processing run function: decimal ASCII bytes (a WebDataset ``.cls`` member) -> (1,) int64.

    Per sample :func:`ascii_label`; lists of per-sample arrays, as DALI's operator passes them.
    """
    for s in range(len(text)):
        out[s][0] = ascii_label(text[s])


@numba.njit(cache=True)
def ascii_label(t):
    """The label in the uint8 bytes ``t``, or -1.

    Leading/trailing whitespace is skipped; anything else that is not a digit (whitespace between
    digits included), and more than 18 digits (past int64), gives -1, which the loader reports as
    an error naming the sample. The same rule as the tar index's labels (``tar_index.py``).
    """
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
    return value if 0 < digits <= 18 and not bad else -1


# DALI's C interface. The operator calls a C function with the addresses of tables: for the k-th
# of n outputs (inputs) and sample s of a batch of ns (ns = 1 without batch processing), the data
# address is ``int64[n, ns]`` at ``data[k, s]`` and the address of its int64 shape is
# ``int64[n, ns]`` at ``shapes[k, s]``. The functions below read them directly (DALI's own
# wrapper builds lists of views for a Python-style run function; that wrapper alone took 10 to
# 18 s to compile, and it cannot be cached). The C functions are closures over plain constants
# (the stage's configuration) that call module-level functions, so Numba's disk cache can keep
# one compiled function per configuration (``_compat.cached_cfunc``).

RUN_SIG = "void(uint64, uint64, uint64, int32, uint64, uint64, uint64, int32)"  # one sample per call
RUN_BATCH_SIG = "void(uint64, uint64, uint64, int32, uint64, uint64, uint64, int32, int32)"
SETUP_SIG = "void(uint64, uint64, int32, uint64, uint64, int32, int32)"


@intrinsic
def _void_ptr(typingctx, address):
    """An integer address as a ``void*`` (what ``carray`` takes)."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return numba.types.voidptr(address), codegen


@numba.njit
def _entry(table, n, k, s, ns):
    return numba.carray(_void_ptr(table), (n, ns), np.int64)[k, s]


@numba.njit
def _shape(shapes, n, k, s, ns, ndim):
    """The (ndim,) int64 shape of sample s of tensor k (writable: a setup function fills it)."""
    return numba.carray(_void_ptr(_entry(shapes, n, k, s, ns)), ndim, np.int64)


@numba.njit
def _view1(data, shapes, n, k, s, ns, dtype):
    sh = _shape(shapes, n, k, s, ns, 1)
    return numba.carray(_void_ptr(_entry(data, n, k, s, ns)), sh[0], dtype)


@numba.njit
def _view3(data, shapes, n, k, s, ns, dtype):
    sh = _shape(shapes, n, k, s, ns, 3)
    return numba.carray(_void_ptr(_entry(data, n, k, s, ns)), (sh[0], sh[1], sh[2]), dtype)


def mix_cfuncs(scale, shift, out_chw: bool, out_dtype: str, thumb: int, per_sample: bool, flip: bool,
               cut: bool = False):
    """The C run and setup functions of the CPU mix stage (``stages.mix_stage``), compiled or loaded.

    Args:
        scale, shift: (C,) per-channel ``1 / std`` and ``-mean / std`` (floats).
        out_chw: write (C, H, W) samples, else (H, W, C).
        out_dtype: "float32", or "float16" / "bfloat16" written as uint16 bit patterns.
        thumb: thumbnail side t, or 0 for no thumbnail (the output then has shape (0,)).
        per_sample: False: for ``numba_function(images, perm, lam[, boxes][, flips],
            batch_processing=True)`` (one call per batch, on one thread, the partner read in
            place). True: for ``numba_function(images, partners, lam[, boxes][, flips,
            partner_flips])`` (one call per sample, spread over DALI's threads; the partners come
            from ``fn.permute_batch``).
        flip: the stage also takes per-sample (1,) int32 horizontal-flip flags and flips while it
            mixes (each sample and its partner by their own flag), saving a pass over the batch.
        cut: the stage also takes per-sample (6,) int64 ``(y0, y1, x0, x1, cut, kind)`` rows
            (``switch.box_rows``): samples with ``cut`` set are cut and pasted (CutMix), the others
            mixed by lambda, in the same pass.

    Returns:
        (run, setup): ``numba`` ``CFunc`` objects (``.address`` is what DALI calls).

    Contract (per sample): out 0 (C, H, W) or (H, W, C) float32 or uint16; out 1
    (t * t * C,) float32, the thumbnail of the *unmixed* sample (with ``cut``: (2 t t C,), that
    thumbnail followed by the cut-and-pasted image's, see :func:`mix_sample`); in 0 (H, W, C)
    uint8, one size for the batch; in 1 (1,) int64 partner index (batch) or the partner image (per
    sample); in 2 (1,) float32 the sample's own weight; then the (6,) box row with ``cut``; then
    the (1,) int32 flip flags.
    """
    sc = np.asarray(scale, np.float32)
    sh = np.asarray(shift, np.float32)
    out_kind = {"float16": _OUT_F16, "bfloat16": _OUT_BF16}.get(out_dtype, 0)
    out_np = np.float32 if out_dtype == "float32" else np.uint16
    chw, t, flips, cuts = bool(out_chw), int(thumb), bool(flip), bool(cut)
    fi = 4 if cuts else 3  # the first flip input
    thumb_n = 2 if cuts else 1  # thumbnails per sample

    if per_sample:
        def run(o_ptr, o_shapes, o_ndims, n_out, i_ptr, i_shapes, i_ndims, n_in):
            fa = fb = False
            if flips:
                fa = _view1(i_ptr, i_shapes, n_in, fi, 0, 1, np.int32)[0] != 0
                fb = _view1(i_ptr, i_shapes, n_in, fi + 1, 0, 1, np.int32)[0] != 0
            box = _view1(i_ptr, i_shapes, n_in, 3, 0, 1, np.int64) if cuts else np.empty(0, np.int64)
            th = _view1(o_ptr, o_shapes, n_out, 1, 0, 1, np.float32)
            k = th.shape[0] // thumb_n
            mix_sample(_view3(o_ptr, o_shapes, n_out, 0, 0, 1, out_np),
                       _view3(i_ptr, i_shapes, n_in, 0, 0, 1, np.uint8),
                       _view3(i_ptr, i_shapes, n_in, 1, 0, 1, np.uint8),
                       _view1(i_ptr, i_shapes, n_in, 2, 0, 1, np.float32)[0], fa, fb,
                       th[:k], sc, sh, chw, t, out_kind, box, th[k:])

        run_sig = RUN_SIG
    else:
        def run(o_ptr, o_shapes, o_ndims, n_out, i_ptr, i_shapes, i_ndims, n_in, ns):
            for s in range(ns):
                p = _view1(i_ptr, i_shapes, n_in, 1, s, ns, np.int64)[0]
                fa = fb = False
                if flips:
                    fa = _view1(i_ptr, i_shapes, n_in, fi, s, ns, np.int32)[0] != 0
                    fb = _view1(i_ptr, i_shapes, n_in, fi, p, ns, np.int32)[0] != 0
                box = _view1(i_ptr, i_shapes, n_in, 3, s, ns, np.int64) if cuts else np.empty(0, np.int64)
                th = _view1(o_ptr, o_shapes, n_out, 1, s, ns, np.float32)
                k = th.shape[0] // thumb_n
                mix_sample(_view3(o_ptr, o_shapes, n_out, 0, s, ns, out_np),
                           _view3(i_ptr, i_shapes, n_in, 0, s, ns, np.uint8),
                           _view3(i_ptr, i_shapes, n_in, 0, p, ns, np.uint8),
                           _view1(i_ptr, i_shapes, n_in, 2, s, ns, np.float32)[0], fa, fb,
                           th[:k], sc, sh, chw, t, out_kind, box, th[k:])

        run_sig = RUN_BATCH_SIG

    def setup(o_shapes, o_ndims, n_out, i_shapes, i_ndims, n_in, ns):
        for s in range(ns):
            shape = _shape(i_shapes, n_in, 0, s, ns, 3)
            _set_image_shape(_shape(o_shapes, n_out, 0, s, ns, 3), shape[0], shape[1], shape[2], chw)
            if n_out > 1:
                _shape(o_shapes, n_out, 1, s, ns, 1)[0] = thumb_n * t * t * shape[2]

    return _compat.cached_cfunc(run, run_sig, DEPENDS), _compat.cached_cfunc(setup, SETUP_SIG, DEPENDS)


def partner_cfuncs(dtype):
    """C run and setup functions of ``stages.partner_labels``: ``out[s] = labels[perm[s]]``.

    ``dtype``: the labels' NumPy type; per sample: out 0 and in 0 (L,) labels, in 1 (1,)
    int64 partner index (batch processing).
    """
    label_dtype = np.dtype(dtype).type

    def run(o_ptr, o_shapes, o_ndims, n_out, i_ptr, i_shapes, i_ndims, n_in, ns):
        for s in range(ns):
            p = _view1(i_ptr, i_shapes, n_in, 1, s, ns, np.int64)[0]
            src = _view1(i_ptr, i_shapes, n_in, 0, p, ns, label_dtype)
            dst = _view1(o_ptr, o_shapes, n_out, 0, s, ns, label_dtype)
            for i in range(dst.shape[0]):
                dst[i] = src[i]

    def setup(o_shapes, o_ndims, n_out, i_shapes, i_ndims, n_in, ns):
        for s in range(ns):  # the shape of the partner's label: every label here has shape (1,)
            dst = _shape(o_shapes, n_out, 0, s, ns, 1)
            dst[0] = _shape(i_shapes, n_in, 0, s, ns, 1)[0]

    return _compat.cached_cfunc(run, RUN_BATCH_SIG, DEPENDS), _compat.cached_cfunc(setup, SETUP_SIG, DEPENDS)


def ascii_label_cfuncs():
    """C run and setup functions of ``stages.ascii_labels``: in 0 (L,) uint8 text -> out 0 (1,) int64."""
    def run(o_ptr, o_shapes, o_ndims, n_out, i_ptr, i_shapes, i_ndims, n_in, ns):
        for s in range(ns):
            _view1(o_ptr, o_shapes, n_out, 0, s, ns, np.int64)[0] = ascii_label(
                _view1(i_ptr, i_shapes, n_in, 0, s, ns, np.uint8))

    def setup(o_shapes, o_ndims, n_out, i_shapes, i_ndims, n_in, ns):
        for s in range(ns):
            _shape(o_shapes, n_out, 0, s, ns, 1)[0] = 1

    return _compat.cached_cfunc(run, RUN_BATCH_SIG, DEPENDS), _compat.cached_cfunc(setup, SETUP_SIG, DEPENDS)


# Numba's disk cache checks a function against its own file only: key this module's cached
# functions (and, in cached_cfunc, its C functions) on the pixel row code they call as well.
DEPENDS = (_pixel_cpu, _pixel_math)
key_disk_cache_on(globals(), *DEPENDS)
_compat.tolerate_unwritable_cache(mix_sample, ascii_label)
