"""The pixel stage's CUDA kernel against the reference: under NUMBA_ENABLE_CUDASIM=1 (CI, through
tests/test_cudasim.py) or on a real GPU (FASTGENLABEL_GPU_TESTS=1).

The kernel is launched directly on NumPy arrays and on device arrays (``cuda.to_device``), exactly
as ``_run_cuda`` launches it on views of torch tensors. The torch glue itself runs on CUDA tensors
on a GPU, and under the simulator on CPU tensors standing in for them. Sizes are tiny: the
simulator runs every thread in Python.
"""
import os

import numpy as np
import pytest
import torch

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
assert SIM or os.environ.get("FASTGENLABEL_GPU_TESTS") == "1", "run through tests/test_cudasim.py"

from fastgenlabel import CutBoxes, MixPairs, mix_images, sample_boxes, sample_mix, sample_pairs  # noqa: E402
from fastgenlabel.functional import images as ref_images  # noqa: E402
from fastgenlabel.kernels import BackendError  # noqa: E402
from fastgenlabel.kernels._interop import cuda_modules  # noqa: E402
from fastgenlabel.kernels.pixel import cuda as kernels  # noqa: E402
from fastgenlabel.kernels.pixel import explain_mix_images  # noqa: E402
from fastgenlabel.kernels.pixel import math as pmath  # noqa: E402

cuda = cuda_modules()
THREADS = 16  # small blocks keep the simulator quick; several blocks per sample exercise the stride loop
MEAN = [123.675, 116.28, 103.53, 90.0]
STD = [58.395, 57.12, 57.375, 50.0]
TOL = {"float32": (1e-5, 1e-5), "float16": (1e-3, 1e-3), "bfloat16": (8e-3, 8e-3)}


def reference(x, pairs, mean, std, dtype, layout, input_layout, boxes=None) -> np.ndarray:
    r = ref_images.mix_images(torch.from_numpy(x), pairs, mean, std, dtype=dtype, layout=layout,
                              input_layout=input_layout, boxes=boxes)
    return r.to(torch.float64).numpy()


def run_kernel(x, pairs, mean, std, dtype, layout, input_layout, *, on_device, boxes=None):
    """Launch the kernel the way the torch glue does; returns the result as float64."""
    b = x.shape[0]
    h, w, c = x.shape[1:] if input_layout == "HWC" else (x.shape[2], x.shape[3], x.shape[1])
    job = ref_images.prepare_pixel_job(x, pairs, mean, std, layout=layout, input_layout=input_layout)
    scale, shift = job.scale_shift()
    bf16 = dtype == "bfloat16"
    out = np.full(b * h * w * c, np.nan, np.float16 if dtype == "float16" else np.float32)
    if bf16:
        out = np.full(b * h * w * c, 0x7FC0, np.uint16)  # bfloat16 NaN bits
    args = [x.reshape(-1), pairs.perm.numpy(), pairs.lam.numpy(), scale, shift, out]
    box = None if boxes is None else boxes.boxes.numpy()
    mask = None if boxes is None or boxes.cut is None else boxes.cut.numpy().astype(np.int64)
    if on_device:
        args = [cuda.to_device(a) for a in args]
        box = None if box is None else cuda.to_device(box)
        mask = None if mask is None else cuda.to_device(mask)
    kernels.launch(*args, h, w, c, input_layout == "CHW", layout == "CHW", bf16,
                   stream=cuda.stream() if on_device else 0, threads=THREADS, boxes=box, mask=mask)
    got = args[-1].copy_to_host() if on_device else out
    if bf16:
        got = torch.from_numpy(got.view(np.int16)).view(torch.bfloat16).to(torch.float64).numpy()
    shape = (b, c, h, w) if layout == "CHW" else (b, h, w, c)
    return got.astype(np.float64).reshape(shape)


