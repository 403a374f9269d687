"""The pixel stage: the reference, the numba-cpu kernel against it, arguments, backends, bit conversions.

The CUDA kernel runs under the simulator in tests/cudasim/test_pixel_cuda.py.
"""
import types

import numba
import numpy as np
import pytest
import torch

try:  # the property test needs hypothesis (the test extra); the rest runs without it
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

from fastgenlabel import CutBoxes, MixPairs, mix_images, sample_boxes, sample_pairs
from fastgenlabel.functional import images as ref_images
from fastgenlabel.kernels import BackendError
from fastgenlabel.kernels.pixel import explain_mix_images
from fastgenlabel.kernels.pixel import math as pmath

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]

# Tolerances per output dtype, relative to the data's scale (max |reference|, at least 1): float32
# differs from the float64 reference by float32 rounding; 16-bit outputs by at most one unit in the
# last place where the float32 result sits next to a rounding boundary.
TOL = {
    "float32": dict(rtol=1e-5, atol=1e-5),
    "float16": dict(rtol=1e-3, atol=1e-3),
    "bfloat16": dict(rtol=8e-3, atol=8e-3),
}


def to_float64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def assert_close(got, want, dtype):
    g, w = to_float64(got), to_float64(want)
    assert g.shape == w.shape
    assert np.isfinite(g).all(), "output not fully written (NaN poison left)"
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    tol = TOL[dtype]
    np.testing.assert_allclose(g, w, rtol=tol["rtol"], atol=tol["atol"] * scale)


def make_images(rng, b, h, w, c, dtype, input_layout="HWC"):
    shape = (b, h, w, c) if input_layout == "HWC" else (b, c, h, w)
    if dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(dtype)


def pairs_for(b, pairing="permutation", lam_mode="sample", seed=0):
    return sample_pairs(b, 1.0, pairing=pairing, lam_mode=lam_mode, generator=seed)


def poisoned(shape, dtype, torch_out):
    if torch_out:
        return torch.full(shape, float("nan"), dtype=getattr(torch, dtype))
    return np.full(shape, np.nan, dtype=dtype)


def run_checked(images, pairs, mean, std, *, dtype, layout, input_layout, torch_io, backend="numba-cpu", boxes=None):
    """Run a backend into a NaN-poisoned ``out``, compare with the reference, check inputs are unchanged."""
    x = torch.from_numpy(images) if torch_io else images
    before = images.copy()
    lam_before, perm_before = pairs.lam.clone(), pairs.perm.clone()
    b, h, w, c = (images.shape if input_layout == "HWC"
                  else (images.shape[0], images.shape[2], images.shape[3], images.shape[1]))
    shape = (b, c, h, w) if layout == "CHW" else (b, h, w, c)
    out = poisoned(shape, dtype, torch_io)
    got = mix_images(x, pairs, mean, std, dtype=dtype, layout=layout, input_layout=input_layout, out=out,
                     backend=backend, boxes=boxes)
    assert got is out
    want = ref_images.mix_images(x, pairs, mean, std, dtype=dtype, layout=layout, input_layout=input_layout,
                                 boxes=boxes)
    assert type(want) is type(got)
    assert_close(got, want, dtype)
    np.testing.assert_array_equal(images, before)
    assert torch.equal(pairs.lam, lam_before) and torch.equal(pairs.perm, perm_before)
    return got


# --- the reference itself ---------------------------------------------------------------------------------------

def test_reference_matches_a_loop():
    rng = np.random.default_rng(0)
    x = make_images(rng, 3, 2, 4, 3, "uint8")
    pairs = MixPairs(torch.tensor([2, 0, 1]), torch.tensor([0.25, 1.0, 0.6]))
    got = ref_images.mix_images(x, pairs, MEAN, STD)
    assert got.shape == (3, 3, 2, 4) and got.dtype == np.float32
    for i in range(3):
        lam, p = float(pairs.lam[i]), int(pairs.perm[i])
        for y in range(2):
            for xx in range(4):
                for c in range(3):
                    v = (lam * float(x[i, y, xx, c]) + (1 - lam) * float(x[p, y, xx, c]) - MEAN[c]) / STD[c]
                    assert got[i, c, y, xx] == pytest.approx(v, rel=1e-6, abs=1e-6)


