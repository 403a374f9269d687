"""Start-up timing shared by the kernel benchmarks: a fresh process with its own Numba cache."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fresh_process_json(script: str, cache_dir: str) -> dict:
    """Run ``script`` in a new interpreter with ``NUMBA_CACHE_DIR=cache_dir``; return the JSON
    object its last output line prints (an empty directory = a cold cache)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                          cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])
