"""Feature sources for the streaming fit: where the z of a batch comes from.

A source is a callable ``source(x, index) -> z``: a batch of inputs (and, where the batch has
them, its sample indices) to (B, d) float features. Four kinds (docs/MATH.md section 4):

- :class:`InputFeatures`: the input itself, flattened (tabular and low-dimensional data).
- :class:`LinearMapFeatures`: a fitted :class:`fastgenlabel.features.ThumbnailPCA` (images or
  thumbnails in, projected thumbnails out): exact under mixing.
- :class:`ModuleFeatures`: any torch module, e.g. a frozen backbone: run in ``eval()`` mode under
  ``no_grad`` on the module's device, output flattened to (B, d).
- :class:`StoredFeatures`: per-sample embeddings in a memory-mapped (N, d) ``.npy``, looked up by
  sample index (the batch must carry indices).

:func:`as_source` turns whatever the user passes (None, a module, a feature map, a ``.npy`` path,
a callable) into one of them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ..features import StoredEmbeddings, ThumbnailPCA, thumbnails_torch


def _tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")


class InputFeatures:
    """z = x, flattened to (B, d): the paper's low-dimensional setting."""

    needs_index = False

    def __call__(self, x, index=None) -> torch.Tensor:
        x = _tensor(x, "x")
        return x.reshape(x.shape[0], -1) if x.ndim != 2 else x

    def __repr__(self) -> str:
        return "InputFeatures()"


class LinearMapFeatures:
    """A fitted :class:`~fastgenlabel.features.ThumbnailPCA`.

    Accepts (B, H, W, C) images (uint8 or float, pixel units; thumbnails are computed with
    :func:`~fastgenlabel.features.thumbnails_torch`) or (B, t*t*C) thumbnails. Returns (B, d)
    float32 on the input's device.
    """

    needs_index = False

    def __init__(self, feature_map: ThumbnailPCA):
        if not isinstance(feature_map, ThumbnailPCA) or not feature_map.fitted:
            raise ValueError(f"feature_map: expected a fitted ThumbnailPCA, got {feature_map!r}")
        self.feature_map = feature_map

    @property
    def dim(self) -> int:
        return self.feature_map.dim

    def __call__(self, x, index=None) -> torch.Tensor:
        x = _tensor(x, "x")
        if x.ndim == 4:
            x = thumbnails_torch(x, self.feature_map.thumbnail)
        elif x.ndim != 2:
            raise ValueError(f"x: expected (B, H, W, C) images or (B, F) thumbnails, got shape {tuple(x.shape)}")
        return self.feature_map.transform(x)

    def __repr__(self) -> str:
        return f"LinearMapFeatures({self.feature_map!r})"


class ModuleFeatures:
    """Features from a torch module (a frozen backbone, a network's penultimate layer).

    The module runs in ``eval()`` mode under ``torch.no_grad()``; its previous training mode is
    restored after every call, so the same network can keep training afterwards (the paper's
    deep variant fits the class models half-way through training). Inputs move to the device of
    the module's first parameter (or ``device``); the output is flattened to (B, d).

    Args:
        module: the torch module (called as ``module(x)``).
        device: where to run it; defaults to the device of its parameters (CPU without any).
    """

    needs_index = False

    def __init__(self, module: torch.nn.Module, device=None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        if device is None:
            p = next(module.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)

    @contextlib.contextmanager
    def _eval(self):
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.module.train(was_training)

    def __call__(self, x, index=None) -> torch.Tensor:
        x = _tensor(x, "x").to(self.device, non_blocking=True)
        with self._eval():
            out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"module: expected it to return a tensor, got {type(out).__name__}")
        return out.reshape(out.shape[0], -1)

    def __repr__(self) -> str:
        return f"ModuleFeatures({type(self.module).__name__}, device={str(self.device)!r})"


class StoredFeatures:
    """Stored per-sample embeddings looked up by sample index (the batch's x is not used).

    Args:
        embeddings: a :class:`~fastgenlabel.features.StoredEmbeddings` or the path of an (N, d)
            float ``.npy`` file (memory-mapped).
        device: where the looked-up rows go (default CPU).
    """

    needs_index = True

    def __init__(self, embeddings, device=None):
        self.embeddings = embeddings if isinstance(embeddings, StoredEmbeddings) else StoredEmbeddings(embeddings)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def dim(self) -> int:
        return self.embeddings.dim

    def __call__(self, x, index=None) -> torch.Tensor:
        if index is None:
            raise ValueError("index: stored embeddings are looked up by sample index; batches must be "
                             "(x, y, index)")
        idx = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        return self.embeddings.lookup(idx).to(self.device)

    def __repr__(self) -> str:
        return f"StoredFeatures({self.embeddings!r})"


class CallableFeatures:
    """Any callable ``f(x) -> (B, ...)`` (wrapped so it also accepts the index)."""

    needs_index = False

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, index=None) -> torch.Tensor:
        out = _tensor(self.fn(x), "features")
        return out.reshape(out.shape[0], -1)

    def __repr__(self) -> str:
        return f"CallableFeatures({self.fn!r})"


SOURCES = (InputFeatures, LinearMapFeatures, ModuleFeatures, StoredFeatures, CallableFeatures)


def as_source(features):
    """A feature source from what the user passes.

    None -> :class:`InputFeatures`; a ``torch.nn.Module`` -> :class:`ModuleFeatures`; a fitted
    ``ThumbnailPCA`` -> :class:`LinearMapFeatures`; ``StoredEmbeddings`` or a ``.npy`` path ->
    :class:`StoredFeatures`; a source -> itself; another callable -> :class:`CallableFeatures`.
    """
    if features is None:
        return InputFeatures()
    if isinstance(features, SOURCES):
        return features
    if isinstance(features, torch.nn.Module):
        return ModuleFeatures(features)
    if isinstance(features, ThumbnailPCA):
        return LinearMapFeatures(features)
    if isinstance(features, StoredEmbeddings) or (isinstance(features, (str, Path))
                                                   and str(features).endswith(".npy")):
        return StoredFeatures(features)
    if callable(features):
        return CallableFeatures(features)
    raise TypeError(f"features: expected None, a torch module, a ThumbnailPCA, a .npy path or a callable, "
                    f"got {type(features).__name__}")
