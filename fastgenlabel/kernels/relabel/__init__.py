"""The relabel stage: GenLabel targets for a mixed batch from the features of its unmixed samples.

``relabel(model, z, pairs, labels, gamma, num_classes=K)`` equals the reference

    z_mix = mix(z, pairs)
    genlabel_target(model, z_mix, labels, labels[pairs.perm], pairs.lam, gamma,
                    num_classes=K, smoothing=smoothing)

computed by fused kernels. Backends, in the order ``backend="auto"`` tries them:

- ``"numba-cuda"``: CUDA torch tensors, on torch's current stream, no copies of the inputs
  (``cuda.py``; full covariance with K >= 32 and K d^2 >= 2^20 computes its scores as one split-TF32
  tensor-core product instead, ``gemm.py``, rescoring exactly the classes where it may be off; diag
  and tied do alike with ``linear.policy("always")``, ``linear.py``);
- ``"numba-cpu"``: NumPy arrays and CPU torch tensors (``cpu.py``; full covariance with
  K >= 32 and K d^2 >= 2^20 computes its scores as one float32 matrix product, refined alike, and
  diag and tied always do, ``linear.py``);
- ``"reference"``: the plain torch reference above (any float dtype, any layout).

The kernels read the model as packed float32 arrays cached on the model (``params.py``), compute
each feature's term in float32 (or a float32 product, bounded and rescored in float64 where its
error could show) and form the logits in float64; the tolerance
table against the float64 reference is in ``tests/test_relabel.py``. Nothing compiles or touches a
GPU at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ...functional import genlabel_target, mix
from ...functional._arrays import Array, as_tensor, check_num_classes, check_unit_interval, like, overlaps
from ...functional.pairs import MixPairs, check_unchanged
from ..registry import Impl, dispatch, explain
from . import gemm, linear
from .params import (
    RelabelParams,
    device_params_for,
    gemm_params_for,
    gemm_typical_error_for,
    linear_params_for,
    linear_views_for,
    params_for,
    unsupported_reason,
)

__all__ = ["IMPLS", "RelabelParams", "explain_relabel", "params_for", "relabel"]


@dataclass(frozen=True)
class RelabelCall:
    """One validated call of :func:`relabel` (what every backend's ``refuse``/``run`` receives)."""

    model: Any
    z: Array  # (B, d) as given
    zt: torch.Tensor  # the same memory as a tensor
    pairs: MixPairs
    labels: Array
    labels_t: torch.Tensor
    gamma: float
    smoothing: float
    num_classes: int
    out: Array | None

    @cached_property
    def params(self) -> RelabelParams:
        """The model's packed kernel parameters (kernel backends only), looked up once per call."""
        return params_for(self.model)


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _c_contiguous(x) -> bool:
    return x.is_contiguous() if isinstance(x, torch.Tensor) else bool(np.asarray(x).flags.c_contiguous)


def _data_ok(zt: torch.Tensor, lt: torch.Tensor, k: int, pairs: MixPairs) -> tuple[bool, bool]:
    """(z finite, labels in [0, k)): NumPy on the host (several times faster than torch's dispatch
    for a batch); on CUDA one device-to-host transfer for both and for the pairs' check."""
    if not zt.is_cuda:
        if zt.dtype in (torch.float32, torch.float64, torch.float16):
            zh, lh = zt.detach().numpy(), lt.numpy()
            return bool(np.isfinite(zh).all()), bool(lh.min() >= 0 and lh.max() < k)
        return bool(torch.isfinite(zt).all()), bool(((lt >= 0) & (lt < k)).all())
    b, perm, lam = zt.shape[0], pairs.perm, pairs.lam
    pairs_ok = ((perm >= 0) & (perm < b)).all() & ((lam >= 0) & (lam <= 1)).all()
    flags = torch.stack([torch.isfinite(zt).all(), ((lt >= 0) & (lt < k)).all(), pairs_ok]).tolist()
    check_unchanged(pairs, ok=bool(flags[2]))
    return bool(flags[0]), bool(flags[1])


def _check_call(model, z, pairs, labels, gamma, num_classes, smoothing, out, validate) -> RelabelCall:
    k = check_num_classes(num_classes)
    g = check_unit_interval(gamma, "gamma")
    eps = check_unit_interval(smoothing, "smoothing")
    if isinstance(model, type) or not hasattr(model, "log_joint") or not hasattr(model, "num_classes"):
        what = f"the class {model.__name__} itself" if isinstance(model, type) else type(model).__name__
        raise TypeError(f"model: expected a fitted class model (GaussianClassModel, KDEClassModel), got {what}")
    if model.num_classes != k:  # raises NotFittedError for an unfitted model
        raise ValueError(f"num_classes: {k}, but the model was fitted for {model.num_classes} classes")
    zt = as_tensor(z, "z")
    if not zt.dtype.is_floating_point:
        raise TypeError(f"z: expected floating-point features, got dtype {zt.dtype}")
    if zt.ndim != 2:
        raise ValueError(f"z: expected shape (B, d), got {tuple(zt.shape)}")
    b = zt.shape[0]
    if zt.shape[1] != model.dim:
        raise ValueError(f"z: expected {model.dim} features per row (the model's d), got {zt.shape[1]}")
    if not isinstance(pairs, MixPairs):
        raise TypeError(f"pairs: expected MixPairs (from sample_pairs), got {type(pairs).__name__}")
    if len(pairs) != b:
        raise ValueError(f"pairs: drawn for a batch of {len(pairs)}, but z has {b} rows")
    dev = _device_of(z)
    if pairs.perm.device != dev or pairs.lam.device != dev:
        raise ValueError(f"pairs: on {pairs.perm.device}, but z is on {dev}; use pairs.to(z.device)")
    lt = as_tensor(labels, "labels")
    if lt.dtype.is_floating_point or lt.dtype.is_complex or lt.dtype == torch.bool:
        raise TypeError(f"labels: expected integer class labels, got dtype {lt.dtype}")
    if lt.shape != (b,):
        raise ValueError(f"labels: expected shape ({b},) (one per row of z), got {tuple(lt.shape)}")
    if lt.device != dev:
        raise ValueError(f"labels: on {lt.device}, but z is on {dev}")
    if out is not None:
        if not isinstance(out, (np.ndarray, torch.Tensor)) or isinstance(z, torch.Tensor) != isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a {'torch tensor' if isinstance(z, torch.Tensor) else 'numpy array'} "
                            f"like z, got {type(out).__name__}")
        if tuple(out.shape) != (b, k):
            raise ValueError(f"out: expected shape {(b, k)}, got {tuple(out.shape)}")
        if str(out.dtype) not in ("float32", "torch.float32"):
            raise TypeError(f"out: expected float32, got {out.dtype}")
        if _device_of(out) != dev:
            raise ValueError(f"out: on {_device_of(out)}, but z is on {dev}")
        if isinstance(out, np.ndarray) and not out.flags.writeable:
            raise ValueError("out: the array is read-only")
        if isinstance(out, torch.Tensor) and out.requires_grad:
            raise ValueError("out: must not require grad (it is written in place)")
        out_t = as_tensor(out, "out")
        for name, src in (("z", zt), ("labels", lt), ("pairs.perm", pairs.perm), ("pairs.lam", pairs.lam)):
            if overlaps(out_t, src):
                raise ValueError(f"out: overlaps {name}; the kernels read their inputs while they write, so out "
                                 "must be a separate buffer")
    if dev.type != "cuda":  # written since sample_pairs? cheap on the host, so even with validate=False
        check_unchanged(pairs)
    if validate and b:
        ok_z, ok_labels = _data_ok(zt, lt, k, pairs)
        if not ok_z:
            rows = torch.nonzero(~torch.isfinite(zt).all(dim=1)).flatten()[:5].tolist()
            raise ValueError(f"z: row(s) {rows} contain NaN or infinity; features must be finite")
        if not ok_labels:
            raise ValueError(f"labels: must lie in [0, {k}) for num_classes={k}; "
                             f"got min {int(lt.min())}, max {int(lt.max())}")
    return RelabelCall(model, z, zt, pairs, labels, lt, g, eps, k, out)


