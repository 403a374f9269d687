import os

# CUDA kernels are tested under Numba's simulator, which must be switched on before numba is
# imported: tests/cudasim runs in its own process (tests/test_cudasim.py starts it). On a machine
# with a GPU, FASTGENLABEL_GPU_TESTS=1 runs the same tests on the real device.
_run_cuda_tests = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or os.environ.get("FASTGENLABEL_GPU_TESTS") == "1"
collect_ignore_glob = [] if _run_cuda_tests else ["cudasim/*"]

import pytest  # noqa: E402

# DALI's Numba stage compiles for 10-15 s in every process, and the CUDA simulator suite runs in a
# process of its own: tests that build a DALI pipeline (the modules below, or a "dali" backend
# parameter), the simulator and the end-to-end demo are "slow", which `python -m pytest -m "not slow"`
# leaves out while working. CI runs everything.
_SLOW_MODULES = {"test_dali.py", "test_dali_webdataset.py", "test_cudasim.py", "test_demo.py", "test_fit_distributed.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.path.name in _SLOW_MODULES or (callspec is not None and callspec.params.get("backend") == "dali"):
            item.add_marker(pytest.mark.slow)
