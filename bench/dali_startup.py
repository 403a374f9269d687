"""A fresh process's DALI start-up: import, loader, first batch, with an empty and a warm Numba cache.

    python bench/make_jpegs.py /tmp/fgl-small --count 64 --size 64x48 --classes 4
    python bench/dali_startup.py /tmp/fgl-small [--runs 2]

Each run is a new interpreter building ``GenLabelLoader(LoaderConfig(data=DIR, backend="dali",
device="cpu", batch_size=16, image_size=32))`` and taking its first batch; the first run gets an
empty ``NUMBA_CACHE_DIR`` (what a new install or a new stage configuration meets), the others the
cache it left. Prints seconds per phase and one epoch after the first batch.
"""
from __future__ import annotations

import argparse
import tempfile

from startup import fresh_process_json

SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
from fastgenlabel import GenLabelLoader, LoaderConfig
t1 = time.perf_counter()
loader = GenLabelLoader(LoaderConfig(data=DATA, backend="dali", device="cpu", batch_size=16, image_size=32))
t2 = time.perf_counter()
next(iter(loader))
t3 = time.perf_counter()
for _ in loader:
    pass
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "loader": t2 - t1, "first_batch": t3 - t2, "to_first_batch": t3 - t0,
                  "epoch": t4 - t3}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a folder of class sub-folders of images")
    parser.add_argument("--runs", type=int, default=2, help="warm runs after the cold one")
    args = parser.parse_args()
    script = f"DATA = {args.data!r}\n" + SCRIPT
    with tempfile.TemporaryDirectory() as cache:
        for run in range(1 + args.runs):
            times = fresh_process_json(script, cache)
            label = "empty cache" if run == 0 else f"warm cache {run}"
            print(f"{label:>13}: " + "  ".join(f"{k} {v:.2f} s" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