def relabel(
    model,
    z: Array,
    pairs: MixPairs,
    labels: Array,
    gamma: float = 1.0,
    *,
    num_classes: int,
    smoothing: float = 0.0,
    backend: str = "auto",
    out: Array | None = None,
    validate: bool = True,
) -> Array:
    """GenLabel training targets of a mixed batch, from the features of its unmixed samples.

    ``t = gamma * softmax_c(log p_c(z_mix) + log pi_c) + (1 - gamma) * y_mix``, label-smoothed,
    with ``z_mix = lam z + (1 - lam) z[perm]`` (docs/MATH.md sections 3 and 5). Matches
    ``genlabel_target(model, mix(z, pairs), labels, labels[perm], pairs.lam, gamma, ...)``.

    Args:
        model: a fitted ``GaussianClassModel`` (full, diag, tied) or ``KDEClassModel``; other
            class models run on the reference backend only.
        z: (B, d) features of the unmixed samples: a NumPy array or a torch tensor (CPU or CUDA).
            The kernels need float32, C-contiguous; other float dtypes go to the reference.
        pairs: the batch's ``MixPairs`` (per-batch or per-sample lambda), on z's device.
        labels: (B,) integer labels in [0, num_classes), on z's device.
        gamma: weight of the GenLabel label in [0, 1]; 0 gives the mixup target.
        num_classes: K; must equal the model's.
        smoothing: label-smoothing epsilon in [0, 1] (timm's convention).
        backend: "auto", "numba-cuda", "numba-cpu" or "reference".
        out: optional (B, K) float32 array/tensor on z's device to write into (fully overwritten).
        validate: check that z is finite, labels are in range and the pairs are still valid (one
            device sync on CUDA). With False, bad data gives undefined (but never out-of-bounds)
            results: on the CPU the pairs are checked all the same (cheap there).

    Returns:
        (B, K) float32 targets, rows summing to 1; a NumPy array if ``z`` is one, else a tensor
        on z's device. Inputs are never modified. A row whose every logit overflows (diag and tied:
        a float32 term past 3e38, a feature ~1e19 standard deviations out) gets y_mix as its y_gen
        on the kernel backends, never NaN.

    Raises:
        TypeError / ValueError naming the bad argument; ``BackendError`` listing every backend's
        reason when no requested backend can run the inputs.
    """
    call = _check_call(model, z, pairs, labels, gamma, num_classes, smoothing, out, validate)
    return dispatch("relabel", backend, IMPLS, call)


