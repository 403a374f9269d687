"""The relabel stage's scalar math, written once.

Every function here is plain Python. ``cpu.py`` compiles them with ``numba.njit`` and ``cuda.py``
with ``numba.cuda.jit(device=True)``; the simulator runs them as they are. Constants are
``np.float32`` globals (Numba freezes them as float32 constants), and no function introduces a
float64 literal, so float32 arguments keep an operation in float32 on either target; the
kernels pass float64 where the digits matter (sums of terms, logits) and get float64 there.

Notation (docs/MATH.md sections 3 and 5): a raw score is the class-dependent part of
``log p_c(z_mix)`` without the per-class constant; the *logit* is raw score + bias, with
``bias_c = log_norm_c + log_prior_c`` (shifted by a constant) and ``-inf`` for empty classes.
Logits are formed and kept in float64 (a feature far out adds the same huge term to every
class's score; the softmax needs the digits below it).
"""
from __future__ import annotations

import math

import numpy as np

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
HALF = np.float32(0.5)
NEG_INF = np.float32(-np.inf)
MAX_F32 = np.float32(np.finfo(np.float32).max)

# The full-covariance product form's logit error (``gemm.py``): at most PRODUCT_GAMMA x M, M a
# bound on the sum of the absolute values of the terms its float32 sum cancels
# (:func:`product_error`). Measured on the CPU: at most 5.2e-7 M (tests/test_relabel_gemm.py), a
# factor of 3.8 below PRODUCT_GAMMA; on a GPU (split-TF32 tensor-core products, whose accumulation
# need not round to nearest) the GPU tests measure it. Logits whose bound is within PRODUCT_TRUST
# nats are kept (targets within ~1e-4, what the product was held to before the bound); otherwise
# the classes that can matter, those within PRODUCT_MARGIN nats of the best (each of the others
# holds at most e^-30 = 1e-13 of the row's mass), are scored again exactly in the factor form.
PRODUCT_GAMMA = np.float32(2e-6)
# The diag/tied product form's (``linear.py``): at most LINEAR_GAMMA (sqrt(T) + 4) M_s
# (:func:`linear_error`). Measured on the CPU (T = 2 to 4096, classes well mixed to far apart): at
# most 0.46 u (sqrt(T) + 4) M_s (tests/test_relabel_linear.py), u = 2^-24; LINEAR_GAMMA = 2u. Features
# that repeat one value round alike at every step and use up the margin (MATH.md section 5).
# That is plain float32 products. The CUDA form's split-TF32 products (``linear.py``) also drop lo x lo, at
# most 2^-22 M_s (|lo| <= 2^-11 |.|), and round the sum twice more: SPLIT_GAMMA M_s more
# (:func:`split_linear_error`). In float32 on the CPU the split products reach 10.2 u M_s at T = 1
# (0.39 of that bound); on a GPU, whose tensor cores' accumulation need not round to nearest, the
# GPU test in tests/test_relabel_linear.py measures it, as for PRODUCT_GAMMA.
LINEAR_GAMMA = np.float32(2.0 ** -23)
SPLIT_GAMMA = np.float32(2.0 ** -20)
PRODUCT_TRUST = np.float32(5e-4)
PRODUCT_MARGIN = np.float32(30.0)


def mixed(a, b, lam, lam_c):
    """``lam * a + (1 - lam) * b`` with ``lam_c = 1 - lam`` computed once by the caller."""
    return lam * a + lam_c * b


def diag_term(x, mu, istd):
    """One feature's term of the diagonal Mahalanobis norm: ``((x - mu) / sigma)^2``."""
    t = (x - mu) * istd
    return t * t


def gauss_score(maha):
    """Raw Gaussian score from a squared Mahalanobis norm: ``-maha / 2``."""
    return -HALF * maha


def product_error(xn2, rho, pa, spread):
    """Bound on the error of every logit of one mixed sample in the product form: PRODUCT_GAMMA x
    (rho / 2 |x|^2 + pa |x| + spread / 2), x = z_mix - m, |x|^2 = ``xn2``, with the model's
    ``gemm.pack`` ``bound``: rho >= max_c of the spectral radius of |P_c|, pa = max_c |P_c a_c|,
    spread = max_c a_c^T P_c a_c (a_c = mu_c - m). Those three terms bound the sums of the absolute
    values of the quadratic, linear and constant terms of the expansion (docs/MATH.md section 5)."""
    return PRODUCT_GAMMA * (HALF * rho * xn2 + pa * math.sqrt(xn2) + HALF * spread)