def test_reference_without_mean_std_is_mix():
    from fastgenlabel import mix

    rng = np.random.default_rng(1)
    x = make_images(rng, 5, 3, 4, 2, "float32", "CHW")
    pairs = pairs_for(5)
    got = ref_images.mix_images(x, pairs, input_layout="CHW")
    np.testing.assert_allclose(got, mix(x, pairs), rtol=1e-6, atol=1e-6)


def test_reference_cutmix_matches_a_loop():
    rng = np.random.default_rng(10)
    b, h, w = 4, 5, 6
    x = make_images(rng, b, h, w, 3, "uint8")
    perm = torch.tensor([3, 0, 1, 2])
    boxes = CutBoxes(torch.tensor([[1, 4, 2, 6], [0, 5, 0, 6], [2, 2, 0, 6], [0, 1, 0, 1]]), h, w)
    pairs = MixPairs(perm, torch.tensor([0.3, 1.0, 0.5, 0.0]))  # lambda weights no pixel with boxes
    got = ref_images.mix_images(x, pairs, MEAN, STD, boxes=boxes)
    for i in range(b):
        y0, y1, x0, x1 = boxes.boxes[i].tolist()
        for r in range(h):
            for col in range(w):
                src = int(perm[i]) if y0 <= r < y1 and x0 <= col < x1 else i
                for c in range(3):
                    v = (float(x[src, r, col, c]) - MEAN[c]) / STD[c]
                    assert got[i, c, r, col] == pytest.approx(v, rel=1e-6, abs=1e-6)


def test_reference_cutmix_with_sampled_boxes_keeps_the_own_share():
    rng = np.random.default_rng(11)
    x = make_images(rng, 6, 16, 12, 1, "float32", "CHW")
    pairs = pairs_for(6, pairing="roll")
    boxes, lam = sample_boxes(pairs, 16, 12, mode="sample", generator=3)
    got = ref_images.mix_images(x, pairs, boxes=boxes, input_layout="CHW")
    own = (got == x).reshape(6, -1).mean(axis=1)  # the partner's pixels differ from the sample's
    np.testing.assert_allclose(own, lam.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("boxes, match", [
    ([[0, 1, 0, 1]] * 2, "boxes: expected CutBoxes"),
    (CutBoxes(torch.zeros(3, 4, dtype=torch.int64), 4, 5), "boxes: 3 boxes for a batch of 2 images"),
    (CutBoxes(torch.zeros(2, 4, dtype=torch.int64), 5, 4), "boxes: drawn for 5 x 4 images, but images are 4 x 5"),
])
def test_bad_boxes_name_themselves(boxes, match):
    x = np.zeros((2, 4, 5, 3), np.uint8)
    with pytest.raises((TypeError, ValueError), match=match):
        mix_images(x, pairs_for(2), MEAN, STD, boxes=boxes)


def test_boxes_changed_after_checking_are_refused():
    boxes = CutBoxes(torch.tensor([[0, 4, 0, 5], [1, 2, 1, 2]]), 4, 5)
    boxes.boxes[1, 3] = 9
    with pytest.raises(ValueError, match="boxes: box 1 .* changed after it was made"):
        mix_images(np.zeros((2, 4, 5, 3), np.uint8), pairs_for(2), MEAN, STD, boxes=boxes)


# --- numba-cpu against the reference -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("input_layout", ["HWC", "CHW"])
@pytest.mark.parametrize("input_dtype", ["uint8", "float16", "float32"])
def test_cpu_matches_reference_dtypes_layouts(input_dtype, input_layout, layout, dtype):
    rng = np.random.default_rng([3, len(input_dtype), len(dtype)])
    x = make_images(rng, 5, 33, 31, 3, input_dtype, input_layout)
    mean, std = (MEAN, STD) if input_dtype == "uint8" else (None, None)
    run_checked(x, pairs_for(5, seed=7), mean, std, dtype=dtype, layout=layout, input_layout=input_layout,
                torch_io=True)


@pytest.mark.parametrize("size", [(1, 7, 5, 3), (5, 33, 31, 3), (6, 4, 9, 1), (3, 5, 7, 4), (2, 3, 2, 5)])
@pytest.mark.parametrize("pairing", ["permutation", "flip", "roll"])
@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
def test_cpu_matches_reference_sizes_pairings(size, pairing, lam_mode):
    b, h, w, c = size
    rng = np.random.default_rng([b, h, w, c])
    x = make_images(rng, b, h, w, c, "uint8")
    mean, std = rng.uniform(50, 200, c), rng.uniform(20, 80, c)
    pairs = pairs_for(b, pairing, lam_mode, seed=b + h)
    run_checked(x, pairs, mean, std, dtype="float32", layout="CHW", input_layout="HWC", torch_io=False)
    run_checked(x, pairs, mean, std, dtype="float16", layout="HWC", input_layout="HWC", torch_io=False)


def _cpu_matches_reference_any_size(b, h, w, c, input_layout, layout, seed):
    rng = np.random.default_rng(seed)
    x = make_images(rng, b, h, w, c, "uint8", input_layout)
    perm = torch.from_numpy(rng.integers(0, b, b))  # any map, not only permutations
    pairs = MixPairs(perm, torch.from_numpy(rng.random(b).astype(np.float32)))
    run_checked(x, pairs, rng.uniform(0, 255, c), rng.uniform(1, 100, c), dtype="float32", layout=layout,
                input_layout=input_layout, torch_io=False)


if given is None:
    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_cpu_matches_reference_any_size():
        pass
else:
    test_cpu_matches_reference_any_size = settings(max_examples=25, deadline=None)(given(
        b=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 5),
        input_layout=st.sampled_from(["HWC", "CHW"]), layout=st.sampled_from(["HWC", "CHW"]),
        seed=st.integers(0, 2**16),
    )(_cpu_matches_reference_any_size))


