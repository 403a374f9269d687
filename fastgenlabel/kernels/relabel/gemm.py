"""Full-covariance scores of a batch as one matrix product, for the GPU's tensor cores.

The per-class quadratic form, expanded around a common centre m (x = z_mix - m, a_c = mu_c - m,
P_c = L_c L_c^T the precision), is linear in the pairwise products of x:

    -1/2 ||L_c^T (x - a_c)||^2 = sum_{i <= j} w_c,ij x_i x_j + (P_c a_c)^T x - 1/2 a_c^T P_c a_c

with w_c,ii = -1/2 P_c,ii and w_c,ij = -P_c,ij (i < j); m is the count-weighted mean of the
class means. So the raw scores of B samples over K classes are ``phi @ W^T`` with phi = [x_i x_j
(i <= j), x_i, 1, 0...] (B, T), T = d (d + 3) / 2 + 1 rounded up to a multiple of ``ALIGN``
(tensor-core GEMMs want rows aligned to at least 16 bytes; 32 floats keep them on 128-byte cache
lines), and W (K, T) packed once per fit (the constant in the column of the 1). One (B x T) x
(T x K) product: the same K d^2 / 2 multiply-adds per sample as the factor form, with no
B x K x d intermediate, on cuBLAS's tensor-core kernels.

Precision, twice:

1. Tensor cores round float32 inputs to TF32 (11 significant bits), which would cost ~3 decimal
   digits. Each operand is split into a TF32-exact high part and the remainder (``hi = x with
   its 13 low mantissa bits cleared``, ``lo = x - hi``, both exact in float32), and ``hi hi^T +
   hi lo^T + lo hi^T`` (float32 accumulation) restores float32-level accuracy (the dropped
   ``lo lo^T`` is ~2^-20 of the terms). On the CPU the products are plain float32.
2. The expansion cancels: for a class far from m the three terms are each of the size of its
   squared Mahalanobis distance from m, and a float32 sum of them loses that size times ~1e-7.
   Real features are like that (scikit-learn's digits, PCA to 32 dimensions: classes 2,000
   squared standard deviations from m; 64 dimensions: 195,000, where the logits are off by 0.4).
   So every call bounds each sample's logit error (``math.product_error``, from ``bound``, see
   :func:`pack`: a bound on the sum of the absolute values of the terms, times a measured
   constant) and, where it exceeds ``PRODUCT_TRUST``, scores the classes that can hold any mass
   (within ``PRODUCT_MARGIN`` nats of the best approximate logit, allowing for the errors)
   exactly again in the factor form: ``cpu.refine_scores`` and ``cuda.refine_row``. Each class
   left alone holds at most e^-30 of its row's mass (all of them together at most K e^-30).
   How many classes a row rescores depends on how the classes overlap: about one on the
   separated benchmark model, none on the compact one (its bound stays under the trust level),
   all of them for ill-conditioned covariances, which :func:`use_gemm` therefore keeps on the
   factor form (the bound at a typical sample: 0.004-0.016 nats for the benchmark's separated
   model, 7-9 for digits at 48-64 dimensions, 11-4,300 for low-rank features with reg = 1e-2 to
   1e-6). The bound covers the product's own rounding; the rounding of the inputs (z,
   the means, the mixing) is shared with the factor form.

Memory: W as two float32 (K, T) halves, 8 K T bytes (265 MB at K = 1000, d = 256), about what
the factor form's (K, d, d) float32 factors take; refinement needs those factors too.

On CUDA one Numba kernel writes phi's halves stacked, [hi; lo] (2B, T), in one pass
(``cuda.quad_split``), and the three products become two: ``[hi; lo] @ W_hi^T`` (the larger
operand read once for both rows) and ``hi @ W_lo^T``. At K = 1000, d = 256 that moves about
0.44 GB per call instead of about 0.87 GB with phi built and split by torch ops and three
products.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

from .math import product_error

_LOW_BITS = np.int32(~0x1FFF)  # float32 -> TF32: 23 - 10 = 13 mantissa bits cleared
_CLASS_CHUNK = 64  # classes per float64 block while packing (bounds host memory)
ALIGN = 32  # phi's and W's row length is a multiple of this many float32
POWER_STEPS = 20  # power iterations before the Collatz-Wielandt bound of |P_c|'s spectral radius
MAX_TYPICAL_ERROR = 10.0  # nats: the product's error bound at a typical sample beyond which the factor form runs

# "auto": large full-covariance problems on CUDA use the product (see ``use_gemm``);
# "always" / "never" force it (tests, benchmarks).
POLICY = "auto"
MIN_WORK = 1 << 20  # K d^2 from which "auto" takes the product
MIN_CLASSES = 32  # below, building phi (d^2 / 2 per sample) costs about what it saves


def use_gemm(num_classes: int, dim: int, typical_error=None) -> bool:
    """Whether full-covariance scores are computed by the matrix product (CPU and CUDA), refined
    where it is inexact (module docstring).

    Speed (measured on the 2-core CPU, B = 256; factor kernel vs product): K = 1000, d = 256: 232
    vs 100 ms; K = 1000, d = 64: 46 vs 10.5 ms; K = 100, d = 128: 6.9 vs 4.4 ms; K = 10, d = 256:
    2.4 vs 10.6 ms. On the H200 (with host overhead) at K = 1000, d = 256: 7.7 vs 3.0 ms.

    ``typical_error`` (nats; a number, or a function giving it, called only when the sizes
    qualify): the model's error bound at a typical sample (:func:`pack`). Above
    ``MAX_TYPICAL_ERROR`` (ill-conditioned covariances: hundreds to thousands of nats) the
    refinement would rescore most classes of every row, slower than the factor form alone, so the
    factor form runs. POLICY "always" / "never" override both rules.
    """
    if POLICY == "always":
        return True
    if POLICY == "never":
        return False
    if num_classes < MIN_CLASSES or num_classes * dim * dim < MIN_WORK:
        return False
    if typical_error is None:
        return True
    value = typical_error() if callable(typical_error) else typical_error
    return value <= MAX_TYPICAL_ERROR


@contextlib.contextmanager
def scoped_policy(module, value: str, allowed=("auto", "always", "never")):
    """Temporarily set ``module.POLICY`` to one of ``allowed``: this module's, ``linear.py``'s and
    ``mkl.py``'s."""
    if value not in allowed:
        raise ValueError(f"policy: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
    old, module.POLICY = module.POLICY, value
    try:
        yield
    finally:
        module.POLICY = old


def policy(value: str):
    """Temporarily set :data:`POLICY` ("auto", "always", "never")."""
    return scoped_policy(sys.modules[__name__], value)


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) with hi exactly representable in TF32 and hi + lo == x exactly (float32)."""
    hi = (x.view(torch.int32) & int(_LOW_BITS)).view(torch.float32)
    return hi, x - hi


def _centre(means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """m, the count-weighted mean of the class means, rounded to float32 (the kernels' copy) and
    back, so that W is expanded around exactly the centre phi is built from."""
    return ((means * counts.unsqueeze(1)).sum(0) / counts.sum()).to(torch.float32).to(torch.float64)


def _abs_radius_bound(prec: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the spectral radius of |P_c| for a (kc, d, d) block: max_i (|P| v)_i / v_i
    holds for any v > 0 (Collatz-Wielandt), and a few power steps make it tight."""
    a = prec.abs()
    v = torch.ones(a.shape[:2], dtype=a.dtype)
    for _ in range(POWER_STEPS):
        v = torch.einsum("kij,kj->ki", a, v)
        v = v / v.amax(1, keepdim=True)
    return (torch.einsum("kij,kj->ki", a, v) / v).amax(1)


def _class_blocks(model):
    """The centre m (:func:`_centre`) and, per block of classes, float64 (slice, live mask, P_c,
    a_c = mu_c - m, P_c a_c, a_c^T P_c a_c)."""
    means = model.means.detach().to("cpu", torch.float64)
    chol = model.precision_chol.detach().to("cpu", torch.float64)
    counts = model.class_counts.detach().to("cpu", torch.float64)
    center = _centre(means, counts)

    def blocks():
        for c0 in range(0, means.shape[0], _CLASS_CHUNK):
            sl = slice(c0, min(means.shape[0], c0 + _CLASS_CHUNK))
            prec = chol[sl] @ chol[sl].transpose(1, 2)
            a = means[sl] - center
            pa = torch.einsum("kij,kj->ki", prec, a)
            yield sl, counts[sl] > 0, prec, a, pa, (a * pa).sum(1)

    return center, blocks()


def pack(model) -> tuple[dict[str, np.ndarray], float]:
    """The product form of a fitted full-covariance ``GaussianClassModel``, with its error bound,
    in one pass over the classes. Its raw scores include the constant, so they take the factor
    form's bias (``params.py``).

    Returns:
        The arrays: float32 ``w`` (K, T), ``center`` (d,) = m, ``bound`` (3,) = (rho, pa, spread)
        for ``math.product_error`` (over the classes with samples: rho >= max_c of the spectral
        radius of |P_c|, pa = max_c |P_c a_c|, spread = max_c a_c^T P_c a_c), int64 ``pair_i``,
        ``pair_j`` (the i <= j index pairs of the quadratic part); and the typical error, the
        median over those classes of ``math.product_error`` at x = a_c (a sample at its class
        mean), which :func:`use_gemm` checks.
    """
    k, d = model.num_classes, model.dim
    iu, ju = torch.triu_indices(d, d)
    twice = torch.where(iu == ju, 1.0, 2.0).to(torch.float64)
    w = np.zeros((k, width(d)), np.float32)
    bound = np.zeros(3)
    distances = [torch.zeros(0, dtype=torch.float64)]
    center, blocks = _class_blocks(model)
    for sl, live, prec, a, pa, mean_maha in blocks:
        block = torch.cat([-0.5 * prec[:, iu, ju] * twice, pa, -0.5 * mean_maha.unsqueeze(1)], 1)
        block[~live] = 0.0
        w[sl, :block.shape[1]] = block.numpy()
        if bool(live.any()):
            terms = (_abs_radius_bound(prec), pa.norm(dim=1), mean_maha)
            bound = np.maximum(bound, [float(t[live].max()) for t in terms])
            distances.append(a.norm(dim=1)[live])
    bound = bound.astype(np.float32)
    errors = [product_error(np.float32(x * x), *bound) for x in torch.cat(distances).tolist()]
    arrays = {"w": w, "center": center.to(torch.float32).numpy(), "bound": bound,
              "pair_i": iu.numpy().astype(np.int64), "pair_j": ju.numpy().astype(np.int64)}
    return arrays, float(np.median(errors))


@contextlib.contextmanager
def fp32_matmul(tf32: bool):
    """float32 matrix products inside the block with TF32 tensor cores allowed (``tf32``: the
    inputs are split, ``split_scores``) or forbidden (products that need float32 accuracy even
    where the user enabled TF32).

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` beside the legacy
    ``allow_tf32``, and reading the legacy flag raises once a script has set the new one, so the
    new setting is saved and restored where it exists. The setting is process-wide: float32
    products that other threads run during the block follow it too.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
        return
    old = matmul.allow_tf32
    matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        matmul.allow_tf32 = old


def width(dim: int) -> int:
    """T, the length of phi and of W's rows: d (d + 3) / 2 + 1 rounded up to a multiple of ALIGN."""
    return -(-(dim * (dim + 3) // 2 + 1) // ALIGN) * ALIGN


def features(arrays: dict[str, torch.Tensor], z: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """phi (B, T) of the mixed, centred batch: [x_i x_j (i <= j), x_i, 1, 0...], x = z_mix - m."""
    lam = lam.to(z.dtype).unsqueeze(1)
    x = lam * z + (1 - lam) * z[perm] - arrays["center"]
    tq = arrays["pair_i"].numel()
    d = z.shape[1]
    phi = torch.zeros((z.shape[0], width(d)), dtype=torch.float32, device=z.device)
    torch.mul(x[:, arrays["pair_i"]], x[:, arrays["pair_j"]], out=phi[:, :tq])
    phi[:, tq:tq + d] = x
    phi[:, tq + d] = 1.0
    return phi


def scores(arrays: dict[str, torch.Tensor], z: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """Raw scores (B, K) of the mixed samples into ``out`` (float32, on z's device, torch's stream).
    On the host z (B, d) and lam (B,) must be float32 and C-contiguous, as the kernels take them.

    They approximate the factor form's raw scores (the same bias), to within ``math.product_error``
    (module docstring); ``cpu.refine_scores`` / ``cuda.refine_row`` make them exact where that matters.
    """
    if not z.is_cuda:  # host: phi by the parallel Numba kernel, then one plain float32 product
        from .cpu import quad_features

        phi = torch.empty((z.shape[0], arrays["w"].shape[1]), dtype=torch.float32)
        quad_features(z.numpy(), perm.numpy(), lam.numpy(), arrays["center"].numpy(), phi.numpy())
        return torch.matmul(phi, arrays["w"].T, out=out)
    return split_scores(arrays, split_features(arrays, z, perm, lam), out)


def split_scores(arrays: dict[str, torch.Tensor], halves: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = hi @ W_hi^T + lo @ W_hi^T + hi @ W_lo^T`` from ``halves`` = [hi; lo] (2B, T), as two
    products with TF32 tensor cores allowed: W's high half is read once for both halves."""
    b = halves.shape[0] // 2
    with fp32_matmul(True):
        both = torch.matmul(halves, arrays["w_hi"].T)
        torch.add(both[:b], both[b:], out=out)
        out.addmm_(halves[:b], arrays["w_lo"].T)
    return out


def split_features(arrays: dict[str, torch.Tensor], z: torch.Tensor, perm: torch.Tensor,
                   lam: torch.Tensor) -> torch.Tensor:
    """[hi(phi); lo(phi)] (2B, T) on CUDA, by one Numba kernel (``cuda.quad_split``) on torch's
    stream: ``torch.cat(split_tf32(features(...)))``, up to the rounding of the mix (the GPU may
    fuse its multiply-add)."""
    from .._interop import current_stream, device_view
    from . import cuda as kernels

    b, d = z.shape
    halves = torch.empty((2 * b, arrays["w_hi"].shape[1]), dtype=torch.float32, device=z.device)
    if b:
        kernels.quad_split[kernels.quad_split_grid(b, halves.shape[1]), kernels.TPB, current_stream(), 4 * d](
            device_view(z), device_view(perm), device_view(lam), device_view(arrays["center"]),
            device_view(arrays["pair_i"]), device_view(arrays["pair_j"]), device_view(halves))
    return halves


__all__ = ["ALIGN", "MAX_TYPICAL_ERROR", "MIN_CLASSES", "MIN_WORK", "POLICY", "features", "fp32_matmul", "scoped_policy",
           "pack", "policy", "scores", "split_features", "split_scores", "split_tf32", "use_gemm", "width"]
