"""Model files: ``.npz`` archives that cannot execute code when loaded.

A file holds the model's arrays plus one JSON header (``__meta__``, stored as bytes) with the
model kind, its options, the format version and a SHA-256 digest over every array's name, dtype,
shape and bytes. Loading uses ``allow_pickle=False`` and checks the digest before building
anything, so a truncated or tampered file raises :class:`ModelFileError` and never yields a
half-loaded model.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zipfile
from typing import Any

import numpy as np

FORMAT = "fastgenlabel.classmodel"
VERSION = 1
_META = "__meta__"


class ModelFileError(ValueError):
    """A model file is unreadable, truncated, tampered with or of another format."""


def _digest(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_state(path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and the JSON-serialisable ``meta`` to ``path`` atomically."""
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype == object:
            raise TypeError(f"model state {name!r}: expected a numeric numpy array")
    header = dict(meta, format=FORMAT, version=VERSION)
    header["digest"] = _digest(arrays, header)
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    write_atomically(path, lambda f: np.savez(f, **payload))


def write_atomically(path, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the whole new one, and a failed write leaves no temporary behind."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; expected a file path")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:  # named by the path asked for, not the temporary
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno is None:
            raise
        raise type(e)(e.errno, e.strerror, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_state(path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify a model file; return ``(meta, arrays)``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ModelFileError(f"model file {path!r}: cannot read ({e.strerror})") from e
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("not an .npz archive")
        with archive as z:
            arrays = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        # NumPy reads other files as pickles, which it refuses, suggesting allow_pickle: not advice to pass on
        detail = "not an .npz archive" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise ModelFileError(f"model file {path!r} is truncated or not a fastgenlabel model ({detail})") from e
    if _META not in arrays:
        if "kind" in arrays and str(arrays["kind"]) == "thumbnail-pca":
            raise ModelFileError(f"model file {path!r} is a ThumbnailPCA feature map, not a class model: pass it "
                                 "as feature_map= (ThumbnailPCA.load reads it)")
        raise ModelFileError(f"model file {path!r} has no fastgenlabel header")
    try:
        header = json.loads(arrays.pop(_META).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"model file {path!r}: its header is corrupt") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"model file {path!r} is not a fastgenlabel class model")
    if header.get("version") != VERSION:
        raise ModelFileError(
            f"model file {path!r} has format version {header.get('version')!r}; this fastgenlabel reads {VERSION}"
        )
    digest = header.pop("digest", None)
    if digest != _digest(arrays, header):
        raise ModelFileError(f"model file {path!r} fails its checksum: it was modified or damaged after saving")
    header.pop("format")
    header.pop("version")
    return header, arrays