def edge_boxes(rng, b, h, w):
    """Boxes touching every border, the full image, zero-area ones (empty rows, empty columns, a
    corner point) and random ones; the first b of them, in shuffled order."""
    fixed = [[0, h, 0, w], [0, 0, 0, 0], [h, h, w, w], [0, h // 2 + 1, 0, w // 2 + 1],
             [h // 2, h, w // 2, w], [1, 1, 0, w], [0, h, 2, 2], [0, 1, w - 1, w]]
    rows = [sorted(rng.integers(0, h + 1, 2)) for _ in range(b)]
    cols = [sorted(rng.integers(0, w + 1, 2)) for _ in range(b)]
    boxes = np.array(fixed + [r + c for r, c in zip(rows, cols)], np.int64)
    boxes = boxes[rng.permutation(len(boxes))[:b]] if b < len(fixed) else boxes[:b]
    boxes[:, :2] = np.minimum(boxes[:, :2], h)
    boxes[:, 2:] = np.minimum(boxes[:, 2:], w)
    return CutBoxes(torch.from_numpy(np.ascontiguousarray(boxes)), h, w)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("input_layout", ["HWC", "CHW"])
@pytest.mark.parametrize("input_dtype", ["uint8", "float16", "float32"])
def test_cpu_cutmix_matches_reference_dtypes_layouts(input_dtype, input_layout, layout, dtype):
    rng = np.random.default_rng([4, len(input_dtype), len(dtype), len(layout + input_layout)])
    b, h, w = 9, 13, 11
    x = make_images(rng, b, h, w, 3, input_dtype, input_layout)
    mean, std = (MEAN, STD) if input_dtype == "uint8" else (None, None)
    run_checked(x, pairs_for(b, seed=8), mean, std, dtype=dtype, layout=layout, input_layout=input_layout,
                torch_io=True, boxes=edge_boxes(rng, b, h, w))


@pytest.mark.parametrize("size", [(1, 7, 5, 3), (1, 4, 4, 3), (3, 5, 1, 1), (5, 9, 8, 4), (2, 1, 6, 2)])
@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_cpu_cutmix_matches_reference_sizes(size, mode):
    b, h, w, c = size
    rng = np.random.default_rng([b, h, w, c, len(mode)])
    x = make_images(rng, b, h, w, c, "uint8")
    mean, std = rng.uniform(50, 200, c), rng.uniform(20, 80, c)
    pairs = pairs_for(b, "roll", "batch" if mode == "batch" else "sample", seed=b)
    for draw in range(3):
        boxes, _ = sample_boxes(pairs, h, w, mode=mode, generator=draw)
        run_checked(x, pairs, mean, std, dtype="float32", layout="CHW", input_layout="HWC", torch_io=False,
                    boxes=boxes)
        run_checked(x, pairs, mean, std, dtype="float16", layout="HWC", input_layout="HWC", torch_io=False,
                    boxes=boxes)
    for box in edge_boxes(rng, 8, h, w).boxes:  # each edge box for the whole batch
        boxes = CutBoxes(box.reshape(1, 4).repeat(b, 1), h, w)
        run_checked(x, pairs, mean, std, dtype="bfloat16", layout="CHW", input_layout="HWC", torch_io=True,
                    boxes=boxes)


def test_cpu_cutmix_full_and_empty_boxes_pick_one_image_and_ignore_lambda():
    rng = np.random.default_rng(13)
    x = make_images(rng, 4, 5, 6, 3, "float32")
    perm = torch.tensor([1, 2, 3, 0])
    boxes = CutBoxes(torch.tensor([[0, 5, 0, 6], [0, 0, 0, 6], [2, 2, 3, 3], [0, 5, 0, 6]]), 5, 6)
    for lam in ([1.0, 0.0, 0.3, 0.5], [0.0, 1.0, 0.9, 0.5]):
        got = mix_images(x, MixPairs(perm, torch.tensor(lam)), layout="HWC", boxes=boxes, backend="numba-cpu")
        for i, src in enumerate([1, 1, 2, 0]):
            np.testing.assert_array_equal(got[i], x[src])


def test_cutmix_runs_on_the_cpu_kernel_by_default():
    x = np.zeros((2, 4, 5, 3), np.uint8)
    boxes, _ = sample_boxes(pairs_for(2, lam_mode="batch"), 4, 5, generator=0)
    assert explain_mix_images(x, pairs_for(2), MEAN, STD, boxes=boxes)["numba-cpu"] is None


def _cpu_cutmix_matches_reference_any_size(b, h, w, c, input_layout, layout, seed):
    rng = np.random.default_rng(seed)
    x = make_images(rng, b, h, w, c, "uint8", input_layout)
    pairs = MixPairs(torch.from_numpy(rng.integers(0, b, b)), torch.from_numpy(rng.random(b).astype(np.float32)))
    run_checked(x, pairs, rng.uniform(0, 255, c), rng.uniform(1, 100, c), dtype="float32", layout=layout,
                input_layout=input_layout, torch_io=False, boxes=edge_boxes(rng, b, h, w))


if given is None:
    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_cpu_cutmix_matches_reference_any_size():
        pass
else:
    test_cpu_cutmix_matches_reference_any_size = settings(max_examples=25, deadline=None)(given(
        b=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 5),
        input_layout=st.sampled_from(["HWC", "CHW"]), layout=st.sampled_from(["HWC", "CHW"]),
        seed=st.integers(0, 2**16),
    )(_cpu_cutmix_matches_reference_any_size))


def test_lambda_one_identity_pairing_is_normalisation():
    rng = np.random.default_rng(4)
    x = make_images(rng, 4, 6, 5, 3, "uint8")
    got = mix_images(x, sample_pairs(4, alpha=0), MEAN, STD, backend="numba-cpu")
    want = ((x.astype(np.float64) - MEAN) / STD).transpose(0, 3, 1, 2)
    assert_close(got, want, "float32")


def test_lambda_extremes_pick_one_image():
    rng = np.random.default_rng(5)
    x = make_images(rng, 4, 5, 6, 3, "float32")
    perm = torch.tensor([1, 2, 3, 0])
    got = mix_images(x, MixPairs(perm, torch.tensor([1.0, 0.0, 1.0, 0.0])), layout="HWC", backend="numba-cpu")
    np.testing.assert_array_equal(got[0], x[0])
    np.testing.assert_array_equal(got[1], x[2])


def test_list_of_samples_equals_batch():
    rng = np.random.default_rng(6)
    x = make_images(rng, 3, 7, 5, 3, "uint8")
    pairs = pairs_for(3)
    batch = mix_images(x, pairs, MEAN, STD, backend="numba-cpu")
    np.testing.assert_array_equal(mix_images(list(x), pairs, MEAN, STD, backend="numba-cpu"), batch)
    from_tensors = mix_images([torch.from_numpy(s) for s in x], pairs, MEAN, STD, backend="numba-cpu")
    assert isinstance(from_tensors, torch.Tensor)
    np.testing.assert_array_equal(from_tensors.numpy(), batch)


def test_result_type_follows_input():
    rng = np.random.default_rng(7)
    x = make_images(rng, 2, 3, 4, 3, "uint8")
    pairs = pairs_for(2)
    a = mix_images(x, pairs, MEAN, STD)
    t = mix_images(torch.from_numpy(x), pairs, MEAN, STD, dtype=torch.bfloat16, layout="NHWC")
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (2, 3, 3, 4)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.shape == (2, 3, 4, 3)
    assert mix_images(x, pairs, MEAN, STD, dtype=np.float16).dtype == np.float16


def test_empty_batch():
    x = np.zeros((0, 5, 7, 3), np.uint8)
    for backend in ("numba-cpu", "reference"):
        got = mix_images(x, sample_pairs(0), MEAN, STD, backend=backend)
        assert got.shape == (0, 3, 5, 7)


def test_scalar_mean_std_broadcast_over_channels():
    rng = np.random.default_rng(8)
    x = make_images(rng, 3, 4, 4, 3, "uint8")
    pairs = pairs_for(3)
    a = mix_images(x, pairs, 127.5, 64.0, backend="numba-cpu")
    b = mix_images(x, pairs, [127.5] * 3, np.full(3, 64.0), backend="numba-cpu")
    np.testing.assert_array_equal(a, b)


def test_out_allocated_by_the_caller_is_returned():
    rng = np.random.default_rng(9)
    x = torch.from_numpy(make_images(rng, 3, 4, 5, 3, "uint8"))
    out = torch.empty((3, 3, 4, 5), dtype=torch.float16)
    assert mix_images(x, pairs_for(3), MEAN, STD, out=out) is out  # dtype taken from out


# --- arguments ---------------------------------------------------------------------------------------------------

def _written(pairs, field, i, value):
    """The pairs with one entry written after they were made (their tensors are mutable)."""
    getattr(pairs, field)[i] = value
    return pairs


@pytest.fixture
def batch():
    return make_images(np.random.default_rng(10), 4, 5, 6, 3, "uint8")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(images=np.zeros((4, 5, 6, 3), np.int32)), TypeError, "images: expected uint8/float16/float32"),
    (dict(images=np.zeros((4, 5, 6), np.uint8)), ValueError, "images: expected a batch (B, H, W, C)"),
    (dict(images="pixels"), TypeError, "images: expected a NumPy array or torch tensor"),
    (dict(images=[]), ValueError, "images: got an empty list"),
    (dict(mean=[1.0, 2.0]), ValueError, "mean: expected a scalar or 3 values"),
    (dict(images=np.zeros((4, 3, 5, 6), np.uint8)), ValueError,  # channels first, read as HWC: 6 "channels"
     "(one per channel of images; images (4, 3, 5, 6) read as input_layout='HWC')"),
    (dict(std=[1.0, 0.0, 1.0]), ValueError, "std: values must be positive"),
    (dict(std=[1.0, np.nan, 1.0]), ValueError, "std: values must be finite"),
    (dict(mean=None), ValueError, "mean: mean and std go together"),
    (dict(mean="red"), TypeError, "mean: expected a number"),
    (dict(mean="127", std="50"), TypeError, "mean: expected a number"),  # not converted
    (dict(mean=True, std=True), TypeError, "mean: expected a number"),
    (dict(pairs=sample_pairs(5)), ValueError, "pairs: drawn for a batch of 5"),
    (dict(pairs=_written(pairs_for(4), "perm", 0, 9)), ValueError, "pairs: perm must lie in [0, 4)"),
    (dict(pairs=_written(pairs_for(4), "lam", 2, float("nan"))), ValueError, "and lam in [0, 1]"),
    (dict(pairs=(torch.arange(4), torch.ones(4))), TypeError, "pairs: expected MixPairs"),
    (dict(dtype="float64"), TypeError, "dtype: expected one of"),
    (dict(dtype="bfloat16"), TypeError, "dtype: bfloat16 output needs torch input"),
    (dict(layout="CWH"), ValueError, "layout: expected one of"),
    (dict(input_layout=3), ValueError, "input_layout: expected one of"),
    (dict(backend="cupy"), ValueError, "backend: expected 'auto' or one of"),
    (dict(dtype="float32", out=np.zeros((4, 3, 5, 6), np.float16)), TypeError, "out: expected dtype float32"),
    (dict(out=np.zeros((4, 5, 6, 3), np.float32)), ValueError, "out: expected shape (4, 3, 5, 6)"),
    (dict(out=torch.zeros((4, 3, 5, 6))), TypeError, "out: expected a NumPy array, like images"),
    (dict(out=[0.0] * 360), TypeError, "out: expected a NumPy array, like images; got list"),
    (dict(out=np.zeros((4, 3, 6, 5), np.float32).transpose(0, 1, 3, 2)), ValueError, "out: must be C-contiguous"),
])
def test_bad_arguments_name_the_argument(batch, kwargs, error, words):
    args = dict(images=batch, pairs=pairs_for(4), mean=MEAN, std=STD)
    args.update(kwargs)
    with pytest.raises(error) as info:
        mix_images(args.pop("images"), args.pop("pairs"), args.pop("mean"), args.pop("std"), **args)
    assert words in str(info.value)


