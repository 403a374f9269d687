"""The samples a loader reads: a folder of class sub-folders, a file list or WebDataset tar shards, checked once.

Sample i is ``paths[i]`` with class ``labels[i]`` (for a tar shard: the member ``members[i]`` of
the shard ``paths[i]``, read in place at ``offsets[i]``); the order (sorted class folders, then
sorted file names; the file list's order; or the shards' order, then each shard's sample order)
is the order of stored embeddings and of sample indices.
"""
from __future__ import annotations

import glob
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .encoded import jpeg_structure, png_structure
from .tar_index import INDEX_SUFFIX, MAX_LABEL_DIGITS, cached_shard_index

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
WDS_IMAGE_EXT = "jpg;jpeg;png"
WDS_LABEL_EXT = "cls"
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # what PIL refuses by default: more than 2 * PIL.Image.MAX_IMAGE_PIXELS


class CorruptImageError(ValueError):
    """An image file cannot be decoded; ``path`` names it."""

    def __init__(self, path, why: str):
        self.path = str(path)
        super().__init__(f"corrupt or truncated image {self.path!r}: {why}")


class ImageTooLargeError(CorruptImageError):
    """An image declares more pixels than ``LoaderConfig.max_image_pixels`` (a decompression bomb, or a huge scan)."""

    def __init__(self, path, width: int, height: int, limit: int):
        self.path, self.width, self.height, self.limit = str(path), width, height, limit
        ValueError.__init__(self, f"image {self.path!r} declares {width} x {height} = {width * height} pixels, more "
                            f"than max_image_pixels = {limit} (a decompression bomb?); raise the limit with "
                            "LoaderConfig(max_image_pixels=...), or None for no limit, if the image is genuine")


@dataclass(frozen=True)
class ImageFiles:
    """The dataset: paths, integer labels and class names.

    Attributes:
        paths: N file paths (str): the image files, or for WebDataset samples the tar shard that
            holds each one.
        labels: (N,) int64 class indices in [0, K).
        classes: K class names (folder names, or the labels' decimal strings for a file list or
            WebDataset shards).
        members, offsets, sizes: WebDataset samples only (else None): each sample's image member
            name, and the byte offset and size of its data inside the shard.
    """

    paths: tuple
    labels: np.ndarray
    classes: tuple
    members: tuple | None = None
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def name(self, i: int) -> str:
        """Sample i's name in messages: its file, or ``shard.tar:member`` for a WebDataset sample."""
        return self.paths[i] if self.members is None else f"{self.paths[i]}:{self.members[i]}"

    def read(self, i: int) -> np.ndarray:
        """Sample i's encoded image, (n,) uint8 (read in place from its shard for a WebDataset sample)."""
        if self.offsets is None:
            return np.fromfile(self.paths[i], dtype=np.uint8)
        return np.fromfile(self.paths[i], dtype=np.uint8, count=int(self.sizes[i]), offset=int(self.offsets[i]))


def scan(data, *, image_ext: str = WDS_IMAGE_EXT, label_ext: str = WDS_LABEL_EXT) -> ImageFiles:
    """A folder of class sub-folders, a text file list of ``path label`` lines, or WebDataset tar shards.

    WebDataset shards (:func:`scan_webdataset`) are: a list of ``.tar`` paths, one ``.tar`` path, a
    glob (``"shards/train-*.tar"``), a brace range (``"shards/train-{0000..0146}.tar"``), or a
    folder that holds ``.tar`` files and no class sub-folders. ``image_ext``, ``label_ext``: the
    shards' image and label members (``;``-separated alternatives).

    Raises:
        FileNotFoundError: ``data`` (or a shard) does not exist, or a pattern matches nothing.
        ValueError: an empty folder, an empty class folder, no image files, a bad list line; a
            corrupt or compressed tar shard, a shard sample without an image or a label.
    """
    shards = webdataset_shards(data)
    if shards is not None:
        return scan_webdataset(shards, image_ext=image_ext, label_ext=label_ext)
    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"data: {str(root)!r} does not exist")
    return scan_file_list(root) if root.is_file() else scan_folder(root)


def _expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation: ``a-{000..009}.tar`` (zero-padded ranges) and ``{x,y}`` alternatives."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1))
        items = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in _expand_braces(head + item + tail)]


def webdataset_shards(data) -> list[str] | None:
    """The tar shards ``data`` names (see :func:`scan`), or None when it names a folder or a file list."""
    if isinstance(data, (list, tuple)):
        items = [str(p) for p in data]
        if not items:
            raise ValueError("data: an empty list of WebDataset shards")
    else:
        s = str(data)
        root = Path(s)
        if root.is_dir():
            has_classes = any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
            tars = sorted(str(p) for p in root.iterdir() if p.is_file() and p.name.endswith(".tar"))
            return tars if tars and not has_classes else None
        if root.is_file():
            return [s] if s.endswith(".tar") else None
        if not (s.endswith(".tar") or any(c in s for c in "*?[{")):
            return None
        items = [s]
    shards = []
    for item in items:
        for pattern in _expand_braces(item):
            if any(c in pattern for c in "*?["):
                found = sorted(p for p in glob.glob(pattern) if not p.endswith(INDEX_SUFFIX))
                if not found:
                    raise FileNotFoundError(f"data: the shard pattern {pattern!r} matches no files")
                shards += found
            else:
                shards.append(pattern)
    return shards


