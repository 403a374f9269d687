"""The pixel stage, reference: mix a batch of images with its partners and normalise it.

``out[i] = (lam[i] * x[i] + (1 - lam[i]) * x[perm[i]] - mean) / std``, per channel, written in the
requested layout and dtype; with CutMix ``boxes``, ``x[i]`` outside its box and ``x[perm[i]]``
inside it (lambda then weights no pixel; docs/MATH.md section 7). ``mean`` and ``std`` are in
the input's units (0-255 for uint8 pixels, as in DALI's ``crop_mirror_normalize``); without
them the batch is only mixed (the variant for already-normalised float batches). The fast paths
in :mod:`fastgenlabel.kernels.pixel` take the same arguments, validated here by
:func:`prepare_pixel_job`, and are tested against :func:`mix_images`.

Conventions (every backend follows them):

- ``images``: a batch (B, H, W, C) for ``input_layout="HWC"`` (the default, as decoders emit
  it) or (B, C, H, W) for ``"CHW"``; or a list of B samples (H, W, C) / (C, H, W) of one size,
  type, dtype and device, which is stacked into one batch first (one copy of the input: pass a
  batch to avoid it). Pixels are uint8, float16 or float32; NumPy arrays or torch tensors.
- The result is a NumPy array for NumPy input and a torch tensor (on the images' device) for
  torch input, shaped (B, C, H, W) for ``layout="CHW"`` (the default) or (B, H, W, C) for
  ``"HWC"``, in float32 (default), float16 or bfloat16. NumPy has no bfloat16, so bfloat16 needs
  torch input (``torch.from_numpy`` is free) and NumPy input asking for it is a TypeError.
- ``out=``: an existing C-contiguous array of the result's type, shape, dtype and device, not
  overlapping the input; it is filled and returned.
- ``pairs`` (from :func:`~fastgenlabel.functional.pairs.sample_pairs`) are usually drawn on the
  CPU. With CUDA images they are copied to the images' device (2 x B numbers, asynchronously
  from pinned memory); pairs on a CUDA device with CPU or other-device images are an error,
  since fetching them would stall the GPU.
- ``boxes`` (from :func:`~fastgenlabel.functional.pairs.sample_boxes`): a CutBoxes for the
  images' height and width, one box per sample, moved to the images' device like the pairs.
- Inputs are never modified.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._arrays import Array, like, overlaps, to_device
from .mixing import check_pairs
from .pairs import CutBoxes, MixPairs, check_boxes_unchanged, check_unchanged

LAYOUTS = ("CHW", "HWC")
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
INPUT_DTYPES = ("uint8", "float16", "float32")

_LAYOUT_ALIASES = {"CHW": "CHW", "NCHW": "CHW", "HWC": "HWC", "NHWC": "HWC"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TORCH_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
_NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
_INPUT_NAMES = {np.dtype(np.uint8): "uint8", np.dtype(np.float16): "float16", np.dtype(np.float32): "float32",
                torch.uint8: "uint8", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class PixelJob:
    """One validated pixel-stage call; every backend runs from this.

    Attributes:
        images: the batch, (B, H, W, C) or (B, C, H, W) per ``input_layout`` (stacked if a list came in).
        perm: (B,) int64 partners, a torch tensor on the images' device (the CPU for NumPy images).
        lam: (B,) float32 weights, likewise.
        mean, std: (C,) float64 host arrays, or None for no normalisation.
        dtype: output dtype name, one of ``OUTPUT_DTYPES``.
        layout, input_layout: per-sample layouts of the output and of ``images``, "CHW" or "HWC".
        out: the caller's output buffer, or None.
        size: (B, H, W, C).
        boxes: (B, 4) int64 CutMix boxes ``(y0, y1, x0, x1)`` on the images' device, or None (mixup).
        cut: (B,) int64 on the images' device with boxes (1: the sample is cut and pasted, 0: mixed
            by lambda), or None without boxes.
    """

    images: Any
    perm: torch.Tensor
    lam: torch.Tensor
    mean: np.ndarray | None
    std: np.ndarray | None
    dtype: str
    layout: str
    input_layout: str
    out: Any
    size: tuple[int, int, int, int]
    boxes: torch.Tensor | None = None
    cut: torch.Tensor | None = None

    @property
    def is_torch(self) -> bool:
        return isinstance(self.images, torch.Tensor)

    @property
    def device(self) -> torch.device:
        return self.images.device if self.is_torch else torch.device("cpu")

    @property
    def input_dtype(self) -> str:
        return _INPUT_NAMES[self.images.dtype]

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        b, h, w, c = self.size
        return (b, c, h, w) if self.layout == "CHW" else (b, h, w, c)

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """(C,) float32 ``1 / std`` and ``-mean / std`` (ones and zeros without normalisation)."""
        c = self.size[3]
        if self.mean is None:
            return np.ones(c, np.float32), np.zeros(c, np.float32)
        return (1.0 / self.std).astype(np.float32), (-self.mean / self.std).astype(np.float32)

    def allocate(self):
        """The result's buffer: the caller's ``out`` or a new, uninitialised one."""
        if self.out is not None:
            return self.out
        if self.is_torch:
            return torch.empty(self.out_shape, dtype=_TORCH_DTYPES[self.dtype], device=self.device)
        return np.empty(self.out_shape, _NUMPY_DTYPES[self.dtype])


def mix_images(
    images,
    pairs: MixPairs,
    mean=None,
    std=None,
    *,
    dtype=None,
    layout: str = "CHW",
    input_layout: str = "HWC",
    out=None,
    boxes: CutBoxes | None = None,
) -> Array:
    """Mix a batch of images with its partners, normalise it and change its layout (reference).

    Args:
        images: (B, H, W, C) uint8/float16/float32 batch (or (B, C, H, W) with
            ``input_layout="CHW"``), or a list of B samples; NumPy or torch.
        pairs: the batch's MixPairs (per-batch or per-sample lambda, any permutation).
        mean, std: per-channel constants in the input's units: a scalar or C values each
            (sequence, NumPy array or CPU tensor), std > 0; both None to only mix.
        dtype: "float32" (default), "float16" or "bfloat16" (torch input only), or the
            matching torch/NumPy dtype; defaults to ``out``'s dtype when ``out`` is given.
        layout: output layout per sample, "CHW" (result (B, C, H, W)) or "HWC" ((B, H, W, C));
            "NCHW"/"NHWC" are accepted as synonyms.
        input_layout: layout of ``images`` per sample, "HWC" (default) or "CHW".
        out: optional output buffer (see the module docstring).
        boxes: CutMix instead of mixup: sample i is ``x[perm[i]]`` inside its box and ``x[i]``
            outside (``pairs.lam`` then weights no pixel; it is the targets' lambda). With the
            boxes' ``cut`` mask, only the samples it marks are cut; the others are mixed by lambda.

    Returns:
        The mixed, normalised batch: NumPy for NumPy input, a torch tensor otherwise.
    """
    return run_reference(prepare_pixel_job(images, pairs, mean, std, dtype=dtype, layout=layout,
                                           input_layout=input_layout, out=out, boxes=boxes))


def run_reference(job: PixelJob):
    """The reference computation, in float64 torch, on the images' device."""
    if job.is_torch:
        x = job.images.detach()
    else:
        with warnings.catch_warnings():  # read-only arrays are fine: the reference only reads
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(job.images)
    if job.input_layout == "CHW":
        x = x.permute(0, 2, 3, 1)
    x = x.to(torch.float64)
    if job.boxes is None:
        lam = job.lam.to(torch.float64).reshape(-1, 1, 1, 1)
        y = lam * x + (1 - lam) * x[job.perm]
    else:  # (B, H, W) True inside each sample's box
        _, h, w, _ = job.size
        rows = torch.arange(h, device=x.device).reshape(1, h, 1)
        cols = torch.arange(w, device=x.device).reshape(1, 1, w)
        y0, y1, x0, x1 = (job.boxes[:, k].reshape(-1, 1, 1) for k in range(4))
        inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        y = torch.where(inside[..., None], x[job.perm], x)
        if not bool(job.cut.all()):
            lam = job.lam.to(torch.float64).reshape(-1, 1, 1, 1)
            y = torch.where(job.cut.bool().reshape(-1, 1, 1, 1), y, lam * x + (1 - lam) * x[job.perm])
    if job.mean is not None:
        y = (y - torch.from_numpy(job.mean).to(x.device)) / torch.from_numpy(job.std).to(x.device)
    if job.layout == "CHW":
        y = y.permute(0, 3, 1, 2)
    y = y.to(_TORCH_DTYPES[job.dtype]).contiguous()
    if job.out is None:
        return like(y, job.images)
    if job.is_torch:
        job.out.copy_(y)
    else:
        job.out[...] = y.numpy()
    return job.out


def prepare_pixel_job(images, pairs, mean=None, std=None, *, dtype=None, layout="CHW", input_layout="HWC",
                      out=None, boxes=None) -> PixelJob:
    """Validate a pixel-stage call once (see :func:`mix_images` for the arguments).

    Raises:
        TypeError: wrong container or dtype (images, out, pairs, mean/std, dtype).
        ValueError: wrong shape, layout, channel count, batch size, device or overlap; the message
            names the argument.
    """
    layout = _layout(layout, "layout")
    input_layout = _layout(input_layout, "input_layout")
    batch = _batch(images, input_layout)
    b, h, w, c = _size(batch, input_layout)
    is_torch = isinstance(batch, torch.Tensor)
    if out is not None and not isinstance(out, (np.ndarray, torch.Tensor)):
        raise TypeError(f"out: expected {'a torch tensor' if is_torch else 'a NumPy array'}, like images; "
                        f"got {type(out).__name__}")
    name = _dtype_name(dtype, out)
    if name == "bfloat16" and not is_torch:
        raise TypeError(
            "dtype: bfloat16 output needs torch input (NumPy has no bfloat16); pass "
            "torch.from_numpy(images) (no copy) or ask for float16/float32"
        )
    mean_v, std_v = _mean_std(mean, std, c, (batch.shape, input_layout))
    check_pairs(pairs, b)
    device = batch.device if is_torch else torch.device("cpu")
    perm, lam = _pairs_on(pairs, device)
    if device.type == "cpu":  # on a GPU the check would synchronise each call: trusted as made there
        check_unchanged(pairs)
    box_t, cut_t = (None, None) if boxes is None else _boxes_on(boxes, b, h, w, device)
    job = PixelJob(batch, perm, lam, mean_v, std_v, name, layout, input_layout, out, (b, h, w, c), box_t, cut_t)
    if out is not None:
        _check_out(out, job, images)
    return job


def _layout(value, name: str) -> str:
    if not isinstance(value, str) or value.upper() not in _LAYOUT_ALIASES:
        raise ValueError(f"{name}: expected one of {LAYOUTS} (or 'NCHW'/'NHWC'), got {value!r}")
    return _LAYOUT_ALIASES[value.upper()]


def _dtype_name(dtype, out) -> str:
    if dtype is None:
        if out is None:
            return "float32"
        dtype = out.dtype
    if isinstance(dtype, torch.dtype):
        if dtype in _TORCH_NAMES:
            return _TORCH_NAMES[dtype]
    elif isinstance(dtype, str) and dtype in _TORCH_DTYPES:
        return dtype
    else:
        try:
            np_dtype = np.dtype(dtype)
        except TypeError:
            np_dtype = None
        for key, value in _NUMPY_DTYPES.items():
            if np_dtype == value:
                return key
    raise TypeError(f"dtype: expected one of {OUTPUT_DTYPES} (or the torch/NumPy dtype), got {dtype!r}")


def _check_pixels(x, name: str) -> None:
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name}: expected a NumPy array or torch tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_NAMES:
        raise TypeError(f"{name}: expected {'/'.join(INPUT_DTYPES)} pixels, got dtype {x.dtype}")


