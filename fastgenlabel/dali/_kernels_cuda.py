"""The per-sample CUDA run function of the in-graph GPU mix (``stages.mix_stage_gpu``).

Imported only when a GPU stage is built. ``cuda`` is a module global so that Numba's CUDA
simulator can stand in for it (tests/test_dali.py runs the kernel under the simulator).
"""
from __future__ import annotations

import numpy as np

from ..kernels._interop import cuda_modules
from ..kernels.pixel import math as _pixel_math

cuda = cuda_modules()  # numba.cuda, with the numba-cuda/numpy patch applied first


def make_mix_gpu(scale, shift, out_chw: bool, out_f16: bool):
    """The per-sample CUDA run function of the in-graph GPU mix (see ``_compat`` defect 3).

    DALI launches it once per sample with the operator's ``blocks``/``threads_per_block``; each
    launch walks the whole image with a grid-stride loop. Inputs per sample: the image (H, W, C)
    uint8, its partner (H, W, C) uint8 (from ``fn.permute_batch``), lam (1,) float32.
    """
    sc = np.asarray(scale, np.float32)
    sh = np.asarray(shift, np.float32)
    mix_d = cuda.jit(device=True)(_pixel_math.mix_normalize)
    f16_d = cuda.jit(device=True)(_pixel_math.f32_to_f16_bits)

    def run_fn(out, a, b, lam):
        H, W, C = a.shape
        ka = lam[0]
        kb = np.float32(1.0) - ka
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for k in range(start, H * W * C, stride):
            c = k % C
            x = (k // C) % W
            y = k // (C * W)
            v = mix_d(a[y, x, c], b[y, x, c], ka, kb, sc[c], sh[c])
            if out_f16:  # a compile-time constant: Numba prunes the other branch
                bits = np.uint16(f16_d(v))
                if out_chw:
                    out[c, y, x] = bits
                else:
                    out[y, x, c] = bits
            else:
                if out_chw:
                    out[c, y, x] = v
                else:
                    out[y, x, c] = v

    return run_fn