def scan_webdataset(shards, *, image_ext: str = WDS_IMAGE_EXT, label_ext: str = WDS_LABEL_EXT) -> ImageFiles:
    """WebDataset tar shards, in the given order; within a shard, its samples in tar order.

    A sample is the run of consecutive members sharing a key (the member path up to the first
    ``.`` of its file name); its image is the first of ``image_ext`` present, its label the
    ``label_ext`` member, a decimal class index (``b"3"``, ``b"3\\n"``). Other members are
    ignored. Only the headers are read (the images stay in place: :meth:`ImageFiles.read` reads
    each at its offset), so shards must be uncompressed ``.tar`` files.

    Raises:
        FileNotFoundError: a shard does not exist.
        ValueError: a shard that is not a readable tar (corrupt, truncated, compressed) or holds no
            samples; a sample without an image or a label member, or with a label that is not a
            decimal integer >= 0 (each message names the shard and the sample).
    """
    image_exts = [e.strip().lower() for e in image_ext.split(";") if e.strip()]
    label_exts = [e.strip().lower() for e in label_ext.split(";") if e.strip()]
    paths, parts = [], []
    for shard in shards:
        shard = str(shard)
        if Path(shard).is_dir():
            raise ValueError(f"data: {shard!r} is a folder; a list names tar shards (paths, globs, brace ranges)")
        if not Path(shard).is_file():
            raise FileNotFoundError(f"data: WebDataset shard {shard!r} does not exist")
        index = cached_shard_index(shard, image_exts, label_exts)
        paths += [shard] * len(index.members)
        parts.append(index)
    labels = np.concatenate([p.labels for p in parts])
    return ImageFiles(tuple(paths), labels, tuple(str(c) for c in range(int(labels.max()) + 1)),
                      members=tuple(m for p in parts for m in p.members),
                      offsets=np.concatenate([p.offsets for p in parts]),
                      sizes=np.concatenate([p.sizes for p in parts]))


def scan_folder(root) -> ImageFiles:
    """Class sub-folders of ``root`` (sorted by name); images (.jpg/.jpeg/.png) inside each, sorted.

    Hidden folders and files (names starting with ".", such as macOS's ``._name.jpg`` metadata
    files) are not read.

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
        files = sorted(p for p in d.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
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
    """Lines ``relative/or/absolute/path label`` (DALI's file_list format, UTF-8); paths relative to the list's folder."""
    path = Path(path)
    base = path.parent
    raw = path.read_bytes()
    if path.suffix.lower() in IMAGE_EXTENSIONS or raw[:2] == b"\xff\xd8" or raw[:8] == b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"data: {str(path)!r} is an image file; data takes a folder of class sub-folders, a text "
                         "file of 'path label' lines, or WebDataset .tar shards")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"data: file list {str(path)!r} line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); "
                         "expected 'path label' lines") from None
    paths, labels = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit() or not parts[1].isascii():
            raise ValueError(f"{str(path)!r} line {n}: expected 'path label' with a label >= 0, got {line!r}")
        if len(parts[1]) > MAX_LABEL_DIGITS:
            raise ValueError(f"{str(path)!r} line {n}: label {parts[1]} is too large for a class index "
                             f"(at most {MAX_LABEL_DIGITS} digits)")
        label = int(parts[1])
        p = Path(parts[0])
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise FileNotFoundError(f"{str(path)!r} line {n}: image {str(p)!r} does not exist")
        paths.append(str(p))
        labels.append(label)
    if not paths:
        raise ValueError(f"data: file list {str(path)!r} lists no images")
    k = max(labels) + 1
    return ImageFiles(tuple(paths), np.asarray(labels, np.int64), tuple(str(c) for c in range(k)))


def check_encoded(data: bytes | np.ndarray, path, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                  other_formats: bool = False, walk_codes: bool = True) -> str | None:
    """Cheap container checks before decoding (:mod:`fastgenlabel.loader.encoded`): a JPEG's markers
    up to its EOI, a PNG's chunks up to its IEND, and the declared width x height against ``max_pixels``.

    Catches empty, truncated and non-image files (a JPEG cut and closed with an end marker too: its
    last scan's codes are walked), and decompression bombs, without decoding the pixels; bytes after
    the end marker are allowed. The loaders walk a sample's JPEG codes once per process
    (``walk_codes=False`` afterwards: the walk costs up to most of a decode; the markers, cheap, are
    checked every time). Returns "jpeg" or "png"; with ``other_formats``, None for
    another format (left to the decoder) instead of an error. Raises :class:`CorruptImageError`
    naming the file, or :class:`ImageTooLargeError`.
    """
    head = bytes(data[:8]) if len(data) else b""
    if len(data) < 16:
        raise CorruptImageError(path, f"only {len(data)} bytes")
    if head[:2] == b"\xff\xd8":
        kind, (problem, width, height) = "jpeg", jpeg_structure(data, walk_codes)
    elif head == b"\x89PNG\r\n\x1a\n":
        kind, (problem, width, height) = "png", png_structure(data)
    elif other_formats:
        return None
    else:
        raise CorruptImageError(path, "neither a JPEG nor a PNG file")
    check_pixels(width, height, path, max_pixels)  # before a truncation: the header was read
    if problem is not None:
        raise CorruptImageError(path, problem)
    return kind


def check_pixels(width: int, height: int, path, max_pixels: int | None) -> None:
    """Refuse an image of more than ``max_pixels`` pixels (None: no limit), naming the file and the limit."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(path, width, height, max_pixels)


def find_undecodable(files: ImageFiles, indices) -> tuple[str, str] | None:
    """The first of samples ``indices`` that PIL cannot decode, with the reason (None if all decode)."""
    import io

    from PIL import Image

    for i in indices:
        try:
            with Image.open(io.BytesIO(files.read(i).tobytes())) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure names the file
            return files.name(i), f"{type(e).__name__}: {e}"
    return None
