"""Fused Numba kernels (CPU and CUDA) and the backend registry. Nothing compiles at import."""
from .registry import BACKENDS, BackendError, Impl, dispatch, explain

__all__ = ["BACKENDS", "BackendError", "Impl", "dispatch", "explain"]
