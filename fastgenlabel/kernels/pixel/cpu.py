"""The pixel stage on the CPU: ``numba.njit(parallel=True, cache=True)`` over the rows of a batch.

Matches :func:`fastgenlabel.functional.images.mix_images`. One pass over memory: each image row
of the sample and of its partner is read once and the output row is written once (with CutMix
boxes, a row takes the box's columns from the partner and the rest from the sample, and rows
outside the box read the sample only; samples the boxes' mask leaves out are mixed by lambda); float16 and
bfloat16 outputs (and float16 inputs, which Numba's CPU target cannot type) go through a
per-thread float32 scratch row that stays in the L1 cache.

Arrays reach the kernel flat (1-D, C-contiguous) and are sliced into rows inside, which lets
LLVM vectorise the inner loops. Nothing here compiles at import: the first call compiles (or
loads the on-disk cache) for the argument types it sees.
"""
import numba
import numpy as np
from numba import prange

from . import math as _math

OUT_FLOAT = 0  # out is a float32 array: written directly
OUT_F16 = 1  # out is a uint16 view of a float16 array
OUT_BF16 = 2  # out is a uint16 view of a bfloat16 tensor

_mix = numba.njit(_math.mix_normalize)
_to_f16 = numba.njit(_math.f32_to_f16_bits)
_to_bf16 = numba.njit(_math.f32_to_bf16_bits)
_from_f16 = numba.njit(_math.f16_bits_to_f32)


@numba.njit
def _mix_row(a, ai, b, bi, ka, kb, scale, shift, scale_t, shift_t, d, di, W, C, a_plane, d_plane, in_chw, out_chw):
    """Mix one image row into ``d``.

    Element (w, c) of the row sits at ``a[ai + c * a_plane + w]`` for a CHW source and at
    ``a[ai + w * C + c]`` for an HWC one (likewise ``b``); it goes to ``d[di + c * d_plane + w]``
    (CHW) or ``d[di + w * C + c]`` (HWC). ``scale_t``/``shift_t`` are the per-channel constants
    tiled over a row (HWC -> HWC runs as one flat loop).
    """
    if not in_chw and not out_chw:
        n = W * C
        ar = a[ai:ai + n]
        br = b[bi:bi + n]
        dr = d[di:di + n]
        for i in range(n):
            dr[i] = _mix(ar[i], br[i], ka, kb, scale_t[i], shift_t[i])
    elif not in_chw:
        ar = a[ai:ai + W * C]
        br = b[bi:bi + W * C]
        if C == 3:
            d0 = d[di:di + W]
            d1 = d[di + d_plane:di + d_plane + W]
            d2 = d[di + 2 * d_plane:di + 2 * d_plane + W]
            s0, s1, s2 = scale[0], scale[1], scale[2]
            h0, h1, h2 = shift[0], shift[1], shift[2]
            for w in range(W):
                d0[w] = _mix(ar[3 * w], br[3 * w], ka, kb, s0, h0)
                d1[w] = _mix(ar[3 * w + 1], br[3 * w + 1], ka, kb, s1, h1)
                d2[w] = _mix(ar[3 * w + 2], br[3 * w + 2], ka, kb, s2, h2)
        else:
            for c in range(C):
                dr = d[di + c * d_plane:di + c * d_plane + W]
                sc = scale[c]
                sh = shift[c]
                for w in range(W):
                    dr[w] = _mix(ar[w * C + c], br[w * C + c], ka, kb, sc, sh)
    else:
        for c in range(C):
            ar = a[ai + c * a_plane:ai + c * a_plane + W]
            br = b[bi + c * a_plane:bi + c * a_plane + W]
            sc = scale[c]
            sh = shift[c]
            if out_chw:
                dr = d[di + c * d_plane:di + c * d_plane + W]
                for w in range(W):
                    dr[w] = _mix(ar[w], br[w], ka, kb, sc, sh)
            else:
                dr = d[di:di + W * C]
                for w in range(W):
                    dr[w * C + c] = _mix(ar[w], br[w], ka, kb, sc, sh)


@numba.njit
def _pick(a, b, inside):
    """``b`` inside the box, else ``a``; both already loaded, so that the compiler emits a select."""
    return b if inside else a


