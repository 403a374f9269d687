"""The relabel stage on the GPU: Numba ``cuda.jit(cache=True)`` kernels.

Each kernel matches the reference ``genlabel_target(model, mix(z, pairs), ...)``, launched on
the caller's stream. Mixing is fused into the loads of z (no z_mix array in global memory), and
no kernel makes a B x K x d intermediate.

- ``diag_fused`` (diagonal covariance; tied after ``whiten_rows``): one launch. Grid (sample
  tiles of ``TS``, class tiles of ``TPB``), threads over classes (coalesced reads of the
  feature-major (d, K) parameters, ``LOADS`` features' worth loaded into registers together),
  the tile's features staged through shared memory ``TD`` at a time, each float32 term added
  to a float64 sum; the logits go to ``logits``. The last block to finish a sample tile (a
  per-tile counter, atomics and fences) holds every class of those samples and turns them into
  targets itself (``finish_row``).
- ``whiten_rows`` (tied covariance): y = (z - m) L per sample, so that tied is diag with unit
  scales on y (whitening commutes with mixing; ``params.py`` says why not the affine form).
- Full covariance where ``gemm.use_gemm`` declines the tensor-core product: ``tri_scores``, one
  block per (sample tile, class), threads over the output coordinates j of
  u = L_c^T (z_mix - mu_c) (coalesced reads of the factor's rows), skipping its zero triangle;
  the squared norm is summed in float64 and reduced across the block (pairwise). The grid's
  fastest index is the sample tile, so the blocks of one class run together: L_c is read from
  memory about once per call and served from L2 to its B / TS tiles. SIMT, u in float32.
- ``kde_scores``: one block per (sample, class): whiten into shared memory, threads over the
  class's points with an online log-sum-exp (distances and the log-sum-exp in float64), then a
  block-level log-sum-exp merge.
- ``quad_split`` (full covariance at ``gemm.use_gemm``'s sizes): the tensor-core product's left
  operand, phi = [x_i x_j, x_i, 1] of the mixed, centred sample, written as its two TF32 halves
  in one pass; the products themselves are cuBLAS's (``gemm.py``).
- ``refine_finish`` (after the product): one block per sample bounds the product's error from
  |z_mix - m| and, where it may matter, scores the classes near the best logit again exactly
  (the factor form, as ``tri_scores`` computes it), then turns the row into targets.
- ``linear_split`` and ``linear_finish`` (diag and tied with ``linear.policy("always")``): the
  same pattern for their product form (``linear.py``): phi = [x^2, x] or x as TF32 halves, one
  thread per element; after cuBLAS's products, one block per sample bounds the error
  (``math.split_linear_error``), rescores exactly (float64) the classes near the best where it
  may matter, then makes the targets.
- ``finish`` (the full factor form and KDE): one block per sample, threads over classes:
  block-level max and sum reductions for the softmax of the logits, then the gamma blend and
  label smoothing, into ``out``.

Every kernel writes its logits (score + bias) as float64 into a (B, K) scratch array,
``logits``, and the softmax subtracts the row's largest in float64: a feature far out adds
the same huge term to every class's score (4.5e6 nats for a dead unit at 30 with reg 1e-4), and
float32 scores lose the digits the targets depend on (up to 0.11 of them, measured).
The per-feature arithmetic stays float32; float64 is one add per term and the per-row
reductions: full rate / 2 on H100/H200, slower on GPUs with 1/64-rate float64. The PTX for sm_90
has no local-memory traffic and no spills (22-128 registers per thread, ``ptxas -v``,
``bench/ptx_report.py``).

Block sizes are compile-time constants; under the simulator (``NUMBA_ENABLE_CUDASIM=1``) they are
tiny so that every strided loop and partial tile runs. Nothing here launches or compiles at
import (importing numba.cuda touches no device).
"""
from __future__ import annotations

import math

import numpy as np
from numba import config, float32, float64, int32

from .._interop import cuda_modules
from . import math as rm

cuda = cuda_modules()

SIM = bool(config.ENABLE_CUDASIM)
TPB = 8 if SIM else 128  # threads per block (a power of two)
TS = 2 if SIM else 8  # samples per block tile (<= TPB)
TD = 4 if SIM else 32  # features staged in shared memory at a time
LOADS = 2 if SIM else 8  # diag_fused: parameters loaded into registers together (divides TD)
QUAD_BLOCKS = 2 if SIM else 16  # quad_split: blocks per sample
TF32_MASK = np.uint32(0xFFFFE000)  # float32 -> TF32: 23 - 10 = 13 mantissa bits cleared
MAX_SHARED_BYTES = 48 * 1024
MAX_GRID_Y = 65535

ZERO = rm.ZERO
ONE = rm.ONE
NEG_INF = rm.NEG_INF

