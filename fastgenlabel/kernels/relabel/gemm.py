"""Full-covariance scores of a batch as one matrix product, for the GPU's tensor cores.

The per-class quadratic form, expanded around a common centre m (x = z_mix - m, a_c = mu_c - m,
P_c = L_c L_c^T the precision), is linear in the pairwise products of x:

    -1/2 ||L_c^T (x - a_c)||^2 = sum_{i <= j} w_c,ij x_i x_j + (P_c a_c)^T x - 1/2 a_c^T P_c a_c

with w_c,ii = -1/2 P_c,ii and w_c,ij = -P_c,ij (i < j). So the raw scores of B samples over K
classes are ``phi @ W^T`` with phi = [x_i x_j (i <= j), x_i] (B, T), T = d (d + 3) / 2, and
W (K, T) packed once per fit; the constant joins the bias. One (B x T) x (T x K) product: the
same K d^2 / 2 multiply-adds per sample as the factor form, with no B x K x d intermediate, on
cuBLAS's tensor-core kernels.

Precision: tensor cores round float32 inputs to TF32 (11 significant bits), which would cost
~3 decimal digits of the scores. Each operand is split into a TF32-exact high part and the
remainder (``hi = x with its 13 low mantissa bits cleared``, ``lo = x - hi``, both exact in
float32), and ``hi hi^T + hi lo^T + lo hi^T`` (three products, float32 accumulation) restores
float32-level accuracy (the dropped ``lo lo^T`` is ~2^-20 relative). On the CPU the products are
plain float32. What remains is the expansion's cancellation: the error grows like
~1e-7 x a_c^T P_c a_c, the squared Mahalanobis distance of the class mean from the centre
(tests/test_relabel_gemm.py measures it). It is not confined to saturated softmaxes: a group of
close classes far from the centre gets unsaturated targets off by 1e-3 at 100 standard
deviations. So :func:`use_gemm` also looks at the model's :func:`spread` and leaves such models
to the factor form.

Memory: W as two float32 (K, T) halves, 4 K T bytes (265 MB at K = 1000, d = 256), about what
the factor form's (K, d, d) float32 factors take.

On CUDA one Numba kernel writes phi's halves stacked, [hi; lo] (2B, T), in one pass
(``cuda.quad_split``), and the three products become two: ``[hi; lo] @ W_hi^T`` (the larger
operand read once for both rows) and ``hi @ W_lo^T``. At K = 1000, d = 256 that moves about
0.44 GB per call instead of about 0.87 GB with phi built and split by torch ops and three
products.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

_LOW_BITS = np.int32(~0x1FFF)  # float32 -> TF32: 23 - 10 = 13 mantissa bits cleared
_CLASS_CHUNK = 64  # classes per float64 block while packing (bounds host memory)

# "auto": large full-covariance problems on CUDA use the product (see ``use_gemm``);
# "always" / "never" force it (tests, benchmarks).
POLICY = "auto"
MIN_WORK = 1 << 20  # K d^2 from which "auto" takes the product
MIN_CLASSES = 32  # below, building phi (d^2 / 2 per sample) costs about what it saves


# The product's error in the targets, measured (session 3, K = 32, d = 16..182, two groups of
# classes far from the overall mean): 0.6-2.5e-7 x max_c a_c^T P_c a_c. Above MAX_TARGET_ERROR
# predicted, the factor form runs instead (its error grows only linearly with the distance).
ERROR_PER_SPREAD = 3e-7
MAX_TARGET_ERROR = 1e-4


def use_gemm(num_classes: int, dim: int, spread=None) -> bool:
    """Whether full-covariance scores are computed by the matrix product (CPU and CUDA).

    Speed (measured on the 2-core CPU, B = 256; factor kernel vs product): K = 1000, d = 256: 232
    vs 100 ms; K = 1000, d = 64: 46 vs 10.5 ms; K = 100, d = 128: 6.9 vs 4.4 ms; K = 10, d = 256:
    2.4 vs 10.6 ms. On the H200 (with host overhead) at K = 1000, d = 256: 7.7 vs 3.0 ms.

    Accuracy: ``spread`` (a number, or a function giving it: :func:`spread`, computed only when
    the sizes qualify) is the model's largest squared Mahalanobis distance of a class mean from
    the centre; the product is used only while ``ERROR_PER_SPREAD * spread`` stays within
    ``MAX_TARGET_ERROR``. POLICY "always" / "never" override both rules.
    """
    if POLICY == "always":
        return True
    if POLICY == "never":
        return False
    if num_classes < MIN_CLASSES or num_classes * dim * dim < MIN_WORK:
        return False
    if spread is None:
        return True
    value = spread() if callable(spread) else spread
    return ERROR_PER_SPREAD * value <= MAX_TARGET_ERROR


def spread(model) -> float:
    """max_c a_c^T P_c a_c, a_c = mu_c - m (the centre the product form expands around), over the
    classes with samples: the size of the terms that cancel in the product form."""
    means = model.means.detach().to("cpu", torch.float64)
    chol = model.precision_chol.detach().to("cpu", torch.float64)
    counts = model.class_counts.detach().to("cpu", torch.float64)
    center = (means * counts.unsqueeze(1)).sum(0) / counts.sum()
    worst = 0.0
    for c0 in range(0, means.shape[0], _CLASS_CHUNK):
        sl = slice(c0, min(means.shape[0], c0 + _CLASS_CHUNK))
        v = torch.einsum("ki,kij->kj", means[sl] - center, chol[sl])  # rows: (mu_c - m)^T L_c
        maha = torch.where(counts[sl] > 0, (v * v).sum(1), torch.zeros_like(counts[sl]))
        worst = max(worst, float(maha.max()))
    return worst


@contextlib.contextmanager
def policy(value: str):
    """Temporarily set :data:`POLICY` ("auto", "always", "never")."""
    global POLICY
    if value not in ("auto", "always", "never"):
        raise ValueError(f"policy: expected 'auto', 'always' or 'never', got {value!r}")
    old, POLICY = POLICY, value
    try:
        yield
    finally:
        POLICY = old


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) with hi exactly representable in TF32 and hi + lo == x exactly (float32)."""
    hi = (x.view(torch.int32) & int(_LOW_BITS)).view(torch.float32)
    return hi, x - hi