def _batch(images, input_layout: str):
    """The batch as one array; a list of samples is validated and stacked (one copy)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: got an empty list; pass at least one sample (or an empty batch array)")
        first = images[0]
        _check_pixels(first, "images[0]")
        for i, sample in enumerate(images):
            _check_pixels(sample, f"images[{i}]")
            if isinstance(sample, torch.Tensor) != isinstance(first, torch.Tensor):
                raise TypeError(f"images[{i}]: {type(sample).__name__}, but images[0] is {type(first).__name__}")
            if sample.ndim != 3:
                raise ValueError(f"images[{i}]: expected one {input_layout} sample (3 dimensions), got shape "
                                 f"{tuple(sample.shape)}")
            if tuple(sample.shape) != tuple(first.shape):
                raise ValueError(f"images[{i}]: shape {tuple(sample.shape)} differs from images[0]'s "
                                 f"{tuple(first.shape)}; samples of a batch must have one size")
            if sample.dtype != first.dtype:
                raise TypeError(f"images[{i}]: dtype {sample.dtype} differs from images[0]'s {first.dtype}")
            if isinstance(sample, torch.Tensor) and sample.device != first.device:
                raise ValueError(f"images[{i}]: on {sample.device}, but images[0] is on {first.device}")
        if isinstance(first, torch.Tensor):
            return torch.stack([s.detach() for s in images])
        return np.stack(images)
    _check_pixels(images, "images")
    if images.ndim != 4:
        axes = "(B, H, W, C)" if input_layout == "HWC" else "(B, C, H, W)"
        raise ValueError(
            f"images: expected a batch {axes} for input_layout={input_layout!r} (or a list of samples), "
            f"got shape {tuple(images.shape)}"
        )
    return images.detach() if isinstance(images, torch.Tensor) else images


def _size(batch, input_layout: str) -> tuple[int, int, int, int]:
    if input_layout == "HWC":
        b, h, w, c = batch.shape
    else:
        b, c, h, w = batch.shape
    if c < 1:
        raise ValueError(f"images: no channels (shape {tuple(batch.shape)}, input_layout={input_layout!r})")
    return int(b), int(h), int(w), int(c)


def _channel_values(v, name: str, channels: int, images=None) -> np.ndarray:
    """(channels,) float64 of a scalar or per-channel ``v``; ``images`` = (shape, input_layout) of
    the batch, named in the error (formatted only then: this runs on every pixel-stage call)."""
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu":
            raise TypeError(
                f"{name}: got a tensor on {v.device}; pass per-channel constants as host values "
                "(a sequence, NumPy array or CPU tensor): they are validated and staged on the host"
            )
        v = v.detach().numpy()
    a = np.asarray(v)
    if a.dtype.kind not in "iuf":  # not strings, booleans or objects, which float64 would convert
        raise TypeError(f"{name}: expected a number or {channels} numbers, got {v!r}")
    a = a.astype(np.float64)
    if a.ndim == 0:
        a = np.full(channels, float(a))
    if a.shape != (channels,):
        where = "" if images is None else f"; images {tuple(images[0])} read as input_layout={images[1]!r}"
        raise ValueError(f"{name}: expected a scalar or {channels} values (one per channel of images{where}), "
                         f"got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: values must be finite, got {a.tolist()}")
    return a


def _mean_std(mean, std, channels: int, images=None):
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        missing = "mean" if mean is None else "std"
        raise ValueError(f"{missing}: mean and std go together; give both or neither (neither only mixes)")
    m = _channel_values(mean, "mean", channels, images)
    s = _channel_values(std, "std", channels, images)
    if (s <= 0).any():
        raise ValueError(f"std: values must be positive, got {s.tolist()}")
    return m, s


def _pairs_on(pairs: MixPairs, device: torch.device):
    """perm (int64) and lam (float32) on ``device``; CPU -> CUDA goes through pinned memory."""
    perm, lam = pairs.perm.contiguous(), pairs.lam.to(torch.float32).contiguous()
    src = perm.device
    if src == device:
        return perm, lam
    if src.type != "cpu":
        where = "the CPU (NumPy or CPU tensors)" if device.type == "cpu" else str(device)
        raise ValueError(
            f"pairs: on {src}, but images are on {where}; draw the pairs on the CPU (sample_pairs does) "
            "or move them yourself (a GPU -> host copy waits for the GPU)"
        )
    if device.type == "cuda":
        return perm.pin_memory().to(device, non_blocking=True), lam.pin_memory().to(device, non_blocking=True)
    return perm.to(device), lam.to(device)


def _boxes_on(boxes, b: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, 4) box tensor and the (B,) int64 cut mask on ``device``, after checking the boxes
    fit this batch. A box outside
    the image is caught on the CPU (where the kernel would write past the row); the CUDA kernel
    only compares against the box, so a changed box there can misplace pixels but not reach
    outside the batch."""
    if not isinstance(boxes, CutBoxes):
        raise TypeError(f"boxes: expected CutBoxes (from sample_boxes), got {type(boxes).__name__}")
    if len(boxes) != b:
        raise ValueError(f"boxes: {len(boxes)} boxes for a batch of {b} images")
    if (boxes.height, boxes.width) != (h, w):
        raise ValueError(f"boxes: drawn for {boxes.height} x {boxes.width} images, but images are {h} x {w}")
    t = boxes.boxes.contiguous()
    if t.device.type == "cpu":
        check_boxes_unchanged(boxes)
    if boxes.cut is None:
        cut = torch.ones(b, dtype=torch.int64, device=t.device)
    else:
        cut = boxes.cut.to(torch.int64).contiguous()
    if t.device == device:
        return t, cut
    if t.device.type != "cpu":
        raise ValueError(f"boxes: on {t.device}, but images are on {device}; draw the boxes on the CPU "
                         "(sample_boxes does) or move them yourself")
    return to_device(t, device), to_device(cut, device)