_dev = cuda.jit(device=True)
mixed = _dev(rm.mixed)
diag_term = _dev(rm.diag_term)
gauss_score = _dev(rm.gauss_score)
lse_update = _dev(rm.lse_update)
lse_merge = _dev(rm.lse_merge)
lse_value = _dev(rm.lse_value)
logit_value = _dev(rm.logit_value)
mixup_mass = _dev(rm.mixup_mass)
target_value = _dev(rm.target_value)
product_error = _dev(rm.product_error)
product_cutoff = _dev(rm.product_cutoff)
split_linear_error = _dev(rm.split_linear_error)
linear_sum_bound = _dev(rm.linear_sum_bound)
diag_exact_term = _dev(rm.diag_exact_term)
tied_exact_term = _dev(rm.tied_exact_term)
PRODUCT_TRUST = rm.PRODUCT_TRUST
HALF = rm.HALF


@cuda.jit(device=True)
def block_max(red, v):
    """Maximum of ``v`` over the block (all threads must call it)."""
    tid = cuda.threadIdx.x
    red[tid] = v
    cuda.syncthreads()
    step = TPB // 2
    while step > 0:
        if tid < step and red[tid + step] > red[tid]:
            red[tid] = red[tid + step]
        cuda.syncthreads()
        step //= 2
    res = red[0]
    cuda.syncthreads()
    return res


@cuda.jit(device=True)
def block_sum(red, v):
    """Sum of ``v`` over the block, pairwise (all threads must call it)."""
    tid = cuda.threadIdx.x
    red[tid] = v
    cuda.syncthreads()
    step = TPB // 2
    while step > 0:
        if tid < step:
            red[tid] += red[tid + step]
        cuda.syncthreads()
        step //= 2
    res = red[0]
    cuda.syncthreads()
    return res


@cuda.jit(device=True)
def stage_mixed(tile, z, perm, lam, s0, i0):
    """tile[t, ii] = z_mix[s0 + t, i0 + ii] (0 outside the batch/features). Cooperative: every
    thread of the block calls it."""
    b, d = z.shape
    for idx in range(cuda.threadIdx.x, TS * TD, TPB):
        t = idx // TD
        ii = idx - t * TD
        s = s0 + t
        i = i0 + ii
        v = ZERO
        if s < b and i < d:
            l = lam[s]
            v = mixed(z[s, i], z[perm[s], i], l, ONE - l)
        tile[t, ii] = v


@cuda.jit(device=True)
def stage_centered(tile, z, perm, lam, s0, i0, order, center, c):
    """tile[t, ii] = z_mix[s0 + t, order[i]] - center[c, i], i = i0 + ii (kernel feature order)."""
    b, d = z.shape
    for idx in range(cuda.threadIdx.x, TS * TD, TPB):
        t = idx // TD
        ii = idx - t * TD
        s = s0 + t
        i = i0 + ii
        v = ZERO
        if s < b and i < d:
            l = lam[s]
            f = order[i]
            v = mixed(z[s, f], z[perm[s], f], l, ONE - l) - center[c, i]
        tile[t, ii] = v


@cuda.jit(device=True)
def load_l2(a, s, c):
    """``a[s, c]`` read from L2 (``ld.global.cg``), past this SM's L1, which does not see other
    blocks' stores. The simulator has no cache hints (nor caches)."""
    if SIM:
        return a[s, c]
    return cuda.ldcg(a, (s, c))


@cuda.jit(device=True)
def diag_chunk(acc, tile, mu_t, istd_t, i0, c, n, wr, mr):
    """Add features i0 .. i0 + n of class ``c`` to the TS samples' float64 sums ``acc``.

    ``LOADS`` features at a time, their parameters are loaded into registers (``wr``, ``mr``:
    local arrays indexed by unrolled constants) before any of them is used, so that a warp waits
    for memory once per group rather than once or twice per feature; the tail goes one by one.
    Each float32 term goes into the float64 sum (a float32 partial sum would round a term that is
    common to every class, a feature far out, differently for each).
    """
    g_end = n - n % LOADS
    for g in range(0, g_end, LOADS):
        for u in range(LOADS):
            wr[u] = istd_t[i0 + g + u, c]
            mr[u] = mu_t[i0 + g + u, c]
        for u in range(LOADS):
            for t in range(TS):
                acc[t] += float64(diag_term(tile[t, g + u], mr[u], wr[u]))
    for ii in range(g_end, n):
        w = istd_t[i0 + ii, c]
        m = mu_t[i0 + ii, c]
        for t in range(TS):
            acc[t] += float64(diag_term(tile[t, ii], m, w))


