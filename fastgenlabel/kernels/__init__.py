"""Fused Numba kernels (CPU and CUDA) and the backend registry. Nothing compiles at import."""
from .pixel import mix_images
from .registry import BACKENDS, BackendError, Impl, dispatch, explain
from .relabel import explain_relabel, relabel

__all__ = ["BACKENDS", "BackendError", "Impl", "dispatch", "explain", "explain_relabel", "mix_images", "relabel"]
