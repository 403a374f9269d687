"""The pixel stage's scalar math, written once.

Plain Python on NumPy scalars: :mod:`.cpu` compiles these functions with ``numba.njit`` and
:mod:`.cuda` with ``numba.cuda.jit(device=True)``; the CUDA simulator runs them as they are.
They match :func:`fastgenlabel.functional.images.mix_images` (the reference) element by element.

Numba's on-disk cache checks a kernel against its own source file only; ``cpu.py`` and
``cuda.py`` add this file's digest to that check (``kernels.compat.key_disk_cache_on``), so an
edit here rebuilds the cached kernels.

Integer work is done in int64 so that NumPy's and Numba's promotion rules agree (uint32 mixed
with a Python int would become float64 in Numba).
"""
import numpy as np


def mix_normalize(a, b, ka, kb, scale, shift):
    """One output element: ``(ka * a + kb * b) * scale + shift``.

    With ``ka = lam``, ``kb = 1 - lam``, ``scale = 1 / std`` and ``shift = -mean / std`` this is the
    reference's ``(lam * x + (1 - lam) * x[perm] - mean) / std``, computed in float32.
    """
    return (ka * np.float32(a) + kb * np.float32(b)) * scale + shift


def f32_to_bf16_bits(v):
    """float32 -> bfloat16 bit pattern (round to nearest even, NaN kept quiet), as int64."""
    x = np.int64(np.float32(v).view(np.uint32))
    if (x & 0x7FFFFFFF) > 0x7F800000:
        return ((x >> 16) | 0x40) & 0xFFFF
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16) & 0xFFFF


def f32_to_f16_bits(v):
    """float32 -> IEEE half bit pattern (round to nearest even, like ``astype(np.float16)``), as int64.

    Written as selects rather than branches so that the CPU compiler can vectorise it.
    """
    x = np.int64(np.float32(v).view(np.uint32))
    sign = (x >> 16) & 0x8000
    ax = x & 0x7FFFFFFF
    # a normal half: rebias the exponent (127 -> 15) and round away 13 mantissa bits, ties to
    # even; a carry out of the mantissa bumps the exponent, as it should
    normal = (ax - 0x38000000 + 0xFFF + ((ax >> 13) & 1)) >> 13
    # a subnormal half (|v| < 2**-14): the significand in units of 2**-24, rounded the same way;
    # shifting by 25 leaves 0 for everything below 2**-25
    e = ax >> 23
    shift = min(max(126 - e, 14), 25)
    m = (ax & 0x7FFFFF) | 0x800000
    sub = (m + (np.int64(1) << (shift - 1)) - 1 + ((m >> shift) & 1)) >> shift
    h = normal if ax >= 0x38800000 else sub
    h = 0x7C00 if ax >= 0x477FF000 else h  # 65520 and above round to infinity
    h = 0x7E00 if ax > 0x7F800000 else h  # NaN stays NaN
    return sign | h


def f16_bits_to_f32(h):
    """IEEE half bit pattern -> float32 (exact)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    normal = np.uint32(sign | ((h & 0x7FFF) << 13) + 0x38000000).view(np.float32)
    special = np.uint32(sign | 0x7F800000 | (m << 13)).view(np.float32)  # infinity, NaN
    sub = np.float32(m) * np.float32(5.9604644775390625e-08)  # m * 2**-24, exact
    sub = -sub if sign != 0 else sub
    v = sub if e == 0 else normal
    return special if e == 31 else v