def _check_out(out, job: PixelJob, images) -> None:
    if job.is_torch != isinstance(out, torch.Tensor):
        want = "a torch tensor" if job.is_torch else "a NumPy array"
        raise TypeError(f"out: expected {want}, like images; got {type(out).__name__}")
    if tuple(out.shape) != job.out_shape:
        raise ValueError(f"out: expected shape {job.out_shape} for layout={job.layout!r}, got {tuple(out.shape)}")
    want_dtype = _TORCH_DTYPES[job.dtype] if job.is_torch else _NUMPY_DTYPES[job.dtype]
    if out.dtype != want_dtype:
        raise TypeError(f"out: expected dtype {job.dtype}, got {out.dtype}")
    if job.is_torch:
        if out.device != job.device:
            raise ValueError(f"out: on {out.device}, but images are on {job.device}")
        if not out.is_contiguous():
            raise ValueError(f"out: must be C-contiguous, got strides {out.stride()}")
        if out.requires_grad:
            raise ValueError("out: must not require grad (it is written in place)")
    elif not out.flags.c_contiguous:
        raise ValueError(f"out: must be C-contiguous, got strides {out.strides}")
    sources = images if isinstance(images, (list, tuple)) else [images]
    if any(overlaps(out, src) for src in sources):
        raise ValueError("out: overlaps images; the kernel reads partner samples while it writes, "
                         "so out must be a separate buffer")