def test_bad_list_samples(batch):
    pairs = pairs_for(4)
    samples = list(batch)
    with pytest.raises(ValueError, match=r"images\[2\]: shape \(5, 5, 3\) differs"):
        mix_images(samples[:2] + [batch[2, :5, :5]] + samples[3:], pairs, MEAN, STD)
    with pytest.raises(TypeError, match=r"images\[1\]: dtype float32 differs"):
        mix_images([samples[0], samples[1].astype(np.float32)] + samples[2:], pairs, MEAN, STD)
    with pytest.raises(TypeError, match=r"images\[3\]: Tensor, but images\[0\] is ndarray"):
        mix_images(samples[:3] + [torch.from_numpy(samples[3])], pairs, MEAN, STD)
    with pytest.raises(ValueError, match=r"images\[0\]: expected one HWC sample"):
        mix_images([batch] * 4, pairs, MEAN, STD)


def test_channels_must_match_the_input_layout(batch):
    with pytest.raises(ValueError, match="mean: expected a scalar or 5 values"):
        mix_images(batch, pairs_for(4), MEAN, STD, input_layout="CHW")  # (4, 5, 6, 3) read as C = 5


def test_out_must_not_overlap_the_input():
    x = np.zeros((2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="out: overlaps images"):
        mix_images(x, pairs_for(2), input_layout="CHW", out=x)
    t = torch.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match="out: overlaps images"):
        mix_images(t, pairs_for(2), input_layout="CHW", out=t)


