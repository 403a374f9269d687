"""The pixel stage, fused: mix, normalise, change layout and dtype in one pass over memory.

:func:`mix_images` validates its arguments once (:func:`~fastgenlabel.functional.images.prepare_pixel_job`)
and runs the first backend of ``IMPLS`` that accepts them, or the one named by ``backend``:

- ``numba-cuda``: CUDA torch tensors, through ``__cuda_array_interface__`` on torch's current
  stream; no copies of the batch (CPU pairs and the per-channel constants, a few hundred bytes,
  go up asynchronously from pinned memory).
- ``numba-cpu``: NumPy arrays and CPU tensors, ``njit(parallel=True)`` over image rows.
- ``reference``: :func:`fastgenlabel.functional.images.mix_images`, plain torch in float64.

Both kernels read C-contiguous batches only (a strided batch is refused with the reason, and
``backend="auto"`` then falls back to the reference). Neither compiles or touches a GPU at
import: the kernel modules are imported on first use, and compiled kernels are cached on disk.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from ...functional.images import PixelJob, prepare_pixel_job, run_reference
from .._interop import current_stream, device_view, host_view
from ..compat import numba_cuda_status
from ..registry import Impl, dispatch, explain

__all__ = ["IMPLS", "explain_mix_images", "mix_images"]

CHUNKS_PER_THREAD = 8
MAX_CUDA_BATCH = 65535


def mix_images(images, pairs, mean=None, std=None, *, dtype=None, layout="CHW", input_layout="HWC", out=None,
               boxes=None, backend: str = "auto"):
    """Mix a batch of images with its partners and normalise it, fused.

    ``out[i] = (lam[i] * x[i] + (1 - lam[i]) * x[perm[i]] - mean) / std`` per channel, in the
    requested layout and dtype; with CutMix ``boxes``, ``x[perm[i]]`` inside sample i's box and
    ``x[i]`` outside it, normalised the same way (samples the boxes' ``cut`` mask leaves out are
    mixed by lambda: mixup and CutMix per sample, in the same pass). Arguments and result are those of the reference,
    :func:`fastgenlabel.functional.images.mix_images`; in short:

    Args:
        images: (B, H, W, C) uint8/float16/float32 batch ((B, C, H, W) with
            ``input_layout="CHW"``), or a list of B samples of one size (stacked first: one
            copy); NumPy or torch, CPU or CUDA.
        pairs: the batch's MixPairs (per-batch or per-sample lambda, any permutation). CPU pairs
            with CUDA images are copied to the device (asynchronously, from pinned memory).
        mean, std: per-channel constants in the input's units (0-255 for uint8), host values;
            both None to only mix (the variant for already-normalised float batches).
        dtype: "float32" (default), "float16" or "bfloat16" (torch input only).
        layout: output layout per sample, "CHW" -> (B, C, H, W) or "HWC" -> (B, H, W, C).
        input_layout: layout of ``images`` per sample, "HWC" (default) or "CHW".
        out: optional C-contiguous output buffer (same type, device, shape and dtype as the
            result, not overlapping ``images``); filled and returned.
        boxes: CutBoxes (from ``sample_boxes``) for CutMix instead of mixup; CPU boxes with CUDA
            images are copied to the device like the pairs.
        backend: "auto", "numba-cuda", "numba-cpu" or "reference".

    Returns:
        The result: NumPy for NumPy input, a torch tensor on the images' device otherwise.

    Raises:
        TypeError, ValueError: invalid arguments (the message names the argument).
        BackendError: no requested backend accepts the inputs; the message gives each reason.
    """
    job = prepare_pixel_job(images, pairs, mean, std, dtype=dtype, layout=layout, input_layout=input_layout,
                            out=out, boxes=boxes)
    return dispatch("mix_images", backend, IMPLS, job)


def explain_mix_images(images, pairs, mean=None, std=None, **kwargs) -> dict[str, str | None]:
    """Every backend's verdict on these arguments (None = would run), without running anything."""
    return explain(IMPLS, prepare_pixel_job(images, pairs, mean, std, **kwargs))


def _contiguity(job: PixelJob) -> str | None:
    x = job.images
    if isinstance(x, torch.Tensor):
        if not x.is_contiguous():
            return (f"images are not contiguous (strides {tuple(x.stride())}); the kernel reads one dense batch "
                    "without copying: call .contiguous()")
    elif not x.flags.c_contiguous:
        return (f"images are not C-contiguous (strides {x.strides}); the kernel reads one dense batch "
                "without copying: use np.ascontiguousarray")
    return None


