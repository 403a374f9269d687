"""One Gaussian per class: full, diagonal or tied (shared) covariance."""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..functional._arrays import check_num_classes
from .base import CHUNK_ELEMENTS, LOG_2PI, ClassModel, FitWarning, register

COVARIANCES = ("full", "diag", "tied")
# With reg = 0, a covariance in which some feature keeps at most this fraction of its variance
# once the other features are known (a collinearity up to 1e-5 of its std) counts as singular.
SINGULAR_TOL = 1e-10
# Covariances are factorised this many float64 values (2 MB) at a time: the fit's temporaries stay
# small next to the (K, d, d) statistics and factors.
FINALIZE_CHUNK_ELEMENTS = 1 << 18


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def device_memory(device=None) -> int | None:
    """Bytes of memory ``device`` has in all (a GPU's, or the host's RAM within any cgroup limit);
    None where it cannot be told. Read once per device and process (a streaming fit asks per batch)."""
    return _device_memory(str(torch.device(device if device is not None else "cpu")))


@functools.cache
def _device_memory(name: str) -> int | None:
    device = torch.device(name)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type != "cpu":
        return None
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                value = int(f.read().strip())
        except (OSError, ValueError):  # absent, or "max"
            continue
        total = value if total is None else min(total, value)
    return total


def statistics_bytes(covariance: str, num_classes: int, dim: int) -> int:
    """Bytes of the float64 scatter statistics: K d^2 (full), K d (diag), d^2 (tied) values."""
    k, d = int(num_classes), int(dim)
    return 8 * {"full": k * d * d, "diag": k * d, "tied": d * d}[covariance]


def check_memory(covariance: str, num_classes: int, dim: int, device=None) -> None:
    """Refuse, before allocating anything, statistics that cannot fit in ``device``'s memory.

    A fitted model holds its statistics and as many derived parameters (the Cholesky factors or
    variances): at least twice :func:`statistics_bytes`. Raises ValueError naming K, d, the
    covariance kind, the bytes and the alternatives when that exceeds the device's total memory.
    """
    need = 2 * statistics_bytes(covariance, num_classes, dim)
    have = device_memory(device)
    if have is not None and need > have:
        raise ValueError(_too_large(covariance, num_classes, dim, device, f"more than the {_fmt_bytes(have)} "
                                    f"of memory of {torch.device(device if device is not None else 'cpu')}"))


def _too_large(covariance: str, k: int, d: int, device, why: str) -> str:
    shape = {"full": "(K, d, d)", "diag": "(K, d)", "tied": "(d, d)"}[covariance]
    size = statistics_bytes(covariance, k, d)
    others = {"full": "covariance='diag' (K d values) or 'tied' (one d x d matrix), or fewer features d",
              "diag": "fewer features d or fewer classes", "tied": "fewer features d"}[covariance]
    return (f"covariance={covariance!r}: K = {k} classes and d = {d} features need {shape} float64 statistics of "
            f"{_fmt_bytes(size)} and as much again for the fitted parameters ({_fmt_bytes(2 * size)}), {why}; "
            f"use {others}")


def _zeros(shape, covariance: str, k: int, d: int, device) -> torch.Tensor:
    """torch.zeros for the statistics, whose allocation failure says what was being allocated."""
    try:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if "memory" not in str(e).lower() and "allocat" not in str(e).lower():
            raise
        raise ValueError(_too_large(covariance, k, d, device, f"which could not be allocated ({e})")) from None


