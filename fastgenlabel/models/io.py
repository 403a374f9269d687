"""Model files: ``.npz`` archives that cannot execute code when loaded.

A file holds the model's arrays plus one JSON header (``__meta__``, stored as bytes) with the
model kind, its options, the format version and a SHA-256 digest over every array's name, dtype,
shape and bytes. Loading uses ``allow_pickle=False`` and checks the digest before building
anything, so a truncated or tampered file raises :class:`ModelFileError` and never yields a
half-loaded model. Feature maps (:class:`fastgenlabel.features.ThumbnailPCA`) use the same
container under their own format name.

Loading reads each array once, straight from the archive into its final buffer, and hashes that
buffer in place: the arrays themselves are the only copy of the file in memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import zipfile
from typing import Any

import numpy as np

FORMAT = "fastgenlabel.classmodel"
FEATURE_MAP_FORMAT = "fastgenlabel.featuremap"
VERSION = 1
_META = "__meta__"


class ModelFileError(ValueError):
    """A model or feature-map file is unreadable, truncated, tampered with or of another format."""


def _hash_array(h, name: str, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)  # no copy for the C-ordered arrays np.savez writes and np.load reads
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.reshape(-1).view(np.uint8))  # the bytes of tobytes(), without copying them


def _digest(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        _hash_array(h, name, arrays[name])
    return h.hexdigest()


def header_of(meta: dict[str, Any], arrays: dict[str, np.ndarray], format: str = FORMAT) -> dict[str, Any]:
    """The JSON header :func:`save_state` writes for ``meta`` and ``arrays``, its ``digest`` included."""
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype == object:
            raise TypeError(f"model state {name!r}: expected a numeric numpy array")
    header = dict(meta, format=format, version=VERSION)
    header["digest"] = _digest(arrays, header)
    return header


def save_state(path, meta: dict[str, Any], arrays: dict[str, np.ndarray], format: str = FORMAT) -> str:
    """Write ``arrays`` and the JSON-serialisable ``meta`` to ``path`` atomically; return the digest."""
    header = header_of(meta, arrays, format)
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    write_atomically(path, lambda f: np.savez(f, **payload))
    return header["digest"]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


def _remove_stale_temporaries(path: str) -> None:
    """Remove ``NAME.tmp<pid>[.<host>]`` siblings of ``path`` left by writers of this host that were
    killed (SIGKILL cannot be caught): their process no longer exists. Temporaries of live processes
    and of other hosts (a shared folder) are left alone."""
    if os.name != "posix":  # os.kill(pid, 0) only probes on POSIX
        return
    folder, name = os.path.split(path)
    pattern = re.compile(re.escape(name) + r"\.tmp(\d+)(?:\.(.+))?")
    try:
        siblings = os.listdir(folder or ".")
    except OSError:
        return
    host = _host()
    for sibling in siblings:
        m = pattern.fullmatch(sibling)
        if not m or (m.group(2) is not None and m.group(2) != host) or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, sibling))
        except (PermissionError, OverflowError, OSError):
            pass  # alive under another user, or not a pid: not ours to judge


def write_atomically(path, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the whole new one, and a failed write leaves no temporary behind.

    The temporary is ``NAME.tmp<pid>.<host>``; a writer that was killed outright leaves it, and the
    next write to ``path`` from the same host removes it once that process is gone.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; expected a file path")
    _remove_stale_temporaries(path)
    tmp = f"{path}.tmp{os.getpid()}.{_host()}"
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


def read_verified(path, format: str = FORMAT, what: str = "model file"
                  ) -> tuple[dict[str, Any] | None, dict[str, np.ndarray], str | None]:
    """Read an archive and check its digest; return ``(header, arrays, digest)``.

    ``header`` is None (and ``digest`` None) for an archive without a fastgenlabel header; the
    caller decides what that means. ``header`` has ``format``, ``version`` and ``digest`` removed.
    Raises ModelFileError naming ``path`` (as ``what``) on an unreadable, truncated or tampered
    file, or one of another format or version.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelFileError(f"{what} {path!r}: cannot read ({e.strerror})") from e
    try:
        with f:
            archive = np.load(f, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy array
                raise ValueError("not an .npz archive")
            with archive as z:
                names = list(z.files)
                if _META not in names:
                    return None, {name: z[name] for name in names}, None
                header = _parse_header(z[_META], path, format, what)
                digest = header.pop("digest", None)
                h = hashlib.sha256()
                h.update(json.dumps(header, sort_keys=True).encode())
                arrays = {}
                for name in sorted(n for n in names if n != _META):
                    arrays[name] = z[name]  # one array at a time, hashed where it lies
                    _hash_array(h, name, arrays[name])
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        # NumPy reads other files as pickles, which it refuses, suggesting allow_pickle: not advice to pass on
        detail = "not an .npz archive" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        kind = "model" if format == FORMAT else "feature map"
        raise ModelFileError(f"{what} {path!r} is truncated or not a fastgenlabel {kind} ({detail})") from e
    if digest != h.hexdigest():
        raise ModelFileError(f"{what} {path!r} fails its checksum: it was modified or damaged after saving")
    header.pop("format")
    header.pop("version")
    return header, arrays, digest


def _parse_header(raw: np.ndarray, path: str, format: str, what: str) -> dict[str, Any]:
    try:
        header = json.loads(np.ascontiguousarray(raw).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{what} {path!r}: its header is corrupt") from e
    if not isinstance(header, dict) or header.get("format") != format:
        if isinstance(header, dict) and header.get("format") == FEATURE_MAP_FORMAT and format == FORMAT:
            raise ModelFileError(f"{what} {path!r} is a ThumbnailPCA feature map, not a class model: pass it "
                                 "as feature_map= (ThumbnailPCA.load reads it)")
        if isinstance(header, dict) and header.get("format") == FORMAT and format == FEATURE_MAP_FORMAT:
            raise ModelFileError(f"{what} {path!r} is a class model, not a feature map: pass it as model=")
        expected = "class model" if format == FORMAT else "feature map"
        raise ModelFileError(f"{what} {path!r} is not a fastgenlabel {expected}")
    if header.get("version") != VERSION:
        raise ModelFileError(
            f"{what} {path!r} has format version {header.get('version')!r}; this fastgenlabel reads {VERSION}"
        )
    return header



def load_state(path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify a model file; return ``(meta, arrays)``."""
    path = os.fspath(path)
    header, arrays, _ = read_verified(path)
    if header is None:
        if "kind" in arrays and str(arrays["kind"]) == "thumbnail-pca":
            raise ModelFileError(f"model file {path!r} is a ThumbnailPCA feature map, not a class model: pass it "
                                 "as feature_map= (ThumbnailPCA.load reads it)")
        raise ModelFileError(f"model file {path!r} has no fastgenlabel header")
    return header, arrays
