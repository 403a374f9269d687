import subprocess
import sys


def test_info_runs_and_names_backends():
    out = subprocess.run([sys.executable, "-m", "fastgenlabel", "info"], capture_output=True, text=True, check=True)
    for name in ("reference", "numba-cpu", "numba-cuda", "dali"):
        assert name in out.stdout
