"""A fitted class model, packed into the flat arrays the relabel kernels read (float32; the bias float64).

Parameters reach the kernels as arrays, never as compiled-in constants, so refitting a model
never recompiles. Packing reads only the models' public attributes (``means``, ``variances``,
``precision_chol``, ``log_norm``, ``log_prior``, ``class_counts``, ``class_points``,
``kernel_chol``), derives everything in float64 and rounds once to float32 (all but ``bias``).

What each kind packs (K classes, d features, M kept KDE points), in terms of docs/MATH.md:

- every kind: ``bias`` (K,) float64 = log_norm_c + log_prior_c minus its largest finite value (a
  constant, which the softmax ignores), ``-inf`` for empty classes. The one float64 array: the
  kernels form each logit, score + bias, in float64 and keep it relative to its row's largest.
- ``diag``: ``mu_t`` (d, K) and ``istd_t`` (d, K) = 1 / sqrt(var), feature-major so that the
  CPU's inner loop and the GPU's threads run over classes on contiguous memory.
  Raw score: -1/2 sum_i ((z_i - mu_ci) istd_ci)^2.
- ``tied`` (shared precision P = L L^T, centre m = the training mean): whitened, then as
  ``diag`` with unit scales. With y = L^T (z - m) and t_c = L^T (mu_c - m),
  log p_c(z) = -1/2 ||y - t_c||^2 + log_norm_c. Packs ``center`` (d,) = m, ``chol`` (d, d) = L,
  ``mu_t`` (d, K) = t_c feature-major and ``istd_t`` (d, K) = 1. The kernels whiten the unmixed
  samples (one (B, d) x (d, d) product; whitening is linear, so it commutes with mixing) and run
  the diag kernels on y. The affine form w_c^T (z - m) - 1/2 ||t_c||^2 cancels terms of the size
  of the classes' squared Mahalanobis distance from m in float32; on the CPU ``linear.py`` uses
  it all the same, with a bound on that error and exact rescoring where it could matter.
- ``full``: ``center`` (K, d) = the class means and ``factor`` (K, d, d) = the model's precision
  Cholesky factor L_c (Sigma_c^-1 = L_c L_c^T), both with their features permuted by ``order``
  (d,) int64 so that the factor is lower triangular (``tri``; see :func:`_feature_order`).
  Raw score: -1/2 ||u||^2, u_j = sum_{i >= j} diff_i factor[c, i, j], diff_i = z_mix[order[i]] -
  center[c, i]: ||u|| = ||L_c^T (z_mix - mu_c)||.
- ``kde``: per class the inverse kernel Cholesky factor A_c = C_c^-1 (kernel covariance
  C_c C_c^T), stored transposed, ``factor[c] = A_c^T``, so that whitening has exactly the
  full-covariance form u = factor[c]^T (z - centre_c); ``center`` (K, d) = the class's mean
  point; ``points`` (M, d) = whitened points minus their class mean, class after class;
  ``offsets`` (K + 1,) int64; features permuted by ``order`` as for ``full`` (distances do not
  change). Raw score: logsumexp_j -1/2 ||u - x_j||^2 (the kernel's normaliser and -log n_c are
  in the bias).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...models import GaussianClassModel, KDEClassModel

KINDS = ("diag", "tied", "full", "kde")
_CACHE_ATTR = "_fastgenlabel_relabel_params"


@dataclass(frozen=True)
class RelabelParams:
    """A model's kernel parameters (host copies). Treat the arrays as read-only.

    Attributes:
        kind: "diag", "tied", "full" or "kde".
        num_classes: K.
        dim: d.
        tri: ``factor`` is lower triangular (the kernels then skip its zero half).
        arrays: name -> C-contiguous float32 array (``offsets``: int64); see the module docstring.
    """

    kind: str
    num_classes: int
    dim: int
    tri: bool
    arrays: dict[str, np.ndarray]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def model_kind(model) -> str | None:
    """The packed kind of ``model``, or None if the kernels do not support it."""
    if type(model) is GaussianClassModel:
        return model.covariance
    if type(model) is KDEClassModel:
        return "kde"
    return None


def unsupported_reason(model) -> str | None:
    """Why the kernels cannot run ``model`` (None: they can)."""
    if model_kind(model) is None:
        return (f"model: the kernels support GaussianClassModel (full, diag, tied) and KDEClassModel, "
                f"got {type(model).__name__}")
    return None


def _f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _bias(model) -> np.ndarray:
    """log_norm + log_prior in float64, shifted so its largest finite entry is 0; -inf if empty."""
    counts = model.class_counts.detach().to("cpu", torch.float64)
    b = model.log_norm.detach().to("cpu", torch.float64) + model.log_prior.detach().to("cpu", torch.float64)
    b = torch.where(counts > 0, b, torch.full_like(b, -math.inf))
    finite = torch.isfinite(b)
    if not bool(finite.any()):
        raise ValueError("model: no class has a finite log-likelihood constant (every class is empty)")
    return torch.where(finite, b - b[finite].max(), torch.full_like(b, -math.inf)).numpy()


def _feature_order(factor: torch.Tensor) -> tuple[np.ndarray, bool]:
    """The feature order in which the (K, d, d) factors are lower triangular, and whether any is.

    u_j = sum_i diff_i F[i, j] is invariant in norm under a common permutation of i and j, so the
    kernels read features in ``order``: reversed for an upper triangular F (the models' L = C^-T),
    as is for a lower one, and as is (``tri`` False: full loops) for anything else. Lower, the
    CPU's KDE whitening loop ``for j in range(i + 1)`` starts at 0, which Numba vectorises well
    (an upper loop ``range(i, d)`` ran several times slower), and the GPU kernels skip the zeros.
    """
    d = factor.shape[-1]
    if bool(torch.equal(torch.tril(factor, diagonal=-1), torch.zeros_like(factor))):
        return np.arange(d - 1, -1, -1, dtype=np.int64), True
    if bool(torch.equal(torch.triu(factor, diagonal=1), torch.zeros_like(factor))):
        return np.arange(d, dtype=np.int64), True
    return np.arange(d, dtype=np.int64), False


def pack(model) -> RelabelParams:
    """Pack a fitted model (no caching; see :func:`params_for`)."""
    kind = model_kind(model)
    if kind is None:
        raise TypeError(unsupported_reason(model))
    k, d = model.num_classes, model.dim
    counts = model.class_counts.detach().to("cpu", torch.float64)
    arrays: dict[str, np.ndarray] = {}
    tri = True
    if kind == "diag":
        means = model.means.detach().to("cpu", torch.float64)
        var = model.variances.detach().to("cpu", torch.float64)
        arrays["mu_t"] = _f32(means.T)
        arrays["istd_t"] = _f32(torch.rsqrt(var).T)
    elif kind == "tied":
        means = model.means.detach().to("cpu", torch.float64)
        chol = model.precision_chol.detach().to("cpu", torch.float64)
        live = counts > 0
        arrays["center"] = _f32((means * counts.unsqueeze(1)).sum(0) / counts.sum())
        arrays["chol"] = _f32(chol)
        # t_c around the float32 m and L the kernels whiten with (y = (z - m) L), so that y - t_c is
        # (z - mu_c) L exactly up to rounding, whatever offset the features share
        t = (means - torch.from_numpy(arrays["center"]).double()) @ torch.from_numpy(arrays["chol"]).double()
        t = torch.where(live.unsqueeze(1), t, torch.zeros_like(t))
        arrays["mu_t"] = _f32(t.T)
        arrays["istd_t"] = np.ones((d, k), np.float32)
    elif kind == "full":
        means = model.means.detach().to("cpu", torch.float64)
        chol = model.precision_chol.detach().to("cpu", torch.float64)
        order, tri = _feature_order(chol)
        idx = torch.from_numpy(order)
        arrays["order"] = order
        arrays["center"] = _f32(means[:, idx])
        arrays["factor"] = _f32(chol[:, idx][:, :, idx])
    else:  # kde
        centers = np.zeros((k, d), np.float64)
        factors = np.zeros((k, d, d), np.float64)
        pts, offsets = [], [0]
        for c in range(k):
            x = model.class_points[c].detach().to("cpu", torch.float64)
            chol = model.kernel_chol[c].detach().to("cpu", torch.float64)
            eye = torch.eye(d, dtype=torch.float64)
            if x.shape[0]:
                wmean = x.mean(0)
                centers[c] = (chol @ wmean).numpy()
                x = x - wmean
                a = torch.linalg.solve_triangular(chol, eye, upper=False)  # C^-1, lower triangular
                factors[c] = a.T.numpy()
            else:
                factors[c] = eye.numpy()
            pts.append(x.numpy())
            offsets.append(offsets[-1] + x.shape[0])
        order, tri = _feature_order(torch.from_numpy(factors))
        arrays["order"] = order
        arrays["center"] = _f32(centers[:, order])
        arrays["factor"] = _f32(factors[:, order][:, :, order])
        arrays["points"] = _f32(np.concatenate(pts)[:, order])  # whitened coordinates, kernel order
        arrays["offsets"] = np.asarray(offsets, dtype=np.int64)
    arrays["bias"] = _bias(model)  # float64: the kernels form logits in float64 (cpu.py, cuda.py)
    return RelabelParams(kind, k, d, tri, arrays)


@dataclass
class _Cache:
    stats: Any
    config: dict
    host: RelabelParams
    devices: dict = field(default_factory=dict)  # device -> {name: torch.Tensor}
    views: dict = field(default_factory=dict)  # device -> {name: kernel view of that tensor}
    gemm: dict = field(default_factory=dict)  # "host" -> arrays, device -> tensors (gemm.py's form)
    typical_error: float | None = None  # gemm.pack's error bound at a typical sample
    linear: dict | None = None  # linear.pack's host arrays (diag, tied)
    linear_devices: dict = field(default_factory=dict)  # device -> linear.pack's arrays as tensors (CUDA form)


def _cache(model) -> _Cache:
    model._require_fitted()
    cache = model.__dict__.get(_CACHE_ATTR)
    config = model.config()
    if cache is None or cache.stats is not model.stats or cache.config != config:
        # The cache holds the statistics object it was packed from: a refit replaces
        # model.stats, so identity (not an id() that could be reused) detects it.
        cache = _Cache(model.stats, config, pack(model))
        model.__dict__[_CACHE_ATTR] = cache
    return cache


def params_for(model) -> RelabelParams:
    """The model's packed parameters, cached on the model until it is refitted or reconfigured."""
    return _cache(model).host


def device_params_for(model, device: torch.device, view=None) -> dict[str, Any]:
    """The packed arrays as torch tensors on ``device``, uploaded once and cached with the host
    copy; with ``view`` (a function of a tensor, e.g. ``_interop.device_view``), the cached views
    of those tensors instead, so a call creates no views either."""
    cache = _cache(model)
    key = str(torch.device(device))
    tensors = cache.devices.get(key)
    if tensors is None:
        tensors = {name: torch.from_numpy(a).to(device) for name, a in cache.host.arrays.items()}
        cache.devices[key] = tensors
    if view is None:
        return tensors
    views = cache.views.get(key)
    if views is None:
        views = {name: view(t) for name, t in tensors.items()}
        cache.views[key] = views
    return views


def gemm_params_for(model, device: torch.device) -> dict[str, torch.Tensor]:
    """The full-covariance product form (``gemm.pack``) as tensors on ``device``, packed and
    uploaded once per fit, cached with the other forms: W as split TF32 halves on CUDA
    (``w_hi``, ``w_lo``), W itself (``w``) elsewhere."""
    from . import gemm

    cache = _cache(model)
    key = str(torch.device(device))
    if key not in cache.gemm:
        tensors = {name: torch.from_numpy(a).to(device) for name, a in _gemm_host(cache, model).items()}
        if torch.device(device).type == "cuda":  # tensor cores: W as TF32-exact halves
            tensors["w_hi"], tensors["w_lo"] = gemm.split_tf32(tensors.pop("w"))
        cache.gemm[key] = tensors
    return cache.gemm[key]


def gemm_typical_error_for(model) -> float:
    """The product form's error bound at a typical sample (``gemm.pack``), which ``gemm.use_gemm``
    checks; once per fit. A model it keeps on the factor form does not keep W in memory."""
    from . import gemm

    cache = _cache(model)
    if cache.typical_error is None:
        _gemm_host(cache, model)
        if cache.typical_error > gemm.MAX_TYPICAL_ERROR:
            del cache.gemm["host"]["w"]  # packed again if POLICY "always" asks for it
    return cache.typical_error


def _gemm_host(cache: _Cache, model) -> dict[str, np.ndarray]:
    """``gemm.pack``'s host arrays, packed once per fit (again if W was let go)."""
    from . import gemm

    if cache.host.kind != "full":
        raise ValueError(f"model: the product form is for full covariance, got {cache.host.kind!r}")
    host = cache.gemm.get("host")
    if host is None or "w" not in host:
        host, cache.typical_error = gemm.pack(model)
        cache.gemm["host"] = host
    return host


def linear_params_for(model, device: torch.device | None = None):
    """The diag/tied product form (``linear.pack``), packed once per fit: host arrays (``device``
    None, the CPU path), or the CUDA path's form as tensors on ``device``, uploaded once and cached
    with them: W as its TF32-exact halves ``w_hi``, ``w_lo`` (K, ``linear.width``), zero padded, for
    ``gemm.split_scores``, and the other arrays as they are."""
    from . import gemm, linear

    cache = _cache(model)
    if cache.linear is None:
        if cache.host.kind not in ("diag", "tied"):
            raise ValueError(f"model: the linear product form is for diag or tied, got {cache.host.kind!r}")
        cache.linear = linear.pack(model, cache.host.arrays["bias"])
    if device is None:
        return cache.linear
    key = str(torch.device(device))
    if key not in cache.linear_devices:
        host = cache.linear
        tensors = {name: torch.from_numpy(a).to(device) for name, a in host.items() if name != "w"}
        k, t = host["w"].shape
        w = np.zeros((k, linear.width(t)), np.float32)
        w[:, :t] = host["w"]
        tensors["w_hi"], tensors["w_lo"] = gemm.split_tf32(torch.from_numpy(w).to(device))
        cache.linear_devices[key] = tensors
    return cache.linear_devices[key]


def linear_views_for(model, device: torch.device, view) -> dict[str, Any]:
    """Cached kernel views (``view``, e.g. ``_interop.device_view``) of :func:`linear_params_for`'s
    tensors on ``device`` other than W's halves (the kernels read those; torch multiplies by W)."""
    tensors = linear_params_for(model, device)
    cache = _cache(model)
    key = (str(torch.device(device)), "views")
    if key not in cache.linear_devices:
        cache.linear_devices[key] = {name: view(t) for name, t in tensors.items() if not name.startswith("w_")}
    return cache.linear_devices[key]