@cuda.jit(cache=True)
def diag_fused(z, perm, lam, mu_t, istd_t, labels, bias, gamma, keep, add, logits, out, done):
    """Diagonal covariance (and tied, on whitened features with unit scales) in one launch:
    logit = -1/2 sum_i ((z_mix_i - mu_ci) istd_ic)^2 + bias_c, in float64. Grid (sample tiles,
    class tiles): a block writes the logits of its TS samples over its TPB classes into
    ``logits`` (B, K) float64; the last block to finish a sample tile (counted in ``done``) turns
    that tile's rows into targets in ``out`` (``finish_row``).

    Splitting the classes over blocks keeps the GPU busy: at B = 256, K = 1000 one block per
    sample tile would be 32 blocks of 4 warps on a 132-SM H200, each warp stalling on every
    parameter load. ``done`` (>= gridDim.x int32, zero) counts the blocks of each tile that have
    written their logits (each thread fences its stores first); the block that makes the count
    complete resets it to zero for the next launch, then reads the whole rows from L2. With one
    class tile (K <= TPB, or gamma = 0: nothing to score) there is nothing to count.
    """
    b, d = z.shape
    k = out.shape[1]
    s0 = cuda.blockIdx.x * TS
    tid = cuda.threadIdx.x
    c = cuda.blockIdx.y * TPB + tid
    tile = cuda.shared.array((TS, TD), float32)
    red = cuda.shared.array(TPB, float64)
    last = cuda.shared.array(1, int32)
    acc = cuda.local.array(TS, float64)
    wr = cuda.local.array(LOADS, float32)
    mr = cuda.local.array(LOADS, float32)
    if gamma > ZERO:
        for t in range(TS):
            acc[t] = 0.0
        for i0 in range(0, d, TD):
            stage_mixed(tile, z, perm, lam, s0, i0)
            cuda.syncthreads()
            if c < k:
                diag_chunk(acc, tile, mu_t, istd_t, i0, c, min(TD, d - i0), wr, mr)
            cuda.syncthreads()
        if c < k:
            for t in range(TS):
                if s0 + t < b:
                    logits[s0 + t, c] = gauss_score(acc[t]) + bias[c]
        if cuda.gridDim.y > 1:
            cuda.threadfence()  # this thread's logits reach L2 before the block is counted
            cuda.syncthreads()
            if tid == 0:
                last[0] = cuda.atomic.add(done, cuda.blockIdx.x, 1) == cuda.gridDim.y - 1
            cuda.syncthreads()
            if last[0] == 0:  # uniform over the block
                return
            if tid == 0:
                done[cuda.blockIdx.x] = 0
            cuda.threadfence()
            for t in range(TS):
                if s0 + t < b:
                    for cc in range(tid, k, TPB):  # the thread that finish_row gives column cc
                        logits[s0 + t, cc] = load_l2(logits, s0 + t, cc)
        cuda.syncthreads()  # the tile's logits are in place, visible to the whole block
    for t in range(TS):
        if s0 + t < b:  # uniform over the block: finish_row's reductions see every thread
            finish_row(s0 + t, perm, lam, labels, gamma, keep, add, logits, out, red)


@cuda.jit(cache=True)
def tri_scores(z, perm, lam, order, center, factor, tri, bias, logits):
    """Full covariance: logits[s, c] = -1/2 ||L_c^T (z_mix[s] - mu_c)||^2 + bias_c (float64),
    ||u||^2 with u_j = sum_{i >= j} diff_i factor[c, i, j] in kernel feature order (u in float32,
    its squares summed in float64). Grid (tiles, K)."""
    b, d = z.shape
    s0 = cuda.blockIdx.x * TS
    c = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    if bias[c] == NEG_INF:  # empty class; uniform over the block
        if tid < TS and s0 + tid < b:
            logits[s0 + tid, c] = NEG_INF
        return
    tile = cuda.shared.array((TS, TD), float32)
    red = cuda.shared.array((TS, TPB), float64)
    acc = cuda.local.array(TS, float32)
    part = cuda.local.array(TS, float64)
    for t in range(TS):
        part[t] = 0.0
    for j0 in range(0, d, TPB):
        j = j0 + tid
        for t in range(TS):
            acc[t] = ZERO
        for i0 in range(j0 if tri else 0, d, TD):  # factor[c, i, j] = 0 for i < j when triangular
            stage_centered(tile, z, perm, lam, s0, i0, order, center, c)
            cuda.syncthreads()
            if j < d:
                for ii in range(min(TD, d - i0)):
                    i = i0 + ii
                    if i >= j or not tri:
                        f = factor[c, i, j]
                        for t in range(TS):
                            acc[t] += tile[t, ii] * f
            cuda.syncthreads()
        for t in range(TS):
            part[t] += float64(acc[t]) * acc[t]
    for t in range(TS):
        red[t, tid] = part[t]
    cuda.syncthreads()
    step = TPB // 2
    while step > 0:
        if tid < step:
            for t in range(TS):
                red[t, tid] += red[t, tid + step]
        cuda.syncthreads()
        step //= 2
    if tid < TS and s0 + tid < b:
        logits[s0 + tid, c] = gauss_score(red[tid, 0]) + bias[c]


