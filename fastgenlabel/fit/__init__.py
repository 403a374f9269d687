"""Fitting the class models at scale: streaming statistics from feature sources, all-reduced across ranks.

- :class:`StreamingFit`: ``update(z, y)`` batch by batch, ``result()`` fits (all ranks merged).
- :func:`fit_batches`: the same over an iterable of batches, with a feature source, a progress
  bar and throughput.
- Feature sources (:mod:`.sources`): the input itself, a fitted ThumbnailPCA, any torch module,
  stored embeddings; :func:`as_source` picks one.
- :func:`fit_image_folder` (:mod:`.folder`): what ``fastgenlabel fit`` runs on a folder of images.
"""
from .folder import FolderFit, fit_image_folder
from .sources import (
    CallableFeatures,
    InputFeatures,
    LinearMapFeatures,
    ModuleFeatures,
    StoredFeatures,
    as_source,
)
from .streaming import FitReport, StreamingFit, empty_stats, fit_batches, owned_mask

__all__ = [
    "CallableFeatures", "FitReport", "FolderFit", "InputFeatures", "LinearMapFeatures", "ModuleFeatures",
    "StoredFeatures", "StreamingFit", "as_source", "empty_stats", "fit_batches", "fit_image_folder", "owned_mask",
]
