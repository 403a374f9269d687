"""Mixup, CutMix and no mixing chosen per batch, pair or sample (sample_mix), in one pixel-stage pass.

The pixel stage with a cut mask is checked against the reference and the reference against a
per-sample loop; the draws' frequencies against prob and switch_prob with fixed seeds.
"""
import numpy as np
import pytest
import scipy.stats
import torch

from fastgenlabel import CutBoxes, MixPairs, mix_images
from fastgenlabel.functional import images as ref_images
from fastgenlabel.functional.switch import CUTMIX, MIX_MODES, MIXUP, UNMIXED, sample_mix

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
TOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}  # as tests/test_pixel.py: output rounding


def mixed_kinds(rng, b, h, w):
    """Pairs and boxes with every kind of sample: mixup, cut (full, empty, border, random boxes)."""
    perm = torch.from_numpy(rng.permutation(b).astype(np.int64))
    lam = torch.from_numpy(rng.random(b).astype(np.float32))
    y, x = sorted(rng.integers(0, h + 1, 2)), sorted(rng.integers(0, w + 1, 2))
    fixed = np.array([[0, h, 0, w], [0, 0, 0, 0], [h // 2, h // 2, 0, w], [0, h // 2 + 1, 0, w // 2 + 1],
                      [h // 2, h, w // 2, w], [0, h, w - 1, w], y + x], np.int64)
    boxes = fixed[rng.integers(0, len(fixed), b)]
    cut = torch.from_numpy(rng.random(b) < 0.5)
    return MixPairs(perm, lam), CutBoxes(torch.from_numpy(np.ascontiguousarray(boxes)), h, w, cut)


def test_reference_with_a_cut_mask_matches_a_loop():
    rng = np.random.default_rng(0)
    b, h, w, c = 9, 5, 7, 3
    x = torch.from_numpy(rng.standard_normal((b, h, w, c)).astype(np.float32))
    pairs, boxes = mixed_kinds(rng, b, h, w)
    got = ref_images.mix_images(x, pairs, boxes=boxes, layout="HWC").double()
    xd = x.double()
    for i in range(b):
        j = int(pairs.perm[i])
        if boxes.cut[i]:
            want = xd[i].clone()
            y0, y1, x0, x1 = boxes.boxes[i].tolist()
            want[y0:y1, x0:x1] = xd[j, y0:y1, x0:x1]
        else:
            lam = float(pairs.lam[i])
            want = lam * xd[i] + (1 - lam) * xd[j]
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("input_dtype", ["uint8", "float16", "float32"])
@pytest.mark.parametrize("layouts", [("HWC", "CHW"), ("HWC", "HWC"), ("CHW", "CHW"), ("CHW", "HWC")])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cpu_kernel_with_a_cut_mask_matches_reference(input_dtype, layouts, dtype):
    input_layout, layout = layouts
    rng = np.random.default_rng([len(input_dtype), len(dtype), len(input_layout + layout), ord(layout[0])])
    for b, h, w, c in ((1, 4, 5, 3), (7, 6, 5, 3), (5, 3, 8, 1), (4, 5, 4, 4)):
        shape = (b, h, w, c) if input_layout == "HWC" else (b, c, h, w)
        if input_dtype == "uint8":
            x = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
            mean, std = (MEAN + [100.0])[:c], (STD + [50.0])[:c]
        else:
            x, mean, std = torch.from_numpy(rng.standard_normal(shape).astype(input_dtype)), None, None
        pairs, boxes = mixed_kinds(rng, b, h, w)
        kwargs = dict(dtype=dtype, layout=layout, input_layout=input_layout, boxes=boxes)
        got = mix_images(x, pairs, mean, std, backend="numba-cpu", **kwargs).double()
        want = ref_images.mix_images(x, pairs, mean, std, **kwargs).double()
        assert torch.isfinite(got).all()
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("mode", MIX_MODES)
@pytest.mark.parametrize("b", [1, 2, 7, 16])
def test_drawn_batches_through_the_kernel_match_reference(mode, b):
    rng = np.random.default_rng(b)
    x = rng.integers(0, 256, (b, 9, 11, 3), dtype=np.uint8)
    for seed in range(4):
        d = sample_mix(b, 9, 11, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, mode=mode, generator=seed)
        got = mix_images(x, d.pairs, MEAN, STD, boxes=d.boxes, backend="numba-cpu")
        want = ref_images.mix_images(x, d.pairs, MEAN, STD, boxes=d.boxes)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
        if b % 2:  # the middle sample of an odd batch is its own partner: left as it is
            mid = b // 2
            assert d.kind[mid] == UNMIXED and d.pairs.lam[mid] == 1
            np.testing.assert_allclose(got[mid], ref_images.mix_images(x[mid:mid + 1], MixPairs(
                torch.zeros(1, dtype=torch.int64), torch.ones(1)), MEAN, STD)[0], rtol=1e-6, atol=1e-5)


def test_unmixed_samples_are_their_own_images_and_one_lambda():
    x = np.random.default_rng(1).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    d = sample_mix(6, 4, 4, mixup_alpha=1.0, prob=0.0, mode="elem", generator=0)
    assert (d.kind == UNMIXED).all() and (d.pairs.lam == 1).all() and (d.boxes.area() == 0).all()
    got = mix_images(x, d.pairs, boxes=d.boxes, layout="HWC", backend="numba-cpu")
    np.testing.assert_array_equal(got, x.astype(np.float32))


def test_pair_mode_mirrors_lambda_kind_and_box():
    for b in (8, 9):
        d = sample_mix(b, 20, 20, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.9, mode="pair", generator=b)
        rev = torch.arange(b - 1, -1, -1)
        assert torch.equal(d.pairs.perm, rev)
        assert torch.equal(d.pairs.lam, d.pairs.lam[rev]) and torch.equal(d.kind, d.kind[rev])
        assert torch.equal(d.boxes.boxes, d.boxes.boxes[rev])


def test_batch_mode_is_one_choice():
    for seed in range(20):
        d = sample_mix(6, 10, 10, mixup_alpha=1.0, cutmix_alpha=1.0, mode="batch", generator=seed)
        assert (d.kind == d.kind[0]).all() and (d.pairs.lam == d.pairs.lam[0]).all()
        if d.kind[0] == CUTMIX:
            assert (d.boxes.boxes == d.boxes.boxes[0]).all()
            assert torch.equal(d.pairs.lam, d.boxes.lam())  # correct_lam, the default


def binomial_ok(k, n, p):
    return scipy.stats.binomtest(int(k), int(n), p).pvalue > 1e-4


@pytest.mark.parametrize("prob, switch_prob", [(1.0, 0.5), (0.6, 0.3), (0.25, 0.9)])
def test_elem_frequencies_follow_prob_and_switch_prob(prob, switch_prob):
    n_mixed = n_cut = n = 0
    for seed in range(40):
        d = sample_mix(100, 16, 16, mixup_alpha=1.0, cutmix_alpha=1.0, prob=prob, switch_prob=switch_prob,
                       mode="elem", generator=seed)
        n += 100
        n_mixed += int((d.kind != UNMIXED).sum())
        n_cut += int((d.kind == CUTMIX).sum())
    assert binomial_ok(n_mixed, n, prob)
    assert binomial_ok(n_cut, n_mixed, switch_prob)


@pytest.mark.parametrize("mode", ["batch", "pair"])
def test_batch_and_pair_frequencies(mode):
    prob, switch_prob, runs = 0.7, 0.4, 600
    kinds = [sample_mix(4, 8, 8, mixup_alpha=1.0, cutmix_alpha=2.0, prob=prob, switch_prob=switch_prob, mode=mode,
                        generator=np.random.default_rng([5, s])).kind[0] for s in range(runs)]
    kinds = np.array(kinds)
    assert binomial_ok((kinds != UNMIXED).sum(), runs, prob)
    assert binomial_ok((kinds == CUTMIX).sum(), (kinds != UNMIXED).sum(), switch_prob)


def test_only_one_kind_when_one_alpha():
    for ma, ca, want in ((1.0, 0.0, MIXUP), (0.0, 1.0, CUTMIX)):
        d = sample_mix(50, 8, 8, mixup_alpha=ma, cutmix_alpha=ca, switch_prob=0.5, mode="elem", generator=1)
        assert set(d.kind.tolist()) == {want}
    d = sample_mix(50, 8, 8, mixup_alpha=1.0, mode="elem", generator=1)
    assert d.boxes is None  # pure mixup needs no boxes


def test_seeds_and_generators():
    a = sample_mix(10, 8, 8, cutmix_alpha=1.0, mode="elem", generator=torch.Generator().manual_seed(2))
    b = sample_mix(10, 8, 8, cutmix_alpha=1.0, mode="elem", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.pairs.lam, b.pairs.lam) and torch.equal(a.boxes.boxes, b.boxes.boxes)
    np.random.seed(4)
    c = sample_mix(10, 8, 8, cutmix_alpha=1.0, mode="elem")
    np.random.seed(4)
    d = sample_mix(10, 8, 8, cutmix_alpha=1.0, mode="elem", generator=np.random.RandomState(4))
    assert torch.equal(c.pairs.lam, d.pairs.lam) and torch.equal(c.boxes.boxes, d.boxes.boxes)


def test_zero_and_empty_batches():
    d = sample_mix(0, 8, 8, cutmix_alpha=1.0, mode="elem", generator=0)
    assert len(d) == 0
    x = np.zeros((0, 8, 8, 3), np.uint8)
    assert mix_images(x, d.pairs, boxes=d.boxes, backend="numba-cpu").shape == (0, 3, 8, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="half"), "mode: expected one of"),
    (dict(mixup_alpha=0.0, cutmix_alpha=0.0), "mixup_alpha, cutmix_alpha: at least one"),
    (dict(prob=1.5), r"prob: expected a probability in \[0, 1\]"),
    (dict(switch_prob=float("nan")), "switch_prob: expected a probability"),
    (dict(cutmix_minmax=(0.8, 0.2)), "minmax: expected two numbers"),
    (dict(mixup_alpha=-1.0), "alpha: expected a finite number >= 0"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_mix(4, 8, 8, **kwargs)


def test_cut_mask_is_checked():
    with pytest.raises(TypeError, match="CutBoxes: cut must be a bool tensor"):
        CutBoxes(torch.zeros(2, 4, dtype=torch.int64), 4, 4, torch.ones(2))
    with pytest.raises(ValueError, match=r"CutBoxes: cut must have shape \(B,\)"):
        CutBoxes(torch.zeros(2, 4, dtype=torch.int64), 4, 4, torch.ones(3, dtype=torch.bool))
