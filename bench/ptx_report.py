"""Registers, spills and float64 instructions of the relabel kernels in sm_90 PTX (``ptxas -v``),
without a GPU: the check behind cuda.py's "no spills" line.

    LD_LIBRARY_PATH=<dir of libnvrtc.so.12 or .13> python bench/ptx_report.py

Needs ``ptxas`` (the CUDA toolkit) and NVRTC (e.g. ``pip install nvidia-cuda-nvrtc-cu12`` in a side
environment). The signatures are those ``relabel_device`` launches with.
"""
import re
import subprocess
import sys
import tempfile
import types

import numba.cuda.dispatcher as dispatcher
from numba import types as nt
from numba.cuda import compile_ptx

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from fastgenlabel.kernels.relabel import cuda as K  # noqa: E402

dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))  # no driver here
Z, I1, F1, F2, F3 = (nt.Array(t, n, "C") for t, n in ((nt.float32, 2), (nt.int64, 1), (nt.float32, 1),
                                                        (nt.float32, 2), (nt.float32, 3)))
D1, D2, C1, S, N = nt.Array(nt.float64, 1, "C"), nt.Array(nt.float64, 2, "C"), nt.Array(nt.int32, 1, "C"), nt.float32, nt.int64
PAIRS = (Z, I1, F1)  # z, perm, lam
TARGETS = (S, S, S, D2, F2)  # gamma, keep, add, logits, out
sigs = {
    "diag_fused": (K.diag_fused, (*PAIRS, F2, F2, I1, D1, *TARGETS, C1)),
    "tri_scores": (K.tri_scores, (*PAIRS, I1, F2, F3, N, D1, D2)),
    "kde_scores": (K.kde_scores, (*PAIRS, I1, F2, F3, N, F2, I1, D1, D2)),
    "refine_finish": (K.refine_finish, (*PAIRS, F1, F1, I1, F2, F3, N, I1, D1, *TARGETS)),
    "finish": (K.finish, (I1, F1, I1, *TARGETS)),
    "linear_split": (K.linear_split, (*PAIRS, F1, N, F2)),
    "linear_finish": (K.linear_finish, (F2, I1, F1, N, F1, D1, D1, D1, F2, F2, F1, F2, I1, *TARGETS)),
}
for name, (kern, sig) in sigs.items():
    ptx, _ = compile_ptx(kern.py_func, sig, cc=(9, 0))
    path = f"{tempfile.gettempdir()}/fastgenlabel-{name}.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    r = subprocess.run(["ptxas", "-arch=sm_90", "-v", path, "-o", "/dev/null"], capture_output=True, text=True)
    info = " ".join(l.split("ptxas info    :")[-1].strip() for l in r.stderr.splitlines() if "Used" in l or "spill" in l)
    nf64 = len(re.findall(r"\.f64", ptx))
    print(f"{name:14s} f64 instrs {nf64:4d} | {info}")
