"""Mixing inputs and mixup targets: the plain reference."""
from __future__ import annotations

import torch

from ._arrays import Array, as_tensor, check_labels, check_num_classes, check_unit_interval, float_dtype_of, like
from .pairs import MixPairs


def _lam_column(pairs: MixPairs, ndim: int, dtype: torch.dtype, device) -> torch.Tensor:
    return pairs.lam.to(device=device, dtype=dtype).reshape((-1,) + (1,) * (ndim - 1))


def check_pairs(pairs: MixPairs, batch_size: int, name: str = "pairs") -> None:
    if not isinstance(pairs, MixPairs):
        raise TypeError(f"{name}: expected MixPairs (from sample_pairs), got {type(pairs).__name__}")
    if len(pairs) != batch_size:
        raise ValueError(f"{name}: drawn for a batch of {len(pairs)}, but the batch has {batch_size} samples")


def mix(x: Array, pairs: MixPairs) -> Array:
    """Mix a batch with its partners: ``lam * x + (1 - lam) * x[perm]`` along the first axis.

    Args:
        x: (B, ...) float array or tensor (inputs, features, images already in float).
        pairs: the batch's MixPairs.

    Returns:
        The mixed batch, same shape and type as ``x``, computed in at least float32.
    """
    t = as_tensor(x, "x")
    if not t.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point batch, got dtype {t.dtype}")
    if t.ndim < 1:
        raise ValueError("x: expected a batch with a leading sample axis")
    check_pairs(pairs, t.shape[0])
    work = float_dtype_of(t)
    lam = _lam_column(pairs, t.ndim, work, t.device)
    tw = t.to(work)
    out = lam * tw + (1 - lam) * tw[pairs.perm.to(t.device)]
    return like(out.to(t.dtype), x)


def one_hot(y: Array, num_classes: int, *, dtype=torch.float32) -> Array:
    """(N,) integer labels to an (N, K) one-hot matrix."""
    k = check_num_classes(num_classes)
    t = check_labels(as_tensor(y, "y"), "y", k)
    out = torch.nn.functional.one_hot(t, k).to(dtype)
    return like(out, y)


def smooth_labels(target: Array, smoothing: float) -> Array:
    """Label smoothing in timm's convention: ``(1 - eps) * t + eps / K``."""
    eps = check_unit_interval(smoothing, "smoothing")
    t = as_tensor(target, "target")
    return like(t * (1 - eps) + eps / t.shape[-1], target)


def mixup_target(y: Array, pairs: MixPairs, num_classes: int, *, smoothing: float = 0.0) -> Array:
    """The mixup label ``lam * e(y) + (1 - lam) * e(y[perm])``, optionally smoothed.

    Args:
        y: (B,) integer labels in [0, num_classes).
        pairs: the batch's MixPairs.
        num_classes: K.
        smoothing: label-smoothing epsilon in [0, 1].

    Returns:
        (B, K) float32 target, rows summing to 1.
    """
    k = check_num_classes(num_classes)
    yt = check_labels(as_tensor(y, "y"), "y", k)
    check_pairs(pairs, yt.shape[0])
    perm = pairs.perm.to(yt.device)
    return like(_mixup_target(yt, yt[perm], pairs.lam.to(yt.device), k, smoothing), y)


def _mixup_target(y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, k: int, smoothing: float,
                  dtype=torch.float32) -> torch.Tensor:
    lam = lam.to(dtype).reshape(-1, 1)
    t = lam * torch.nn.functional.one_hot(y_a, k).to(dtype) + (1 - lam) * torch.nn.functional.one_hot(y_b, k).to(dtype)
    eps = check_unit_interval(smoothing, "smoothing")
    return t * (1 - eps) + eps / k if eps else t
