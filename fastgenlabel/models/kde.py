"""Kernel density estimate per class (Gaussian kernel, scipy's ``gaussian_kde`` semantics)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import CHUNK_ELEMENTS, LOG_2PI, ClassModel, register

BANDWIDTHS = ("scott", "silverman")
# Added to a singular class covariance S, times the mean pooled within-class variance tr(S_pool) / d
# (docs/MATH.md): relative, so that the model does not depend on the features' units, and the same
# for every class, so that a feature constant in every class (a dead unit) adds the same term to
# every class's score when it fires, which the posterior does not depend on.
JITTER = 1e-8
# S counts as singular when Cholesky fails or a feature keeps at most this fraction of its
# variance given the others (GaussianClassModel's test with reg = 0).
SINGULAR_TOL = 1e-10


def _signed(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MUL1, _MUL2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(h: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> keeps the sign)."""
    return (h >> n) & ((1 << (64 - n)) - 1)


def _mix64(h: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors holding uint64 bits (wrapping arithmetic)."""
    h = h + _GOLDEN
    h = (h ^ _shr(h, 30)) * _MUL1
    h = (h ^ _shr(h, 27)) * _MUL2
    return h ^ _shr(h, 31)


def _row_keys(z: torch.Tensor, seed: int) -> torch.Tensor:
    """(N,) float64 keys in [0, 1): a seeded hash of every row's float64 bits, computed on z's
    device (a GPU fit never copies its features to the host for the cap)."""
    bits = z.detach().to(torch.float64).contiguous().view(torch.int64)
    h = _mix64(torch.full((bits.shape[0],), _signed(seed & ((1 << 64) - 1)), dtype=torch.int64, device=z.device))
    for j in range(bits.shape[1]):
        h = _mix64(h ^ bits[:, j])
    return _shr(h, 11).to(torch.float64) * 2.0 ** -53


@dataclass(frozen=True)
class KDEStats:
    """The kept sample of every class, and how many samples each class had in all.

    When a cap applies, every sample carries a pseudo-random key (a seeded hash of its features,
    so a sample gets the same key in whichever batch it arrives) and each class keeps the
    ``max_points`` samples with the smallest keys: a uniform sample without replacement that
    merges exactly (the union's smallest keys) however the data was split into batches.
    Without a cap the keys are unused and zero.
    """

    count: torch.Tensor  # (K,) float64, samples seen per class
    points: torch.Tensor  # (M, d) float64, kept samples
    labels: torch.Tensor  # (M,) int64
    keys: torch.Tensor  # (M,) float64 in [0, 1)
    max_points: int  # 0 = no cap

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    @classmethod
    def from_batch(cls, z, y, k, max_points_per_class=None, seed=0) -> KDEStats:
        keys = (_row_keys(z, seed) if max_points_per_class
                else torch.zeros(z.shape[0], dtype=torch.float64, device=z.device))
        count = torch.bincount(y, minlength=k).to(torch.float64)
        stats = cls(count, z, y, keys, int(max_points_per_class or 0))
        return stats._capped()

    def _capped(self) -> KDEStats:
        if not self.max_points:
            return self
        # Order by (label, key); keep the first max_points of every label.
        order = torch.argsort(self.keys, stable=True)
        order = order[torch.argsort(self.labels[order], stable=True)]
        labels = self.labels[order]
        starts = torch.searchsorted(labels, labels, right=False)
        rank = torch.arange(labels.shape[0], device=labels.device) - starts
        keep = order[rank < self.max_points]
        return KDEStats(self.count, self.points[keep], self.labels[keep], self.keys[keep], self.max_points)

    def merge(self, other: KDEStats) -> KDEStats:
        if not isinstance(other, KDEStats):
            raise TypeError("other: expected KDEStats")
        if other.count.shape != self.count.shape or other.dim != self.dim or other.max_points != self.max_points:
            raise ValueError("other: KDE statistics of another K, d or cap")
        dev = self.count.device
        merged = KDEStats(
            self.count + other.count.to(dev),
            torch.cat([self.points, other.points.to(dev)]),
            torch.cat([self.labels, other.labels.to(dev)]),
            torch.cat([self.keys, other.keys.to(dev)]),
            self.max_points,
        )
        return merged._capped()

    def to_numpy(self):
        return {
            "count": self.count.cpu().numpy(),
            "points": self.points.cpu().numpy(),
            "labels": self.labels.cpu().numpy(),
            "keys": self.keys.cpu().numpy(),
            "max_points": np.asarray(self.max_points, dtype=np.int64),
        }

    @classmethod
    def from_numpy(cls, arrays, device=None, **_options) -> KDEStats:
        count = torch.as_tensor(np.asarray(arrays["count"]), dtype=torch.float64, device=device)
        points = torch.as_tensor(np.asarray(arrays["points"]), dtype=torch.float64, device=device)
        labels = torch.as_tensor(np.asarray(arrays["labels"]), dtype=torch.int64, device=device)
        keys = torch.as_tensor(np.asarray(arrays["keys"]), dtype=torch.float64, device=device)
        cap = int(np.asarray(arrays["max_points"]))
        k = count.shape[0] if count.ndim == 1 else 0
        if (count.ndim != 1 or k < 1 or points.ndim != 2 or points.shape[1] < 1
                or labels.shape != (points.shape[0],) or keys.shape != labels.shape):
            raise ValueError("stats: KDE arrays of inconsistent shapes")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError("stats: KDE labels out of range")
        if not (bool(torch.isfinite(points).all()) and bool(torch.isfinite(count).all())):
            raise ValueError("stats: non-finite KDE points")
        kept = torch.bincount(labels, minlength=k).to(torch.float64)
        if bool((kept > count).any()) or bool(((kept == 0) & (count > 0)).any()):
            raise ValueError("stats: KDE kept points do not match the class counts")
        return cls(count, points, labels, keys, cap)


def _covariance_factor(cov: torch.Tensor, scale: float, c: int) -> torch.Tensor:
    """The lower Cholesky factor of ``cov``, regularised only where ``cov`` is singular (see
    :class:`KDEClassModel`)."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        unexplained = torch.diagonal(chol).square() / torch.diagonal(cov)
        if bool((unexplained > SINGULAR_TOL).all()):
            return chol
    d = cov.shape[0]
    chol, info = torch.linalg.cholesky_ex(cov + JITTER * scale * torch.eye(d, dtype=cov.dtype, device=cov.device))
    if int(info) != 0:
        raise ValueError(f"z: the kernel covariance of class {c} is not positive definite")
    return chol


@register
class KDEClassModel(ClassModel):
    """A Gaussian-kernel density estimate per class.

    The kernel covariance of class c is ``h^2 * S_c``, scipy's, with S_c the unbiased covariance
    of the class's kept points and h Scott's factor ``n^(-1/(d+4))`` (default), Silverman's
    ``(n (d + 2) / 4)^(-1/(d+4))``, or a float given by the user (the factor itself, as scipy's
    ``bw_method``); n is the number of kept points. Only a singular S_c (fewer points than
    d + 1, collinear or constant features; numerically: Cholesky fails or a feature keeps at most
    ``SINGULAR_TOL`` of its variance given the others) gets ``1e-8 * tr(S_pool) / d * I`` added,
    S_pool the pooled within-class covariance: a regulariser relative to the data's scale, so
    rescaling the features (z -> s z) rescales the model and leaves the GenLabel targets unchanged,
    and one for every class, so a feature constant in every class adds the same term to every
    class's score when it fires.

    log p_c(z) = logsumexp_j N(z; x_j, H_c) - log n_c.

    Args:
        bandwidth: "scott", "silverman" or a positive float factor.
        max_points_per_class: keep at most this many points per class (a seeded uniform sample);
            None keeps all.
        prior: "uniform" (the paper) or "empirical".
        seed: seed of the hash that draws the kept sample when capping.

    Defined fallbacks: a class with a single point borrows the pooled within-class covariance of
    the classes with two or more points (the identity if there are none); the regulariser's scale is
    1 when the pooled covariance is zero too; a class with no points gets log-likelihood -inf and a
    warning.
    """

    kind = "kde"

    def __init__(self, bandwidth="scott", max_points_per_class: int | None = None, prior: str = "uniform",
                 seed: int = 0):
        super().__init__(prior)
        if isinstance(bandwidth, str):
            if bandwidth not in BANDWIDTHS:
                raise ValueError(f"bandwidth: expected 'scott', 'silverman' or a positive float, got {bandwidth!r}")
        else:
            if isinstance(bandwidth, bool):
                raise ValueError(f"bandwidth: expected 'scott', 'silverman' or a positive float, got {bandwidth!r}")
            try:
                bandwidth = float(bandwidth)
            except (TypeError, ValueError):
                raise ValueError(f"bandwidth: expected 'scott', 'silverman' or a positive float, got {bandwidth!r}") from None
            if not (bandwidth > 0 and math.isfinite(bandwidth)):
                raise ValueError(f"bandwidth: expected a positive finite factor, got {bandwidth!r}")
        if max_points_per_class is not None:
            if isinstance(max_points_per_class, bool) or not isinstance(max_points_per_class, (int, np.integer)) \
                    or max_points_per_class < 1:
                raise ValueError(f"max_points_per_class: expected a positive integer or None, got {max_points_per_class!r}")
            max_points_per_class = int(max_points_per_class)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        self.bandwidth = bandwidth
        self.max_points_per_class = max_points_per_class
        self.seed = int(seed)

    def config(self):
        return {"bandwidth": self.bandwidth, "max_points_per_class": self.max_points_per_class,
                "seed": self.seed, **super().config()}

    def _stats_type(self):
        return KDEStats

    def _stats_options(self):
        return {"max_points_per_class": self.max_points_per_class, "seed": self.seed}

    def factor(self, n: int, d: int) -> float:
        """The bandwidth factor h for a class of n kept points in d dimensions."""
        if self.bandwidth == "scott":
            return n ** (-1.0 / (d + 4))
        if self.bandwidth == "silverman":
            return (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
        return float(self.bandwidth)

    def _finalize(self, s: KDEStats) -> dict:
        if s.max_points != int(self.max_points_per_class or 0):
            raise ValueError("stats: gathered with another max_points_per_class than this model's")
        k, d = s.count.shape[0], s.dim
        dev = s.points.device
        eye = torch.eye(d, dtype=torch.float64, device=dev)
        # Class c's points are points[order[starts[c]:starts[c + 1]]]: one class copied at a time.
        order = torch.argsort(s.labels, stable=True)
        starts = [0, *torch.cumsum(torch.bincount(s.labels, minlength=k), 0).tolist()]

        def points_of(c):
            return s.points[order[starts[c]:starts[c + 1]]]

        covs, pooled, dof = {}, torch.zeros(d, d, dtype=torch.float64, device=dev), 0
        for c in range(k):
            x = points_of(c)
            if x.shape[0] >= 2:
                xc = x - x.mean(0)
                scatter = xc.T @ xc
                covs[c] = scatter / (x.shape[0] - 1)
                pooled += scatter
                dof += x.shape[0] - 1
        pooled = pooled / dof if dof else eye
        scale = float(torch.trace(pooled)) / d or 1.0  # the singular classes' regulariser, one for all
        class_points, kernel_chol, log_norm = [], [], torch.full((k,), -math.inf, dtype=torch.float64)
        for c in range(k):
            x = points_of(c)
            n = x.shape[0]
            if n == 0:
                class_points.append(x)
                kernel_chol.append(eye)
                continue
            chol = self.factor(n, d) * _covariance_factor(covs.get(c, pooled), scale, c)
            # Whitened points: the kernel becomes an isotropic unit Gaussian in whitened space.
            class_points.append(torch.linalg.solve_triangular(chol, x.T, upper=False).T)
            kernel_chol.append(chol)
            log_norm[c] = -torch.log(torch.diagonal(chol)).sum() - 0.5 * d * LOG_2PI - math.log(n)
            del x
        return {"class_points": class_points, "kernel_chol": kernel_chol, "log_norm": log_norm.to(dev)}

    def _log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        k = len(self.class_points)
        out = torch.full((z.shape[0], k), -math.inf, dtype=torch.float64, device=z.device)
        for c in range(k):
            pts = self.class_points[c]
            if pts.shape[0] == 0:
                continue
            wz = torch.linalg.solve_triangular(self.kernel_chol[c], z.T, upper=False).T
            step = max(1, CHUNK_ELEMENTS // max(1, pts.shape[0]))
            for r0 in range(0, z.shape[0], step):
                sq = torch.cdist(wz[r0:r0 + step], pts, compute_mode="donot_use_mm_for_euclid_dist").square()
                out[r0:r0 + step, c] = torch.logsumexp(-0.5 * sq, dim=1)
        return out + self.log_norm
