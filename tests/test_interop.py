"""The CUDA paths' view and stream caches (kernels/_interop.py), with Numba's side stubbed: the
caching logic runs on the CPU; tests/cudasim and the GPU runs cover the views themselves."""
import gc
import weakref

import torch

from fastgenlabel.kernels import _interop


class FakeView:
    def __init__(self, t):
        self.ptr, self.shape = t.data_ptr(), tuple(t.shape)


def test_one_view_per_pointer_and_layout_and_no_reference_kept(monkeypatch):
    made = []
    monkeypatch.setattr(_interop, "_VIEWS", type(_interop._VIEWS)())
    monkeypatch.setattr(_interop, "_new_view", lambda t: made.append(t.data_ptr()) or FakeView(t))
    a = torch.zeros(4, 6)
    v = _interop.device_view(a)
    assert _interop.device_view(a) is v and len(made) == 1
    assert _interop.device_view(a.view(6, 4)) is not v  # same memory, other shape
    assert _interop.device_view(a[:, ::2]) is not v  # other strides
    assert _interop.device_view(a.view(torch.int32)) is not v  # other dtype
    assert _interop.device_view(a[1:]).ptr != v.ptr  # other pointer
    assert len(made) == 5
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None, "the cache must not keep tensors alive"


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_interop, "_VIEWS", type(_interop._VIEWS)())
    monkeypatch.setattr(_interop, "_new_view", FakeView)
    keep = [torch.zeros(3) for _ in range(_interop._MAX_VIEWS + 10)]
    first = _interop.device_view(keep[0])
    for t in keep[1:]:
        _interop.device_view(t)
    assert len(_interop._VIEWS) == _interop._MAX_VIEWS
    assert _interop.device_view(keep[0]) is not first  # the oldest entry was dropped
