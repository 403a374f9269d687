"""Workarounds for the DALI 2.4 defects fastgenlabel meets, each narrow, version-checked, in one place.

1. ``minimal_numba_version`` in ``nvidia/dali/plugin/numba/__init__.py`` knows CUDA 11 and 12 only,
   so the GPU Numba operator refuses a CUDA 13 toolkit ("Unsupported CUDA toolkit version").
   :func:`patch_numba_cuda13` adds the CUDA 13 key (numba-cuda >= 0.30 targets CUDA 13) for
   DALI <= 2.4 when the key is missing.
2. ``NumbaFunction.__init__`` rejects FLOAT16 inputs and outputs whenever numba *has* float16 (a
   leftover inverted check). fastgenlabel never hands FLOAT16 to the operator: kernels write the
   float16 bit patterns into UINT16 buffers and the graph reinterprets them
   (:func:`float16_output`), which works on every DALI version, so nothing is patched.
3. On the GPU the operator launches one kernel per sample (no batch processing), each with the
   fixed ``blocks``/``threads_per_block`` of the operator: DALI's per-sample handling costs
   milliseconds per batch of 256 (anchors.md: permute_batch 3.2 ms + per-sample mix 3.5 ms on an
   H200, against 0.11-0.18 ms for one fused launch over the batch). fastgenlabel's GPU default
   therefore mixes *after* the pipeline with :func:`fastgenlabel.mix_images` on the output batch
   (one launch, no partner copy); the in-graph GPU stage exists for pipelines that must emit mixed
   images, and gives each launch a whole image (grid-stride loop) so that no launch is starved.
4. The CPU ``setup_fn`` wrapper reads the input shapes with ``num_outs`` instead of ``num_ins``
   (``_get_setup_fn_cpu``): a setup function sees only the first ``num_outs`` inputs. Our
   operators put the image first and never have more outputs than inputs, so that is enough
   (and the CPU stages' own setup callbacks, defect 5, read the input shapes themselves).
5. Every ``numba_function`` call compiles its run/setup functions again, in every process, and
   nothing of it can be cached on disk: DALI wraps them in a ``cfunc`` that closes over
   ``carray`` lambdas it builds with ``eval``. For the CPU mix stage that compile took most of
   a fresh process's start-up, and the wrapper alone (with an empty run function) most of that.
   fastgenlabel's CPU stages therefore hand DALI their own C callbacks
   (``_kernels.mix_cfuncs`` and friends: they read DALI's pointer tables themselves), compiled
   by :func:`cached_cfunc` into Numba's disk cache, one entry per stage configuration, keyed on
   the pixel code they call too; a later process loads them (``docs/BENCHMARKS.md``, "DALI
   start-up"). :func:`cached_numba_function` passes such callbacks through by address, and
   compiles Python run functions (the in-graph GPU stage) once per process and key.
"""
from __future__ import annotations

import functools
import importlib.metadata as metadata
import threading

DALI_MIN = (1, 30)
_lock = threading.Lock()
_compiled: dict = {}  # key -> a compiled address or a stage's C callbacks (which own their code)


@functools.cache
def dali_version() -> tuple[int, ...] | None:
    """The installed DALI's (major, minor, patch), or None when DALI is not installed (cached)."""
    for dist in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"):
        try:
            raw = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in raw.split(".")[:3])
    try:  # nightly and weekly builds have other distribution names; the module knows its version
        import nvidia.dali as dali
    except ImportError:
        return None
    raw = str(getattr(dali, "__version__", "0"))
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in raw.split(".")[:3])


def require_dali():
    """Import ``nvidia.dali`` or raise an ImportError that says how to install it."""
    try:
        import nvidia.dali as dali
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "fastgenlabel.dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (CUDA 13) or "
            "nvidia-dali-cuda120 (CUDA 12); or use GenLabelLoader(config, backend='torch')"
        ) from e
    v = dali_version()
    if v is not None and v[:2] < DALI_MIN:
        raise ImportError(f"fastgenlabel.dali needs DALI >= {DALI_MIN[0]}.{DALI_MIN[1]}, found {v}")
    return dali


def patch_numba_cuda13() -> bool:
    """Defect 1: let DALI <= 2.4's GPU Numba operator accept a CUDA 13 toolkit.

    Returns:
        True when the table was extended now (False: not needed or not applicable).
    """
    v = dali_version()
    if v is None or v[:2] > (2, 4):
        return False
    import nvidia.dali.plugin.numba as dali_numba
    from packaging.version import Version

    table = dali_numba.minimal_numba_version
    if 13 in table:
        return False
    table[13] = Version("0.61.0")  # the first numba whose CUDA target (numba-cuda) supports CUDA 13
    return True


def float16_output(node):
    """Defect 2: view a UINT16 node that holds float16 bit patterns as FLOAT16 (no copy).

    Args:
        node: a DALI DataNode of dtype UINT16 (CPU or GPU).

    Returns:
        The same data as a FLOAT16 DataNode.
    """
    from nvidia.dali import fn, types

    return fn.reinterpret(node, dtype=types.FLOAT16)


