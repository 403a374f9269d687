"""NumPy/torch interop for the reference: compute once, in torch, return what came in."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

Array = Any  # np.ndarray | torch.Tensor


def as_tensor(x: Array, name: str, *, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Return ``x`` as a torch tensor (zero-copy for NumPy arrays where possible)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        a = np.asarray(x)
        if a.dtype == object:
            raise TypeError(f"{name}: expected a numeric array, got an object array")
        t = torch.from_numpy(np.ascontiguousarray(a).reshape(a.shape))  # ascontiguousarray makes 0-d 1-d
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if device is not None:
        t = t.to(device)
    if dtype is not None:
        t = t.to(dtype)
    return t


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``. Host to GPU goes through pinned memory without blocking: a pageable
    copy would make the host wait for everything queued on the stream (e.g. a training step)."""
    device = torch.device(device)
    if device.type == "cuda" and not t.is_cuda:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def like(result: torch.Tensor, reference: Array) -> Array:
    """Return ``result`` as NumPy if ``reference`` was not a torch tensor."""
    if isinstance(reference, torch.Tensor):
        return result
    return result.detach().cpu().numpy()


def float_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The float dtype results are returned in: at least float32, float64 kept."""
    if x.dtype == torch.float64:
        return torch.float64
    return torch.float32


def check_float_features(z: torch.Tensor, name: str, *, dim: int | None = None) -> None:
    """Raise ``ValueError`` unless ``z`` is a finite float (N, d) matrix."""
    if not torch.is_floating_point(z):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {z.dtype}")
    if z.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, d), got {tuple(z.shape)}")
    if dim is not None and z.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} features per row (the model's d), got {z.shape[1]}")
    bad = ~torch.isfinite(z).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise ValueError(
            f"{name}: {int(bad.sum())} row(s) contain NaN or infinity (first rows: {rows}); "
            "features must be finite"
        )


def check_labels(y: torch.Tensor, name: str, num_classes: int, n: int | None = None) -> torch.Tensor:
    """Validate integer labels in [0, num_classes) and return them as int64."""
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise TypeError(f"{name}: expected integer class labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,), got {tuple(y.shape)}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels (one per row), got {y.shape[0]}")
    y = y.to(torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}) for num_classes={num_classes}; "
            f"got min {int(y.min())}, max {int(y.max())}"
        )
    return y


def check_num_classes(num_classes, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"{name}: expected a positive integer, got {num_classes!r}")
    return int(num_classes)


def check_unit_interval(value: float, name: str) -> float:
    if isinstance(value, (bool, np.bool_, str, bytes)):  # float() would take True and "0.5"
        raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")
    return v


def overlaps(a, b) -> bool:
    """Whether two arrays or tensors share memory (tensors: their byte ranges on one device).
    Cheap where they do not (the usual case): the kernels' hot paths ask it per call."""
    if isinstance(a, torch.Tensor):
        a0, b0 = a.data_ptr(), b.data_ptr()
        if not (a0 < b0 + _span(b) and b0 < a0 + _span(a)):
            return False
        return a.numel() > 0 and b.numel() > 0 and a.device == b.device
    return bool(np.may_share_memory(a, b))


def _span(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to just past its last one."""
    if t.is_contiguous():
        return t.numel() * t.element_size()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True) if n > 0)
    return (last + 1) * t.element_size()
