"""The kernels' on-disk cache follows the scalar math they call, not only their own file."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import numpy as np
from fastgenlabel.kernels import compat
from fastgenlabel.kernels.relabel import cpu, gemm, math as rm
if sys.argv[1] == "edited":  # what an edit of math.py looks like to the cache: another digest
    compat.key_disk_cache_on(vars(cpu), rm, compat)
z = np.ones((2, 3), np.float32)
phi = np.empty((2, gemm.width(3)), np.float32)
cpu.quad_features(z, np.array([1, 0]), np.array([0.5, 0.5], np.float32), np.zeros(3, np.float32), phi)
stats = cpu.quad_features.stats
print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values())}))
"""


def run(tmp_path, variant):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, variant], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_editing_the_math_module_invalidates_cached_kernels(tmp_path):
    assert run(tmp_path, "plain") == {"hits": 0, "misses": 1}  # compiled, saved
    assert run(tmp_path, "plain") == {"hits": 1, "misses": 0}  # loaded
    assert run(tmp_path, "edited") == {"hits": 0, "misses": 1}  # the math changed: compiled again
    assert run(tmp_path, "edited") == {"hits": 1, "misses": 0}


def test_keying_is_idempotent_and_skips_plain_functions():
    from fastgenlabel.kernels import compat
    from fastgenlabel.kernels.relabel import cpu
    from fastgenlabel.kernels.relabel import math as rm

    before = cpu.finish._cache._cache_file._source_stamp
    namespace = {"finish": cpu.finish, "plain": len, "number": 3}
    assert compat.key_disk_cache_on(namespace, rm) == 1
    assert cpu.finish._cache._cache_file._source_stamp == before