@numba.njit
def _cut_row(a, ai, b, bi, x0, x1, scale, shift, scale_t, shift_t, d, di, W, C, a_plane, d_plane, in_chw, out_chw):
    """One CutMix row into ``d``: columns [x0, x1) normalised from ``b`` (the partner), the others
    from ``a``. Laid out as :func:`_mix_row`; a row the box misses is that with weights (1, 0) and
    ``b = a``; a row through the box reads both rows and selects per element in one full-width
    loop (vectorised; three narrower loops spent their time in loop tails)."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    if x1 <= x0:
        _mix_row(a, ai, a, ai, one, zero, scale, shift, scale_t, shift_t, d, di, W, C, a_plane, d_plane,
                 in_chw, out_chw)
    elif not in_chw and not out_chw:
        n = W * C
        lo = x0 * C
        hi = x1 * C
        ar = a[ai:ai + n]
        br = b[bi:bi + n]
        dr = d[di:di + n]
        for i in range(n):
            v = _pick(ar[i], br[i], (i >= lo) & (i < hi))
            dr[i] = _mix(v, v, one, zero, scale_t[i], shift_t[i])
    elif not in_chw:
        ar = a[ai:ai + W * C]
        br = b[bi:bi + W * C]
        if C == 3:
            d0 = d[di:di + W]
            d1 = d[di + d_plane:di + d_plane + W]
            d2 = d[di + 2 * d_plane:di + 2 * d_plane + W]
            s0, s1, s2 = scale[0], scale[1], scale[2]
            h0, h1, h2 = shift[0], shift[1], shift[2]
            for w in range(W):
                inside = (w >= x0) & (w < x1)
                v0 = _pick(ar[3 * w], br[3 * w], inside)
                v1 = _pick(ar[3 * w + 1], br[3 * w + 1], inside)
                v2 = _pick(ar[3 * w + 2], br[3 * w + 2], inside)
                d0[w] = _mix(v0, v0, one, zero, s0, h0)
                d1[w] = _mix(v1, v1, one, zero, s1, h1)
                d2[w] = _mix(v2, v2, one, zero, s2, h2)
        else:
            for c in range(C):
                dr = d[di + c * d_plane:di + c * d_plane + W]
                sc = scale[c]
                sh = shift[c]
                for w in range(W):
                    v = _pick(ar[w * C + c], br[w * C + c], (w >= x0) & (w < x1))
                    dr[w] = _mix(v, v, one, zero, sc, sh)
    else:
        for c in range(C):
            ar = a[ai + c * a_plane:ai + c * a_plane + W]
            br = b[bi + c * a_plane:bi + c * a_plane + W]
            sc = scale[c]
            sh = shift[c]
            if out_chw:
                dr = d[di + c * d_plane:di + c * d_plane + W]
                for w in range(W):
                    v = _pick(ar[w], br[w], (w >= x0) & (w < x1))
                    dr[w] = _mix(v, v, one, zero, sc, sh)
            else:
                dr = d[di:di + W * C]
                for w in range(W):
                    v = _pick(ar[w], br[w], (w >= x0) & (w < x1))
                    dr[w * C + c] = _mix(v, v, one, zero, sc, sh)


@numba.njit
def _box_columns(boxes, s, h, cut):
    """The columns [x0, x1) row h of sample s takes from the partner: (0, 0) outside its box."""
    if cut and boxes[s, 0] <= h < boxes[s, 1]:
        return boxes[s, 2], boxes[s, 3]
    return 0, 0


@numba.njit
def _f16_row_to_f32(src, si, dst, W, C, plane, in_chw):
    """Decode one row of float16 bits (CHW planes ``plane`` apart, or HWC) into ``dst`` (planes W apart)."""
    if in_chw:
        for c in range(C):
            s = src[si + c * plane:si + c * plane + W]
            t = dst[c * W:(c + 1) * W]
            for w in range(W):
                t[w] = _from_f16(s[w])
    else:
        s = src[si:si + W * C]
        for i in range(W * C):
            dst[i] = _from_f16(s[i])


@numba.njit
def _store_row(scratch, out, oi, W, C, plane, out_chw, out_kind):
    """Encode a float32 scratch row (CHW planes W apart, or HWC) into 16-bit ``out`` at ``oi``."""
    if out_chw:
        for c in range(C):
            s = scratch[c * W:(c + 1) * W]
            o = out[oi + c * plane:oi + c * plane + W]
            if out_kind == OUT_F16:
                for w in range(W):
                    o[w] = np.uint16(_to_f16(s[w]))
            else:
                for w in range(W):
                    o[w] = np.uint16(_to_bf16(s[w]))
    else:
        o = out[oi:oi + W * C]
        if out_kind == OUT_F16:
            for i in range(W * C):
                o[i] = np.uint16(_to_f16(scratch[i]))
        else:
            for i in range(W * C):
                o[i] = np.uint16(_to_bf16(scratch[i]))


@numba.njit
def _copy_row(scratch, out, oi, W, C, plane, out_chw):
    """Copy a float32 scratch row (CHW planes W apart, or HWC) into float32 ``out`` at ``oi``."""
    if out_chw:
        for c in range(C):
            out[oi + c * plane:oi + c * plane + W] = scratch[c * W:(c + 1) * W]
    else:
        out[oi:oi + W * C] = scratch


@numba.njit
def _tiled(v, C, W):
    """(C,) per-channel constants repeated over an HWC row of W pixels."""
    t = np.empty(W * C, np.float32)
    for i in range(W * C):
        t[i] = v[i % C]
    return t


@numba.njit
def _row_starts(r, H, W, C, perm, in_chw, out_chw):
    """Row r = (sample s, row h): where it starts in the sample, in its partner and in the output."""
    s = r // H
    h = r - s * H
    img = H * W * C
    in_row = h * W if in_chw else h * W * C
    out_row = h * W if out_chw else h * W * C
    return s, s * img + in_row, perm[s] * img + in_row, s * img + out_row


# The three kernels below share one contract (the module docstring of the reference applies):
#
#   x      (B*H*W*C,) the batch, flat and C-contiguous, samples in CHW order if in_chw else HWC
#   perm   (B,) int64 partner of every sample; lam (B,) float32 weight of the sample itself
#   boxes  (B, 4) int64 CutMix boxes (y0, y1, x0, x1), read only when cut is True
#   mask   (B,) int64, read only when cut is True: 1 where the sample is cut (lam unused), 0 where
#          it is mixed by lam (box unused)
#   scale  (C,) float32 1 / std; shift (C,) float32 -mean / std
#   out    (B*H*W*C,) flat, CHW order if out_chw else HWC
#   n_chunks  the B*H rows are cut into this many chunks shared among the threads (a few per
#             thread keep the load balanced when other processes share the cores)
#
# They differ in the element types they read and write, so that a call compiles only what it uses.


@numba.njit(parallel=True, cache=True)
def mix_kernel(x, perm, lam, boxes, mask, cut, scale, shift, out, H, W, C, in_chw, out_chw, n_chunks):
    """uint8 or float32 ``x`` -> float32 ``out``: each output element written once, directly."""
    n_rows = perm.shape[0] * H
    n_chunks = max(1, min(n_rows, n_chunks))
    plane = H * W
    scale_t = _tiled(scale, C, W)
    shift_t = _tiled(shift, C, W)
    for k in prange(n_chunks):
        for r in range(k * n_rows // n_chunks, (k + 1) * n_rows // n_chunks):
            s, ai, bi, oi = _row_starts(r, H, W, C, perm, in_chw, out_chw)
            if cut and mask[s] != 0:
                x0, x1 = _box_columns(boxes, s, r - s * H, cut)
                _cut_row(x, ai, x, bi, x0, x1, scale, shift, scale_t, shift_t, out, oi, W, C, plane, plane,
                         in_chw, out_chw)
            else:
                ka = lam[s]
                _mix_row(x, ai, x, bi, ka, np.float32(1.0) - ka, scale, shift, scale_t, shift_t,
                         out, oi, W, C, plane, plane, in_chw, out_chw)


@numba.njit(parallel=True, cache=True)
def mix_encode_kernel(x, perm, lam, boxes, mask, cut, scale, shift, out, H, W, C, in_chw, out_chw, out_kind, n_chunks):
    """uint8 or float32 ``x`` -> ``out`` uint16 holding float16 (OUT_F16) or bfloat16 (OUT_BF16) bits."""
    n_rows = perm.shape[0] * H
    n_chunks = max(1, min(n_rows, n_chunks))
    plane = H * W
    scale_t = _tiled(scale, C, W)
    shift_t = _tiled(shift, C, W)
    for k in prange(n_chunks):
        d_buf = np.empty(W * C, np.float32)
        for r in range(k * n_rows // n_chunks, (k + 1) * n_rows // n_chunks):
            s, ai, bi, oi = _row_starts(r, H, W, C, perm, in_chw, out_chw)
            if cut and mask[s] != 0:
                x0, x1 = _box_columns(boxes, s, r - s * H, cut)
                _cut_row(x, ai, x, bi, x0, x1, scale, shift, scale_t, shift_t, d_buf, 0, W, C, plane, W,
                         in_chw, out_chw)
            else:
                ka = lam[s]
                _mix_row(x, ai, x, bi, ka, np.float32(1.0) - ka, scale, shift, scale_t, shift_t,
                         d_buf, 0, W, C, plane, W, in_chw, out_chw)
            _store_row(d_buf, out, oi, W, C, plane, out_chw, out_kind)


@numba.njit(parallel=True, cache=True)
def mix_f16_kernel(x, perm, lam, boxes, mask, cut, scale, shift, out, H, W, C, in_chw, out_chw, out_kind, n_chunks):
    """``x`` uint16 holding float16 bits -> float32 ``out`` (OUT_FLOAT) or uint16 bits (OUT_F16, OUT_BF16)."""
    n_rows = perm.shape[0] * H
    n_chunks = max(1, min(n_rows, n_chunks))
    plane = H * W
    scale_t = _tiled(scale, C, W)
    shift_t = _tiled(shift, C, W)
    for k in prange(n_chunks):
        a_buf = np.empty(W * C, np.float32)
        b_buf = np.empty(W * C, np.float32)
        d_buf = np.empty(W * C, np.float32)
        for r in range(k * n_rows // n_chunks, (k + 1) * n_rows // n_chunks):
            s, ai, bi, oi = _row_starts(r, H, W, C, perm, in_chw, out_chw)
            _f16_row_to_f32(x, ai, a_buf, W, C, plane, in_chw)
            if cut and mask[s] != 0:
                x0, x1 = _box_columns(boxes, s, r - s * H, cut)
                if x1 > x0:  # only rows through the box read the partner
                    _f16_row_to_f32(x, bi, b_buf, W, C, plane, in_chw)
                _cut_row(a_buf, 0, b_buf, 0, x0, x1, scale, shift, scale_t, shift_t, d_buf, 0, W, C, W, W,
                         in_chw, out_chw)
            else:
                ka = lam[s]
                _f16_row_to_f32(x, bi, b_buf, W, C, plane, in_chw)
                _mix_row(a_buf, 0, b_buf, 0, ka, np.float32(1.0) - ka, scale, shift, scale_t, shift_t,
                         d_buf, 0, W, C, W, W, in_chw, out_chw)
            if out_kind == OUT_FLOAT:
                _copy_row(d_buf, out, oi, W, C, plane, out_chw)
            else:
                _store_row(d_buf, out, oi, W, C, plane, out_chw, out_kind)


def run(x, perm, lam, boxes, scale, shift, out, H, W, C, in_chw, out_chw, in_f16, out_kind, n_chunks, mask=None):
    """Pick the kernel for these element types (see the contract above) and run it; ``boxes``
    (B, 4) int64 for CutMix, or None for mixup; ``mask`` (B,) int64 with boxes (None: all cut)."""
    cut = boxes is not None
    if not cut:
        boxes = np.zeros((0, 4), np.int64)
    if mask is None:
        mask = np.ones(boxes.shape[0], np.int64)
    if in_f16:
        mix_f16_kernel(x, perm, lam, boxes, mask, cut, scale, shift, out, H, W, C, in_chw, out_chw, out_kind,
                       n_chunks)
    elif out_kind == OUT_FLOAT:
        mix_kernel(x, perm, lam, boxes, mask, cut, scale, shift, out, H, W, C, in_chw, out_chw, n_chunks)
    else:
        mix_encode_kernel(x, perm, lam, boxes, mask, cut, scale, shift, out, H, W, C, in_chw, out_chw, out_kind,
                          n_chunks)


from ..compat import key_disk_cache_on  # noqa: E402

key_disk_cache_on(globals(), _math)
