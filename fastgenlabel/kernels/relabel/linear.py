"""Diag and tied scores of a batch as one float32 matrix product, exact where its error could show.

Around a common centre m (x = z_mix - m, a_c = mu_c - m), the class-dependent part of each raw
score is linear in a few features of x (docs/MATH.md section 5):

- diag (precisions s_ci): -1/2 sum_i s_ci (x_i - a_ci)^2 = sum_i [-1/2 (s_ci - sbar_i) x_i^2
  + s_ci a_ci x_i] - 1/2 sum_i s_ci a_ci^2 - 1/2 sum_i sbar_i x_i^2, with sbar_i the midrange of
  s_ci over the classes: phi = [x^2, x], T = 2d;
- tied (P = L L^T, t_c = L^T a_c): -1/2 ||L^T x - t_c||^2 = x . (L t_c) - 1/2 ||t_c||^2
  - 1/2 ||L^T x||^2: phi = x, T = d.

The last term is the same for every class and is dropped (the softmax ignores it): a dead unit,
whose precision is the regulariser's for every class, then adds nothing. The per-class constant
is kept in float64 with the bias. The product ``phi @ W^T`` runs in float32 (torch's MKL, ``mkl.py``); its
error per logit is at most ``math.linear_error`` of M_s = min(sum_j |phi_sj| max_c |W_cj|,
||phi_s|| max_c ||W_c||), two bounds of the sum of the absolute values of any class's terms (the
second by Cauchy-Schwarz, tighter for in-distribution rows). Rows whose bound exceeds
``PRODUCT_TRUST`` get the classes within reach of the best rescored exactly in float64
(``cpu.linear_finish``).

On CUDA (POLICY "always"; "auto" keeps the fused kernel there, one launch against five, until a
GPU has timed both): ``cuda.linear_split`` writes phi's TF32 halves [hi; lo] (2B, width) in one
pass, cuBLAS's tensor cores multiply them by W's halves (``gemm.split_scores``), and
``cuda.linear_finish``, a block per sample, bounds them (``math.split_linear_error``: the split
drops lo x lo), rescores as the CPU does and makes the targets.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

# "auto": diag and tied run on the product on the CPU, on the fused kernel on CUDA; "always": on
# the product on both; "never": on the fused float64-sum kernel (tests, benchmarks).
POLICY = "auto"


def policy(value: str):
    """Temporarily set :data:`POLICY` ("auto", "always", "never")."""
    from .gemm import scoped_policy

    return scoped_policy(sys.modules[__name__], value)


def use_linear(device_type: str) -> bool:
    """Whether diag/tied scores come from the product form on this device: on the CPU unless
    POLICY is "never"; on CUDA only when POLICY is "always" (the fused kernel is one launch)."""
    if POLICY == "always":
        return True
    if POLICY == "never":
        return False
    return device_type == "cpu"


def fits_cuda(params) -> bool:
    """Whether ``cuda.linear_finish``'s shared memory holds this model's row (tied: y, d float64);
    past it the fused kernel runs."""
    from .cuda import MAX_SHARED_BYTES

    return params.kind == "diag" or 8 * params.dim <= MAX_SHARED_BYTES


def width(terms: int) -> int:
    """phi's row length on CUDA: T terms rounded up to ``gemm.ALIGN`` (aligned tensor-core rows)."""
    from .gemm import ALIGN

    return -(-terms // ALIGN) * ALIGN


def split_features(arrays: dict[str, torch.Tensor], z: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor,
                   quad: bool) -> torch.Tensor:
    """[hi(phi); lo(phi)] (2B, width) on z's device by one Numba kernel (``cuda.linear_split``) on
    torch's stream: phi = [x^2, x] (``quad``) or x, x = z_mix - center, zero padded; ``arrays``:
    ``params.linear_params_for`` on that device."""
    from .._interop import current_stream, device_view
    from . import cuda as kernels

    b = z.shape[0]
    halves = torch.empty((2 * b, arrays["w_hi"].shape[1]), dtype=torch.float32, device=z.device)
    if b:
        kernels.linear_split[kernels.linear_split_grid(b, halves.shape[1]), kernels.TPB, current_stream()](
            device_view(z), device_view(perm), device_view(lam), device_view(arrays["center"]), int(quad),
            device_view(halves))
    return halves


def _f32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def pack(model, bias: np.ndarray) -> dict[str, np.ndarray]:
    """The product form of a fitted diag or tied ``GaussianClassModel``.

    Every parameter is rounded to float32 once, and W and the constants are derived in float64
    from those rounded values, so that the product and the exact rescoring compute the same
    scores up to the product's rounding. ``bias``: the packed float64 bias (``params._bias``).

    Returns:
        ``center`` (d,) m; ``w`` (K, T) W; ``mcol`` (T,) max_c |W_cj| and ``wnorm`` (1,) float64
        max_c ||W_c|| over live classes;
        ``const`` (K,) float64, bias plus the class constant (-inf for empty classes); and for
        the rescoring, diag: ``a`` (K, d), ``s`` (K, d), ``sbar`` (d,); tied: ``t`` (K, d), ``chol``
        (d, d) = L.
    """
    means = model.means.detach().to("cpu", torch.float64)
    counts = model.class_counts.detach().to("cpu", torch.float64)
    live = counts > 0
    center = ((means * counts.unsqueeze(1)).sum(0) / counts.sum()).to(torch.float32)
    a = (means - center.double()).to(torch.float32).double()
    arrays = {"center": center.numpy()}
    if model.covariance == "diag":
        s = (1.0 / model.variances.detach().to("cpu", torch.float64)).to(torch.float32).double()
        sbar = ((s[live].amax(0) + s[live].amin(0)) / 2).to(torch.float32).double()
        w = torch.cat([-0.5 * (s - sbar), s * a], 1)
        const = -0.5 * (s * a * a).sum(1)
        arrays.update(a=_f32(a), s=_f32(s), sbar=_f32(sbar))
    elif model.covariance == "tied":
        chol = model.precision_chol.detach().to("cpu", torch.float64).to(torch.float32).double()
        t = (a @ chol).to(torch.float32).double()
        w = t @ chol.T  # w_c = L t_c
        const = -0.5 * (t * t).sum(1)
        arrays.update(t=_f32(t), chol=_f32(chol))
    else:
        raise ValueError(f"model: the linear product form is for diag or tied covariance, got {model.covariance!r}")
    w[~live] = 0.0
    w32 = w.to(torch.float32)
    arrays["w"] = _f32(w32)
    arrays["mcol"] = _f32(w32.abs().amax(0))
    arrays["wnorm"] = w32.double().norm(dim=1).amax().reshape(1).numpy()
    arrays["const"] = np.where(live.numpy(), bias + const.numpy(), -np.inf)
    return arrays


__all__ = ["POLICY", "fits_cuda", "pack", "policy", "split_features", "use_linear", "width"]
