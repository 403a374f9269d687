"""GenLabel labels and training targets (docs/MATH.md section 3): the plain reference."""
from __future__ import annotations

import math

import torch

from ._arrays import (
    Array,
    as_tensor,
    check_float_features,
    check_labels,
    check_num_classes,
    check_unit_interval,
    like,
)
from .mixing import _mixup_target


def genlabel_posterior(log_joint: Array, *, top2: bool = False) -> Array:
    """GenLabel's label from per-class log-joints ``log p_c(z) + log pi_c``.

    Args:
        log_joint: (N, K) log-likelihoods plus log-priors.
        top2: keep only the two classes of highest log-joint, weighted by a sigmoid of their
            difference (the authors' synthetic-data variant; with a uniform prior that is the
            log-likelihood difference, as in the paper).

    Returns:
        (N, K) softmax over classes, float64.
    """
    lj = as_tensor(log_joint, "log_joint").to(torch.float64)
    if lj.ndim != 2:
        raise ValueError(f"log_joint: expected shape (N, K), got {tuple(lj.shape)}")
    if lj.shape[0] and bool(torch.isnan(lj).any() | torch.isposinf(lj).any()):
        raise ValueError("log_joint: contains NaN or +inf")
    if lj.shape[0] and bool(torch.isneginf(lj).all(dim=1).any()):
        raise ValueError("log_joint: a row has -inf for every class (no class can explain the sample)")
    if top2 and lj.shape[1] > 2:
        second = torch.topk(lj, 2, dim=1).values[:, 1:2]
        # Ties at the second place keep every tied class; ties are measure-zero for real data.
        lj = torch.where(lj >= second, lj, torch.full_like(lj, -math.inf))
    return like(torch.softmax(lj, dim=1), log_joint)


def genlabel_target(
    model,
    z_mix: Array,
    y_a: Array,
    y_b: Array,
    lam,
    gamma: float = 1.0,
    *,
    num_classes: int,
    smoothing: float = 0.0,
    top2: bool = False,
) -> Array:
    """The GenLabel training target ``t = gamma * y_gen + (1 - gamma) * y_mix``.

    Args:
        model: a fitted class model (``GaussianClassModel`` or ``KDEClassModel``).
        z_mix: (N, d) features of the mixed samples.
        y_a: (N,) labels of the samples; y_b: (N,) labels of their partners.
        lam: mixing weight of ``y_a``: a float or an (N,) array, each in [0, 1].
        gamma: weight of the GenLabel label, in [0, 1]; 0 gives the mixup target.
        num_classes: K; must equal the model's.
        smoothing: label-smoothing epsilon applied to t (timm's convention).
        top2: use the top-2 variant of the GenLabel label.

    Returns:
        (N, K) float32 target (float64 if ``z_mix`` is float64), rows summing to 1.
    """
    k = check_num_classes(num_classes)
    g = check_unit_interval(gamma, "gamma")
    eps = check_unit_interval(smoothing, "smoothing")
    if model.num_classes != k:
        raise ValueError(f"num_classes: {k}, but the model was fitted for {model.num_classes} classes")
    z = as_tensor(z_mix, "z_mix")
    check_float_features(z, "z_mix", dim=model.dim)
    n = z.shape[0]
    ya = check_labels(as_tensor(y_a, "y_a"), "y_a", k, n=n)
    yb = check_labels(as_tensor(y_b, "y_b"), "y_b", k, n=n)
    lam_t = as_tensor(lam, "lam").to(torch.float64)
    if lam_t.ndim == 0:
        lam_t = lam_t.expand(n)
    if lam_t.shape != (n,):
        raise ValueError(f"lam: expected a scalar or shape ({n},), got {tuple(lam_t.shape)}")
    if n and not bool(((lam_t >= 0) & (lam_t <= 1)).all()):
        raise ValueError(f"lam: values must lie in [0, 1], got [{float(lam_t.min())}, {float(lam_t.max())}]")
    out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    y_mix = _mixup_target(ya, yb, lam_t.to(ya.device), k, 0.0, dtype=torch.float64)
    t = y_mix
    if g > 0 and n:
        lj = as_tensor(model.log_joint(z), "log_joint").to(y_mix.device)
        t = g * genlabel_posterior(lj, top2=top2) + (1 - g) * y_mix
    if eps:
        t = t * (1 - eps) + eps / k
    return like(t.to(out_dtype), z_mix)