def test_lambda_and_perm_are_validated_when_pairs_are_made():
    with pytest.raises(ValueError, match="lam must lie in"):
        MixPairs(torch.arange(3), torch.tensor([0.5, 1.5, 0.5]))
    with pytest.raises(ValueError, match="perm entries must lie in"):
        MixPairs(torch.tensor([0, 1, 3]), torch.full((3,), 0.5))


def test_pairs_on_another_device_are_refused_not_fetched():
    pairs = types.SimpleNamespace(perm=torch.empty(4, dtype=torch.int64, device="meta"),
                                  lam=torch.empty(4, device="meta"))
    with pytest.raises(ValueError, match="pairs: on meta, but images are on the CPU"):
        ref_images._pairs_on(pairs, torch.device("cpu"))


def test_mean_on_a_device_is_refused():
    x = np.zeros((2, 3, 3, 3), np.uint8)
    with pytest.raises(TypeError, match="mean: got a tensor on meta"):
        mix_images(x, pairs_for(2), torch.zeros(3, device="meta"), STD)


# --- backends ----------------------------------------------------------------------------------------------------

def test_backend_reasons(batch):
    pairs = pairs_for(4)
    verdict = explain_mix_images(batch, pairs, MEAN, STD)
    assert verdict == {"numba-cuda": "images are a NumPy array; numba-cuda runs on CUDA torch tensors",
                       "numba-cpu": None, "reference": None}
    strided = batch[:, :, ::2]
    verdict = explain_mix_images(strided, pairs, MEAN, STD)
    assert "not C-contiguous" in verdict["numba-cpu"]
    verdict = explain_mix_images(torch.from_numpy(batch), pairs, MEAN, STD)
    assert verdict["numba-cuda"] == "images are on cpu; numba-cuda runs on CUDA torch tensors"
    meta = torch.empty((4, 5, 6, 3), dtype=torch.uint8, device="meta")
    verdict = explain_mix_images(meta, pairs, MEAN, STD)
    assert verdict["numba-cpu"].startswith("images are on meta; numba-cpu runs on host memory")


