"""Handing torch tensors and NumPy arrays to Numba kernels without hidden copies."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


def is_cuda(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_cuda


def host_view(x) -> np.ndarray:
    """A NumPy view of a CPU tensor or array (no copy); raises for CUDA tensors."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        if x.is_cuda:
            raise ValueError("expected a CPU tensor, got a CUDA tensor")
        return x.detach().numpy()
    raise TypeError(f"expected a numpy array or torch tensor, got {type(x).__name__}")


def cuda_modules():
    """Import numba.cuda (applying the numba-cuda/numpy compatibility patch first)."""
    from .compat import patch_numba_cuda_row_stack

    patch_numba_cuda_row_stack()
    from numba import cuda

    return cuda


_VIEWS: OrderedDict = OrderedDict()  # (pointer, shape, strides, dtype, device) -> Numba view
_MAX_VIEWS = 256
_STREAMS: dict = {}  # CUstream handle -> Numba stream


def device_view(t: torch.Tensor):
    """A Numba device array over a CUDA tensor's memory, made once per (pointer, shape, strides,
    dtype) and reused.

    A view is only a pointer with a shape, so a later tensor at the same address with the same
    layout gets the same, correct view. Views hold no reference to the tensor (the kernels use
    them only during the call that made them, while the caller holds the tensor), so the cache
    keeps no memory alive. Making a view per array per call cost more than the kernels: Numba
    synchronises the stream a ``__cuda_array_interface__`` advertises (default ``sync=True``:
    ~3 ms per relabel call on the H200), wraps that stream, and builds a DeviceNDArray.
    """
    key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device.index)
    view = _VIEWS.get(key)
    if view is None:
        view = _VIEWS[key] = _new_view(t)
        if len(_VIEWS) > _MAX_VIEWS:
            _VIEWS.popitem(last=False)
    return view


def _new_view(t: torch.Tensor):
    cuda = cuda_modules()
    desc = dict(t.detach().__cuda_array_interface__)
    desc.pop("stream", None)  # launches name torch's current stream themselves; no sync, no wrapper
    return cuda.from_cuda_array_interface(desc, owner=None, sync=False)


def current_stream():
    """torch's current CUDA stream as a Numba stream (one wrapper per stream handle), so kernels
    order with torch's work."""
    return numba_stream(torch.cuda.current_stream().cuda_stream)


def numba_stream(handle: int):
    """The Numba wrapper of the CUDA stream ``handle`` (made once per handle)."""
    stream = _STREAMS.get(handle)
    if stream is None:
        cuda = cuda_modules()
        stream = _STREAMS[handle] = cuda.external_stream(handle)
    return stream
