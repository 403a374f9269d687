"""CutBoxes and sample_boxes: CutMix's boxes, drawn as timm draws them and checked like MixPairs."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from fastgenlabel import CutBoxes, MixPairs, sample_boxes, sample_pairs
from fastgenlabel.functional import BOX_MODES


def lams(b, seed):
    return torch.from_numpy(np.random.default_rng(seed).beta(1.0, 1.0, b).astype(np.float32))


@pytest.mark.parametrize("mode", BOX_MODES)
@pytest.mark.parametrize("minmax", [None, (0.2, 0.8)])
def test_seeded_draws_are_deterministic(mode, minmax):
    lam = lams(17, 0) if mode == "sample" else torch.full((17,), 0.3)
    a, la = sample_boxes(lam, 20, 31, mode=mode, minmax=minmax, generator=5)
    b, lb = sample_boxes(lam, 20, 31, mode=mode, minmax=minmax, generator=np.random.default_rng(5))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(la, lb)
    t1, _ = sample_boxes(lam, 20, 31, mode=mode, minmax=minmax, generator=torch.Generator().manual_seed(3))
    t2, _ = sample_boxes(lam, 20, 31, mode=mode, minmax=minmax, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1.boxes, t2.boxes)
    assert a.boxes.dtype == torch.int64 and a.boxes.shape == (17, 4) and la.dtype == torch.float32
    others = [sample_boxes(lam, 20, 31, mode=mode, minmax=minmax, generator=s)[0].boxes for s in range(6, 10)]
    assert not all(torch.equal(a.boxes, o) for o in others)


def test_batch_mode_is_one_box_sample_mode_one_each():
    one, _ = sample_boxes(torch.full((40,), 0.5), 64, 64, mode="batch", generator=1)
    assert (one.boxes == one.boxes[0]).all()
    each, _ = sample_boxes(torch.full((40,), 0.5), 64, 64, mode="sample", generator=1)
    assert len({tuple(r) for r in each.boxes.tolist()}) > 10


def test_box_from_lambda_is_timms_rand_bbox():
    """Every box is [c - cut // 2, c + (cut + 1) // 2) clipped, cut = floor(side * sqrt(1 - lam)), for some
    centre c in [0, side): recover the centre where the box says it and check the rest follows."""
    h, w, b = 37, 50, 4000
    lam = lams(b, 2)
    boxes, _ = sample_boxes(lam, h, w, mode="sample", correct_lam=False, generator=3)
    for (lo, hi), side, k in (((0, 1), h, 0), ((2, 3), w, 1)):
        cut = np.floor(np.array([h, w])[k] * np.sqrt(1.0 - lam.double().numpy())).astype(np.int64)
        half, rest = cut // 2, (cut + 1) // 2  # timm 1.0: the box is cut wide, its centre rounded down
        lo_v, hi_v = boxes.boxes[:, lo].numpy(), boxes.boxes[:, hi].numpy()
        centre = np.where(lo_v > 0, lo_v + half, hi_v - rest)  # the unclipped end gives the centre
        known = (lo_v > 0) | (hi_v < side)
        assert known.mean() > 0.5
        c = centre[known]
        assert ((c >= 0) & (c < side)).all()
        np.testing.assert_array_equal(lo_v[known], np.clip(c - half[known], 0, side))
        np.testing.assert_array_equal(hi_v[known], np.clip(c + rest[known], 0, side))


def test_box_centre_is_uniform():
    """lam = 1 gives empty boxes at the centre itself: its rows and columns are uniform."""
    h, w, b = 12, 9, 6000
    boxes, lam = sample_boxes(torch.ones(b), h, w, mode="sample", generator=4)
    assert (boxes.boxes[:, 0] == boxes.boxes[:, 1]).all() and (boxes.boxes[:, 2] == boxes.boxes[:, 3]).all()
    assert torch.equal(lam, torch.ones(b))
    for col, side in ((0, h), (2, w)):
        counts = np.bincount(boxes.boxes[:, col].numpy(), minlength=side)
        assert counts.shape == (side,)
        assert scipy.stats.chisquare(counts).pvalue > 1e-3


def test_correct_lam_is_the_pasted_share():
    h, w = 23, 41
    lam = lams(500, 5)
    boxes, corrected = sample_boxes(lam, h, w, mode="sample", generator=6)
    area = (boxes.boxes[:, 1] - boxes.boxes[:, 0]) * (boxes.boxes[:, 3] - boxes.boxes[:, 2])
    want = (1.0 - area.double() / (h * w)).float()
    assert torch.equal(corrected, want) and torch.equal(boxes.lam(), want)
    assert (corrected >= lam - 1e-6).all()  # flooring and clipping only shrink the box
    _, kept = sample_boxes(lam, h, w, mode="sample", correct_lam=False, generator=6)
    assert torch.equal(kept, lam)


def test_minmax_sides_and_placement():
    h, w, b = 40, 25, 3000
    boxes, lam = sample_boxes(torch.full((b,), 0.9), h, w, mode="sample", minmax=(0.2, 0.8), correct_lam=False,
                              generator=7)
    bx = boxes.boxes.numpy()
    for (lo, hi), side in (((0, 1), h), ((2, 3), w)):
        cut = bx[:, hi] - bx[:, lo]
        assert cut.min() == math.floor(side * 0.2) and cut.max() == math.floor(side * 0.8) - 1
        assert (bx[:, lo] >= 0).all() and (bx[:, lo] <= side - cut).all()
        assert (bx[:, hi] == side).any()  # the corner's range includes side - cut (timm 1.0)
    # minmax ignores lambda and always corrects it (as timm does)
    area = (bx[:, 1] - bx[:, 0]) * (bx[:, 3] - bx[:, 2])
    assert torch.equal(lam, torch.from_numpy(1.0 - area / (h * w)).float())


def test_minmax_edge_ranges_take_the_lower_end():
    full, lam = sample_boxes(torch.full((3,), 0.5), 6, 7, minmax=(1.0, 1.0), generator=0)
    assert full.boxes.tolist() == [[0, 6, 0, 7]] * 3 and torch.equal(lam, torch.zeros(3))
    empty, lam = sample_boxes(torch.full((3,), 0.5), 6, 7, minmax=(0.0, 0.0), generator=0)
    assert (empty.area() == 0).all() and torch.equal(lam, torch.ones(3))


def test_takes_mix_pairs_and_empty_batches():
    pairs = sample_pairs(9, lam_mode="sample", generator=1)
    a, la = sample_boxes(pairs, 10, 10, mode="sample", generator=2)
    b, lb = sample_boxes(pairs.lam, 10, 10, mode="sample", generator=2)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(la, lb)
    MixPairs(pairs.perm, la)  # a valid pairing with the corrected lambdas
    empty, lam = sample_boxes(torch.zeros(0), 10, 10, generator=0)
    assert empty.boxes.shape == (0, 4) and lam.shape == (0,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=torch.tensor([0.2, 0.3])), "lam: mode='batch'"),
    (dict(lam=torch.tensor([1.5])), r"lam: values must lie in \[0, 1\]"),
    (dict(lam=torch.tensor([float("nan")])), r"lam: values must lie in \[0, 1\]"),
    (dict(lam=torch.zeros(2, 2)), "lam: expected MixPairs or"),
    (dict(lam="x"), "lam: expected MixPairs or"),
    (dict(height=-1), "height: expected a non-negative integer"),
    (dict(width=2.5), "width: expected a non-negative integer"),
    (dict(mode="elem"), "mode: expected one of"),
    (dict(minmax=(0.8, 0.2)), "minmax: expected two numbers"),
    (dict(minmax=0.5), "minmax: expected two numbers"),
    (dict(minmax=(0.1, 1.2)), "minmax: expected two numbers"),
    (dict(generator=-1), "generator: an int seed"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    args = dict(lam=torch.full((2,), 0.5), height=8, width=8)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        sample_boxes(args.pop("lam"), args.pop("height"), args.pop("width"), **args)


@pytest.mark.parametrize("boxes, match", [
    (torch.tensor([[0, 4, 0, 5]], dtype=torch.int32), "int64"),
    (torch.tensor([0, 4, 0, 5]), r"shape \(B, 4\)"),
    ([[0, 4, 0, 5]], "torch tensor"),
    (torch.tensor([[0, 4, 0, 5], [3, 2, 0, 1]]), r"box 1 = \(y0, y1, x0, x1\) = \(3, 2, 0, 1\)"),
    (torch.tensor([[0, 9, 0, 5]]), "not within a 8 x 6 image"),
    (torch.tensor([[0, 8, -1, 5]]), "not within a 8 x 6 image"),
    (torch.tensor([[0, 8, 0, 7]]), "not within a 8 x 6 image"),
])
def test_cut_boxes_refuse_bad_boxes(boxes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CutBoxes(boxes, 8, 6)


def test_cut_boxes_border_and_empty_boxes_are_valid():
    boxes = CutBoxes(torch.tensor([[0, 8, 0, 6], [8, 8, 6, 6], [3, 3, 0, 6], [0, 0, 0, 0]]), 8, 6)
    assert boxes.area().tolist() == [48, 0, 0, 0] and boxes.lam().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert len(boxes) == 4 and boxes.to("cpu").height == 8
    with pytest.raises(ValueError, match="CutBoxes: height must be"):
        CutBoxes(torch.zeros(1, 4, dtype=torch.int64), -1, 6)