def cached_numba_function(key, *inputs, run_fn, out_types, in_types, outs_ndim, ins_ndim, setup_fn=None,
                          device="cpu", batch_processing=False, blocks=None, threads_per_block=None):
    """``numba_function`` with defect 5 worked around.

    Args:
        key: a hashable that identifies ``run_fn``/``setup_fn`` and everything they close over;
            two calls with the same key must describe the same computation.
        *inputs: the operator's DataNodes.
        run_fn, setup_fn: Python functions for DALI to compile (once per process and key), or
            compiled C callbacks (``numba`` ``CFunc``, e.g. from :func:`cached_cfunc`) whose
            addresses DALI calls as they are: what fastgenlabel's CPU stages pass.
        out_types, in_types, outs_ndim, ins_ndim, device, batch_processing, blocks,
            threads_per_block: as for ``nvidia.dali.plugin.numba.fn.experimental.numba_function``.

    Returns:
        The operator's output DataNode(s).
    """
    from nvidia.dali.plugin.numba import NumbaFunction

    if device == "gpu":
        patch_numba_cuda13()
    cls = _caching_class(NumbaFunction)
    op = cls(key=key, run_fn=run_fn, out_types=out_types, in_types=in_types, outs_ndim=outs_ndim,
             ins_ndim=ins_ndim, setup_fn=setup_fn, device=device, batch_processing=batch_processing,
             blocks=blocks, threads_per_block=threads_per_block)
    return op(*inputs)


def cached_cfunc(pyfunc, sig, depends=()):
    """Defect 5: ``numba.cfunc(sig, cache=True)(pyfunc)``, keyed on ``depends`` too, never failing for the cache.

    Numba keys a cached C callback on its code, the values it closes over and its own source
    file; ``depends`` (modules) adds the sources of the functions it calls
    (``kernels.compat.key_disk_cache_on``). The cache lives where Numba puts it: ``NUMBA_CACHE_DIR``,
    else ``__pycache__`` beside the source when writable, else a per-user folder. Where no folder
    can be written, or saving fails (a full disk), the function is compiled in memory as before.

    Returns:
        The compiled ``numba.core.ccallback.CFunc`` (``.address``; ``._cache_hits`` is 1 when it
        was loaded from the cache).
    """
    from numba.core.ccallback import CFunc
    from numba.core.sigutils import normalize_signature

    from ..kernels.compat import key_disk_cache_on

    func = CFunc(pyfunc, normalize_signature(sig), locals={}, options={"nopython": True})
    try:
        func.enable_caching()
    except RuntimeError:  # no writable cache folder: Numba says "cannot cache function"
        pass
    else:
        key_disk_cache_on({"f": func}, *depends)
        tolerate_unwritable_cache(func)
    func.compile()
    return func


def tolerate_unwritable_cache(*funcs):
    """Let the Numba functions ``funcs`` (``cache=True``) work where their cache cannot be written.

    Numba raises the OSError of a failed save (a cache folder that cannot be made, a full disk)
    out of the compile, although the function was compiled; here the save is skipped instead, so
    only the next process compiles again.
    """
    for func in funcs:
        cache = getattr(func, "_cache", None)
        save = getattr(cache, "save_overload", None)
        if save is None or getattr(save, "_fgl_tolerant", False):
            continue

        def save_overload(sig, data, _save=save):
            try:
                _save(sig, data)
            except OSError:
                pass

        save_overload._fgl_tolerant = True
        cache.save_overload = save_overload


def is_cfunc(fn) -> bool:
    """Whether ``fn`` is a compiled Numba C callback (its address is handed to DALI as it is)."""
    from numba.core.ccallback import CFunc

    return isinstance(fn, CFunc)


@functools.cache
def _caching_class(base):
    """A NumbaFunction subclass: compiled C callbacks are taken as they are, Python functions are
    compiled once per process and key."""

    class CachedNumbaFunction(base):
        def __init__(self, *, key, **kwargs):
            self._fgl_key = key
            super().__init__(**kwargs)

        def _get_run_fn_cpu(self, *args):
            if is_cfunc(args[0]):
                return args[0].address
            return memo(("run-cpu", self._fgl_key, args[1:]), lambda: super(CachedNumbaFunction, self)
                         ._get_run_fn_cpu(*args))

        def _get_run_fn_gpu(self, *args):
            return memo(("run-gpu", self._fgl_key, args[1:]), lambda: super(CachedNumbaFunction, self)
                         ._get_run_fn_gpu(*args))

        def _get_setup_fn_cpu(self, setup_fn):
            if setup_fn is None:
                return None
            if is_cfunc(setup_fn):
                return setup_fn.address
            return memo(("setup", self._fgl_key), lambda: super(CachedNumbaFunction, self)
                         ._get_setup_fn_cpu(setup_fn))

    CachedNumbaFunction.__name__ = base.__name__  # DALI names the operator after the class
    CachedNumbaFunction.__qualname__ = base.__qualname__
    return CachedNumbaFunction


def _freeze(x):
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


def memo(key, compile_fn):
    """``compile_fn()``, once per process and ``key``; the result is kept alive here (compiled
    functions must outlive every pipeline that calls their addresses)."""
    key = _freeze(key)
    with _lock:
        if key not in _compiled:
            _compiled[key] = compile_fn()
        return _compiled[key]

