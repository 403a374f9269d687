"""WebDataset tar shards: reading a shard's index from its headers, and keeping it between runs.

A tar shard's index (its samples' image members, offsets, sizes and labels) is read from its
headers once, then kept in a sidecar ``SHARD.tar.fglidx.npz`` (or, where the shard's folder is
not writable, in ``$XDG_CACHE_HOME/fastgenlabel/tar-index/``) and reused while the shard's size,
mtime, ctime and first and last 64 KiB are unchanged (a shard edited in place and its mtime set
back still gets a new ctime). A stale, foreign or unreadable sidecar is ignored and rewritten.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_SUFFIX = ".fglidx.npz"
INDEX_VERSION = 2
MAX_LABEL_DIGITS = 18  # a class index fits int64 (the DALI path's label kernel has the same rule)
MAX_LABEL_BYTES = 4096  # a label member holds one decimal index (and perhaps whitespace)
EDGE_BYTES = 1 << 16  # the shard's first and last bytes hashed into a sidecar's stamp


@dataclass(frozen=True)
class ShardIndex:
    """One tar shard's samples in tar order: image member names, their data's byte offsets and sizes, labels."""

    members: tuple
    offsets: np.ndarray  # (n,) int64
    sizes: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64


def index_shard(shard: str, image_exts: list, label_exts: list) -> ShardIndex:
    """Read ``shard``'s tar headers (and label members): the slow path :func:`cached_shard_index` saves."""
    labels, members, offsets, sizes = [], [], [], []
    size = os.stat(shard).st_size
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for key, group in _tar_samples(tar, size, shard):
                image = next((group[e] for e in image_exts if e in group), None)
                label = next((group[e] for e in label_exts if e in group), None)
                where = f"{shard!r}, sample {key!r} (members {sorted(group)})"
                if image is None:
                    raise ValueError(f"data: WebDataset shard {where} has no image member "
                                     f"({', '.join('.' + e for e in image_exts)})")
                if label is None:
                    raise ValueError(f"data: WebDataset shard {where} has no label member "
                                     f"({', '.join('.' + e for e in label_exts)})")
                labels.append(_read_label(tar, label, where))
                members.append(image.name)
                offsets.append(image.offset_data)
                sizes.append(image.size)
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"data: WebDataset shard {shard!r} is not a readable tar file (corrupt, truncated, "
                         f"or compressed: use uncompressed .tar shards): {e}") from e
    if not members:
        raise ValueError(f"data: WebDataset shard {shard!r} holds no samples")
    return ShardIndex(tuple(members), np.asarray(offsets, np.int64), np.asarray(sizes, np.int64),
                      np.asarray(labels, np.int64))