@dataclass(frozen=True)
class GaussianStats:
    """Per-class count, mean and centred scatter (M2), merged with Chan et al.'s pairwise rule.

    ``m2`` is (K, d, d) for "full", (K, d) for "diag" and the pooled within-class (d, d) for
    "tied". All tensors are float64 on the features' device.
    """

    covariance: str
    count: torch.Tensor  # (K,)
    mean: torch.Tensor  # (K, d)
    m2: torch.Tensor

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @classmethod
    def from_batch(cls, z: torch.Tensor, y: torch.Tensor, k: int, covariance: str) -> GaussianStats:
        d = z.shape[1]
        check_memory(covariance, k, d, z.device)
        count = torch.bincount(y, minlength=k).to(z.dtype)
        total = torch.zeros(k, d, dtype=z.dtype, device=z.device).index_add_(0, y, z)
        mean = total / count.clamp(min=1).unsqueeze(1)
        # A second pass removes the mean's rounding error: a constant feature gets exactly zero variance.
        mean += torch.zeros_like(mean).index_add_(0, y, z - mean[y]) / count.clamp(min=1).unsqueeze(1)
        centred = z - mean[y]
        if covariance == "diag":
            m2 = torch.zeros(k, d, dtype=z.dtype, device=z.device).index_add_(0, y, centred * centred)
        elif covariance == "tied":
            m2 = centred.T @ centred
        else:
            m2 = _zeros((k, d, d), covariance, k, d, z.device)
            for c in torch.unique(y).tolist():
                xc = centred[y == c]
                m2[c] = xc.T @ xc
        return cls(covariance, count, mean, m2)

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Statistics of the union of both batches (exact, numerically stable)."""
        if not isinstance(other, GaussianStats) or other.covariance != self.covariance:
            raise TypeError("other: expected GaussianStats of the same covariance type")
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"other: statistics of shape {tuple(other.mean.shape)} do not match {tuple(self.mean.shape)}")
        na, nb = self.count, other.count.to(self.count.device)
        n = na + nb
        delta = other.mean.to(self.mean.device) - self.mean
        w_b = torch.where(n > 0, nb / n.clamp(min=1), torch.zeros_like(n))
        cross = torch.where(n > 0, na * nb / n.clamp(min=1), torch.zeros_like(n))
        mean = self.mean + delta * w_b.unsqueeze(1)
        m2b = other.m2.to(self.m2.device)
        if self.covariance == "diag":
            m2 = self.m2 + m2b + delta * delta * cross.unsqueeze(1)
        elif self.covariance == "tied":
            m2 = self.m2 + m2b + (delta * cross.unsqueeze(1)).T @ delta
        else:  # in place: no (K, d, d) temporaries besides the result
            m2 = torch.add(self.m2, m2b).baddbmm_((delta * cross.unsqueeze(1)).unsqueeze(2), delta.unsqueeze(1))
        return GaussianStats(self.covariance, n, mean, m2)

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {"count": self.count.cpu().numpy(), "mean": self.mean.cpu().numpy(), "m2": self.m2.cpu().numpy()}

    @classmethod
    def from_numpy(cls, arrays, device=None, covariance: str = "full") -> GaussianStats:
        t = {k: torch.as_tensor(np.asarray(arrays[k]), dtype=torch.float64, device=device) for k in ("count", "mean", "m2")}
        k, d = t["mean"].shape if t["mean"].ndim == 2 else (-1, -1)
        want = {"full": (k, d, d), "diag": (k, d), "tied": (d, d)}[covariance]
        if t["count"].shape != (k,) or t["m2"].shape != want or k < 1 or d < 1:
            raise ValueError(
                f"stats: shapes count {tuple(t['count'].shape)}, mean {tuple(t['mean'].shape)}, "
                f"m2 {tuple(t['m2'].shape)} do not form {covariance!r} statistics"
            )
        if not all(bool(torch.isfinite(v).all()) for v in t.values()) or bool((t["count"] < 0).any()):
            raise ValueError("stats: non-finite values or negative counts")
        return cls(covariance, t["count"], t["mean"], t["m2"])


@register
class GaussianClassModel(ClassModel):
    """Class-conditional Gaussians (the paper's "GM": one Gaussian per class, not a mixture).

    Sigma_c is the maximum-likelihood covariance (divided by n_c) plus ``reg * I``.

    - ``covariance="full"``: one full covariance per class (the paper's model).
    - ``"diag"``: per-class variances; ``"tied"``: one pooled within-class covariance shared by
      all classes (cheap variants for large K and d).

    Defined fallbacks: a class with one sample gets covariance ``reg * I`` (full, diag) and
    relies on the pooled covariance (tied); a class with none gets log-likelihood -inf and a
    warning. With ``reg=0``, a singular covariance (collinear or constant features, a class of
    at most d samples; numerically, ``SINGULAR_TOL``) raises ``ValueError`` naming ``reg`` and
    the class.

    Parameters derived on fit (float64): ``means`` (K, d) and either ``precision_chol``
    (K, d, d) / (d, d) with Sigma^-1 = L L^T, or ``variances`` (K, d); ``log_norm`` (K,)
    = sum(log diag L) - d/2 log(2 pi).
    """

    kind = "gaussian"

    def __init__(self, covariance: str = "full", reg: float = 1e-4, prior: str = "uniform"):
        super().__init__(prior)
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance: expected one of {COVARIANCES}, got {covariance!r}")
        if isinstance(reg, bool) or not isinstance(reg, (int, float, np.integer, np.floating)):
            raise ValueError(f"reg: expected a finite number >= 0, got {reg!r}")
        reg = float(reg)
        if not (reg >= 0 and np.isfinite(reg)):
            raise ValueError(f"reg: expected a finite number >= 0, got {reg!r}")
        self.covariance = covariance
        self.reg = reg

    def config(self):
        return {"covariance": self.covariance, "reg": self.reg, **super().config()}

    def check_memory(self, num_classes: int, dim: int, device=None) -> None:
        """Refuse statistics that cannot fit in ``device``'s memory (see :func:`check_memory`)."""
        check_memory(self.covariance, check_num_classes(num_classes), dim, device)

    def _stats_type(self):
        return GaussianStats

    def _stats_options(self):
        return {"covariance": self.covariance}

    def _finalize(self, s: GaussianStats) -> dict:
        if s.covariance != self.covariance:
            raise ValueError(f"stats: {s.covariance!r} statistics cannot fit a {self.covariance!r} model")
        n, d = s.count, s.dim
        eye = torch.eye(d, dtype=torch.float64, device=n.device)
        if s.covariance == "diag":
            var = s.m2 / n.clamp(min=1).unsqueeze(1) + self.reg
            var = torch.where((n > 0).unsqueeze(1), var, torch.ones_like(var))
            overflow = torch.nonzero(~torch.isfinite(var).all(dim=1)).flatten().tolist()
            if overflow:
                raise ValueError(f"z: the variances of class(es) {overflow[:10]} overflow float64 (features of "
                                 "magnitude ~1e154 or more); rescale the features")
            bad = torch.nonzero(~(var > 0).all(dim=1)).flatten().tolist()
            if bad:
                raise ValueError(f"reg: class(es) {bad[:10]} have a zero variance; use reg > 0")
            return {"means": s.mean, "variances": var, "log_norm": -0.5 * torch.log(var).sum(dim=1) - 0.5 * d * LOG_2PI}
        if s.covariance == "tied":
            m2, scale = s.m2.unsqueeze(0), n.sum().reshape(1)
        else:
            m2, scale = s.m2, n.clamp(min=1)
            few = torch.nonzero((n > 1) & (n <= d)).flatten().tolist()
            if few and self.reg > 0:
                warnings.warn(f"covariance='full': class(es) {few[:10]} have at most d = {d} samples, so their "
                              f"covariance is singular but for reg = {self.reg:g} and their likelihoods are "
                              "overconfident; use covariance='diag' or 'tied', fewer features, or more samples",
                              FitWarning, stacklevel=4)  # _finalize, fit_stats, fit, the caller
        # Class by class in chunks: the (K, d, d) temporaries (Sigma, its factor and inverse) stay
        # small, so a fit (or a load) holds little more than the statistics and the result.
        prec_chol = torch.empty_like(m2)
        log_norm = torch.empty(m2.shape[0], dtype=torch.float64, device=n.device)
        bad, finite, top = [], True, 0.0
        step = max(1, FINALIZE_CHUNK_ELEMENTS // (d * d))
        for c0 in range(0, m2.shape[0], step):
            c1 = min(m2.shape[0], c0 + step)
            sigma = m2[c0:c1] / scale[c0:c1].view(-1, 1, 1) + self.reg * eye
            if s.covariance == "full":
                sigma = torch.where((n[c0:c1] > 0).view(-1, 1, 1), sigma, eye.expand_as(sigma))
            chol, info = torch.linalg.cholesky_ex(sigma)
            singular = info != 0
            if self.reg == 0 and not bool(singular.any()):
                # Rounding lets Cholesky pass a singular matrix; C_ii^2 / Sigma_ii is the fraction of
                # feature i's variance that the previous features leave unexplained.
                unexplained = (torch.diagonal(chol, dim1=-2, dim2=-1).square()
                               / torch.diagonal(sigma, dim1=-2, dim2=-1))
                singular = (unexplained <= SINGULAR_TOL).any(dim=-1)
            bad += (torch.nonzero(singular).flatten() + c0).tolist()
            finite = finite and bool(torch.isfinite(sigma).all())
            top = max(top, float(torch.diagonal(sigma, dim1=-2, dim2=-1).max()))
            if bad:
                continue  # no parameters will be returned: only the list of bad classes matters
            # Sigma = C C^T  =>  Sigma^-1 = C^-T C^-1 = L L^T with L = C^-T.
            c_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
            prec_chol[c0:c1] = c_inv.transpose(-1, -2)
            log_norm[c0:c1] = torch.log(torch.diagonal(c_inv, dim1=-2, dim2=-1)).sum(-1) - 0.5 * d * LOG_2PI
            del sigma, chol, c_inv
        if bad:
            which = "the tied covariance is" if s.covariance == "tied" else f"the covariance of class(es) {bad[:10]} is"
            if not finite:
                raise ValueError(f"z: {which} not finite (features too large for float64 products); rescale them")
            if self.reg > 0:
                raise ValueError(f"reg: {which} singular even with reg = {self.reg:g}: its variances reach {top:.3g}, "
                                 "so reg is too small to regularise it; rescale the features (z) or raise reg")
            raise ValueError(f"reg: {which} singular (not positive definite); use reg > 0")
        if s.covariance == "tied":
            return {"means": s.mean, "precision_chol": prec_chol[0], "log_norm": log_norm.expand(n.shape[0]).clone()}
        return {"means": s.mean, "precision_chol": prec_chol, "log_norm": log_norm}

    def _log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        k, d = self.means.shape
        out = torch.empty(z.shape[0], k, dtype=torch.float64, device=z.device)
        step = max(1, CHUNK_ELEMENTS // max(1, z.shape[0] * d))
        for c0 in range(0, k, step):
            c1 = min(k, c0 + step)
            diff = z.unsqueeze(1) - self.means[c0:c1].unsqueeze(0)  # (N, k, d)
            if self.covariance == "diag":
                maha = (diff * diff / self.variances[c0:c1]).sum(-1)
            elif self.covariance == "tied":
                u = diff @ self.precision_chol  # rows: (z - mu)^T L
                maha = (u * u).sum(-1)
            else:
                u = torch.einsum("nkd,kde->nke", diff, self.precision_chol[c0:c1])
                maha = (u * u).sum(-1)
            out[:, c0:c1] = -0.5 * maha + self.log_norm[c0:c1]
        return out
