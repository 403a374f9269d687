"""Random resized crops and flips as pure functions of (seed, epoch, sample index), drawn on the host.

Both backends crop the same windows: the torch dataset per sample, the DALI backend per batch (its
external source hands the windows and flips to ``decoders.image_slice`` and the mix stage, so no
draw comes from DALI's own generator and a loader can resume anywhere). The draws are numpy's
Philox4x64-10 (``np.random.Philox``), vectorised over samples: key (seed, epoch), counter
(index, block, stream, 0). The windows follow torchvision's ``RandomResizedCrop`` (the algorithm
DALI's ``image_random_crop`` uses too): up to 10 tries of an area fraction ~ U(scale) and a
log-aspect ~ U(log ratio), rounded to pixels, kept if it fits; else a centre crop of the clamped
ratio. The position of a fitting window is uniform over the positions where it fits.
"""
from __future__ import annotations

import numpy as np

ATTEMPTS = 10
CROP_STREAM = 1  # the counter's third word: other streams of draws may use other values
_DRAWS = 2 * ATTEMPTS + 3  # areas, log-aspects, x, y, flip
_M = (0xD2E7470EE14C6C93, 0xCA5A826395121157)  # Philox4x64 multipliers and Weyl key increments
_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)
_LO32 = np.uint64(0xFFFFFFFF)


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 64-bit halves of the 128-bit products a * b (uint64 arrays, wrapping)."""
    a0, a1 = np.uint64(a & 0xFFFFFFFF), np.uint64(a >> 32)
    b0, b1 = b & _LO32, b >> np.uint64(32)
    p01, p10 = a0 * b1, a1 * b0
    mid = ((a0 * b0) >> np.uint64(32)) + (p01 & _LO32) + (p10 & _LO32)
    hi = a1 * b1 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))
    return hi, np.uint64(a) * b


def philox4x64(counter: np.ndarray, key) -> np.ndarray:
    """Philox4x64-10 of (n, 4) uint64 counters under one (k0, k1) key: (n, 4) uint64 (Random123's
    definition; ``np.random.Philox(counter=c, key=k).random_raw(4)`` gives that of c + 1)."""
    c = [np.ascontiguousarray(counter[:, j], np.uint64) for j in range(4)]
    k0, k1 = int(key[0]) & 0xFFFFFFFFFFFFFFFF, int(key[1]) & 0xFFFFFFFFFFFFFFFF
    with np.errstate(over="ignore"):
        for r in range(10):
            if r:
                k0, k1 = (k0 + _W[0]) & 0xFFFFFFFFFFFFFFFF, (k1 + _W[1]) & 0xFFFFFFFFFFFFFFFF
            hi0, lo0 = _mulhilo(_M[0], c[0])
            hi1, lo1 = _mulhilo(_M[1], c[2])
            c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return np.stack(c, axis=1)


def uniforms(seed: int, epoch: int, indices, draws: int, stream: int = CROP_STREAM) -> np.ndarray:
    """(n, draws) float64 uniforms in [0, 1), row i a pure function of (seed, epoch, indices[i], stream)."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    if (idx < 0).any():
        raise ValueError("indices: sample indices must be >= 0")
    blocks = -(-draws // 4)
    counter = np.zeros((idx.size, blocks, 4), np.uint64)
    counter[:, :, 0] = idx[:, None].astype(np.uint64)
    counter[:, :, 1] = np.arange(blocks, dtype=np.uint64)[None, :]
    counter[:, :, 2] = np.uint64(stream)
    raw = philox4x64(counter.reshape(-1, 4), (int(seed), int(epoch))).reshape(idx.size, blocks * 4)[:, :draws]
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def crop_windows(widths, heights, *, seed: int, epoch: int, indices, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 flip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random resized crop windows and flips of samples ``indices`` of images (widths, heights).

    Returns (start (n, 2) int32 (left, top), shape (n, 2) int32 (w, h), flip (n,) int32 0/1);
    flips are all 0 with ``flip=False``. Row i depends on (seed, epoch, indices[i]) and the size only.
    """
    width = np.asarray(widths, np.int64).reshape(-1)
    height = np.asarray(heights, np.int64).reshape(-1)
    u = uniforms(seed, epoch, indices, _DRAWS)
    area = (width * height).astype(np.float64)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :ATTEMPTS])
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, ATTEMPTS:2 * ATTEMPTS])
    w = np.round(np.sqrt(target * aspect))  # round half to even, as Python's round in torchvision
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(width))
    cw, ch = w[rows, first].astype(np.int64), h[rows, first].astype(np.int64)
    left = np.floor(u[:, -3] * (width - cw + 1)).astype(np.int64)
    top = np.floor(u[:, -2] * (height - ch + 1)).astype(np.int64)
    failed = ~fits.any(axis=1)
    if failed.any():  # torchvision's fallback: the whole image at the ratio clamped into range, centred
        fw, fh = width[failed], height[failed]
        in_ratio = fw / fh
        lo, hi = min(ratio), max(ratio)
        cw_f = np.where(in_ratio < lo, fw, np.where(in_ratio > hi, np.round(fh * hi), fw)).astype(np.int64)
        ch_f = np.where(in_ratio < lo, np.round(fw / lo), fh).astype(np.int64)
        cw[failed], ch[failed] = cw_f, ch_f
        left[failed], top[failed] = (fw - cw_f) // 2, (fh - ch_f) // 2
    flips = (u[:, -1] < 0.5) & bool(flip)
    return (np.stack([left, top], 1).astype(np.int32), np.stack([cw, ch], 1).astype(np.int32),
            flips.astype(np.int32))