@cuda.jit(cache=True)
def kde_scores(z, perm, lam, order, center, factor, tri, points, offsets, bias, logits):
    """KDE: logits[s, c] = logsumexp_j -1/2 ||A_c (z_mix[s] - centre_c) - x_j||^2 + bias_c, the
    distances and the log-sum-exp in float64. Grid (B, K); dynamic shared memory: 2 d float32."""
    b, d = z.shape
    s = cuda.blockIdx.x
    c = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    if bias[c] == NEG_INF:
        if tid == 0:
            logits[s, c] = NEG_INF
        return
    buf = cuda.shared.array(0, float32)  # [0, d): z_mix - centre; [d, 2d): whitened
    red_m = cuda.shared.array(TPB, float64)
    red_s = cuda.shared.array(TPB, float64)
    l = lam[s]
    p = perm[s]
    for i in range(tid, d, TPB):
        f = order[i]
        buf[i] = mixed(z[s, f], z[p, f], l, ONE - l) - center[c, i]
    cuda.syncthreads()
    for j in range(tid, d, TPB):
        a = ZERO
        for i in range(j if tri else 0, d):
            a += buf[i] * factor[c, i, j]
        buf[d + j] = a
    cuda.syncthreads()
    m = -math.inf
    acc = 0.0
    for q in range(offsets[c] + tid, offsets[c + 1], TPB):
        dist = 0.0
        for j in range(d):
            v = buf[d + j] - points[q, j]
            dist += float64(v) * v
        m, acc = lse_update(m, acc, gauss_score(dist))
    red_m[tid] = m
    red_s[tid] = acc
    cuda.syncthreads()
    step = TPB // 2
    while step > 0:
        if tid < step:
            m2, s2 = lse_merge(red_m[tid], red_s[tid], red_m[tid + step], red_s[tid + step])
            red_m[tid] = m2
            red_s[tid] = s2
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        logits[s, c] = lse_value(red_m[0], red_s[0]) + bias[c]


@cuda.jit(cache=True)
def whiten_rows(z, center, chol, out):
    """Tied covariance: out[s] = (z[s] - m) L, the samples where the shared covariance is the
    identity (``params.py``). One block per sample (grid x: up to 2^31 - 1), threads over output
    coordinates j (coalesced reads of L's rows); dynamic shared memory d float32 holding z - m."""
    s = cuda.blockIdx.x
    d = z.shape[1]
    x = cuda.shared.array(0, float32)
    for i in range(cuda.threadIdx.x, d, cuda.blockDim.x):
        x[i] = z[s, i] - center[i]
    cuda.syncthreads()
    for j in range(cuda.threadIdx.x, d, cuda.blockDim.x):
        acc = ZERO
        for i in range(d):
            acc += x[i] * chol[i, j]
        out[s, j] = acc


@cuda.jit(device=True)
def tf32_high(v):
    """``v`` with its 13 low mantissa bits cleared: exactly representable in TF32."""
    return np.uint32(np.float32(v).view(np.uint32) & TF32_MASK).view(np.float32)


@cuda.jit(cache=True)
def quad_split(z, perm, lam, center, pair_i, pair_j, out):
    """The full-covariance product's left operand, split for TF32 tensor cores, in one pass:
    with phi = [x_i x_j (i <= j, the ``pair_i``, ``pair_j`` order), x_i, 1, 0...] of x = z_mix[s] - center,
    ``out[s] = hi(phi)`` and ``out[B + s] = phi - hi(phi)`` (both exact in float32; ``gemm.py``).

    Grid (B, blocks per sample): the batch on x, which takes up to 2^31 - 1 blocks; dynamic shared
    memory d float32 holding x. (Built with torch ops instead, phi and its halves took six passes
    over B x T floats.)
    """
    b, d = z.shape
    s = cuda.blockIdx.x
    tq = pair_i.shape[0]
    width = out.shape[1]
    x = cuda.shared.array(0, float32)
    l = lam[s]
    p = perm[s]
    for i in range(cuda.threadIdx.x, d, cuda.blockDim.x):
        x[i] = mixed(z[s, i], z[p, i], l, ONE - l) - center[i]
    cuda.syncthreads()
    for t in range(cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x, width, cuda.gridDim.y * cuda.blockDim.x):
        if t < tq:
            v = x[pair_i[t]] * x[pair_j[t]]
        elif t < tq + d:
            v = x[t - tq]
        elif t == tq + d:
            v = ONE
        else:  # padding
            v = ZERO
        hi = tf32_high(v)
        out[s, t] = hi
        out[b + s, t] = v - hi