def _read_label(tar, member, where: str) -> int:
    """The decimal class index a label member holds (read whole; at most MAX_LABEL_BYTES)."""
    if member.size > MAX_LABEL_BYTES:
        raise ValueError(f"data: WebDataset shard {where}: label member {member.name!r} is {member.size} bytes; "
                         f"expected a decimal class index (at most {MAX_LABEL_BYTES} bytes)")
    text = tar.extractfile(member).read().decode("ascii", "replace").strip()
    if not re.fullmatch(r"[0-9]+", text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ValueError(f"data: WebDataset shard {where}: label member {member.name!r} holds "
                         f"{shown!r}, not a class index >= 0")
    if len(text) > MAX_LABEL_DIGITS:
        raise ValueError(f"data: WebDataset shard {where}: label member {member.name!r} holds {text}, too large "
                         f"for a class index (at most {MAX_LABEL_DIGITS} digits)")
    return int(text)


def cached_shard_index(shard: str, image_exts: list, label_exts: list) -> ShardIndex:
    """``shard``'s index from its sidecar when that matches the shard; else :func:`index_shard`, then saved.

    The sidecar goes next to the shard, or into :func:`index_cache_dir` when that fails; when
    neither can be written the index is simply not kept. Saving is atomic (a temporary file, then
    ``os.replace``), so concurrent ranks at worst index the same shard twice.
    """
    stamp = _index_stamp(shard, image_exts, label_exts)
    places = sidecar_paths(shard)
    for path in places:
        index = _load_index(path, stamp)
        if index is not None:
            return index
    index = index_shard(shard, image_exts, label_exts)
    if _index_stamp(shard, image_exts, label_exts) != stamp:  # the shard changed while it was read
        return index
    for path in places:
        try:
            _save_index(path, index, stamp)
            break
        except (OSError, ValueError):  # a folder that cannot be written; a member name that cannot be encoded
            continue
    return index


def index_cache_dir() -> Path:
    """Where the sidecars of shards in folders that cannot be written go: ``$XDG_CACHE_HOME/fastgenlabel/tar-index``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "fastgenlabel" / "tar-index"


def sidecar_paths(shard: str) -> tuple[Path, Path]:
    """The sidecar next to ``shard``, and its place in the cache folder (keyed by the shard's real path)."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(shard))).hexdigest()[:24]
    return Path(shard + INDEX_SUFFIX), index_cache_dir() / f"{Path(shard).name}-{key}{INDEX_SUFFIX}"


def _index_stamp(shard: str, image_exts: list, label_exts: list) -> dict:
    """What a sidecar must match: format version, the member extensions read, and the shard's size,
    mtime, ctime (which changes with any write, and which no ``os.utime`` can set back) and a hash
    of its first and last EDGE_BYTES (a content check where a file system keeps no reliable ctime)."""
    with open(shard, "rb") as f:
        st = os.fstat(f.fileno())
        digest = hashlib.sha256(f.read(EDGE_BYTES))
        if st.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return {"version": INDEX_VERSION, "shard_size": st.st_size, "shard_mtime_ns": st.st_mtime_ns,
            "shard_ctime_ns": st.st_ctime_ns, "shard_edges_sha256": digest.hexdigest(),
            "image_ext": ";".join(image_exts), "label_ext": ";".join(label_exts)}


def _save_index(path: Path, index: ShardIndex, stamp: dict) -> None:
    names = [os.fsencode(m) for m in index.members]
    arrays = {k: np.asarray(v) for k, v in stamp.items()}
    arrays.update(names=np.frombuffer(b"".join(names), np.uint8), name_ends=np.cumsum([len(n) for n in names]),
                  offsets=index.offsets, sizes=index.sizes, labels=index.labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_index(path: Path, stamp: dict) -> ShardIndex | None:
    """The index saved at ``path`` if it is readable, consistent and made from this very shard; else None."""
    try:
        return _read_index(path, stamp)
    except Exception:  # noqa: BLE001 - missing, truncated, foreign or corrupt: index the shard again
        return None


def _read_index(path: Path, stamp: dict) -> ShardIndex | None:
    with np.load(path, allow_pickle=False) as z:
        if any(z[k].shape != () or z[k].item() != v for k, v in stamp.items()):
            return None
        blob, ends = z["names"].tobytes(), z["name_ends"].astype(np.int64)
        offsets, sizes, labels = (z[k].astype(np.int64) for k in ("offsets", "sizes", "labels"))
    n = len(ends)
    if not (n and ends.shape == offsets.shape == sizes.shape == labels.shape == (n,) and ends[-1] == len(blob)
            and (np.diff(ends, prepend=0) > 0).all() and labels.min() >= 0 and sizes.min() >= 0
            and offsets.min() >= 0 and (offsets + sizes).max() <= stamp["shard_size"]):
        return None
    starts = np.concatenate([[0], ends[:-1]]).tolist()
    members = tuple(os.fsdecode(blob[a:b]) for a, b in zip(starts, ends.tolist()))
    return ShardIndex(members, offsets, sizes, labels)


def _tar_samples(tar, file_size: int, shard: str):
    """(key, {extension: TarInfo}) for each run of consecutive file members sharing a key.

    A key names one sample: a run that holds an extension twice is two samples under one key
    (WebDataset would merge them, keeping one image and one label), and is refused.
    """
    key, group = None, {}
    for m in tar:
        if not m.isfile():
            continue
        if m.offset_data + m.size > file_size:
            raise tarfile.ReadError(f"member {m.name!r} ends past the end of the file (truncated)")
        folder, _, base = m.name.rpartition("/")
        stem, dot, ext = base.partition(".")
        k = f"{folder}/{stem}" if folder else stem
        if k != key:
            if group:
                yield key, group
            key, group = k, {}
        if dot:
            if ext.lower() in group:
                raise ValueError(f"data: WebDataset shard {shard!r}: key {k!r} names two samples (members "
                                 f"{group[ext.lower()].name!r} and {m.name!r}); a key must identify one sample")
            group[ext.lower()] = m
    if tar.offset + tarfile.BLOCKSIZE > file_size:  # tarfile stops quietly when a cut falls between members
        raise tarfile.ReadError("no end-of-archive marker (truncated)")
    if group:
        yield key, group
