"""The pixel stage on CUDA: ``numba.cuda.jit(cache=True)``, one thread per pixel and all its channels.

Matches :func:`fastgenlabel.functional.images.mix_images`. One pass over memory: a thread reads
the C values of one pixel of its sample and of the partner and writes the C output values; for
an HWC -> CHW conversion consecutive threads take consecutive pixels, so each channel plane is
written with coalesced stores (and the byte reads of a warp cover one contiguous span). The
grid is (pixel blocks, B): the sample's lambda and partner come from ``blockIdx.y``, and each
thread strides over ``PIXELS_PER_THREAD`` pixels. float16 output is a native float16 store;
bfloat16 output is written as bits into a uint16 view (the bit conversion is :mod:`.math`'s).
With CutMix boxes a thread reads its pixel from the partner inside the sample's box and from the
sample outside it: one read per output value; samples the boxes' mask leaves out are mixed.

Importing this module imports ``numba.cuda`` (patched, see ``kernels/compat.py``) but neither
touches a GPU nor compiles; the first launch compiles (or loads the on-disk cache) for the
argument types it sees. Under ``NUMBA_ENABLE_CUDASIM=1`` the same code runs in the simulator.
"""
import numpy as np

from .._interop import cuda_modules
from . import math as _math

cuda = cuda_modules()

THREADS = 256
PIXELS_PER_THREAD = 4
MAX_BATCH = 65535  # gridDim.y

_mix = cuda.jit(device=True)(_math.mix_normalize)
_to_bf16 = cuda.jit(device=True)(_math.f32_to_bf16_bits)


@cuda.jit(device=True)
def _put(out, o, v, out_bf16):
    if out_bf16:
        out[o] = np.uint16(_to_bf16(v))
    else:
        out[o] = v


@cuda.jit(cache=True)
def mix_kernel(x, perm, lam, boxes, mask, cut, scale, shift, out, HW, W, C, in_chw, out_chw, out_bf16):
    """``out = (lam * x + (1 - lam) * x[perm] - mean) / std`` for a whole batch; with ``cut``,
    ``out = (x[perm] - mean) / std`` inside each sample's box and ``(x - mean) / std`` outside.

    Args:
        x: (B*H*W*C,) the batch, flat and C-contiguous, uint8/float16/float32, samples in CHW
            order if ``in_chw`` else HWC.
        perm: (B,) int64 partners; lam: (B,) float32 weights of the samples themselves.
        boxes: (B, 4) int64 CutMix boxes (y0, y1, x0, x1), read only when ``cut``.
        mask: (B,) int64, read only when ``cut``: 1 where the sample is cut (its lam unused), 0
            where it is mixed by lam (its box unused). The branch is per block: no divergence.
        scale: (C,) float32 ``1 / std``; shift: (C,) float32 ``-mean / std``.
        out: (B*H*W*C,) float32 or float16, or uint16 receiving bfloat16 bits when
            ``out_bf16``; CHW order if ``out_chw`` else HWC.
        HW, W, C: pixels per image, pixels per row, and channels.

    Three channels (RGB) load the pixel's six input values and the constants before the first
    store: the compiler cannot move a load above a store to ``out`` (it may alias ``x``), so a
    loop over channels would wait for memory once per channel instead of once per pixel.
    """
    s = cuda.blockIdx.y
    p = perm[s]
    ka = lam[s]
    kb = np.float32(1.0) - ka
    img = HW * C
    x_self = s * img
    x_partner = p * img
    # element (pixel q, channel c) sits at q * pix + c * chan within a sample
    in_pix = 1 if in_chw else C
    in_chan = HW if in_chw else 1
    out_pix = 1 if out_chw else C
    out_chan = HW if out_chw else 1
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    step = cuda.gridDim.x * cuda.blockDim.x
    if cut and mask[s] != 0:
        _cut_pixels(x, x_self, x_partner, boxes[s, 0], boxes[s, 1], boxes[s, 2], boxes[s, 3], scale, shift, out,
                    start, step, HW, W, C, in_pix, in_chan, out_pix, out_chan, out_bf16)
        return
    if C == 3:
        sc0, sc1, sc2 = scale[0], scale[1], scale[2]
        sh0, sh1, sh2 = shift[0], shift[1], shift[2]
        for q in range(start, HW, step):
            i = q * in_pix
            a0, a1, a2 = x[x_self + i], x[x_self + i + in_chan], x[x_self + i + 2 * in_chan]
            b0, b1, b2 = x[x_partner + i], x[x_partner + i + in_chan], x[x_partner + i + 2 * in_chan]
            o = x_self + q * out_pix
            _put(out, o, _mix(a0, b0, ka, kb, sc0, sh0), out_bf16)
            _put(out, o + out_chan, _mix(a1, b1, ka, kb, sc1, sh1), out_bf16)
            _put(out, o + 2 * out_chan, _mix(a2, b2, ka, kb, sc2, sh2), out_bf16)
        return
    for q in range(start, HW, step):
        for c in range(C):
            i = q * in_pix + c * in_chan
            v = _mix(x[x_self + i], x[x_partner + i], ka, kb, scale[c], shift[c])
            _put(out, x_self + q * out_pix + c * out_chan, v, out_bf16)