# --- numba-cpu -------------------------------------------------------------------------------------------------

def _refuse_cpu(job: PixelJob) -> str | None:
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed"
    if job.device.type != "cpu":
        return f"images are on {job.device}; numba-cpu runs on host memory (NumPy arrays or CPU tensors)"
    return _contiguity(job)


def _flat_bits(a) -> np.ndarray:
    """A flat NumPy view of an array/tensor; 16-bit floats as their uint16 bit patterns."""
    if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16):
        a = a.view(torch.int16)
    v = host_view(a).reshape(-1)
    if v.dtype.itemsize == 2:
        v = v.view(np.uint16)
    return v


def _run_cpu(job: PixelJob):
    import numba

    from . import cpu

    out = job.allocate()
    if job.size[0] * job.size[1] * job.size[2] == 0:
        return out
    scale, shift = job.scale_shift()
    kind = {"float32": cpu.OUT_FLOAT, "float16": cpu.OUT_F16, "bfloat16": cpu.OUT_BF16}[job.dtype]
    _, h, w, c = job.size
    boxes = None if job.boxes is None else host_view(job.boxes)
    mask = None if job.cut is None else host_view(job.cut)
    cpu.run(_flat_bits(job.images), host_view(job.perm), host_view(job.lam), boxes, scale, shift, _flat_bits(out),
            h, w, c, job.input_layout == "CHW", job.layout == "CHW", job.input_dtype == "float16", kind,
            CHUNKS_PER_THREAD * numba.get_num_threads(), mask)
    return out


# --- numba-cuda ------------------------------------------------------------------------------------------------

def _refuse_cuda(job: PixelJob) -> str | None:
    ok, why = numba_cuda_status()
    if not ok:
        return why
    if not job.is_torch:
        return "images are a NumPy array; numba-cuda runs on CUDA torch tensors"
    if job.device.type != "cuda":
        return f"images are on {job.device}; numba-cuda runs on CUDA torch tensors"
    if job.size[0] > MAX_CUDA_BATCH:
        return f"batch of {job.size[0]} samples; the kernel's grid takes at most {MAX_CUDA_BATCH} per call"
    return _contiguity(job)


def _run_cuda(job: PixelJob):
    from . import cuda as kernels

    out = job.allocate()
    b, h, w, c = job.size
    if b * h * w == 0:
        return out
    device = job.device
    scale, shift = job.scale_shift()
    scale_v, shift_v = _device_constants(scale, shift, device)
    out_bf16 = job.dtype == "bfloat16"
    flat_out = out.reshape(-1)
    with torch.cuda.device(device):  # makes the device's primary context current: Numba launches there
        stream = current_stream()
        dev_out = device_view(flat_out.view(torch.int16) if out_bf16 else flat_out)
        if out_bf16:
            dev_out = dev_out.view(np.uint16)
        kernels.launch(
            device_view(job.images.reshape(-1)), device_view(job.perm), device_view(job.lam),
            scale_v, shift_v, dev_out, h, w, c, job.input_layout == "CHW", job.layout == "CHW", out_bf16,
            stream=stream, boxes=None if job.boxes is None else device_view(job.boxes),
            mask=None if job.cut is None else device_view(job.cut))
    return out


_CONSTANTS: dict = {}  # (scale, shift, device) -> the constants on the device; a run uses one or two


def _device_constants(scale: np.ndarray, shift: np.ndarray, device: torch.device):
    """Views of the per-channel scale and shift on the device, uploaded once per distinct value
    (a per-call upload from pinned memory cost a host allocation every batch)."""
    key = (scale.tobytes(), shift.tobytes(), str(device))
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= 64:
            # A kernel on another stream may still read an entry; freed memory goes back to the
            # stream it was made on, where the next allocation could overwrite it. Rare: wait.
            torch.cuda.synchronize()
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.from_numpy(np.concatenate([scale, shift])).to(device)
    c = scale.shape[0]
    return device_view(t[:c]), device_view(t[c:])


IMPLS = (
    Impl("numba-cuda", _refuse_cuda, _run_cuda),
    Impl("numba-cpu", _refuse_cpu, _run_cpu),
    Impl("reference", lambda job: None, run_reference),
)