def linear_error(m_s, width):
    """Bound on the error of every logit of one mixed sample in the diag/tied product form:
    LINEAR_GAMMA (sqrt(T) + 4) M_s, T = ``width`` terms, M_s a bound on the sum of their absolute
    values. The 4 covers the roundings of each term (W, phi, the product); the sqrt(T) the
    accumulated rounding of the sum, which grows like sqrt(T) in the probabilistic model of
    rounding errors (Higham and Mary, 2019) and was measured to (docs/MATH.md section 5)."""
    return LINEAR_GAMMA * (math.sqrt(width) + 4) * m_s


def split_linear_error(m_s, width):
    """:func:`linear_error` plus SPLIT_GAMMA M_s: the bound for the split-TF32 products on CUDA."""
    return (LINEAR_GAMMA * (math.sqrt(width) + 4) + SPLIT_GAMMA) * m_s


def linear_sum_bound(by_column, norm2, wnorm):
    """M_s of one row of phi for :func:`linear_error`: min(``by_column`` = sum_j |phi_j| max_c
    |W_cj|, sqrt(``norm2`` = ||phi||^2) x ``wnorm`` = max_c ||W_c||). NaN if phi is."""
    return min(by_column, math.sqrt(norm2) * wnorm)


def diag_exact_term(x, a, s, sbar):
    """Twice feature i's term of a diag class's exact score in the product form (``linear.py``):
    sbar_i x_i^2 - s_ci (x_i - a_ci)^2 (the shared -sbar_i x_i^2 / 2 of the raw score added back),
    as (sbar - s) x^2 + s a (2x - a), where no x^2 terms cancel however far out x is."""
    return (sbar - s) * x * x + s * a * (x + x - a)


def tied_exact_term(y, t):
    """Twice coordinate j's term of a tied class's exact score in the product form: y_j^2 -
    (y_j - t_cj)^2, y = L^T x (the shared -||y||^2 / 2 added back), as t (2y - t): no cancellation."""
    return t * (y + y - t)


def product_cutoff(best, err):
    """Logit below which a class can hold at most e^-PRODUCT_MARGIN of the row's mass whatever the
    errors (``err`` bounds each logit's, ``best`` is the largest approximate logit)."""
    return best - PRODUCT_MARGIN - (err + err)


def lse_update(m, s, x):
    """Online log-sum-exp: fold ``x`` into the running ``(max, sum of exp(. - max))``."""
    if x == NEG_INF:
        return m, s
    if x > m:
        return x, s * math.exp(m - x) + ONE
    return m, s + math.exp(x - m)


def lse_merge(m1, s1, m2, s2):
    """Combine two online log-sum-exp states."""
    if m2 > m1:
        m1, s1, m2, s2 = m2, s2, m1, s1
    if m2 == NEG_INF:
        return m1, s1
    return m1, s1 + s2 * math.exp(m2 - m1)


def lse_value(m, s):
    """``log(sum exp)`` of an online state; ``-inf`` when nothing (finite) was folded in."""
    if s > ZERO:
        return m + math.log(s)
    return NEG_INF


def logit_value(v):
    """A logit as the softmax may read it: NaN is mapped to ``-inf`` and ``+inf`` (a float32 score
    that overflowed upwards, |z| ~ 1e38) to the largest float32, so that the softmax shares the row
    among those classes instead of making ``inf - inf`` NaN."""
    if v != v:
        return NEG_INF
    if v > MAX_F32:
        return MAX_F32
    return v


def mixup_mass(c, y_a, y_b, lam, lam_c):
    """Class ``c``'s entry of the mixup label ``lam * e(y_a) + (1 - lam) * e(y_b)``."""
    v = lam - lam  # a zero of lam's type
    if c == y_a:
        v += lam
    if c == y_b:
        v += lam_c
    return v


def target_value(p, y_mix, gamma, gamma_c, keep, add):
    """``(gamma * y_gen + (1 - gamma) * y_mix) * (1 - eps) + eps / K``, with ``keep = 1 - eps``
    and ``add = eps / K`` (timm's label smoothing)."""
    return (gamma * p + gamma_c * y_mix) * keep + add
