"""Benchmark conventions (pytest-benchmark).

Method: every benchmark warms up first (so Numba kernels are compiled and cached before timing),
synchronises CUDA inside the timed function, and reports the median and the interquartile range.
Each benchmark sets ``benchmark.group`` to the workload (stage, sizes, device) and
``benchmark.extra_info["impl"]`` to the implementation, so ``bench/render.py`` can put one
workload's implementations side by side and compute the issue's goal ratios from one run.

Run:  python -m pytest bench --benchmark-json out/bench.json && python bench/render.py out/bench.json
"""
from __future__ import annotations

import os
import platform
import subprocess


def _commit() -> str:
    """The commit measured: FASTGENLABEL_COMMIT when set (the GPU machine receives a working tree
    whose .git may be older: name the commit in the device command), else git's HEAD."""
    if os.environ.get("FASTGENLABEL_COMMIT"):
        return os.environ["FASTGENLABEL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    import numba
    import numpy
    import torch

    machine_info["fastgenlabel_commit"] = _commit()
    machine_info["versions"] = {
        "python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
        "numba": numba.__version__,
    }
    try:
        import numba_cuda

        machine_info["versions"]["numba-cuda"] = numba_cuda.__version__
    except ImportError:
        pass
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
