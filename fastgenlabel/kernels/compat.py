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


def key_disk_cache_on(namespace: dict, *modules) -> int:
    """Make the on-disk cache of the Numba kernels in ``namespace`` depend on ``modules`` too.

    Numba checks a cached kernel against its own source file's modification time and size only,
    so after an edit of the scalar math it calls (``math.py``, another file) it would keep
    loading the old machine code. This adds a digest of those modules' sources to the stamp that
    each kernel's cache index is saved with and compared against (Numba's and numba-cuda's
    ``IndexDataCacheFile``; a dispatcher without that attribute, e.g. under the CUDA simulator,
    is left as it is). Returns the number of kernels keyed.
    """
    import hashlib
    import pathlib

    digest = hashlib.sha256()
    for module in modules:
        digest.update(pathlib.Path(module.__file__).read_bytes())
    tag = digest.hexdigest()[:16]
    keyed = 0
    for obj in namespace.values():
        cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)
        stamp = getattr(cache_file, "_source_stamp", None)
        if stamp is None:
            continue
        base = stamp[0] if isinstance(stamp, tuple) and len(stamp) == 2 and isinstance(stamp[1], str) else stamp
        cache_file._source_stamp = (base, tag)
        keyed += 1
    return keyed
