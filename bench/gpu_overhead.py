"""Where the host time of one CUDA call goes: wall time per call and the top functions (cProfile).

    python bench/gpu_overhead.py     # on a GPU machine

The GPU work of a relabel or pixel call is tens of microseconds; anything above that in the
wall time is host overhead (dispatch, views, launches, synchronisation). Prints per-call medians
of synchronised calls and of 50 calls queued without synchronisation, then the profile.
"""
import cProfile
import pstats
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import fastgenlabel as fg  # noqa: E402
from test_bench_relabel import inputs, model  # noqa: E402

dev = torch.device("cuda")


def timed(fn, n=50):
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        per.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return statistics.median(per) * 1e6, (time.perf_counter() - t) / n * 1e6


def main():
    calls = {}
    for kind in ("diag", "tied", "full"):
        m = model(kind, 1000, 256)
        x = inputs(m, 256, "cuda")
        for validate in (True, False):
            calls[f"relabel {kind} K=1000 d=256 B=256 validate={validate}"] = (
                lambda m=m, x=x, v=validate: fg.relabel(m, x["z"], x["pairs"], x["labels"], 1.0, num_classes=1000,
                                                        backend="numba-cuda", out=x["out"], validate=v))
    imgs = torch.randint(0, 256, (256, 224, 224, 3), dtype=torch.uint8, device=dev)
    pairs = fg.sample_pairs(256, 1.0, lam_mode="sample", generator=0).to(dev)
    out = torch.empty((256, 3, 224, 224), dtype=torch.float16, device=dev)
    calls["mix_images B=256 fp16"] = lambda: fg.mix_images(imgs, pairs, (123.7, 116.3, 103.5), (58.4, 57.1, 57.4),
                                                           backend="numba-cuda", out=out)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    for name, fn in calls.items():
        sync_us, queued_us = timed(fn)
        fn()
        start.record()
        for _ in range(20):
            fn()
        end.record()
        end.synchronize()
        print(f"{name:48s} synchronised {sync_us:8.1f} us/call   queued {queued_us:8.1f} us/call   "
              f"CUDA events {start.elapsed_time(end) / 20 * 1e3:8.1f} us/call", flush=True)
    for name in ("relabel diag K=1000 d=256 B=256 validate=False", "mix_images B=256 fp16"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            calls[name]()
        torch.cuda.synchronize()
        prof.disable()
        print(f"\n--- {name}: 100 calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    np.random.seed(0)
    main()
