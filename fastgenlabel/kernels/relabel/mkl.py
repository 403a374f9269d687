"""torch's own MKL ``sgemm``, called from inside a Numba parallel region.

Through ``torch.mm`` the diag/tied product runs in torch's OpenMP pool and the finish in Numba's:
two pools on the same cores, each spinning for a while after its work, so that each stalls the
other. Called from every Numba thread on that thread's rows, with MKL held to one thread there
(``MKL_Set_Num_Threads_Local``), MKL's sgemm lets features, product and finish run in one parallel
region (``cpu.linear_fused``).

The functions are found by symbol in the library torch links MKL into (``libtorch_cpu`` of the
x86-64 Linux wheels) and passed to the kernels as addresses, called through :func:`call_sgemm`
and :func:`call_set_threads` (a function address is an integer argument: typed at once, and the
compiled kernels stay cacheable). Integer arguments go by pointers to int64 values below 2^31,
which both MKL interfaces read alike (LP64 the low 32 bits, ILP64 all 64), and a small product is
checked against NumPy before the functions are used. Anywhere else :func:`functions` is None and
the product goes through ``torch.mm``.
"""
from __future__ import annotations

import ctypes
import functools
import pathlib
import sys

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_LIBRARIES = ("libtorch_cpu.so", "libtorch_cpu.dylib")


@intrinsic
def call_sgemm(typingctx, address, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call the Fortran ``sgemm`` at ``address`` with its 13 arguments, all pointers (as integers)."""
    sig = types.void(types.intp, *([types.intp] * 13))

    def codegen(context, builder, signature, args):
        pointer = ir.IntType(8).as_pointer()
        fn = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [pointer] * 13).as_pointer())
        builder.call(fn, [builder.inttoptr(v, pointer) for v in args[1:]])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def call_set_threads(typingctx, address, count):
    """``MKL_Set_Num_Threads_Local(count)`` at ``address``: MKL's thread count for the calling
    thread (0: MKL's global setting); returns the previous one."""
    sig = types.int32(types.intp, types.int32)

    def codegen(context, builder, signature, args):
        fn = builder.inttoptr(args[0], ir.FunctionType(ir.IntType(32), [ir.IntType(32)]).as_pointer())
        return builder.call(fn, [args[1]])

    return sig, codegen


def _lookup():
    lib_dir = pathlib.Path(torch.__file__).resolve().parent / "lib"
    for name in _LIBRARIES:
        path = lib_dir / name
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
                return lib.SGEMM, lib.MKL_Set_Num_Threads_Local
            except (OSError, AttributeError):
                return None
    return None


def _agrees(sgemm) -> bool:
    """C = A W^T of small integer matrices (exact in float32) through the kernels' argument
    convention (column-major C^T = op(W) A^T), against NumPy."""
    rng = np.random.default_rng(0)
    a = rng.integers(-8, 8, (5, 7)).astype(np.float32)
    w = rng.integers(-8, 8, (3, 7)).astype(np.float32)
    out = np.full((5, 3), np.nan, np.float32)
    ints = np.array([3, 5, 7, 7, 7, 3], np.int64)  # m, n, k, lda, ldb, ldc
    scalars = np.array([1.0, 0.0], np.float32)
    trans = np.array([ord("T"), ord("N")], np.uint8)
    i, s, t = ints.ctypes.data, scalars.ctypes.data, trans.ctypes.data
    sgemm.argtypes, sgemm.restype = [ctypes.c_void_p] * 13, None
    sgemm(t, t + 1, i, i + 8, i + 16, s, w.ctypes.data, i + 24, a.ctypes.data, i + 32, s + 4, out.ctypes.data, i + 40)
    return bool(np.array_equal(out, a @ w.T))


@functools.cache
def functions() -> tuple[int, int] | None:
    """The addresses of MKL's Fortran ``SGEMM`` and ``MKL_Set_Num_Threads_Local`` in torch's
    library, or None where torch exposes no MKL (then the product goes through ``torch.mm``)."""
    if not torch.backends.mkl.is_available():
        return None
    found = _lookup()
    if found is None or not _agrees(found[0]):
        return None
    return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in found)


# "auto": the diag/tied product by MKL inside the kernels' own parallel region where
# :func:`functions` finds it; "torch": always through ``torch.mm`` (tests, benchmarks).
POLICY = "auto"


def use_mkl() -> bool:
    return POLICY == "auto" and functions() is not None


def policy(value: str):
    """Temporarily set :data:`POLICY` ("auto" or "torch")."""
    from .gemm import scoped_policy

    return scoped_policy(sys.modules[__name__], value, ("auto", "torch"))


__all__ = ["POLICY", "call_set_threads", "call_sgemm", "functions", "policy", "use_mkl"]