def check(got, want, dtype):
    assert np.isfinite(got).all(), "output not fully written"
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max(initial=0)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("input_layout", ["HWC", "CHW"])
@pytest.mark.parametrize("input_dtype", ["uint8", "float16", "float32"])
def test_kernel_matches_reference(input_dtype, input_layout, layout, dtype):
    rng = np.random.default_rng([len(input_dtype), len(dtype), len(layout + input_layout)])
    b, h, w, c = 3, 7, 5, 3
    shape = (b, h, w, c) if input_layout == "HWC" else (b, c, h, w)
    if input_dtype == "uint8":
        x, mean, std = rng.integers(0, 256, shape, dtype=np.uint8), MEAN[:c], STD[:c]
    else:
        x, mean, std = rng.standard_normal(shape).astype(input_dtype), None, None
    before = x.copy()
    pairs = sample_pairs(b, lam_mode="sample", generator=len(dtype))
    got = run_kernel(x, pairs, mean, std, dtype, layout, input_layout, on_device=input_dtype == "float32")
    check(got, reference(x, pairs, mean, std, dtype, layout, input_layout), dtype)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("size, pairing, lam_mode", [
    ((1, 7, 5, 3), "permutation", "batch"),
    ((5, 3, 11, 1), "flip", "sample"),
    ((4, 6, 6, 4), "roll", "batch"),
    ((2, 33, 1, 3), "flip", "batch"),  # a thread takes several pixels: the stride loop
    ((2, 9, 9, 3), "roll", "sample"),  # 81 pixels: two blocks per sample
])
def test_kernel_sizes_and_pairings(size, pairing, lam_mode):
    b, h, w, c = size
    rng = np.random.default_rng(list(size))
    x = rng.integers(0, 256, size, dtype=np.uint8)
    pairs = sample_pairs(b, pairing=pairing, lam_mode=lam_mode, generator=b)
    got = run_kernel(x, pairs, MEAN[:c], STD[:c], "float32", "CHW", "HWC", on_device=True)
    check(got, reference(x, pairs, MEAN[:c], STD[:c], "float32", "CHW", "HWC"), "float32")


def test_kernel_any_partner_map_and_lambda_extremes():
    x = np.random.default_rng(1).standard_normal((4, 3, 2, 3)).astype(np.float32)
    pairs = MixPairs(torch.tensor([2, 2, 0, 3]), torch.tensor([1.0, 0.0, 0.5, 0.25]))
    got = run_kernel(x, pairs, None, None, "float32", "HWC", "HWC", on_device=False)
    np.testing.assert_array_equal(got[0], x[0])
    np.testing.assert_array_equal(got[1], x[2])
    check(got, reference(x, pairs, None, None, "float32", "HWC", "HWC"), "float32")


