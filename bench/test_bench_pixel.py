"""Benchmarks of the pixel stage: uint8 NHWC 224 x 224 x 3 batch -> mixed, normalised NCHW batch.

Run: ``python -m pytest bench/test_bench_pixel.py --benchmark-columns=median,iqr,min,rounds``
(add ``-k "not reference"`` to skip the slow float64 reference, ``-k cuda`` for the GPU cases).

Method: B in {64, 256}, per-sample lambda and a random permutation (the general case) unless a
competitor only does batch lambda with the flipped batch (timm's batch mode); CutMix with a box per
sample (``sample_boxes(mode="sample")``); warm-up rounds
compile kernels (Numba, torch.compile) before timing; CUDA cases synchronise inside the timed
function; outputs are preallocated where the implementation allows it. Report medians with their
spread, the commit, the device and the versions (pytest-benchmark's JSON records the machine).

What users run today is measured beside fastgenlabel: torch eager (layout + float + normalise, then
the mixup expression), torch eager normalisation followed by timm's batch-mode mixup written out in
place (``x.mul_(lam).add_(x.flip(0).mul_(1 - lam))``: the stand-in where timm is not installed),
``torch.compile`` of the fused expression, and timm / torchvision where they import.
The start-up cases time a fresh process's first call with an empty and with a warm Numba cache.
"""
import pathlib
import tempfile

import numpy as np
import pytest
import torch
from queued import record_queued
from startup import fresh_process_json

from fastgenlabel import mix_images, sample_boxes, sample_pairs

H = W = 224
C = 3
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
BATCHES = [64, 256]
HAS_CUDA = torch.cuda.is_available()
ROOT = pathlib.Path(__file__).resolve().parents[1]

_DATA = {}


def data(b: int, device: str = "cpu") -> dict:
    """The batch (NumPy and torch), its pairs and the per-channel constants, made once per (B, device)."""
    key = (b, device)
    if key not in _DATA:
        rng = np.random.default_rng(b)
        x = rng.integers(0, 256, (b, H, W, C), dtype=np.uint8)
        pairs = sample_pairs(b, 1.0, lam_mode="sample", generator=b)
        boxes, _ = sample_boxes(pairs, H, W, mode="sample", generator=b)  # CutMix: a box per sample
        t = torch.from_numpy(x).to(device)
        _DATA[key] = dict(
            x=x, t=t, pairs=pairs, boxes=boxes, lam=pairs.lam.to(device).view(-1, 1, 1, 1), perm=pairs.perm.to(device),
            lam_batch=float(pairs.lam[0]),
            mean=torch.tensor(MEAN, device=device).view(1, C, 1, 1),
            std=torch.tensor(STD, device=device).view(1, C, 1, 1),
        )
    return _DATA[key]


def eager_fused(x, lam, perm, mean, std):
    """Layout + float + normalise, then the mixup expression (per-sample lambda, any permutation)."""
    y = (x.permute(0, 3, 1, 2).contiguous().float() - mean) / std
    return lam * y + (1 - lam) * y[perm]


def eager_normalise_timm_batch_mixup(x, lam: float, mean, std):
    """Eager normalisation, then timm's ``Mixup(mode="batch")`` arithmetic (flipped batch, one lambda)."""
    y = x.permute(0, 3, 1, 2).contiguous().float().sub_(mean).div_(std)
    flipped = y.flip(0).mul_(1.0 - lam)
    return y.mul_(lam).add_(flipped)


def eager_normalise_timm_cutmix(x, perm, boxes, mean, std):
    """Eager normalisation, then timm's ``Mixup(mode="elem")`` CutMix loop (a clone of the batch,
    then each sample's box pasted from its partner), with the contestant's partners and boxes."""
    y = x.permute(0, 3, 1, 2).contiguous().float().sub_(mean).div_(std)
    orig = y.clone()
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        y[i][:, y0:y1, x0:x1] = orig[perm[i]][:, y0:y1, x0:x1]
    return y


