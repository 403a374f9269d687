"""The relabel stage on the CPU: Numba ``njit(cache=True)`` kernels, parallel where it pays.

Each path matches the reference ``genlabel_target(model, mix(z, pairs), ...)`` (see
``fastgenlabel.functional``). Two phases per call:

1. logits (B, K), written into ``out`` relative to their row's largest: each kernel forms the raw
   score + bias in float64 and stores ``float32(logit - row max)`` (:func:`store_relative`), so the
   digits the softmax needs survive however large the scores are (a feature thousands of standard
   deviations out adds the same huge term to every class):

   - diag and tied: one float32 matrix product (``linear.py``: :func:`linear_features` with the
     rows' error bounds), finished by :func:`linear_finish`, which rescores exactly the rows and
     classes the bound flags and forms the targets in the same pass; all three in one parallel
     region, :func:`linear_fused`, where torch's MKL can be called per thread (``mkl.py``); or, with
     ``linear.POLICY`` "never", :func:`diag_scores`, one fused pass over the (d, K) parameters
     (tied: the samples whitened first, ``torch.mm``, then unit scales);
   - full: :func:`full_scores`, batched GEMMs over chunks of classes plus a fused epilogue; or,
     for large K d^2, ``gemm.py``'s single product, made exact where needed by
     :func:`refine_scores`;
   - kde: :func:`kde_scores`, parallel over samples: whitening and an online log-sum-exp;

2. :func:`finish`, parallel over samples: the softmax of those logits, the gamma blend with the
   mixup label and label smoothing, in place.

The matrix products use torch's CPU BLAS (a core dependency) rather than loops or NumPy's
OpenBLAS, though OpenBLAS's single product can be faster: its worker threads keep spinning after a
call and stall the next parallel region, Numba's or torch's (torch's own pool does too, hence
:func:`linear_fused`). Everything else
is njit. Hot loops run in float32 (the params are float32) with reassociation allowed so that LLVM
can vectorise them; sums whose rounding would show in the result are accumulated in float64.
Compiled kernels are cached on disk (``cache=True``): the first call in a fresh environment
compiles (a few seconds per model kind), later processes load them; the cache follows edits of
``math.py`` too (``kernels.compat.key_disk_cache_on``).
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from . import math as rm
from . import mkl

# No "nnan"/"ninf": -inf logits (empty classes) must keep their meaning.
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
DIAG_TILE = 2  # samples sharing one pass over the (d, K) parameter arrays

_jit = njit(cache=True)
mixed = _jit(rm.mixed)
diag_term = _jit(rm.diag_term)
gauss_score = _jit(rm.gauss_score)
lse_update = _jit(rm.lse_update)
lse_value = _jit(rm.lse_value)
logit_value = _jit(rm.logit_value)
mixup_mass = _jit(rm.mixup_mass)
target_value = _jit(rm.target_value)
product_error = _jit(rm.product_error)
product_cutoff = _jit(rm.product_cutoff)
linear_error = _jit(rm.linear_error)
linear_sum_bound = _jit(rm.linear_sum_bound)
diag_exact_term = _jit(rm.diag_exact_term)
tied_exact_term = _jit(rm.tied_exact_term)

ONE = rm.ONE
NEG_INF = rm.NEG_INF
PRODUCT_TRUST = rm.PRODUCT_TRUST


@njit(cache=True)
def mix_rows(z, perm, lam, z_mix):
    """z_mix[s] = lam[s] z[s] + (1 - lam[s]) z[perm[s]] (the reference's ``mix``; B x d, serial:
    too little work to be worth waking threads for)."""
    b, d = z.shape
    for s in range(b):
        l = lam[s]
        lc = ONE - l
        p = perm[s]
        for i in range(d):
            z_mix[s, i] = mixed(z[s, i], z[p, i], l, lc)


@njit(parallel=True, cache=True)
def quad_features(z, perm, lam, center, phi):
    """phi[s] = [x_i x_j for i <= j (row-major, as torch.triu_indices), x_i, 1, 0...], x =
    z_mix[s] - center: the left operand of the full-covariance product (``gemm.py``)."""
    b, d = z.shape
    tq = d * (d + 1) // 2
    for s in prange(b):
        l = lam[s]
        lc = ONE - l
        p = perm[s]
        x = np.empty(d, np.float32)
        for i in range(d):
            x[i] = mixed(z[s, i], z[p, i], l, lc) - center[i]
            phi[s, tq + i] = x[i]
        phi[s, tq + d] = ONE
        for t in range(tq + d + 1, phi.shape[1]):
            phi[s, t] = 0
        t = 0
        for i in range(d):
            xi = x[i]
            for j in range(i, d):
                phi[s, t + j - i] = xi * x[j]
            t += d - i


@njit(cache=True)
def store_relative(logits, out_row):
    """out_row = logits - max(logits), rounded once to float32: the row's logits relative to its
    largest. All ``-inf`` (no class can explain the sample) stays ``-inf``."""
    mx = -np.inf
    for c in range(logits.shape[0]):
        if logits[c] > mx:
            mx = logits[c]
    for c in range(logits.shape[0]):
        out_row[c] = logits[c] - mx if mx > -np.inf else -np.inf


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def diag_scores(z_mix, mu_t, istd_t, bias, out):
    """out[s] = the relative logits -1/2 sum_i ((z_mix[s, i] - mu_ci) istd_ci)^2 + bias_c: one fused
    pass, no B x K x d. The float32 terms are summed in float64: a float32 partial sum would round
    a term common to all classes (a feature far out) differently for each."""
    b, d = z_mix.shape
    k = mu_t.shape[1]
    n_tiles = (b + DIAG_TILE - 1) // DIAG_TILE
    for tile in prange(n_tiles):
        s0 = tile * DIAG_TILE
        ns = min(DIAG_TILE, b - s0)
        total = np.zeros((DIAG_TILE, k), np.float64)
        for i in range(d):
            for t in range(ns):
                x = z_mix[s0 + t, i]
                for c in range(k):
                    total[t, c] += np.float64(diag_term(x, mu_t[i, c], istd_t[i, c]))
        logits = np.empty(k, np.float64)
        for t in range(ns):
            for c in range(k):
                logits[c] = gauss_score(total[t, c]) + bias[c]
            store_relative(logits, out[s0 + t])


@njit(cache=True, fastmath=FASTMATH)
def project(z_row, order, center, factor, c, tri, diff, u):
    """u = F_c^T (z_row[order] - center_c) for a lower triangular F_c (``tri``) or any F_c."""
    d = diff.shape[0]
    for i in range(d):
        diff[i] = z_row[order[i]] - center[c, i]
        u[i] = 0
    f = factor[c]
    for i in range(d):
        di = diff[i]
        row = f[i]
        for j in range(i + 1 if tri else d):
            u[j] += di * row[j]


@njit(cache=True, fastmath=FASTMATH)
def sq_scores(u, c0, bias, logits):
    """Epilogue of the full-covariance GEMMs: logits[s, c0 + cc] = -1/2 ||u[cc, s]||^2 + bias (float64;
    serial: one chunk is little work next to its GEMM, and a parallel region per chunk costs thread
    wake-ups)."""
    kc, b, d = u.shape
    for s in range(b):
        for cc in range(kc):
            acc = 0.0
            if bias[c0 + cc] != NEG_INF:
                for j in range(d):
                    acc += np.float64(u[cc, s, j]) * u[cc, s, j]
            logits[s, c0 + cc] = gauss_score(acc) + bias[c0 + cc]


@njit(parallel=True, cache=True)
def store_relative_rows(logits, out):
    for s in prange(logits.shape[0]):
        store_relative(logits[s], out[s])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def refine_scores(z, perm, lam, product_center, bound, order, center, factor, tri, bias, out):
    """The product form's raw scores in ``out`` (``gemm.py``) -> relative logits, made exact where
    they may be off: per sample, the error bound ``product_error``; above ``PRODUCT_TRUST``, every
    class at or above ``product_cutoff`` is scored again in the factor form. Parallel over samples."""
    b, d = z.shape
    k = out.shape[1]
    for s in prange(b):
        l = lam[s]
        lc = ONE - l
        p = perm[s]
        zm = np.empty(d, np.float32)
        xn2 = 0.0
        for i in range(d):
            zm[i] = mixed(z[s, i], z[p, i], l, lc)
            v = np.float64(zm[i] - product_center[i])
            xn2 += v * v
        err = product_error(np.float32(xn2), bound[0], bound[1], bound[2])
        logits = np.empty(k, np.float64)
        best = -np.inf
        for c in range(k):
            logits[c] = logit_value(np.float64(out[s, c]) + bias[c])
            if logits[c] > best:
                best = logits[c]
        if err > PRODUCT_TRUST:
            cut = product_cutoff(best, np.float64(err))
            diff = np.empty(d, np.float32)
            u = np.empty(d, np.float32)
            for c in range(k):
                if bias[c] != NEG_INF and logits[c] >= cut:
                    project(zm, order, center, factor, c, tri, diff, u)
                    acc = 0.0
                    for j in range(d):
                        acc += np.float64(u[j]) * u[j]
                    logits[c] = gauss_score(acc) + bias[c]
        store_relative(logits, out[s])


@njit(cache=True, fastmath=FASTMATH)
def linear_feature_rows(z, perm, lam, center, quad, mcol, wnorm, phi, err, r0, r1):
    """phi[s] = [x^2, x] (``quad``, diag) or x (tied), x = z_mix[s] - center, the left operand of the
    diag/tied product (``linear.py``), and err[s] = ``linear_error`` of M_s = min(sum_j |phi_sj|
    mcol_j, ||phi_s|| wnorm), the bound on every logit's error in row s (NaN if phi is); rows
    r0 <= s < r1."""
    d = z.shape[1]
    off = d if quad else 0
    width = phi.shape[1]
    for s in range(r0, r1):
        l = lam[s]
        lc = ONE - l
        p = perm[s]
        for i in range(d):
            x = mixed(z[s, i], z[p, i], l, lc) - center[i]
            phi[s, off + i] = x
            if quad:
                phi[s, i] = x * x
        by_column = 0.0
        norm2 = 0.0
        for j in range(width):
            v = np.float64(phi[s, j])
            by_column += abs(v) * mcol[j]
            norm2 += v * v
        err[s] = linear_error(linear_sum_bound(by_column, norm2, wnorm[0]), width)


@njit(cache=True)
def linear_features(z, perm, lam, center, quad, mcol, wnorm, phi, err):
    """:func:`linear_feature_rows` of every row, serially (the ``torch.mm`` route): B x T is little
    work, and a parallel region beside torch's product waits for its spinning threads."""
    linear_feature_rows(z, perm, lam, center, quad, mcol, wnorm, phi, err, 0, z.shape[0])