def test_missing_packages_are_reasons(batch, monkeypatch):
    from fastgenlabel.kernels import pixel

    real_find_spec = pixel.importlib.util.find_spec
    monkeypatch.setattr(pixel.importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba" else real_find_spec(name, *a))
    monkeypatch.setattr(pixel, "numba_cuda_status", lambda: (False, "numba-cuda is not installed (pip install ...)"))
    verdict = explain_mix_images(torch.from_numpy(batch), pairs_for(4), MEAN, STD)
    assert verdict == {"numba-cuda": "numba-cuda is not installed (pip install ...)",
                       "numba-cpu": "numba is not installed", "reference": None}
    with pytest.raises(BackendError, match="numba-cpu: numba is not installed"):
        mix_images(batch, pairs_for(4), MEAN, STD, backend="numba-cpu")


def test_explicit_backend_that_refuses_says_why(batch):
    with pytest.raises(BackendError, match="numba-cuda: images are a NumPy array"):
        mix_images(batch, pairs_for(4), MEAN, STD, backend="numba-cuda")
    with pytest.raises(BackendError, match="numba-cpu: images are not C-contiguous"):
        mix_images(batch[:, ::-1], pairs_for(4), MEAN, STD, backend="numba-cpu")


def test_auto_falls_back_to_the_reference_for_strided_input(batch):
    strided = torch.from_numpy(batch).permute(0, 2, 1, 3)  # (4, 6, 5, 3), not contiguous
    pairs = pairs_for(4)
    got = mix_images(strided, pairs, MEAN, STD)
    assert_close(got, mix_images(strided.contiguous(), pairs, MEAN, STD, backend="numba-cpu"), "float32")


# --- the scalar math, compiled for the CPU -------------------------------------------------------------------------

_to_f16 = numba.njit(pmath.f32_to_f16_bits)
_to_bf16 = numba.njit(pmath.f32_to_bf16_bits)
_from_f16 = numba.njit(pmath.f16_bits_to_f32)


@numba.njit
def _encode(values, out, bf16):
    for i in range(values.size):
        out[i] = np.uint16(_to_bf16(values[i]) if bf16 else _to_f16(values[i]))


@numba.njit
def _decode(bits, out):
    for i in range(bits.size):
        out[i] = _from_f16(bits[i])


def awkward_float32s() -> np.ndarray:
    """Random bit patterns, every tie between two adjacent halves, and the edges of each range."""
    rng = np.random.default_rng(11)
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    ties = ((halves[:-1] + halves[1:]) / 2).astype(np.float32)  # exact in float32
    edges = np.concatenate([np.arange(a - 64, a + 64, dtype=np.int64) for a in
                            (0x33000000, 0x387FF000, 0x38800000, 0x477FE000, 0x477FF000, 0x7F800000, 0x3F808000)])
    bits = np.concatenate([rng.integers(0, 2**32, 200_000), edges, [0, 0x80000000, 0x7FC00000, 0xFFC00001]])
    f = bits.astype(np.uint32).view(np.float32)
    return np.concatenate([f, ties, -ties])


def test_f16_decoding_is_exact_for_every_half():
    bits = np.arange(2**16, dtype=np.uint16)
    got = np.empty(bits.size, np.float32)
    _decode(bits, got)
    np.testing.assert_array_equal(got.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))


