"""The samples a loader reads: a folder of class sub-folders or a file list, checked once.

Sample i is ``paths[i]`` with class ``labels[i]``; the order (sorted class folders, then sorted
file names; or the file list's order) is the order of stored embeddings and of sample indices.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class CorruptImageError(ValueError):
    """An image file cannot be decoded; ``path`` names it."""

    def __init__(self, path, why: str):
        self.path = str(path)
        super().__init__(f"corrupt or truncated image {self.path!r}: {why}")


@dataclass(frozen=True)
class ImageFiles:
    """The dataset: paths, integer labels and class names.

    Attributes:
        paths: N file paths (str).
        labels: (N,) int64 class indices in [0, K).
        classes: K class names (folder names, or the labels' decimal strings for a file list).
    """

    paths: tuple
    labels: np.ndarray
    classes: tuple

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def scan(data) -> ImageFiles:
    """A folder of class sub-folders, or a text file list of ``path label`` lines.

    Raises:
        FileNotFoundError: ``data`` does not exist.
        ValueError: an empty folder, an empty class folder, no image files, a bad list line.
    """
    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"data: {str(root)!r} does not exist")
    return scan_file_list(root) if root.is_file() else scan_folder(root)


def scan_folder(root) -> ImageFiles:
    """Class sub-folders of ``root`` (sorted by name); images (.jpg/.jpeg/.png) inside each, sorted.

    A class folder with a single image is allowed (the class models have a defined fallback for
    it: covariance ``reg * I``) but warned about, naming the folder.
    """
    root = Path(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS][:3]
        hint = f" (it holds images {loose} directly: put them in one folder per class)" if loose else ""
        raise ValueError(f"data: folder {str(root)!r} has no class sub-folders{hint}")
    paths, labels = [], []
    for k, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"data: class folder {str(d)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                             "remove it or add images")
        if len(files) == 1:
            warnings.warn(f"data: class folder {str(d)!r} holds a single image; its class model falls back "
                          "to a regularised covariance around that one point", stacklevel=3)
        paths += [str(p) for p in files]
        labels += [k] * len(files)
    return ImageFiles(tuple(paths), np.asarray(labels, np.int64), tuple(d.name for d in class_dirs))


def scan_file_list(path) -> ImageFiles:
    """Lines ``relative/or/absolute/path label`` (DALI's file_list format); paths relative to the list's folder."""
    path = Path(path)
    base = path.parent
    paths, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ValueError(f"{str(path)!r} line {n}: expected 'path label' with a label >= 0, got {line!r}")
        p = Path(parts[0])
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise FileNotFoundError(f"{str(path)!r} line {n}: image {str(p)!r} does not exist")
        paths.append(str(p))
        labels.append(int(parts[1]))
    if not paths:
        raise ValueError(f"data: file list {str(path)!r} lists no images")
    k = max(labels) + 1
    return ImageFiles(tuple(paths), np.asarray(labels, np.int64), tuple(str(c) for c in range(k)))


def check_encoded(data: bytes | np.ndarray, path) -> None:
    """Cheap container checks before decoding: JPEG (SOI ... EOI) or PNG (signature ... IEND).

    Catches empty, truncated and non-image files without decoding (a decoder may silently fill a
    truncated JPEG with grey). Raises :class:`CorruptImageError` naming the file.
    """
    b = bytes(data[:8]) if len(data) else b""
    if len(data) < 16:
        raise CorruptImageError(path, f"only {len(data)} bytes")
    tail = bytes(data[-32:])
    if b[:2] == b"\xff\xd8":
        if b"\xff\xd9" not in tail:
            raise CorruptImageError(path, "JPEG without an end-of-image marker (truncated)")
    elif b == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in tail:
            raise CorruptImageError(path, "PNG without an IEND chunk (truncated)")
    else:
        raise CorruptImageError(path, "neither a JPEG nor a PNG file")


def find_undecodable(paths) -> tuple[str, str] | None:
    """The first of ``paths`` that PIL cannot decode, with the reason (None if all decode)."""
    from PIL import Image

    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure names the file
            return str(p), f"{type(e).__name__}: {e}"
    return None