def explain_relabel(model, z, pairs, labels, gamma: float = 1.0, *, num_classes: int, smoothing: float = 0.0,
                    out=None, validate: bool = True) -> dict[str, str | None]:
    """Every backend's verdict on these arguments (None = would run), without running anything."""
    call = _check_call(model, z, pairs, labels, gamma, num_classes, smoothing, out, validate)
    return explain(IMPLS, call)


# ---- backends -----------------------------------------------------------------------------

def _kernel_input_reason(call: RelabelCall) -> str | None:
    why = unsupported_reason(call.model)
    if why:
        return why
    if call.zt.dtype != torch.float32:
        return f"dtype: the kernels take float32 z, got {call.zt.dtype}"
    if not _c_contiguous(call.z):
        return "contiguity: z must be C-contiguous (the kernels make no hidden copies)"
    if call.out is not None and not _c_contiguous(call.out):
        return "contiguity: out must be C-contiguous"
    return None


def _use_product(call: RelabelCall) -> bool:
    """Full covariance: the product form (gemm.py) for this model and size, or the factor kernels."""
    return gemm.use_gemm(call.num_classes, call.params.dim, typical_error=lambda: gemm_typical_error_for(call.model))


def _refuse_cpu(call: RelabelCall) -> str | None:
    if call.zt.is_cuda:
        return f"device: numba-cpu runs on host memory, z is on {call.zt.device}"
    try:
        import numba  # noqa: F401
    except ImportError as e:
        return f"missing package: numba cannot be imported ({e})"
    return _kernel_input_reason(call)


def _host(x) -> np.ndarray:
    return x.detach().numpy() if isinstance(x, torch.Tensor) else x


def _run_cpu(call: RelabelCall):
    from . import cpu

    b, k = call.zt.shape[0], call.num_classes
    if call.out is None:
        out_t = torch.empty((b, k), dtype=torch.float32)
        out = out_t.numpy()
        result = out_t if isinstance(call.z, torch.Tensor) else out
    else:
        out = _host(call.out)
        result = call.out
    params = call.params
    product = lin = None
    if params.kind == "full" and _use_product(call):  # one float32 product (gemm.py)
        product = gemm_params_for(call.model, torch.device("cpu"))
    elif params.kind in ("diag", "tied") and linear.use_linear("cpu"):  # one float32 product (linear.py)
        lin = linear_params_for(call.model)
    cpu.relabel_host(
        params, _host(call.zt), call.pairs.perm.numpy(), call.pairs.lam.to(torch.float32).numpy(),
        call.labels_t.to(torch.int64).numpy(), call.gamma, call.smoothing, out, product=product, linear=lin,
    )
    return result


def _refuse_cuda(call: RelabelCall) -> str | None:
    if not call.zt.is_cuda:
        where = "a NumPy array" if isinstance(call.z, np.ndarray) else f"on {call.zt.device}"
        return f"device: numba-cuda runs on CUDA torch tensors, z is {where}"
    from ..compat import numba_cuda_status

    ok, why = numba_cuda_status()
    if not ok:
        return f"missing package: {why}"
    why = _kernel_input_reason(call)
    if why:
        return why
    from .cuda import refuse_shape

    return refuse_shape(call.params, call.zt.shape[0])