def edge_boxes(b, h, w, seed):
    """The full image, zero-area boxes, boxes touching each border and a random one, shuffled."""
    rng = np.random.default_rng(seed)
    y, x = sorted(rng.integers(0, h + 1, 2)), sorted(rng.integers(0, w + 1, 2))
    fixed = np.array([[0, h, 0, w], [0, 0, 0, 0], [h // 2, h // 2, 0, w], [0, h // 2 + 1, 0, w // 2 + 1],
                      [h // 2, h, w // 2, w], [0, h, w - 1, w], y + x], np.int64)
    return CutBoxes(torch.from_numpy(np.ascontiguousarray(fixed[rng.permutation(len(fixed))[:b]])), h, w)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("input_layout", ["HWC", "CHW"])
def test_cutmix_kernel_matches_reference(input_layout, layout, dtype):
    input_dtype = ["uint8", "float16", "float32"][(len(dtype) + len(layout + input_layout)) % 3]
    rng = np.random.default_rng([len(dtype), len(layout), len(input_layout)])
    b, h, w, c = 5, 6, 5, 3
    shape = (b, h, w, c) if input_layout == "HWC" else (b, c, h, w)
    if input_dtype == "uint8":
        x, mean, std = rng.integers(0, 256, shape, dtype=np.uint8), MEAN[:c], STD[:c]
    else:
        x, mean, std = rng.standard_normal(shape).astype(input_dtype), None, None
    pairs = sample_pairs(b, lam_mode="sample", generator=len(dtype))
    boxes = edge_boxes(b, h, w, len(dtype + layout))
    got = run_kernel(x, pairs, mean, std, dtype, layout, input_layout, on_device=input_dtype != "float16",
                     boxes=boxes)
    check(got, reference(x, pairs, mean, std, dtype, layout, input_layout, boxes), dtype)


@pytest.mark.parametrize("size, mode", [
    ((1, 4, 6, 3), "batch"),
    ((3, 5, 4, 1), "sample"),
    ((3, 4, 3, 4), "sample"),
    ((2, 9, 9, 3), "batch"),  # 81 pixels: two blocks per sample
])
def test_cutmix_kernel_sizes(size, mode):
    b, h, w, c = size
    x = np.random.default_rng(list(size)).integers(0, 256, size, dtype=np.uint8)
    pairs = sample_pairs(b, pairing="flip", generator=b)
    boxes, _ = sample_boxes(pairs, h, w, mode=mode, generator=c)
    for box in (boxes, edge_boxes(b, h, w, b)):
        got = run_kernel(x, pairs, MEAN[:c], STD[:c], "float32", "CHW", "HWC", on_device=True, boxes=box)
        check(got, reference(x, pairs, MEAN[:c], STD[:c], "float32", "CHW", "HWC", box), "float32")


def test_cutmix_kernel_full_and_empty_boxes_ignore_lambda():
    x = np.random.default_rng(5).standard_normal((3, 3, 4, 3)).astype(np.float32)
    pairs = MixPairs(torch.tensor([1, 2, 0]), torch.tensor([1.0, 0.0, 0.5]))
    boxes = CutBoxes(torch.tensor([[0, 3, 0, 4], [0, 3, 2, 2], [1, 1, 0, 4]]), 3, 4)
    got = run_kernel(x, pairs, None, None, "float32", "HWC", "HWC", on_device=False, boxes=boxes)
    for i, src in enumerate([1, 1, 2]):
        np.testing.assert_array_equal(got[i], x[src])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layouts", [("HWC", "CHW"), ("CHW", "HWC")])
@pytest.mark.parametrize("size", [(1, 4, 5, 3), (5, 6, 5, 3), (4, 3, 4, 1)])
def test_cut_mask_kernel_matches_reference(dtype, layouts, size):
    """Mixup, CutMix and unmixed samples in one launch (timm's per-sample switch)."""
    input_layout, layout = layouts
    b, h, w, c = size
    rng = np.random.default_rng([len(dtype), b, c, len(layout + input_layout)])
    shape = (b, h, w, c) if input_layout == "HWC" else (b, c, h, w)
    input_dtype = ["uint8", "float16", "float32"][(b + len(dtype)) % 3]
    if input_dtype == "uint8":
        x, mean, std = rng.integers(0, 256, shape, dtype=np.uint8), MEAN[:c], STD[:c]
    else:
        x, mean, std = rng.standard_normal(shape).astype(input_dtype), None, None
    pairs = sample_pairs(b, lam_mode="sample", generator=b)
    edge = edge_boxes(b, h, w, b + c)
    cut = torch.from_numpy(rng.random(b) < 0.5)
    cut[0] = not bool(cut[-1]) if b > 1 else cut[0]  # both kinds when there are two samples
    drawn = sample_mix(b, h, w, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.7, mode="elem", generator=b)
    for p, box in ((pairs, CutBoxes(edge.boxes, h, w, cut)), (drawn.pairs, drawn.boxes)):
        got = run_kernel(x, p, mean, std, dtype, layout, input_layout, on_device=input_dtype != "float16",
                         boxes=box)
        check(got, reference(x, p, mean, std, dtype, layout, input_layout, box), dtype)


def test_empty_and_oversized_batches():
    empty = np.zeros(0, np.float32)
    kernels.launch(np.zeros(0, np.uint8), np.zeros(0, np.int64), empty, empty, empty, empty, 4, 4, 3,
                   False, True, False)  # nothing to launch: returns quietly
    with pytest.raises(ValueError, match="at most 65535 samples"):
        kernels.launch(None, np.zeros(kernels.MAX_BATCH + 1, np.int64), None, None, None, None, 1, 1, 1,
                       False, True, False)


def test_grid_covers_every_pixel():
    for pixels in (1, 35, 50176):
        blocks, batch = kernels.grid(7, pixels)
        assert batch == 7 and blocks * kernels.THREADS * kernels.PIXELS_PER_THREAD >= pixels


_bf16_device = cuda.jit(device=True)(pmath.f32_to_bf16_bits)


@cuda.jit
def _bf16_kernel(values, out):
    i = cuda.grid(1)
    if i < values.size:
        out[i] = np.uint16(_bf16_device(values[i]))


def test_bf16_bits_as_a_device_function():
    rng = np.random.default_rng(2)
    f = np.concatenate([rng.standard_normal(200).astype(np.float32) * 1e3,
                        np.array([0.0, -0.0, np.inf, -np.inf, 1.00390625, 1.01171875], np.float32)])
    out = np.zeros(f.size, np.uint16)
    _bf16_kernel[(f.size + 63) // 64, 64](f, out)
    want = torch.from_numpy(f).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(out, want)


# --- the torch glue's argument handling (no CUDA tensors exist here) ------------------------------------------------

def test_glue_refuses_host_inputs_with_reasons():
    x = np.zeros((2, 3, 3, 3), np.uint8)
    pairs = sample_pairs(2, generator=0)
    assert explain_mix_images(x, pairs, 0.0, 1.0)["numba-cuda"] == (
        "images are a NumPy array; numba-cuda runs on CUDA torch tensors")
    assert explain_mix_images(torch.from_numpy(x), pairs, 0.0, 1.0)["numba-cuda"] == (
        "images are on cpu; numba-cuda runs on CUDA torch tensors")
    with pytest.raises(BackendError, match="numba-cuda: images are on cpu"):
        mix_images(torch.from_numpy(x), pairs, 0.0, 1.0, backend="numba-cuda")


def test_glue_refuses_oversized_and_strided_batches():
    pairs = sample_pairs(kernels.MAX_BATCH + 1, generator=0)
    meta = torch.empty((kernels.MAX_BATCH + 1, 2, 2, 3), dtype=torch.uint8, device="meta")
    job = ref_images.prepare_pixel_job(meta, pairs, 0.0, 1.0)
    from fastgenlabel.kernels import pixel

    assert pixel._refuse_cuda(job).startswith("images are on meta")  # the device check comes first
    x = torch.zeros((2, 4, 4, 3), dtype=torch.uint8)[:, ::2]
    strided = ref_images.prepare_pixel_job(x, sample_pairs(2), 0.0, 1.0)
    assert "not contiguous" in pixel._contiguity(strided)


@pytest.fixture
def glue_device():
    """Where the torch glue runs: CUDA tensors on a GPU; under the simulator, CPU tensors whose memory
    the simulator wraps as device arrays (no copy), with torch's CUDA calls made no-ops. Either way the
    glue's views, bfloat16 bits, constants and flags run."""
    if not SIM:
        yield torch.device("cuda")
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        _stand_in_for_cuda_tensors(monkeypatch)
        yield torch.device("cpu")


def _stand_in_for_cuda_tensors(monkeypatch):
    import contextlib
    import types

    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from fastgenlabel.kernels import pixel as pixel_module

    # the simulator has no views of CUDA tensors: these stand in (uncached: CPU buffers get reused)
    monkeypatch.setattr(pixel_module, "device_view", lambda t: FakeCUDAArray(t.detach().numpy()))
    monkeypatch.setattr(pixel_module, "current_stream", lambda: cuda.stream())
    monkeypatch.setattr(pixel_module, "_CONSTANTS", {})
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)


@pytest.mark.parametrize("dtype, layout, input_layout, input_dtype, cut", [
    ("float32", "CHW", "HWC", "uint8", False),
    ("float16", "HWC", "HWC", "uint8", False),
    ("bfloat16", "CHW", "CHW", "float32", False),
    ("bfloat16", "HWC", "HWC", "float16", False),
    ("float32", "CHW", "HWC", "uint8", True),
    ("bfloat16", "HWC", "CHW", "float16", True),
    ("float32", "CHW", "HWC", "uint8", "switch"),  # mixup, CutMix and unmixed samples in one batch
])
def test_torch_glue_end_to_end(glue_device, dtype, layout, input_layout, input_dtype, cut):
    from fastgenlabel.kernels import pixel

    rng = np.random.default_rng(3)
    shape = (3, 5, 6, 3) if input_layout == "HWC" else (3, 3, 5, 6)
    x = (rng.integers(0, 256, shape, dtype=np.uint8) if input_dtype == "uint8"
         else rng.standard_normal(shape).astype(input_dtype))
    images = torch.from_numpy(x).to(glue_device)
    pairs = sample_pairs(3, lam_mode="sample", generator=4)  # on the CPU: the glue moves them
    boxes = sample_boxes(pairs, 5, 6, mode="sample", generator=5)[0] if cut else None  # likewise
    if cut == "switch":
        pairs = MixPairs(pairs.perm, torch.tensor([0.3, 1.0, 0.6]))
        boxes = CutBoxes(torch.tensor([[1, 4, 0, 6], [0, 0, 0, 0], [0, 5, 2, 3]]), 5, 6, torch.tensor([True, True, False]))
    job = ref_images.prepare_pixel_job(images, pairs, MEAN[:3], STD[:3], dtype=dtype, layout=layout,
                                       input_layout=input_layout)
    out = job.allocate().fill_(float("nan"))
    job = ref_images.prepare_pixel_job(images, pairs, MEAN[:3], STD[:3], layout=layout, input_layout=input_layout,
                                       out=out, boxes=boxes)
    got = pixel._run_cuda(job)
    assert got is out and got.device == images.device
    want = reference(x, pairs, MEAN[:3], STD[:3], dtype, layout, input_layout, boxes)
    check(got.cpu().to(torch.float64).numpy(), want, dtype)
    np.testing.assert_array_equal(images.cpu().numpy(), x)


@pytest.mark.skipif(SIM, reason="needs CUDA tensors (a GPU)")
def test_auto_picks_numba_cuda_for_cuda_tensors():
    x = torch.randint(0, 256, (4, 7, 5, 3), dtype=torch.uint8, device="cuda")
    pairs = sample_pairs(4, generator=0)
    assert explain_mix_images(x, pairs, MEAN[:3], STD[:3])["numba-cuda"] is None
    got = mix_images(x, pairs.to("cuda"), MEAN[:3], STD[:3], dtype=torch.bfloat16)  # pairs already on the GPU
    want = ref_images.mix_images(x.cpu(), pairs, MEAN[:3], STD[:3], dtype=torch.bfloat16)
    check(got.cpu().double().numpy(), want.double().numpy(), "bfloat16")
