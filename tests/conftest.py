import os

# CUDA kernels are tested under Numba's simulator, which must be switched on before numba is
# imported: tests/cudasim runs in its own process (tests/test_cudasim.py starts it). On a machine
# with a GPU, FASTGENLABEL_GPU_TESTS=1 runs the same tests on the real device.
_run_cuda_tests = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or os.environ.get("FASTGENLABEL_GPU_TESTS") == "1"
collect_ignore_glob = [] if _run_cuda_tests else ["cudasim/*"]
