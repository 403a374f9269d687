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
from queued import device_time
from test_bench_relabel import inputs, model

import fastgenlabel as fg

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


def host_us(fn, n=200):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def components(calls):
    """Host time of the pieces of one relabel call, each alone."""
    from fastgenlabel.kernels import _interop
    from fastgenlabel.kernels.relabel import _check_call, params_for
    from fastgenlabel.kernels.relabel import cuda as kernels
    from fastgenlabel.kernels.relabel.params import device_params_for

    m = model("diag", 1000, 256)
    x = inputs(m, 256, "cuda")
    t = torch.empty(256, 1000, device=dev)
    views = [_interop.device_view(a) for a in (x["z"], x["pairs"].perm, x["pairs"].lam, x["labels"], x["out"])]
    arrays = device_params_for(m, dev, view=_interop.device_view)
    stream = _interop.current_stream()
    params = params_for(m)
    done_t = torch.zeros(kernels.sample_tiles(256), dtype=torch.int32, device=dev)  # kept alive: views hold no memory
    done = _interop.device_view(done_t)
    logits_t = torch.empty(256, 1000, dtype=torch.float64, device=dev)
    logits = _interop.device_view(logits_t)
    rows = {
        "torch.cuda.synchronize() (idle GPU)": lambda: torch.cuda.synchronize(),
        "device_view, cached": lambda: _interop.device_view(t),
        "new view (numba from_cuda_array_interface)": lambda: _interop._new_view(t),
        "current_stream()": _interop.current_stream,
        "_check_call, validate=False": lambda: _check_call(m, x["z"], x["pairs"], x["labels"], 1.0, 1000, 0.0,
                                                            x["out"], False),
        "_check_call, validate=True": lambda: _check_call(m, x["z"], x["pairs"], x["labels"], 1.0, 1000, 0.0,
                                                           x["out"], True),
        "relabel_device (1 launch, prebuilt views)": lambda: kernels.relabel_device(
            params, arrays, *views[:4], 1.0, 0.0, views[4], stream=stream, done=done, logits=logits),
        "empty torch op (t.zero_())": lambda: t.zero_(),
    }
    print("\n--- host time of the pieces (us per call, 200 calls, no sync unless named)")
    for name, fn in rows.items():
        print(f"{name:48s} {host_us(fn):8.1f} us", flush=True)
    torch.cuda.synchronize()


def launch_floor():
    """Host time of Numba launches of empty kernels (prebuilt views): the floor under any
    numba-cuda call, by argument count (diag_fused takes 9 arrays and 3 scalars)."""
    from fastgenlabel.kernels import _interop

    cuda = _interop.cuda_modules()

    @cuda.jit
    def k0():
        pass

    @cuda.jit
    def k4(a, b, c, d):
        pass

    @cuda.jit
    def k12(a, b, c, d, e, f, g, h, i, x, y, z):
        pass

    t = torch.zeros(256, device=dev)  # kept alive while the views are used
    v = _interop.device_view(t)
    stream = _interop.current_stream()
    one = np.float32(1.0)
    rows = {
        "empty kernel, no arguments": lambda: k0[1, 32, stream](),
        "empty kernel, 4 arrays": lambda: k4[1, 32, stream](v, v, v, v),
        "empty kernel, 9 arrays + 3 scalars": lambda: k12[1, 32, stream](v, v, v, v, v, v, v, v, v, one, one, one),
        "empty kernel, 9 arrays + 3 scalars, stream 0": lambda: k12[1, 32](v, v, v, v, v, v, v, v, v, one, one, one),
    }
    print("\n--- Numba launch floor (us per launch, 200 launches, no sync)")
    for name, fn in rows.items():
        print(f"{name:48s} {host_us(fn):8.1f} us", flush=True)
    torch.cuda.synchronize()


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
        gpu = device_time(fn)
        print(f"{name:48s} synchronised {sync_us:8.1f} us/call   queued {queued_us:8.1f} us/call   "
              f"CUDA events {start.elapsed_time(end) / 20 * 1e3:8.1f} us/call   "
              f"GPU time {'-' if gpu is None else f'{gpu * 1e6:.1f}'} us/call", flush=True)
    components(calls)
    launch_floor()
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