def test_f16_encoding_rounds_like_numpy():
    f = awkward_float32s()
    got = np.empty(f.size, np.uint16)
    _encode(f, got, False)
    with np.errstate(over="ignore"):
        want = f.astype(np.float16)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


def test_bf16_encoding_rounds_like_torch():
    f = awkward_float32s()
    got = np.empty(f.size, np.uint16)
    _encode(f, got, True)
    want = torch.from_numpy(f).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert torch.isnan(torch.from_numpy(got[nan].view(np.int16)).view(torch.bfloat16)).all()


def test_new_sizes_constants_and_layouts_do_not_recompile():
    from fastgenlabel.kernels.pixel import cpu

    rng = np.random.default_rng(12)
    mix_images(make_images(rng, 2, 3, 4, 3, "uint8"), pairs_for(2), MEAN, STD, backend="numba-cpu")
    before = len(cpu.mix_kernel.signatures)
    for b, h, w, c, layout, input_layout in [(5, 9, 2, 1, "HWC", "HWC"), (1, 4, 7, 4, "CHW", "CHW"),
                                             (3, 6, 5, 2, "HWC", "CHW")]:
        x = make_images(rng, b, h, w, c, "uint8", input_layout)
        mix_images(x, pairs_for(b, lam_mode="batch"), rng.uniform(0, 255, c), rng.uniform(1, 99, c),
                   layout=layout, input_layout=input_layout, backend="numba-cpu")
    assert len(cpu.mix_kernel.signatures) == before