@njit(cache=True)
def sgemm_rows(sgemm, a, r0, r1, w, out):
    """out[r0:r1] = a[r0:r1] @ W^T, W (N, k), all row-major float32, by the Fortran ``sgemm`` at
    address ``sgemm`` (``mkl.py``) in the calling thread. Column-major that is C (N x rows) =
    W^T' A with W seen as (k x N) and transposed, A = a's rows seen as (k x rows)."""
    rows = r1 - r0
    if rows <= 0:
        return
    k = a.shape[1]
    ints = np.array([w.shape[0], rows, k, k, k, out.shape[1]], np.int64)  # m, n, k, lda, ldb, ldc
    scalars = np.array([1.0, 0.0], np.float32)
    trans = np.array([84, 78], np.uint8)  # "T", "N"
    mkl.call_sgemm(sgemm, trans[0:].ctypes.data, trans[1:].ctypes.data, ints[0:].ctypes.data, ints[1:].ctypes.data,
                   ints[2:].ctypes.data, scalars[0:].ctypes.data, w.ctypes.data, ints[3:].ctypes.data,
                   a[r0:].ctypes.data, ints[4:].ctypes.data, scalars[1:].ctypes.data, out[r0:].ctypes.data,
                   ints[5:].ctypes.data)


@njit(cache=True)
def linear_exact(phi_row, c, quad, a, s, sbar, t, y):
    """Class c's score in the product form with its class constant, in float64 from the float32
    parameters and the float32 x (tied: and y = L^T x, float64, :func:`whiten_row`): diag
    -1/2 sum_i s_ci (x_i - a_ci)^2 + 1/2 sbar_i x_i^2; tied -1/2 ||y - t_c||^2 + 1/2 ||y||^2.
    Written so that no term cancels against another however far out x is."""
    acc = 0.0
    if quad:
        d = a.shape[1]
        for i in range(d):
            acc += diag_exact_term(np.float64(phi_row[d + i]), np.float64(a[c, i]), np.float64(s[c, i]),
                                   np.float64(sbar[i]))
    else:
        for j in range(t.shape[1]):
            acc += tied_exact_term(np.float64(y[j]), np.float64(t[c, j]))
    return 0.5 * acc


