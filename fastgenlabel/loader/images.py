"""A plain torch Dataset over image files: PIL decode, random resized crop, flip (no torchvision needed).

The torch backend's default dataset and the benchmark's baseline. The crop follows
torchvision's ``RandomResizedCrop`` (10 tries at a random area and log-uniform aspect ratio,
then a centre crop of the clamped ratio) and ``RandomHorizontalFlip``; the windows and flips are
:func:`~.crops.crop_windows`, pure functions of (seed, epoch, index) (the DALI backend's too), so
results depend neither on worker scheduling nor on where a pass started.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from .crops import crop_windows
from .files import DEFAULT_MAX_IMAGE_PIXELS, CorruptImageError, ImageFiles, check_encoded, check_pixels


class ImageFileDataset(torch.utils.data.Dataset):
    """Items ``(image (S, S, 3) uint8 tensor, label, index)`` of an :class:`ImageFiles`.

    Args:
        files: the samples.
        image_size: S.
        train: random resized crop + random flip (with ``flip``); else resize the shorter side to S / 0.875 and
            centre-crop.
        crop_scale, crop_ratio: the crop's area and aspect-ratio ranges.
        seed: base seed; :meth:`set_epoch` changes the crops per epoch.
        skip_bad: return None for an undecodable file (the collate function drops it) instead of
            raising :class:`CorruptImageError`.
        max_image_pixels: images declaring more pixels are refused before decoding (None: no
            limit); for JPEG and PNG it replaces PIL's own ``Image.MAX_IMAGE_PIXELS``.

    JPEG and PNG files get the DALI backend's container checks first
    (:func:`~fastgenlabel.loader.files.check_encoded`); other formats are left to PIL.
    """

    def __init__(self, files: ImageFiles, image_size: int, *, train: bool = True, crop_scale=(0.08, 1.0),
                 crop_ratio=(3 / 4, 4 / 3), flip: bool = True, seed: int = 0,
                 skip_bad: bool = False, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.files, self.image_size, self.train = files, image_size, train
        self.crop_scale, self.crop_ratio, self.seed, self.skip_bad = crop_scale, crop_ratio, seed, skip_bad
        self.flip, self.max_image_pixels = flip, max_image_pixels
        self.epoch = 0
        self.num_classes = files.num_classes
        self._walked = np.zeros(len(files), bool)  # JPEG codes walked once per process (check_encoded)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image, ImageOps

        path = self.files.name(i)
        try:
            data = self.files.read(i)
            kind = check_encoded(data, path, max_pixels=self.max_image_pixels, other_formats=True,
                                 walk_codes=not self._walked[i])
            self._walked[i] = True
            with _open(io.BytesIO(data.tobytes()), kind) as im:
                check_pixels(im.width, im.height, path, self.max_image_pixels)
                im = _to_rgb(ImageOps.exif_transpose(im))  # upright, as DALI's decoders give it
        except Exception as e:  # noqa: BLE001 - any decoder failure names the file
            if self.skip_bad:
                why = str(e) if isinstance(e, CorruptImageError) else f"corrupt image {path!r} ({e})"
                warnings.warn(f"skipping {why}", stacklevel=2)
                return None
            if isinstance(e, CorruptImageError):
                raise
            raise CorruptImageError(path, f"{type(e).__name__}: {e}") from e
        s = self.image_size
        if self.train:
            start, shape, flip = crop_windows(im.width, im.height, seed=self.seed, epoch=self.epoch, indices=[i],
                                              scale=self.crop_scale, ratio=self.crop_ratio, flip=self.flip)
            (left, top), (w, h) = start[0].tolist(), shape[0].tolist()
            im = im.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h))
            if flip[0]:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = round(s / 0.875)
            scale = short / min(im.width, im.height)
            im = im.resize((max(s, round(im.width * scale)), max(s, round(im.height * scale))), Image.BILINEAR)
            left, top = int((im.width - s) / 2 + 0.5), int((im.height - s) / 2 + 0.5)  # half up, as DALI's fn.crop
            im = im.crop((left, top, left + s, top + s))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()), int(self.files.labels[i]), int(i)


def _open(fp, kind: str | None):
    """PIL's image of a JPEG or PNG through its format plugin (``Image.open`` would apply PIL's
    global pixel limit on top of ``max_image_pixels``, already checked); other formats: ``Image.open``."""
    from PIL import Image

    if kind == "jpeg":
        from PIL import JpegImagePlugin

        return JpegImagePlugin.jpeg_factory(fp)
    if kind == "png":
        from PIL import PngImagePlugin

        return PngImagePlugin.PngImageFile(fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_image_pixels decides
        return Image.open(fp)


def _to_rgb(im):
    """8-bit RGB. 16- and 32-bit integer images (``I;16``, ``I``) are scaled to 8 bits first:
    PIL's ``convert("RGB")`` clips them to 255 (a white image), where DALI decodes them."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def collate_skipping_none(items):
    """``default_collate`` after dropping the None items of skipped files."""
    kept = [it for it in items if it is not None]
    if not kept:
        raise CorruptImageError("<batch>", "every image of the batch is corrupt")
    return torch.utils.data.default_collate(kept)
