import os

# CUDA kernels are tested under Numba's simulator, which must be switched on before numba is
# imported: tests/cudasim runs in its own process (tests/test_cudasim.py starts it).
collect_ignore_glob = [] if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else ["cudasim/*"]