@njit(cache=True)
def whiten_row(phi_row, chol, y):
    """y = L^T x in float64 from the float32 x (``phi_row``) and L (``chol``): a row's whitened
    features for the tied rescoring, finite wherever x is (a float32 y could overflow)."""
    d = chol.shape[0]
    for j in range(d):
        y[j] = 0.0
    for i in range(d):
        xi = np.float64(phi_row[i])
        for j in range(d):
            y[j] += xi * chol[i, j]


LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)  # ln 2 = LN2_HI + LN2_LO, LN2_HI with 9 significant bits (k * LN2_HI is exact)
LN2_LO = np.float32(-2.12194440e-4)
EXP_MIN = np.float32(-87.0)  # e^-87 ~ 1.6e-38: below it the result is taken as 0


@njit(cache=True, fastmath=FASTMATH)
def exp_rel(x, scale):
    """x = exp(x) in place for x <= 0 (relative logits), float32 within 3e-7 relative; 0 below
    EXP_MIN. ``scale``: int32 scratch of x's length. Written so that LLVM vectorises it (NumPy's exp
    is a scalar call per element here): e^x = 2^k e^r, |r| <= ln 2 / 2, e^r by its Taylor polynomial
    to degree 7, 2^k built in the exponent bits."""
    n = x.shape[0]
    for i in range(n):
        v = max(x[i], EXP_MIN)
        k = np.floor(v * LOG2E + np.float32(0.5))
        r = (v - k * LN2_HI) - k * LN2_LO
        p = np.float32(1.0 / 5040)
        p = p * r + np.float32(1.0 / 720)
        p = p * r + np.float32(1.0 / 120)
        p = p * r + np.float32(1.0 / 24)
        p = p * r + np.float32(1.0 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + ONE
        p = p * r + ONE
        scale[i] = (np.int32(k) + np.int32(127)) << 23 if x[i] >= EXP_MIN else np.int32(0)
        x[i] = p
    f = scale.view(np.float32)
    for i in range(n):
        x[i] = x[i] * f[i]


LOWEST = -1e300  # stands for -inf (an empty class) inside linear_finish's fast path


@njit(cache=True, fastmath=FASTMATH | {"nnan", "ninf"})
def finite_max(x):
    """max(x) of a finite float64 array, vectorised (the flags let LLVM reorder the comparisons)."""
    best = x[0]
    for i in range(1, x.shape[0]):
        best = max(best, x[i])
    return best


@njit(cache=True, fastmath=FASTMATH)
def linear_finish_row(r, phi, err, const, bias, quad, a, s, sbar, t, chol, perm, lam, labels, gamma, keep, add, out,
                      lg, scale, y):
    """Row r of :func:`linear_finish`; ``lg`` (K,) float64, ``scale`` (K,) int32 and ``y`` (d,)
    float64 (tied; empty for diag) are scratch."""
    b, k = out.shape
    row = out[r]
    check = 0.0  # NaN if a score is not finite
    for c in range(k):
        v = np.float64(row[c])
        check += v * 0.0
        lg[c] = max(v + const[c], LOWEST)
    finite = check == 0.0
    best = finite_max(lg) if finite else np.inf
    usable = True  # False if even the exact scores overflow (x itself past float32): y_gen = y_mix
    # a score overflows only where |phi| |W| does, so its bound flags the row too
    if not finite or not err[r] <= PRODUCT_TRUST:
        cut = product_cutoff(best, err[r]) if finite and err[r] < np.inf else -np.inf
        if not quad:
            whiten_row(phi[r], chol, y)
        for c in range(k):
            if const[c] == NEG_INF:
                lg[c] = LOWEST
            elif lg[c] >= cut or not finite:
                v = linear_exact(phi[r], c, quad, a, s, sbar, t, y) + bias[c]
                usable &= v < np.inf and v > -np.inf
                lg[c] = max(v, LOWEST) if usable else LOWEST
        best = finite_max(lg)
    l = lam[r]
    ya, yb = labels[r], labels[perm[r]]
    if usable:
        total = 0.0
        for c in range(k):
            row[c] = lg[c] - best
        exp_rel(row, scale)
        for c in range(k):
            total += np.float64(row[c])
        factor = np.float32(1.0 / total) * gamma * keep
        for c in range(k):
            row[c] = row[c] * factor + add
        mix = (ONE - gamma) * keep
    else:
        for c in range(k):
            row[c] = add
        mix = keep
    if 0 <= ya < k and 0 <= yb < k:  # the mixup label's two entries (labels unchecked with validate=False)
        row[ya] += mix * l
        row[yb] += mix * (ONE - l)


@njit(parallel=True, cache=True)
def linear_finish(phi, err, const, bias, quad, a, s, sbar, t, chol, perm, lam, labels, gamma, keep, add, out):
    """The product's scores in ``out`` -> targets, in place, one sample per iteration: float64
    logits (score + ``const``, the class constant and bias); where the row's bound ``err`` exceeds
    PRODUCT_TRUST (or a score is not finite: float32 overflow) every class within
    ``product_cutoff`` of the best is rescored exactly (:func:`linear_exact` + ``bias``; tied
    whitens the row in float64 first, L = ``chol``); then the softmax, the gamma blend and
    smoothing. The common case runs as vectorised loops over the row; the rescoring is the scalar
    exception. A row whose exact scores overflow too (x itself near float32's largest) gets the
    mixup label as y_gen, never NaN."""
    b, k = out.shape
    for r in prange(b):
        linear_finish_row(r, phi, err, const, bias, quad, a, s, sbar, t, chol, perm, lam, labels, gamma, keep, add,
                          out, np.empty(k, np.float64), np.empty(k, np.int32), np.empty(t.shape[1], np.float64))


@njit(parallel=True, cache=True)
def sgemm_blocks(sgemm, set_threads, a, b, out, chunks):
    """out = a @ B^T (B (N, k)) in :func:`linear_fused`'s blocks of rows, one sgemm per thread."""
    step = -(-a.shape[0] // chunks)
    for i in prange(chunks):
        previous = mkl.call_set_threads(set_threads, np.int32(1))
        sgemm_rows(sgemm, a, i * step, min(a.shape[0], i * step + step), b, out)
        mkl.call_set_threads(set_threads, previous)


def linear_product(phi: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = phi @ W^T`` (float32, W (K, T) row-major) exactly as the diag/tied kernels compute it:
    MKL per block of rows (:func:`linear_fused`) where ``mkl.use_mkl()``, else ``torch.mm`` with W
    row-major, of torch's layouts the one whose rounding errors grow least when every term is alike
    (docs/MATH.md section 5)."""
    if mkl.use_mkl():
        sgemm, set_threads = mkl.functions()
        sgemm_blocks(sgemm, set_threads, phi, w, out, numba.get_num_threads())
    else:
        torch.mm(torch.from_numpy(phi), torch.from_numpy(w).T, out=torch.from_numpy(out))
    return out


@njit(parallel=True, cache=True)
def linear_fused(sgemm, set_threads, z, perm, lam, center, quad, mcol, wnorm, w, chol, phi, err, const, bias, a, s,
                 sbar, t, labels, gamma, keep, add, out, chunks):
    """:func:`linear_features`, the product ``phi @ W^T`` and :func:`linear_finish` in one parallel
    region: ``chunks`` blocks of rows, each through all three on one thread, the product by MKL's
    sgemm held to that thread (``mkl.py``: ``sgemm``, ``set_threads`` are function addresses)."""
    b, k = out.shape
    step = -(-b // chunks)
    for i in prange(chunks):
        r0 = i * step
        r1 = min(b, r0 + step)
        if r0 >= r1:
            continue
        linear_feature_rows(z, perm, lam, center, quad, mcol, wnorm, phi, err, r0, r1)
        previous = mkl.call_set_threads(set_threads, np.int32(1))
        sgemm_rows(sgemm, phi, r0, r1, w, out)
        mkl.call_set_threads(set_threads, previous)
        lg = np.empty(k, np.float64)
        scale = np.empty(k, np.int32)
        y = np.empty(t.shape[1], np.float64)
        for r in range(r0, r1):
            linear_finish_row(r, phi, err, const, bias, quad, a, s, sbar, t, chol, perm, lam, labels, gamma, keep, add,
                              out, lg, scale, y)


def full_scores(z_mix, params, out, chunk_elements=1 << 20):
    """Full covariance: out[s] = the relative logits -1/2 ||L_c^T (z_mix[s] - mu_c)||^2 + bias_c.

    For a chunk of classes, diff = z_mix - mu_c (kc x B x d) and u = diff @ L_c are batched
    float32 matrix products (``torch.bmm``: MKL here; the difference form, so nothing cancels
    against the class means), then a fused njit epilogue squares and sums. Only a kc x B x d block
    exists at a time, never B x K x d. The GEMM ignores the factor's zero triangle and still beat
    an njit triangular loop 2-8x (K = 1000, B = 256: 20 vs 173 ms at d = 64, 0.23 vs 1.0 s at
    d = 256, two cores); NumPy's OpenBLAS was slower than both when the cores are shared (its
    threads synchronise once per small GEMM).
    """
    a = params.arrays
    b, d = z_mix.shape
    k = params.num_classes
    zo = torch.from_numpy(np.ascontiguousarray(z_mix[:, a["order"]]))
    center = torch.from_numpy(a["center"])
    factor = torch.from_numpy(a["factor"])
    kc = max(1, min(k, chunk_elements // max(1, b * d)))
    diff = torch.empty((kc, b, d), dtype=torch.float32)
    u = torch.empty((kc, b, d), dtype=torch.float32)
    logits = np.empty((b, k), np.float64)
    for c0 in range(0, k, kc):
        n = min(kc, k - c0)
        torch.sub(zo.unsqueeze(0), center[c0:c0 + n].unsqueeze(1), out=diff[:n])
        torch.bmm(diff[:n], factor[c0:c0 + n], out=u[:n])
        sq_scores(u[:n].numpy(), c0, a["bias"], logits)
    store_relative_rows(logits, out)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def kde_scores(z_mix, order, center, factor, tri, points, offsets, bias, out):
    """KDE: out[s] = the relative logits logsumexp_j -1/2 ||A_c (z_mix[s] - centre_c) - x_j||^2 + bias_c
    over class c's whitened points, with an online log-sum-exp (no N x M intermediate). Parallel
    over samples."""
    b, d = z_mix.shape
    k = center.shape[0]
    for s in prange(b):
        diff = np.empty(d, np.float32)
        u = np.empty(d, np.float32)
        logits = np.empty(k, np.float64)
        for c in range(k):
            logits[c] = -np.inf
            if bias[c] == NEG_INF:
                continue
            project(z_mix[s], order, center, factor, c, tri, diff, u)
            m = -np.inf
            acc = 0.0
            for q in range(offsets[c], offsets[c + 1]):
                dist = 0.0
                for j in range(d):
                    v = np.float64(u[j] - points[q, j])
                    dist += v * v
                m, acc = lse_update(m, acc, gauss_score(dist))
            logits[c] = lse_value(m, acc) + bias[c]
        store_relative(logits, out[s])


@njit(parallel=True, cache=True)
def finish(perm, lam, labels, gamma, keep, add, out):
    """Relative logits -> targets in place, one sample per iteration (each element is read before
    it is written). gamma == 0 never reads the logits. If every logit of a row is -inf (diag and
    tied: a float32 term overflowed, a feature ~1e19 standard deviations out), y_gen falls back to
    the mixup label: never NaN."""
    b, k = out.shape
    gamma_c = ONE - gamma
    for s in prange(b):
        l = lam[s]
        lc = ONE - l
        p = perm[s]
        ya = labels[s]
        yb = labels[p]
        mx = NEG_INF
        if gamma > 0:
            for c in range(k):
                v = logit_value(out[s, c])
                if v > mx:
                    mx = v
        if mx > NEG_INF:
            total = 0.0
            for c in range(k):
                e = np.exp(logit_value(out[s, c]) - mx)
                out[s, c] = e
                total += e
            inv = np.float32(1.0 / total)
            for c in range(k):
                out[s, c] = target_value(out[s, c] * inv, mixup_mass(c, ya, yb, l, lc), gamma, gamma_c, keep, add)
        else:
            for c in range(k):
                ym = mixup_mass(c, ya, yb, l, lc)
                out[s, c] = target_value(ym, ym, gamma, gamma_c, keep, add)


_SCRATCH = threading.local()  # per thread: phi and err of the last shape (fresh pages cost a fault each)


def _scratch(b: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    held = getattr(_SCRATCH, "arrays", None)
    if held is None or held[0].shape != (b, width):
        held = _SCRATCH.arrays = (np.empty((b, width), np.float32), np.empty(b, np.float64))
    return held



def relabel_host(params, z, perm, lam, labels, gamma, smoothing, out, *, product=None, linear=None):
    """Run the relabel stage on host arrays.

    Args:
        params: :class:`RelabelParams` of the model.
        z: (B, d) float32 C-contiguous features of the unmixed samples.
        perm: (B,) int64 partners; lam: (B,) float32 weights; labels: (B,) int64.
        gamma, smoothing: floats in [0, 1].
        out: (B, K) float32 C-contiguous, fully overwritten.
        product: for full covariance, the model's product form on the CPU
            (``params.gemm_params_for``): the scores are then one float32 matrix product
            (``gemm.py``), refined by :func:`refine_scores`, instead of ``full_scores``.
        linear: for diag and tied, the model's product form (``params.linear_params_for``): the
            scores are then one float32 matrix product (``linear.py``), finished and made exact
            where needed by :func:`linear_finish`, instead of :func:`diag_scores`.

    Returns:
        out.
    """
    b, d = z.shape
    k = params.num_classes
    if b == 0:
        return out
    a = params.arrays
    g = np.float32(gamma)
    keep = np.float32(1.0 - smoothing)
    add = np.float32(smoothing / k)
    bias = a["bias"]
    if params.kind == "full" and product is not None:
        if g > 0:
            from .gemm import scores

            scores(product, torch.from_numpy(z), torch.from_numpy(perm), torch.from_numpy(lam), torch.from_numpy(out))
            refine_scores(z, perm, lam, product["center"].numpy(), product["bound"].numpy(), a["order"], a["center"],
                          a["factor"], params.tri, bias, out)
        finish(perm, lam, labels, g, keep, add, out)
        return out
    if linear is not None and params.kind in ("diag", "tied"):
        if g > 0:
            quad = params.kind == "diag"
            width = linear["w"].shape[1]
            phi, err = _scratch(b, width)
            none = linear["center"][None, :0]
            get = linear.get
            if mkl.use_mkl():  # features, product and finish in one parallel region (mkl.py)
                sgemm, set_threads = mkl.functions()
                linear_fused(sgemm, set_threads, z, perm, lam, linear["center"], quad, linear["mcol"], linear["wnorm"],
                             linear["w"], get("chol", none), phi, err, linear["const"], bias, get("a", none),
                             get("s", none), get("sbar", none[0]), get("t", none), labels, g, keep, add, out,
                             numba.get_num_threads())
                return out
            linear_features(z, perm, lam, linear["center"], quad, linear["mcol"], linear["wnorm"], phi, err)
            linear_product(phi, linear["w"], out)
            linear_finish(phi, err, linear["const"], bias, quad, get("a", none), get("s", none),
                          get("sbar", none[0]), get("t", none), get("chol", none), perm, lam, labels, g, keep, add, out)
            return out
        finish(perm, lam, labels, g, keep, add, out)
        return out
    if g > 0:
        if params.kind == "tied":  # whitened (y = (z - m) L), then unit-scale diag scores (params.py)
            z = torch.mm(torch.from_numpy(np.subtract(z, a["center"])), torch.from_numpy(a["chol"])).numpy()
        z_mix = np.empty_like(z)
        mix_rows(z, perm, lam, z_mix)
        if params.kind in ("diag", "tied"):
            diag_scores(z_mix, a["mu_t"], a["istd_t"], bias, out)
        elif params.kind == "full":
            full_scores(z_mix, params, out)
        else:
            kde_scores(z_mix, a["order"], a["center"], a["factor"], params.tri, a["points"], a["offsets"], bias, out)
    finish(perm, lam, labels, g, keep, add, out)
    return out


from ..compat import key_disk_cache_on  # noqa: E402

key_disk_cache_on(globals(), rm)
