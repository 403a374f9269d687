"""What DALI's external source costs the thread that feeds it, by the form of the batch.

    python bench/make_jpegs.py /tmp/fgl-jpegs
    python bench/dali_feed.py /tmp/fgl-jpegs [--batch-size 256]

A CPU pipeline that only passes the loader's four inputs through (encoded images, indices,
perm, lam), fed ready batches, so the time per ``run`` is DALI's feeding and scheduling. Forms:
``lists`` (B per-sample (1,) arrays for each small input), ``arrays`` ((B, 1) arrays: what
``EpochSource`` gives). Prints the best of three 30-batch timings.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def per_batch(files, batch_size: int, form: str) -> float:
    from nvidia.dali import fn, pipeline_def, types

    encoded = [[files.read(i % len(files)) for i in range(j * batch_size, (j + 1) * batch_size)] for j in range(4)]
    calls = {"n": 0}

    def source():
        jpegs = encoded[calls["n"] % 4]
        calls["n"] += 1
        idx = np.arange(batch_size, dtype=np.int64).reshape(-1, 1)
        lam = np.ones((batch_size, 1), np.float32)
        if form == "lists":
            return jpegs, list(idx), list(idx), list(lam)
        return jpegs, idx, idx, lam

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=None, prefetch_queue_depth=2)
    def pipe():
        return tuple(fn.external_source(source=source, num_outputs=4, batch=True,
                                        dtype=[types.UINT8, types.INT64, types.INT64, types.FLOAT]))

    p = pipe()
    p.build()
    for _ in range(5):
        p.run()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(30):
            p.run()
        best = min(best, (time.perf_counter() - t) / 30)
    return best


def main(argv=None) -> int:
    from fastgenlabel.loader.files import scan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    files = scan(args.data)
    for form in ("lists", "arrays"):
        print(f"{form}: {per_batch(files, args.batch_size, form) * 1e3:.2f} ms per batch of {args.batch_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