@cuda.jit(device=True)
def _cut_pixels(x, x_self, x_partner, y0, y1, x0, x1, scale, shift, out, start, step, HW, W, C, in_pix, in_chan,
                out_pix, out_chan, out_bf16):
    """The CutMix pixels of one sample's thread: each read from the partner inside the box, from
    the sample outside, normalised as a mix with weights (1, 0)."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for q in range(start, HW, step):
        h = q // W
        w = q - h * W
        src = x_partner if (y0 <= h and h < y1 and x0 <= w and w < x1) else x_self
        i = src + q * in_pix
        o = x_self + q * out_pix
        if C == 3:
            a0, a1, a2 = x[i], x[i + in_chan], x[i + 2 * in_chan]
            _put(out, o, _mix(a0, a0, one, zero, scale[0], shift[0]), out_bf16)
            _put(out, o + out_chan, _mix(a1, a1, one, zero, scale[1], shift[1]), out_bf16)
            _put(out, o + 2 * out_chan, _mix(a2, a2, one, zero, scale[2], shift[2]), out_bf16)
        else:
            for c in range(C):
                a = x[i + c * in_chan]
                _put(out, o + c * out_chan, _mix(a, a, one, zero, scale[c], shift[c]), out_bf16)


def grid(batch: int, pixels: int, threads: int = THREADS) -> tuple[int, int]:
    """Blocks (x over pixels, y over samples) for ``mix_kernel``."""
    return max(1, min(-(-pixels // (threads * PIXELS_PER_THREAD)), 2**31 - 1)), batch


def launch(x, perm, lam, scale, shift, out, H, W, C, in_chw, out_chw, out_bf16, stream=0, threads=THREADS,
           boxes=None, mask=None):
    """Run ``mix_kernel`` on device arrays (see its docstring) on ``stream``; empty batches do
    nothing. ``boxes``: (B, 4) int64 CutMix boxes, or None for mixup; ``mask``: (B,) int64 device
    array with boxes (None: every sample cut)."""
    batch = perm.shape[0]
    if batch == 0 or H * W == 0:
        return
    if batch > MAX_BATCH:
        raise ValueError(f"images: numba-cuda handles at most {MAX_BATCH} samples per call, got {batch}")
    cut = boxes is not None
    if not cut:  # not read; any 2-D int64 array keeps one compiled kernel for both
        boxes = perm.reshape(batch, 1)
    if mask is None:
        mask = cuda.to_device(np.ones(batch, np.int64), stream=stream) if cut else perm  # perm: not read
    mix_kernel[grid(batch, H * W, threads), threads, stream](
        x, perm, lam, boxes, mask, cut, scale, shift, out, H * W, W, C, bool(in_chw), bool(out_chw), bool(out_bf16))


from ..compat import key_disk_cache_on  # noqa: E402

key_disk_cache_on(globals(), _math)