def label(benchmark, b: int, device: str, impl: str) -> None:
    """One workload per (B, device): bench/render.py puts its implementations side by side."""
    benchmark.group = f"pixel B={b} 224x224x3 uint8 NHWC -> NCHW [{device}]"
    benchmark.extra_info.update(impl=impl, batch=b, device=device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# --- fastgenlabel ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_numba_cpu(benchmark, b, dtype):
    d = data(b)
    out = torch.empty((b, C, H, W), dtype=getattr(torch, dtype))
    label(benchmark, b, "cpu", f"numba-cpu {dtype}")
    benchmark.pedantic(mix_images, args=(d["t"], d["pairs"], MEAN, STD), kwargs=dict(out=out, backend="numba-cpu"),
                       rounds=30 if b == 64 else 10, warmup_rounds=2)


@pytest.mark.parametrize("b", [256])
def test_numba_cpu_cutmix(benchmark, b):
    """CutMix in the same pass (a box per sample), beside the mixup case above."""
    d = data(b)
    out = torch.empty((b, C, H, W), dtype=torch.float32)
    label(benchmark, b, "cpu", "numba-cpu float32 cutmix")
    benchmark.pedantic(mix_images, args=(d["t"], d["pairs"], MEAN, STD),
                       kwargs=dict(out=out, boxes=d["boxes"], backend="numba-cpu"), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("b", [256])
def test_torch_eager_normalise_timm_cutmix(benchmark, b):
    """The CutMix goal's baseline: the same batch, partners and boxes as ``test_numba_cpu_cutmix``."""
    d = data(b)
    boxes, perm = d["boxes"].boxes.tolist(), d["pairs"].perm.tolist()
    label(benchmark, b, "cpu", "torch eager + timm-style CutMix (elem)")
    benchmark.pedantic(eager_normalise_timm_cutmix, args=(d["t"], perm, boxes, d["mean"], d["std"]),
                       rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("b", BATCHES)
def test_reference(benchmark, b):
    d = data(b)
    label(benchmark, b, "cpu", "reference")
    benchmark.pedantic(mix_images, args=(d["t"], d["pairs"], MEAN, STD), kwargs=dict(backend="reference"),
                       rounds=2, warmup_rounds=0)


# --- what users run today, CPU ------------------------------------------------------------------------------------

@pytest.mark.parametrize("b", BATCHES)
def test_torch_eager(benchmark, b):
    d = data(b)
    label(benchmark, b, "cpu", "torch eager")
    benchmark.pedantic(eager_fused, args=(d["t"], d["lam"], d["perm"], d["mean"], d["std"]),
                       rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("b", BATCHES)
def test_torch_eager_normalise_timm_batch_standin(benchmark, b):
    d = data(b)
    label(benchmark, b, "cpu", "torch eager + eager mixup (timm batch stand-in)")
    benchmark.pedantic(eager_normalise_timm_batch_mixup, args=(d["t"], d["lam_batch"], d["mean"], d["std"]),
                       rounds=5, warmup_rounds=1)


_COMPILED = {}


def compiled_fused():
    if "fn" not in _COMPILED:
        try:
            fn = torch.compile(eager_fused)
            d = data(2)
            fn(d["t"], d["lam"], d["perm"], d["mean"], d["std"])
            _COMPILED["fn"] = fn
        except Exception as e:  # no compiler, unsupported platform, ...
            _COMPILED["fn"] = None
            _COMPILED["why"] = f"torch.compile unavailable: {type(e).__name__}: {str(e)[:200]}"
    if _COMPILED["fn"] is None:
        pytest.skip(_COMPILED["why"])
    return _COMPILED["fn"]


@pytest.mark.parametrize("b", BATCHES)
def test_torch_compile(benchmark, b):
    fn = compiled_fused()
    d = data(b)
    label(benchmark, b, "cpu", "torch.compile")
    benchmark.pedantic(fn, args=(d["t"], d["lam"], d["perm"], d["mean"], d["std"]), rounds=10, warmup_rounds=2)


def _timm_mixup():
    try:
        from timm.data import Mixup
    except Exception as e:  # not installed, or does not import beside this torch
        pytest.skip(f"timm not importable here ({type(e).__name__}: {str(e)[:120]}); see the eager stand-in")
    return Mixup


DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_timm_mixup(benchmark, b, mode, device):
    mixup = _timm_mixup()(mixup_alpha=1.0, mode=mode, num_classes=1000)
    d = data(b, device)
    target = torch.zeros(b, dtype=torch.int64, device=device)
    label(benchmark, b, device, f"torch eager + timm Mixup({mode})")

    def call():
        y = d["t"].permute(0, 3, 1, 2).contiguous().float().sub_(d["mean"]).div_(d["std"])
        return mixup(y, target)

    def run():
        out = call()
        sync(device)
        return out

    benchmark.pedantic(run, rounds=30 if device == "cuda" else 3, warmup_rounds=1)
    if device == "cuda":
        record_queued(benchmark, call)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", BATCHES)
def test_torchvision_mixup(benchmark, b, device):
    try:
        from torchvision.transforms import v2
    except Exception as e:
        pytest.skip(f"torchvision not importable here ({type(e).__name__}: {str(e)[:120]})")
    mixup = v2.MixUp(alpha=1.0, num_classes=1000)
    d = data(b, device)
    target = torch.zeros(b, dtype=torch.int64, device=device)
    label(benchmark, b, device, "torch eager + torchvision v2.MixUp")

    def call():
        y = d["t"].permute(0, 3, 1, 2).contiguous().float().sub_(d["mean"]).div_(d["std"])
        return mixup(y, target)

    def run():
        out = call()
        sync(device)
        return out

    benchmark.pedantic(run, rounds=30 if device == "cuda" else 3, warmup_rounds=1)
    if device == "cuda":
        record_queued(benchmark, call)


# --- CUDA ---------------------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


@cuda_only
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_numba_cuda(benchmark, b, dtype):
    d = data(b, "cuda")
    out = torch.empty((b, C, H, W), dtype=getattr(torch, dtype), device="cuda")
    label(benchmark, b, "cuda", f"numba-cuda {dtype}")

    def run():
        mix_images(d["t"], d["pairs"], MEAN, STD, out=out, backend="numba-cuda")
        torch.cuda.synchronize()

    benchmark.extra_info.update(device=torch.cuda.get_device_name(0))
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
    record_queued(benchmark, lambda: mix_images(d["t"], d["pairs"], MEAN, STD, out=out, backend="numba-cuda"))


@cuda_only
@pytest.mark.parametrize("b", BATCHES)
def test_torch_cuda_eager(benchmark, b):
    d = data(b, "cuda")
    label(benchmark, b, "cuda", "torch eager")

    def run():
        eager_fused(d["t"], d["lam"], d["perm"], d["mean"], d["std"])
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
    record_queued(benchmark, lambda: eager_fused(d["t"], d["lam"], d["perm"], d["mean"], d["std"]))


@cuda_only
@pytest.mark.parametrize("b", BATCHES)
def test_torch_cuda_eager_normalise_timm_batch_standin(benchmark, b):
    d = data(b, "cuda")
    label(benchmark, b, "cuda", "torch eager + eager mixup (timm batch stand-in)")

    def run():
        eager_normalise_timm_batch_mixup(d["t"], d["lam_batch"], d["mean"], d["std"])
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
    record_queued(benchmark, lambda: eager_normalise_timm_batch_mixup(d["t"], d["lam_batch"], d["mean"], d["std"]))


@cuda_only
@pytest.mark.parametrize("b", BATCHES)
def test_torch_cuda_compile(benchmark, b):
    fn = torch.compile(eager_fused)
    d = data(b, "cuda")
    label(benchmark, b, "cuda", "torch.compile")

    def run():
        fn(d["t"], d["lam"], d["perm"], d["mean"], d["std"])
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
    record_queued(benchmark, lambda: fn(d["t"], d["lam"], d["perm"], d["mean"], d["std"]))


@cuda_only
@pytest.mark.parametrize("b", BATCHES)
def test_cuda_copy_floor(benchmark, b):
    """The bandwidth floor: a device-to-device copy moving the pixel stage's bytes (read 2 x uint8
    per element, write one float16), i.e. copying B*H*W*C*2 bytes."""
    src = torch.empty(b * H * W * C * 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    label(benchmark, b, "cuda", "copy floor (same bytes, D2D copy)")

    def run():
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
    record_queued(benchmark, lambda: dst.copy_(src))


# --- start-up: compile vs on-disk cache ----------------------------------------------------------------------------

_FIRST_CALL = """
import json, time
t0 = time.perf_counter()
import numpy as np
from fastgenlabel import mix_images, sample_pairs
t1 = time.perf_counter()
import numba
t2 = time.perf_counter()
x = np.zeros((2, 8, 8, 3), np.uint8)
mix_images(x, sample_pairs(2, generator=0), 127.0, 64.0, backend="numba-cpu")
t3 = time.perf_counter()
mix_images(x, sample_pairs(2, generator=0), 127.0, 64.0, backend="numba-cpu")
t4 = time.perf_counter()
print(json.dumps({"import_fastgenlabel_s": t1 - t0, "import_numba_s": t2 - t1, "first_call_s": t3 - t2,
                  "second_call_s": t4 - t3}))
"""


def first_call(cache_dir: str) -> dict:
    return fresh_process_json(_FIRST_CALL, cache_dir)


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_numba_cpu_startup(benchmark, cache):
    """A fresh process's first numba-cpu call (uint8 -> float32): compile (cold cache) or load (warm)."""
    with tempfile.TemporaryDirectory() as cache_dir:
        if cache == "warm":
            first_call(cache_dir)
        result = {}
        benchmark.group = "pixel start-up [cpu]"
        benchmark.extra_info.update(impl=f"numba-cpu, {cache} cache")
        benchmark.pedantic(lambda: result.update(first_call(cache_dir)), rounds=1, iterations=1)
        benchmark.extra_info.update(result)
        print(f"\nnumba-cpu start-up, {cache} cache: {result}")
