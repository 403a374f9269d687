"""Workarounds for known defects of the packages users have, each narrow and version-checked."""
from __future__ import annotations

import functools
import importlib.metadata as metadata
import importlib.util

import numpy as np


@functools.cache
def _version(dist: str) -> tuple[int, ...] | None:
    """The installed distribution's (major, minor, patch). Cached: a metadata lookup parses
    files (~0.35 ms), and the CUDA paths ask on every call."""
    try:
        raw = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in raw.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.cache
def numba_cuda_status() -> tuple[bool, str]:
    """Whether numba's CUDA target can be imported here, and why not."""
    if importlib.util.find_spec("numba") is None:
        return False, "numba is not installed"
    if _version("numba-cuda") is None and _version("numba") and _version("numba") >= (0, 61):
        return False, "numba-cuda is not installed (pip install 'fastgenlabel[cuda]')"
    return True, "ok"


def patch_numba_cuda_row_stack() -> bool:
    """numba-cuda <= 0.30 registers an overload for ``np.row_stack``, which numpy 2.5 removed,
    so compiling any kernel fails with AttributeError. Give numpy back the alias (it was exactly
    ``np.vstack``) for those versions only. Returns whether the patch was applied."""
    version = _version("numba-cuda")
    if version is None or version >= (0, 31) or hasattr(np, "row_stack"):
        return False
    np.row_stack = np.vstack  # type: ignore[attr-defined]
    return True