def pack(model, bias_of) -> dict[str, np.ndarray]:
    """The product form of a fitted full-covariance ``GaussianClassModel``.

    ``bias_of(extra)`` is ``params._bias``: log_norm + log_prior + extra, shifted, -inf if empty.
    Returns float32 ``w`` (K, T), ``center`` (d,), ``bias`` (K,) and int64
    ``pair_i``, ``pair_j`` (the i <= j index pairs of the quadratic part).
    """
    means = model.means.detach().to("cpu", torch.float64)
    chol = model.precision_chol.detach().to("cpu", torch.float64)
    counts = model.class_counts.detach().to("cpu", torch.float64)
    k, d = means.shape
    live = counts > 0
    center = (means * counts.unsqueeze(1)).sum(0) / counts.sum()
    iu, ju = torch.triu_indices(d, d)
    twice = torch.where(iu == ju, 1.0, 2.0).to(torch.float64)
    w = np.empty((k, iu.numel() + d), np.float32)
    const = torch.zeros(k, dtype=torch.float64)
    for c0 in range(0, k, _CLASS_CHUNK):
        sl = slice(c0, min(k, c0 + _CLASS_CHUNK))
        prec = chol[sl] @ chol[sl].transpose(1, 2)
        a = means[sl] - center
        pa = torch.einsum("kij,kj->ki", prec, a)
        block = torch.cat([-0.5 * prec[:, iu, ju] * twice, pa], 1)
        block[~live[sl]] = 0.0
        w[sl] = block.numpy()
        const[sl] = torch.where(live[sl], -0.5 * (a * pa).sum(1), torch.zeros_like(pa[:, 0]))
    return {"w": w, "center": center.to(torch.float32).numpy(), "bias": bias_of(const),
            "pair_i": iu.numpy().astype(np.int64), "pair_j": ju.numpy().astype(np.int64)}


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


def features(arrays: dict[str, torch.Tensor], z: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """phi (B, T) of the mixed, centred batch: [x_i x_j (i <= j), x_i], x = z_mix - m."""
    lam = lam.to(z.dtype).unsqueeze(1)
    x = lam * z + (1 - lam) * z[perm] - arrays["center"]
    tq = arrays["pair_i"].numel()
    phi = torch.empty((z.shape[0], tq + z.shape[1]), dtype=torch.float32, device=z.device)
    torch.mul(x[:, arrays["pair_i"]], x[:, arrays["pair_j"]], out=phi[:, :tq])
    phi[:, tq:] = x
    return phi


def scores(arrays: dict[str, torch.Tensor], z: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """Raw scores (B, K) of the mixed samples into ``out`` (float32, on z's device, torch's stream).
    On the host z (B, d) and lam (B,) must be float32 and C-contiguous, as the kernels take them.

    With ``arrays["bias"]`` as the bias they equal the factor form's logits (module docstring).
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
    halves = torch.empty((2 * b, arrays["pair_i"].numel() + d), dtype=torch.float32, device=z.device)
    if b:
        kernels.quad_split[kernels.quad_split_grid(b, halves.shape[1]), kernels.TPB, current_stream(), 4 * d](
            device_view(z), device_view(perm), device_view(lam), device_view(arrays["center"]),
            device_view(arrays["pair_i"]), device_view(arrays["pair_j"]), device_view(halves))
    return halves


def flops(num_classes: int, dim: int, batch: int) -> float:
    """Floating-point operations of one call's products (three of them on a GPU)."""
    return 3 * 2.0 * batch * num_classes * (dim * (dim + 3) / 2)


__all__ = ["ERROR_PER_SPREAD", "MAX_TARGET_ERROR", "MIN_CLASSES", "MIN_WORK", "POLICY", "features", "flops",
           "fp32_matmul", "pack", "policy", "scores", "split_features", "split_scores", "split_tf32", "spread",
           "use_gemm"]
