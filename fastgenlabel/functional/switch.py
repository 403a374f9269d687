"""Choosing per batch, pair or sample between mixup, CutMix and no mixing, as timm's ``Mixup`` does.

:func:`sample_mix` makes timm's draws in timm's order (``prob``, ``switch_prob``, the Beta
draws, then one box per cut sample; docs/MATH.md section 7), from NumPy's global state by default
so that a run seeded as timm seeds it draws what timm would. The result, :class:`MixDraw`, is
what the fused pixel stage takes in one pass: the pairs (partner ``B - 1 - i``, the targets'
lambda) and CutBoxes whose ``cut`` mask marks the samples pasted by box (unmixed samples are cut
samples with an empty box, so that their rows read no partner). :class:`MixFeed` draws them for
a loader, each batch's a pure function of (seed, shard, epoch, batch index), as ``PairFeed`` does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .pairs import CutBoxes, MixPairs, _check_minmax, _rng, check_alpha, pair_generator

MIX_MODES = ("batch", "pair", "elem")
UNMIXED, MIXUP, CUTMIX = 0, 1, 2


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing choices.

    Attributes:
        pairs: MixPairs: ``perm`` the reversed batch (timm's partner ``B - 1 - i``; the middle
            sample of an odd batch is its own partner and unmixed), ``lam`` (B,) float32 the
            targets' lambda (the box-corrected one for cut samples, 1 for unmixed ones).
        boxes: CutBoxes with ``cut`` set, or None when every sample is mixed by lambda.
        kind: (B,) int8 ``UNMIXED`` (0), ``MIXUP`` (1) or ``CUTMIX`` (2) per sample.
    """

    pairs: MixPairs
    boxes: CutBoxes | None
    kind: torch.Tensor

    def __len__(self) -> int:
        return len(self.pairs)


class _Draws:
    """timm's three draws (``rand``, ``beta``, ``randint``) on NumPy's global state, a
    RandomState, or a ``numpy.random.Generator`` (``random``, ``beta``, ``integers``)."""

    def __init__(self, generator):
        self.legacy = generator is None or isinstance(generator, np.random.RandomState)
        # None: NumPy's module functions, on the state np.random.seed seeds (timm's draws)
        self.g = np.random if generator is None else generator if self.legacy else _rng(generator)

    def rand(self, size=None):
        return self.g.rand(*(() if size is None else (size,))) if self.legacy else self.g.random(size)

    def beta(self, alpha, size=None):
        return self.g.beta(alpha, alpha, size)

    def randint(self, low, high):
        """One integer in [low, high); ``low`` without a draw when the range is empty (timm raises)."""
        if high <= low:
            return low
        return int(self.g.randint(low, high) if self.legacy else self.g.integers(low, high))


