"""Runs tests/cudasim (the CUDA kernels) in a separate process under NUMBA_ENABLE_CUDASIM=1."""
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_cuda_kernels_under_simulator():
    if not any(HERE.joinpath("cudasim").glob("test_*.py")):
        raise AssertionError("tests/cudasim holds no tests: every CUDA kernel must run under the simulator")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "cudasim")],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