def _run_cuda(call: RelabelCall):
    from .._interop import device_view, numba_stream
    from . import cuda as kernels

    dev = call.zt.device
    b, k = call.zt.shape[0], call.num_classes
    out = call.out if call.out is not None else torch.empty((b, k), dtype=torch.float32, device=dev)
    params = call.params
    with torch.cuda.device(dev):
        handle = torch.cuda.current_stream().cuda_stream
        stream = numba_stream(handle)
        lam = call.pairs.lam if call.pairs.lam.dtype == torch.float32 else call.pairs.lam.to(torch.float32)
        labels = call.labels_t if call.labels_t.dtype == torch.int64 else call.labels_t.to(torch.int64)
        arrays = device_params_for(call.model, dev, view=device_view)
        logits = torch.empty((b, k), dtype=torch.float64, device=dev)  # held until the launches are queued
        if params.kind == "full" and _use_product(call):  # tensor cores (gemm.py), then refined
            g = gemm_params_for(call.model, dev)
            if call.gamma > 0:
                gemm.scores(g, call.zt, call.pairs.perm, lam, out)
            arrays = dict(arrays, product_center=device_view(g["center"]), bound=device_view(g["bound"]))
            kernels.relabel_device(
                params, arrays, device_view(call.zt), device_view(call.pairs.perm), device_view(lam),
                device_view(labels), call.gamma, call.smoothing, device_view(out), stream=stream, scores_ready=True,
                logits=device_view(logits))
            return out
        if params.kind in ("diag", "tied") and linear.use_linear("cuda") and linear.fits_cuda(params):  # tensor cores
            lin = linear_params_for(call.model, dev)
            views = linear_views_for(call.model, dev, device_view)
            halves = None  # held until the launches are queued
            if call.gamma > 0:
                halves = linear.split_features(lin, call.zt, call.pairs.perm, lam, params.kind == "diag")
                gemm.split_scores(lin, halves, out)
                views = dict(views, halves=device_view(halves))
            kernels.relabel_device(
                params, arrays, device_view(call.zt), device_view(call.pairs.perm), device_view(lam),
                device_view(labels), call.gamma, call.smoothing, device_view(out), stream=stream, scores_ready=True,
                logits=device_view(logits), linear=views)
            return out
        done = whitened = scratch = None
        if params.kind in ("diag", "tied"):
            done = _tile_counters(dev, handle, kernels.sample_tiles(b))
        if params.kind == "tied" and call.gamma > 0:  # held until the launches are queued
            whitened = torch.empty((b, params.dim), dtype=torch.float32, device=dev)
            scratch = device_view(whitened)
        kernels.relabel_device(
            params, arrays, device_view(call.zt), device_view(call.pairs.perm), device_view(lam),
            device_view(labels), call.gamma, call.smoothing, device_view(out), stream=stream, done=done,
            scratch=scratch, logits=device_view(logits),
        )
    return out


_COUNTERS: dict = {}  # (device index, stream handle) -> (int32 zeros, their view): diag_fused's tile counters


def _tile_counters(dev: torch.device, handle: int, tiles: int):
    """A view of zeroed per-tile counters for launches on stream ``handle`` (torch's current
    stream), made once per stream: the kernel leaves them zero, a larger batch gets a larger
    array. Zeroed on that stream, so the first launch is ordered after the fill."""
    from .._interop import device_view

    key = (dev.index, handle)
    entry = _COUNTERS.get(key)
    if entry is None or entry[0].shape[0] < tiles:
        t = torch.zeros(max(tiles, 64), dtype=torch.int32, device=dev)
        entry = _COUNTERS[key] = (t, device_view(t))
    return entry[1]


def _run_reference(call: RelabelCall):
    lt = call.labels_t
    y_b = lt[call.pairs.perm.to(lt.device)]
    z_mix = mix(call.z, call.pairs)
    t = genlabel_target(call.model, z_mix, lt, y_b, call.pairs.lam, call.gamma,
                        num_classes=call.num_classes, smoothing=call.smoothing)
    t = as_tensor(t, "target").to(torch.float32)
    if call.out is not None:
        if isinstance(call.out, torch.Tensor):
            call.out.copy_(t)
        else:
            call.out[...] = t.cpu().numpy()
        return call.out
    return like(t, call.z)


IMPLS = (
    Impl("numba-cuda", _refuse_cuda, _run_cuda),
    Impl("numba-cpu", _refuse_cpu, _run_cpu),
    Impl("reference", lambda call: None, _run_reference),
)