def _box(d: _Draws, h: int, w: int, lam, minmax):
    """timm's ``rand_bbox`` (from ``lam``) or ``rand_bbox_minmax``, one box, as (y0, y1, x0, x1);
    as timm 1.0 draws them (an unclipped box is ``cut`` wide, its centre rounded down)."""
    if minmax is not None:
        cut_h = d.randint(int(h * minmax[0]), int(h * minmax[1]))
        cut_w = d.randint(int(w * minmax[0]), int(w * minmax[1]))
        y0 = d.randint(0, h - cut_h + 1)
        x0 = d.randint(0, w - cut_w + 1)
        return y0, y0 + cut_h, x0, x0 + cut_w
    ratio = np.sqrt(1 - lam)  # in lam's precision: float32 per element, float64 per batch, as timm
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy = d.randint(0, h)
    cx = d.randint(0, w)
    return (min(max(cy - cut_h // 2, 0), h), min(max(cy + (cut_h + 1) // 2, 0), h),
            min(max(cx - cut_w // 2, 0), w), min(max(cx + (cut_w + 1) // 2, 0), w))


def _check_probability(v, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(v, bool) or not 0 <= f <= 1:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {v!r}")
    return f


def sample_mix(batch_size: int, height: int, width: int, *, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0,
               cutmix_minmax=None, prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch",
               correct_lam: bool = True, generator=None) -> MixDraw:
    """Draw one batch's choices between mixup, CutMix and no mixing, with timm's meanings.

    Args:
        batch_size, height, width: the batch's B and image size.
        mixup_alpha, cutmix_alpha: Beta parameters (>= 0); 0 turns that kind off. At least one > 0.
        cutmix_minmax: None or ``(min, max)`` box side ratios (CutMix then ignores lambda; timm
            also sets ``cutmix_alpha = 1`` with it, which :class:`fastgenlabel.Mixup` does).
        prob: probability that a batch (mode "batch") or a pair/sample is mixed at all.
        switch_prob: probability of CutMix rather than mixup when both alphas are > 0.
        mode: "batch" (one choice and lambda for the batch), "pair" (per pair ``(i, B-1-i)``,
            both sharing lambda and box) or "elem" (per sample).
        correct_lam: the cut samples' lambda from their clipped box (always with minmax).
        generator: None (NumPy's global state, as timm), a RandomState, a NumPy or torch
            Generator, or an int seed.
    """
    for name, v in (("batch_size", batch_size), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
    if mode not in MIX_MODES:
        raise ValueError(f"mode: expected one of {MIX_MODES}, got {mode!r}")
    ma, ca = check_alpha(mixup_alpha), check_alpha(cutmix_alpha)
    if ma == 0 and ca == 0:
        raise ValueError("mixup_alpha, cutmix_alpha: at least one must be > 0 (or cutmix_minmax set)")
    minmax = None if cutmix_minmax is None else _check_minmax(cutmix_minmax)
    prob, switch_prob = _check_probability(prob, "prob"), _check_probability(switch_prob, "switch_prob")
    b, h, w = int(batch_size), int(height), int(width)
    d = _Draws(generator)
    if mode == "batch":
        lam, kind = _per_batch(d, ma, ca, prob, switch_prob)
        n = b
        lams, kinds = np.full(b, lam, np.float64), np.full(b, kind, np.int8)
    else:
        n = b if mode == "elem" else b // 2
        lams, kinds = _per_elem(d, n, ma, ca, prob, switch_prob)
    boxes = np.zeros((b, 4), np.int64)
    if mode == "batch":
        if kinds.size and kinds[0] == CUTMIX:
            box = _box(d, h, w, lams[0], minmax)
            boxes[:] = box
            if correct_lam or minmax is not None:
                lams[:] = _area_lam(box, h, w)
    else:
        for i in range(n):
            if kinds[i] == CUTMIX:
                box = _box(d, h, w, lams[i], minmax)
                boxes[i] = box
                if correct_lam or minmax is not None:
                    lams[i] = _area_lam(box, h, w)
        lams = lams.astype(np.float32)  # timm keeps per-sample lambdas in float32
        if mode == "pair":
            mid = np.ones(b % 2)
            lams = np.concatenate([lams, mid, lams[::-1]])
            kinds = np.concatenate([kinds, np.zeros(b % 2, np.int8), kinds[::-1]])
            boxes[b - n:] = boxes[:n][::-1]
    if b % 2:  # the middle sample is its own partner: nothing to mix
        lams[b // 2], kinds[b // 2], boxes[b // 2] = 1.0, UNMIXED, 0
    perm = torch.arange(b - 1, -1, -1, dtype=torch.int64)
    pairs = MixPairs(perm, torch.from_numpy(np.asarray(lams, np.float32).copy()))
    kind_t = torch.from_numpy(kinds.astype(np.int8))
    cut = kind_t != MIXUP
    box_t = None if not bool(cut.any()) else CutBoxes(torch.from_numpy(boxes), h, w, cut)
    return MixDraw(pairs, box_t, kind_t)


def _area_lam(box, h: int, w: int) -> float:
    y0, y1, x0, x1 = box
    return 1.0 - (y1 - y0) * (x1 - x0) / float(h * w) if h * w else 1.0


def _per_batch(d: _Draws, ma: float, ca: float, prob: float, switch_prob: float):
    """timm's ``_params_per_batch``: (lambda, kind)."""
    if not d.rand() < prob:
        return 1.0, UNMIXED
    if ma > 0 and ca > 0:
        cut = d.rand() < switch_prob
        lam = d.beta(ca) if cut else d.beta(ma)
    elif ma > 0:
        cut, lam = False, d.beta(ma)
    else:
        cut, lam = True, d.beta(ca)
    lam = float(lam)
    if lam == 1.0:
        return 1.0, UNMIXED
    return lam, CUTMIX if cut else MIXUP


def _per_elem(d: _Draws, n: int, ma: float, ca: float, prob: float, switch_prob: float):
    """timm's ``_params_per_elem``: (n,) float32 lambdas and int8 kinds."""
    if ma > 0 and ca > 0:
        cut = d.rand(n) < switch_prob
        lam_mix = np.where(cut, d.beta(ca, n), d.beta(ma, n))
    elif ma > 0:
        cut, lam_mix = np.zeros(n, bool), d.beta(ma, n)
    else:
        cut, lam_mix = np.ones(n, bool), d.beta(ca, n)
    mixed = d.rand(n) < prob
    lam = np.where(mixed, lam_mix.astype(np.float32), np.float32(1.0))
    kinds = np.where(lam == 1, UNMIXED, np.where(cut, CUTMIX, MIXUP)).astype(np.int8)
    return lam, kinds


class MixFeed:
    """Every batch's :class:`MixDraw` for a loader, a pure function of (seed, shard, epoch, batch index).

    The CutMix / switched counterpart of :class:`~fastgenlabel.functional.pairs.PairFeed`: each
    batch's draws are :func:`sample_mix`'s (timm's order and meanings) from the generator
    :func:`~fastgenlabel.functional.pairs.pair_generator` seeds from where the batch sits, so the
    pairs, boxes and cut mask never depend on threads, prefetching or the backend.

    Args:
        seed, shard_id, batch_size: as for ``PairFeed``.
        options: :func:`sample_mix`'s keyword arguments (``mixup_alpha``, ``cutmix_alpha``, ...).
    """

    def __init__(self, *, seed: int = 0, shard_id: int = 0, batch_size: int, **options):
        sample_mix(1, 1, 1, **options, generator=0)  # checks the options once, here
        self.options = dict(options)
        self.seed, self.shard_id, self.batch_size = int(seed), int(shard_id), int(batch_size)

    def draw(self, batch_size: int, epoch: int, batch_index: int, height: int, width: int) -> MixDraw:
        """The MixDraw of batch ``batch_index`` of ``epoch`` for height x width images (CPU tensors)."""
        rng = pair_generator(self.seed, self.shard_id, epoch, batch_index)
        return sample_mix(batch_size, height, width, **self.options, generator=rng)


def box_rows(draw: MixDraw) -> np.ndarray:
    """(B, 6) int64 ``(y0, y1, x0, x1, cut, kind)`` per sample: a draw's boxes, cut mask and kinds
    as one array (the form the DALI stage takes through ``external_source``)."""
    rows = np.zeros((len(draw), 6), np.int64)
    if draw.boxes is not None:
        rows[:, :4] = draw.boxes.boxes.numpy()
        cut = draw.boxes.cut
        rows[:, 4] = 1 if cut is None else cut.numpy()
    rows[:, 5] = draw.kind.numpy()
    return rows


def draw_from_rows(pairs: MixPairs, rows: np.ndarray, height: int, width: int) -> MixDraw:
    """The MixDraw that :func:`box_rows` wrote, back from its rows and the pairs."""
    rows = np.asarray(rows, np.int64).reshape(-1, 6)
    cut = torch.from_numpy(rows[:, 4] != 0)
    boxes = CutBoxes(torch.from_numpy(np.ascontiguousarray(rows[:, :4])), height, width, cut) \
        if bool(cut.any()) else None
    return MixDraw(pairs, boxes, torch.from_numpy(rows[:, 5].astype(np.int8)))
