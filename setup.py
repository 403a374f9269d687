"""Build hook for the optional native DALI operator in ``csrc/``.

All metadata lives in ``pyproject.toml``. The native operator is built only when
``FASTGENLABEL_BUILD_NATIVE=1`` is set; without a compiler, CUDA or DALI headers the
package installs as pure Python and every feature falls back to the Numba kernels.
"""
import os

from setuptools import setup

if os.environ.get("FASTGENLABEL_BUILD_NATIVE") == "1":
    raise SystemExit(
        "FASTGENLABEL_BUILD_NATIVE=1: the native DALI operator (csrc/) is not part of this "
        "release yet; unset the variable to install the pure-Python package."
    )

setup()