def quad_split_grid(batch: int, width: int) -> tuple[int, int]:
    """``quad_split``'s grid: (B, up to QUAD_BLOCKS blocks of TPB threads per sample; each block
    recomputes the sample's d mixed features, so not one block per TPB outputs)."""
    return batch, max(1, min(QUAD_BLOCKS, -(-width // TPB)))


@cuda.jit(device=True)
def refine_row(s, z, perm, lam, product_center, bound, order, center, factor, tri, bias, out, logits, buf, red, picked,
               count):
    """The product form's raw scores of sample ``s`` (``out``) -> its float64 logits, made exact
    where they may be off (``gemm.py``), as ``cpu.refine_scores``; every thread of the block calls
    it. The error bound from |z_mix - m|; above ``PRODUCT_TRUST``, the classes at or above the
    cutoff are gathered in ``picked``, TPB at a time, and each is scored again by the whole block
    (threads over the coordinates j of u = L_c^T (z_mix - mu_c), coalesced reads of the factor's
    rows, its zero triangle skipped). ``buf``: 2 d float32 (z_mix, then z_mix - mu_c in kernel
    feature order). Thread ``tid`` owns the classes c = tid (mod TPB), as in ``finish_row``."""
    d = z.shape[1]
    k = out.shape[1]
    tid = cuda.threadIdx.x
    l = lam[s]
    p = perm[s]
    sq = ZERO
    for i in range(tid, d, TPB):
        v = mixed(z[s, i], z[p, i], l, ONE - l)
        buf[i] = v
        x = v - product_center[i]
        sq += x * x
    err = product_error(float32(block_sum(red, sq)), bound[0], bound[1], bound[2])
    best = -math.inf
    for c in range(tid, k, TPB):
        v = logit_value(float64(out[s, c]) + bias[c])
        logits[s, c] = v
        if v > best:
            best = v
    if err <= PRODUCT_TRUST:  # uniform over the block (a block reduction)
        return
    cut = product_cutoff(block_max(red, best), float64(err))
    for c0 in range(0, k, TPB):
        if tid == 0:
            count[0] = 0
        cuda.syncthreads()
        c = c0 + tid
        if c < k and bias[c] != NEG_INF and logits[s, c] >= cut:
            picked[cuda.atomic.add(count, 0, 1)] = c
        cuda.syncthreads()
        for q in range(count[0]):  # uniform
            cc = picked[q]
            for i in range(tid, d, TPB):
                buf[d + i] = buf[order[i]] - center[cc, i]
            cuda.syncthreads()
            part = 0.0
            for j in range(tid, d, TPB):
                u = ZERO
                for i in range(j if tri else 0, d):
                    u += buf[d + i] * factor[cc, i, j]
                part += float64(u) * u
            total = block_sum(red, part)
            if tid == 0:
                logits[s, cc] = gauss_score(total) + bias[cc]
        cuda.syncthreads()  # count and picked are rewritten next round; logits are final for finish_row


@cuda.jit(cache=True)
def refine_finish(z, perm, lam, product_center, bound, order, center, factor, tri, labels, bias, gamma, keep, add,
                  logits, out):
    """After the full-covariance product (``gemm.py``), whose raw scores are in ``out``: one block
    per sample, ``refine_row`` then ``finish_row``, in one launch. Dynamic shared memory: 2 d
    float32."""
    buf = cuda.shared.array(0, float32)
    red = cuda.shared.array(TPB, float64)
    picked = cuda.shared.array(TPB, int32)
    count = cuda.shared.array(1, int32)
    s = cuda.blockIdx.x
    if gamma > ZERO:  # uniform
        refine_row(s, z, perm, lam, product_center, bound, order, center, factor, tri, bias, out, logits, buf, red,
                   picked, count)
    finish_row(s, perm, lam, labels, gamma, keep, add, logits, out, red)


@cuda.jit(cache=True)
def linear_split(z, perm, lam, center, quad, out):
    """The diag/tied product's left operand (``linear.py``), split for TF32 tensor cores: with
    phi = [x^2, x] (``quad``, diag) or x (tied), x = z_mix[s] - center, zero padded to out's width,
    ``out[s] = hi(phi)`` and ``out[B + s] = phi - hi(phi)`` (both exact in float32). Grid (B, width /
    TPB): one thread per element, each mixing the feature it needs (phi's x^2 and x of a feature
    come from the same expression)."""
    b, d = z.shape
    s = cuda.blockIdx.x
    t = cuda.blockIdx.y * TPB + cuda.threadIdx.x
    if t >= out.shape[1]:
        return
    i = t
    square = False
    if quad:
        if t < d:
            square = True
        else:
            i = t - d
    v = ZERO
    if i < d:
        l = lam[s]
        x = mixed(z[s, i], z[perm[s], i], l, ONE - l) - center[i]
        v = x * x if square else x
    hi = tf32_high(v)
    out[s, t] = hi
    out[b + s, t] = v - hi


def linear_split_grid(batch: int, width: int) -> tuple[int, int]:
    """``linear_split``'s grid: the batch on x (up to 2^31 - 1 blocks), phi's padded width on y."""
    return batch, -(-width // TPB)


@cuda.jit(device=True)
def phi_value(halves, s, j):
    """phi[s, j] from its TF32 halves (``linear_split``): hi + lo, exact in float32."""
    return halves[s, j] + halves[halves.shape[0] // 2 + s, j]


@cuda.jit(device=True)
def linear_row(s, halves, quad, mcol, wnorm, const, bias, a, sv, sbar, chol, scores, logits, ybuf, red, picked,
               count):
    """The diag/tied product's scores of sample ``s`` (``scores``) -> its float64 logits, made exact
    where they may be off, as ``cpu.linear_features``' bounds + ``cpu.linear_finish``; every thread of the block
    calls it. The row's bound (``split_linear_error``: the split products') from phi (``halves``, hi +
    lo); above ``PRODUCT_TRUST``, or when a score
    is not finite (then every live class), the classes at or above ``product_cutoff`` are gathered in
    ``picked``, TPB at a time, and each is scored again exactly by the whole block: diag from x =
    phi[d:] and the class's a, s (``sv``), sbar; tied from y = L^T x (``chol``), computed once into
    ``ybuf`` (d float64), and the class's t (passed as ``a``); such a row's logits are then stored
    relative to its largest. Thread ``tid`` owns the classes c = tid (mod TPB), as in ``finish_row``."""
    k = scores.shape[1]
    width = mcol.shape[0]
    d = a.shape[1]
    tid = cuda.threadIdx.x
    by_column = 0.0
    norm2 = 0.0
    for j in range(tid, width, TPB):
        v = float64(phi_value(halves, s, j))
        by_column += abs(v) * mcol[j]
        norm2 += v * v
    by_column = block_sum(red, by_column)
    err = split_linear_error(linear_sum_bound(by_column, block_sum(red, norm2), wnorm[0]), width)
    best = -math.inf
    bad = 0.0  # 1 where a score is not finite (float32 overflow)
    for c in range(tid, k, TPB):
        v = float64(scores[s, c])
        if v - v != 0.0:
            bad = 1.0
        lv = -math.inf
        if const[c] != -math.inf:
            lv = v + const[c]
        logits[s, c] = lv
        if lv > best:
            best = lv
    bad = block_max(red, bad)
    best = block_max(red, best)
    if bad == 0.0 and err <= PRODUCT_TRUST:  # uniform over the block (block reductions)
        return
    cut = -math.inf
    if bad == 0.0 and err < math.inf:
        cut = product_cutoff(best, err)
    if not quad:  # y = L^T x in float64 (as cpu.whiten_row: a float32 y could overflow)
        for j in range(tid, d, TPB):
            acc = 0.0
            for i in range(d):
                acc += float64(phi_value(halves, s, i)) * chol[i, j]
            ybuf[j] = acc
        cuda.syncthreads()
    for c0 in range(0, k, TPB):
        if tid == 0:
            count[0] = 0
        cuda.syncthreads()
        c = c0 + tid
        if c < k and const[c] != -math.inf and (bad != 0.0 or logits[s, c] >= cut):
            picked[cuda.atomic.add(count, 0, 1)] = c
        cuda.syncthreads()
        for q in range(count[0]):  # uniform
            cc = picked[q]
            part = 0.0
            if quad:
                for i in range(tid, d, TPB):
                    part += diag_exact_term(float64(phi_value(halves, s, d + i)), float64(a[cc, i]),
                                            float64(sv[cc, i]), float64(sbar[i]))
            else:
                for j in range(tid, d, TPB):
                    part += tied_exact_term(ybuf[j], float64(a[cc, j]))
            total = block_sum(red, part)
            if tid == 0:
                logits[s, cc] = HALF * total + bias[cc]
        cuda.syncthreads()  # count and picked are rewritten next round
    # Relative to the row's largest (as the CPU stores them): an exact score can pass float32's range
    # (|z| ~ 1e30), where finish_row would clamp it.
    best = -math.inf
    for c in range(tid, k, TPB):
        if logits[s, c] > best:
            best = logits[s, c]
    best = block_max(red, best)
    if best - best == 0.0:  # finite; uniform
        for c in range(tid, k, TPB):
            logits[s, c] -= best


@cuda.jit(cache=True)
def linear_finish(halves, perm, lam, quad, mcol, wnorm, const, bias, a, sv, sbar, chol, labels, gamma, keep, add,
                  logits, out):
    """After the diag/tied product (``linear.py``), whose scores are in ``out``: one block per sample,
    ``linear_row`` then ``finish_row``, in one launch. Tied passes t as ``a`` (``sv``, ``sbar``
    unused), diag any 2-d float32 array as ``chol``. Dynamic shared memory: tied d float64 (y)."""
    ybuf = cuda.shared.array(0, float64)
    red = cuda.shared.array(TPB, float64)
    picked = cuda.shared.array(TPB, int32)
    count = cuda.shared.array(1, int32)
    s = cuda.blockIdx.x
    if gamma > ZERO:  # uniform
        linear_row(s, halves, quad, mcol, wnorm, const, bias, a, sv, sbar, chol, out, logits, ybuf, red, picked,
                   count)
    finish_row(s, perm, lam, labels, gamma, keep, add, logits, out, red)


@cuda.jit(device=True)
def finish_row(s, perm, lam, labels, gamma, keep, add, logits, out, red):
    """Float64 logits of sample ``s`` -> its targets in ``out``; every thread of the block calls it
    (block reductions in ``red``, float64) and handles the classes c = tid (mod TPB). The softmax
    subtracts the row's largest logit in float64, then runs in float32. gamma == 0 never reads the
    logits; a row whose logits are all -inf (float32 overflow of the features) takes the mixup
    label as y_gen: never NaN."""
    tid = cuda.threadIdx.x
    k = out.shape[1]
    l = lam[s]
    lc = ONE - l
    p = perm[s]
    ya = labels[s]
    yb = labels[p]
    gamma_c = ONE - gamma
    mx = -math.inf
    if gamma > ZERO:
        for c in range(tid, k, TPB):
            v = logit_value(logits[s, c])
            if v > mx:
                mx = v
        mx = block_max(red, mx)
    if mx > -math.inf:
        total = ZERO
        for c in range(tid, k, TPB):
            e = math.exp(float32(logit_value(logits[s, c]) - mx))
            out[s, c] = e
            total += e
        inv = ONE / float32(block_sum(red, total))
        for c in range(tid, k, TPB):
            out[s, c] = target_value(out[s, c] * inv, mixup_mass(c, ya, yb, l, lc), gamma, gamma_c, keep, add)
    else:
        for c in range(tid, k, TPB):
            ym = mixup_mass(c, ya, yb, l, lc)
            out[s, c] = target_value(ym, ym, gamma, gamma_c, keep, add)


@cuda.jit(cache=True)
def finish(perm, lam, labels, gamma, keep, add, logits, out):
    """Logits -> targets; one block per sample (the full-covariance factor form and KDE)."""
    red = cuda.shared.array(TPB, float64)
    finish_row(cuda.blockIdx.x, perm, lam, labels, gamma, keep, add, logits, out, red)


def refuse_shape(params, batch: int) -> str | None:
    """Why the kernels' launch configuration cannot cover this model/batch (None: it can)."""
    if params.kind == "kde" and 2 * params.dim * 4 > MAX_SHARED_BYTES:
        return f"shape: the KDE kernel stages 2 d floats in shared memory; d = {params.dim} is too large"
    if params.kind in ("full", "kde") and params.num_classes > MAX_GRID_Y:
        return f"shape: the {params.kind} kernel launches one grid row per class; needs K <= {MAX_GRID_Y}"
    if params.kind in ("diag", "tied") and class_tiles(params.num_classes) > MAX_GRID_Y:
        return f"shape: the {params.kind} kernel launches one grid row per {TPB} classes; needs K <= {MAX_GRID_Y * TPB}"
    if params.kind == "full" and 8 * params.dim > MAX_SHARED_BYTES:
        return f"shape: the full kernels stage 2 d floats in shared memory; d = {params.dim} is too large"
    if params.kind == "tied" and 4 * params.dim > MAX_SHARED_BYTES:
        return f"shape: the tied kernels stage d floats in shared memory; d = {params.dim} is too large"
    del batch  # every kernel puts the batch on the grid's x dimension (up to 2^31 - 1 blocks)
    return None


def sample_tiles(batch: int) -> int:
    """Blocks along the batch (``TS`` samples each): the length ``diag_fused``'s ``done`` needs."""
    return (batch + TS - 1) // TS


def class_tiles(num_classes: int) -> int:
    return (num_classes + TPB - 1) // TPB


def relabel_device(params, arrays, z, perm, lam, labels, gamma, smoothing, out, *, stream=0, scores_ready=False,
                   done=None, scratch=None, logits=None, linear=None):
    """Launch the relabel stage on device arrays (anything with ``__cuda_array_interface__``).

    Args:
        params: the model's :class:`RelabelParams` (kind, K, d, tri).
        arrays: its arrays on the device, by name (see ``params.py``).
        z: (B, d) float32 C-contiguous; perm: (B,) int64; lam: (B,) float32; labels: (B,) int64.
        gamma, smoothing: floats in [0, 1].
        out: (B, K) float32 C-contiguous, fully overwritten.
        stream: a Numba stream (torch's current stream in the torch path) or 0.
        scores_ready: ``out`` already holds the approximate raw scores of the full-covariance
            product (``gemm.py``): only ``refine_finish`` runs (with the product's
            ``arrays["product_center"]`` and ``arrays["bound"]`` beside the factor form's arrays);
            diag and tied: the scores of their product (``linear.py``), and only ``linear_finish``
            runs, on ``linear``.
        done: diag and tied: an int32 device array of at least :func:`sample_tiles` (B) zeros,
            ``diag_fused``'s per-tile counters. The kernel leaves it zero again, so one array
            serves every launch on one stream (launches on other streams need their own). None:
            a fresh one is uploaded for this call.
        scratch: tied: a (B, d) float32 device array for the whitened samples (None: allocated).
        logits: a (B, K) float64 device array for the logits (None: allocated).
        linear: diag and tied with ``scores_ready``: the product form's device arrays
            (``params.linear_params_for`` on the device: ``mcol``, ``wnorm``, ``const``, diag ``a``,
            ``s``, ``sbar``, tied ``t``, ``chol``) and ``halves``, [hi; lo] of phi (2B, width), the
            product's left operand (``linear_split``); with gamma = 0 neither is read.

    Returns:
        out. The launches (one for diag and after the product, two for tied, the full factor
        form and KDE) are asynchronous on ``stream``.
    """
    b = z.shape[0]
    k = params.num_classes
    if b == 0:
        return out
    g = np.float32(gamma)
    keep = np.float32(1.0 - smoothing)
    add = np.float32(smoothing / k)
    bias = arrays["bias"]
    if logits is None:
        logits = cuda.device_array((b, k), np.float64, stream=stream)
    elif tuple(logits.shape) != (b, k) or logits.dtype != np.float64:
        raise ValueError(f"logits: expected a ({b}, {k}) float64 array, got {tuple(logits.shape)} {logits.dtype}")
    tiles = sample_tiles(b)
    if params.kind in ("diag", "tied") and scores_ready:
        if g > 0:
            if linear is None or "halves" not in linear:
                raise ValueError("linear: diag/tied scores_ready needs the product form's arrays and 'halves'")
            quad = params.kind == "diag"
            a = linear["a"] if quad else linear["t"]
            sv, sbar = (linear["s"], linear["sbar"]) if quad else (a, linear["mcol"])  # tied: unused
            chol = a if quad else linear["chol"]  # diag: unused
            linear_finish[b, TPB, stream, 0 if quad else 8 * params.dim](
                linear["halves"], perm, lam, int(quad), linear["mcol"], linear["wnorm"], linear["const"], bias, a, sv,
                sbar, chol, labels, g, keep, add, logits, out)
        else:
            finish[b, TPB, stream](perm, lam, labels, g, keep, add, logits, out)
        return out
    if params.kind in ("diag", "tied") and not scores_ready:
        if done is None:
            done = cuda.to_device(np.zeros(tiles, np.int32), stream=stream)
        elif done.shape[0] < tiles:
            raise ValueError(f"done: {done.shape[0]} counters for {tiles} sample tiles")
        if params.kind == "tied" and g > 0:  # whitened, then the diag kernel with unit scales
            d = params.dim
            if scratch is None:
                scratch = cuda.device_array((b, d), np.float32, stream=stream)
            whiten_rows[b, TPB, stream, 4 * d](z, arrays["center"], arrays["chol"], scratch)
            z = scratch
        grid = (tiles, class_tiles(k) if g > 0 else 1)
        diag_fused[grid, TPB, stream](z, perm, lam, arrays["mu_t"], arrays["istd_t"], labels, bias, g, keep, add, logits,
                                      out, done)
        return out
    if scores_ready:
        refine_finish[b, TPB, stream, 8 * params.dim](z, perm, lam, arrays["product_center"], arrays["bound"], arrays["order"],
                                                      arrays["center"], arrays["factor"], int(params.tri), labels, bias,
                                                      g, keep, add, logits, out)
        return out
    if g > 0:
        if params.kind == "full":
            tri_scores[(tiles, k), TPB, stream](z, perm, lam, arrays["order"], arrays["center"],
                                                arrays["factor"], int(params.tri), bias, logits)
        else:
            kde_scores[(b, k), TPB, stream, 8 * params.dim](
                z, perm, lam, arrays["order"], arrays["center"], arrays["factor"], int(params.tri),
                arrays["points"], arrays["offsets"], bias, logits)
    finish[b, TPB, stream](perm, lam, labels, g, keep, add, logits, out)
    return out
