"""Drawing the mixup pairing and mixing weights: all of mixup's randomness, apart from compute.

:func:`sample_pairs` draws one batch's pairs; :class:`PairFeed` seeds it from where the batch sits
(seed, shard, epoch, batch index), for the loaders and the DALI pipelines alike.
:func:`sample_boxes` draws CutMix's boxes (:class:`CutBoxes`) for pairs already drawn."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._arrays import to_device

PAIRINGS = ("permutation", "flip", "roll")
LAM_MODES = ("batch", "sample")


@dataclass(frozen=True)
class MixPairs:
    """Who is mixed with whom, and how much.

    Sample ``i`` becomes ``lam[i] * x[i] + (1 - lam[i]) * x[perm[i]]``.

    Attributes:
        perm: (B,) int64 partner index of every sample.
        lam: (B,) float32 weight of the sample itself, in [0, 1]. With ``lam_mode="batch"``
            all entries are equal.
    """

    perm: torch.Tensor
    lam: torch.Tensor

    def __post_init__(self):
        perm, lam = self.perm, self.lam
        if not isinstance(perm, torch.Tensor) or not isinstance(lam, torch.Tensor):
            raise TypeError("MixPairs: perm and lam must be torch tensors")
        if perm.ndim != 1 or lam.ndim != 1 or perm.shape != lam.shape:
            raise ValueError(
                f"MixPairs: perm and lam must both have shape (B,), got {tuple(perm.shape)} and {tuple(lam.shape)}"
            )
        if perm.dtype != torch.int64:
            raise TypeError(f"MixPairs: perm must be int64, got {perm.dtype}")
        if not lam.dtype.is_floating_point:
            raise TypeError(f"MixPairs: lam must be a float tensor, got {lam.dtype}")
        b = perm.shape[0]
        if b and (int(perm.min()) < 0 or int(perm.max()) >= b):
            raise ValueError(f"MixPairs: perm entries must lie in [0, {b}), got [{int(perm.min())}, {int(perm.max())}]")
        if b and not bool(((lam >= 0) & (lam <= 1)).all()):
            raise ValueError(
                f"MixPairs: lam must lie in [0, 1], got [{float(lam.min())}, {float(lam.max())}]"
            )

    def __len__(self) -> int:
        return self.perm.shape[0]

    def to(self, device) -> MixPairs:
        """The same pairs on another device. Not validated again: these were, and checking on a
        GPU would synchronise it three times."""
        moved = object.__new__(MixPairs)
        object.__setattr__(moved, "perm", to_device(self.perm, device))
        object.__setattr__(moved, "lam", to_device(self.lam, device))
        return moved


def check_unchanged(pairs: MixPairs, ok: bool | None = None, name: str = "pairs") -> None:
    """Raise if the pairs' tensors were written since ``MixPairs`` checked them (a perm out of
    range would be read out of bounds, a lam outside [0, 1] gives NaN targets).

    Args:
        pairs: the batch's pairs; checked here when ``ok`` is None (host tensors).
        ok: the verdict computed elsewhere (on a GPU, folded into the caller's one sync).
    """
    b = len(pairs)
    if ok is None:
        ok = not b or _in_range(pairs.perm.numpy(), pairs.lam.detach(), b)
    if not ok:
        raise ValueError(f"{name}: perm must lie in [0, {b}) and lam in [0, 1]; the pairs' tensors were changed "
                         "after sample_pairs made them")


def _in_range(perm: np.ndarray, lam: torch.Tensor, b: int) -> bool:
    lam = (lam if lam.dtype in (torch.float32, torch.float64) else lam.float()).numpy()
    return bool(perm.min() >= 0 and perm.max() < b and lam.min() >= 0 and lam.max() <= 1)  # NaN fails


def check_alpha(alpha) -> float:
    """``alpha`` as a float; refuses a bool, a non-number, NaN, infinity and a negative value."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(alpha, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"alpha: expected a finite number >= 0 (0: no mixing), got {alpha!r}")
    return value


def _rng(generator) -> np.random.Generator:
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):  # one draw of it seeds the NumPy generator
        seed = torch.randint(0, 2 ** 63 - 1, (1,), generator=generator, device=generator.device)
        return np.random.default_rng(int(seed.item()))
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        if generator < 0:
            raise ValueError(f"generator: an int seed must be >= 0, got {generator!r}")
        return np.random.default_rng(int(generator))
    raise TypeError(
        "generator: expected a numpy.random.Generator, a torch.Generator, an int seed or None, "
        f"got {type(generator).__name__}"
    )


def sample_pairs(
    batch_size: int,
    alpha: float = 1.0,
    *,
    pairing: str = "permutation",
    lam_mode: str = "batch",
    generator=None,
) -> MixPairs:
    """Draw the pairing and the mixing weights for one batch.

    Args:
        batch_size: B, the number of samples (0 gives empty pairs).
        alpha: lambda ~ Beta(alpha, alpha), a finite number >= 0; ``alpha = 0`` means no mixing
            (lambda = 1 and the identity pairing). A negative alpha is refused: it is no Beta
            parameter, and treating it as 0 would turn mixup off without a word.
        pairing: ``"permutation"`` (uniform random, the GenLabel authors' choice), ``"flip"``
            (reversed batch, timm) or ``"roll"`` (shift by one, torchvision).
        lam_mode: ``"batch"`` (one lambda for the batch, the default) or ``"sample"``.
        generator: a ``numpy.random.Generator``, a ``torch.Generator`` (one draw of it, which
            advances its state, seeds the NumPy generator that draws the pairs) or an int seed;
            None draws fresh entropy.

    Returns:
        MixPairs with ``perm`` (B,) int64 and ``lam`` (B,) float32, on the CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
        raise ValueError(f"batch_size: expected a non-negative integer, got {batch_size!r}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing: expected one of {PAIRINGS}, got {pairing!r}")
    if lam_mode not in LAM_MODES:
        raise ValueError(f"lam_mode: expected one of {LAM_MODES}, got {lam_mode!r}")
    alpha = check_alpha(alpha)
    rng = _rng(generator)
    b = int(batch_size)
    if alpha == 0:
        return MixPairs(torch.arange(b, dtype=torch.int64), torch.ones(b, dtype=torch.float32))
    if pairing == "permutation":
        perm = rng.permutation(b)
    elif pairing == "flip":
        perm = np.arange(b - 1, -1, -1)  # not arange(b)[::-1]: torch rejects its negative stride
    else:
        perm = np.roll(np.arange(b), 1)
    draws = 1 if lam_mode == "batch" else b
    lam = np.broadcast_to(rng.beta(alpha, alpha, size=draws), (b,))
    return MixPairs(
        torch.from_numpy(np.ascontiguousarray(perm, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(lam, dtype=np.float32)),
    )


BOX_MODES = ("batch", "sample")


@dataclass(frozen=True)
class CutBoxes:
    """Where CutMix pastes the partner: one box per sample (docs/MATH.md section 7).

    Sample ``i`` takes its partner's pixels at rows ``y0 <= h < y1`` and columns ``x0 <= w < x1``
    and keeps its own elsewhere. Zero-area boxes (nothing pasted) and the full image are allowed.
    With ``cut``, only the samples it marks are cut and pasted; the others are mixed by their
    pairs' lambda (mixup), their boxes unused: one batch mixes some samples one way and some the
    other, in the same pass (timm's ``switch_prob`` per sample; an unmixed sample is a cut one
    with an empty box).

    Attributes:
        boxes: (B, 4) int64 ``(y0, y1, x0, x1)`` per sample, in pixels, half-open, with
            ``0 <= y0 <= y1 <= height`` and ``0 <= x0 <= x1 <= width``.
        height, width: the image size the boxes are for (the pixel stage checks it).
        cut: None (every sample is cut) or (B,) bool, True where the sample is cut and pasted.
    """

    boxes: torch.Tensor
    height: int
    width: int
    cut: torch.Tensor | None = None

    def __post_init__(self):
        boxes, cut = self.boxes, self.cut
        if cut is not None:
            if not isinstance(cut, torch.Tensor) or cut.dtype != torch.bool:
                raise TypeError(f"CutBoxes: cut must be a bool tensor or None, got "
                                f"{getattr(cut, 'dtype', type(cut).__name__)}")
            if isinstance(boxes, torch.Tensor) and (cut.shape != boxes.shape[:1] or cut.device != boxes.device):
                raise ValueError(f"CutBoxes: cut must have shape (B,) = {tuple(boxes.shape[:1])} on the boxes' "
                                 f"device {boxes.device}, got {tuple(cut.shape)} on {cut.device}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"CutBoxes: {name} must be a non-negative integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not isinstance(boxes, torch.Tensor):
            raise TypeError(f"CutBoxes: boxes must be a torch tensor, got {type(boxes).__name__}")
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"CutBoxes: boxes must have shape (B, 4) as (y0, y1, x0, x1), got {tuple(boxes.shape)}")
        if boxes.dtype != torch.int64:
            raise TypeError(f"CutBoxes: boxes must be int64, got {boxes.dtype}")
        if boxes.device.type == "cpu":  # a GPU check would synchronise; CPU-made boxes are checked here
            bad = _bad_box(boxes.numpy(), self.height, self.width)
            if bad is not None:
                raise ValueError(f"CutBoxes: {bad}")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def area(self) -> torch.Tensor:
        """(B,) int64 pixels pasted per sample."""
        b = self.boxes
        return (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])

    def lam(self) -> torch.Tensor:
        """(B,) float32 share of every sample's own pixels, ``1 - area / (H W)`` (1 for an empty
        image); for samples ``cut`` leaves out, the pairs' lambda applies instead."""
        pixels = self.height * self.width
        if pixels == 0:
            return torch.ones(len(self), dtype=torch.float32, device=self.boxes.device)
        return (1.0 - self.area().to(torch.float64) / pixels).to(torch.float32)

    def to(self, device) -> CutBoxes:
        """The same boxes on another device (not validated again, as for ``MixPairs.to``)."""
        moved = object.__new__(CutBoxes)
        object.__setattr__(moved, "boxes", to_device(self.boxes, device))
        object.__setattr__(moved, "height", self.height)
        object.__setattr__(moved, "width", self.width)
        object.__setattr__(moved, "cut", None if self.cut is None else to_device(self.cut, device))
        return moved


def _bad_box(b: np.ndarray, height: int, width: int) -> str | None:
    """What is wrong with (B, 4) boxes for a height x width image, or None."""
    if not b.shape[0]:
        return None
    y0, y1, x0, x1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    ok = (y0 >= 0) & (y0 <= y1) & (y1 <= height) & (x0 >= 0) & (x0 <= x1) & (x1 <= width)
    if ok.all():
        return None
    i = int(np.argmin(ok))
    return (f"box {i} = (y0, y1, x0, x1) = {tuple(int(v) for v in b[i])} is not within a {height} x {width} "
            "image (need 0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width)")


def check_boxes_unchanged(boxes: CutBoxes, name: str = "boxes") -> None:
    """Raise if CPU boxes were written since ``CutBoxes`` checked them (the CPU kernel would write
    outside the sample's row)."""
    bad = _bad_box(boxes.boxes.numpy(), boxes.height, boxes.width)
    if bad is not None:
        raise ValueError(f"{name}: {bad}; the boxes' tensor was changed after it was made")


def _check_minmax(minmax) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in minmax)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (0 <= lo <= hi <= 1):
        raise ValueError(f"minmax: expected two numbers 0 <= min <= max <= 1 (box side ratios), got {minmax!r}")
    return lo, hi


def _lam_values(lam) -> np.ndarray:
    if isinstance(lam, MixPairs):
        lam = lam.lam
    if isinstance(lam, torch.Tensor):
        lam = lam.detach().cpu().to(torch.float64).numpy()
    a = np.asarray(lam)
    if a.dtype.kind not in "iuf" or a.ndim != 1:
        raise ValueError(f"lam: expected MixPairs or (B,) numbers in [0, 1], got {type(lam).__name__} "
                         f"of shape {a.shape}")
    a = a.astype(np.float64)
    if a.size and not ((a >= 0) & (a <= 1)).all():  # NaN fails
        raise ValueError(f"lam: values must lie in [0, 1], got [{a.min()}, {a.max()}]")
    return a


def _integers(rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Uniform integers in [low, high), elementwise; ``low`` where the range is empty."""
    return low + rng.integers(0, np.maximum(high - low, 1))


def sample_boxes(lam, height: int, width: int, *, mode: str = "batch", minmax=None, correct_lam: bool = True,
                 generator=None) -> tuple[CutBoxes, torch.Tensor]:
    """Draw CutMix boxes as timm does (docs/MATH.md section 7) and correct lambda to them.

    Args:
        lam: the batch's MixPairs (their ``lam`` is used) or (B,) lambdas in [0, 1].
        height, width: the image size.
        mode: ``"batch"`` (one box for the whole batch, drawn from the one lambda: all entries of
            ``lam`` must be equal) or ``"sample"`` (a box per sample from its own lambda).
        minmax: None (the box from lambda: side ratio ``sqrt(1 - lam)``, centre uniform, clipped
            to the image) or timm's ``cutmix_minmax`` ``(min, max)``: sides uniform within those
            fractions of the image, placed inside it, lambda unused.
        correct_lam: recompute lambda as ``1 - area / (H W)`` of the box drawn (always with minmax).
        generator: as for :func:`sample_pairs` (NumPy or torch generator, int seed, or None).

    Returns:
        ``(boxes, lam)``: the CutBoxes (on the CPU) and (B,) float32 lambdas for the targets
        (``MixPairs(pairs.perm, lam)`` pairs them with the partners).
    """
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
    if mode not in BOX_MODES:
        raise ValueError(f"mode: expected one of {BOX_MODES}, got {mode!r}")
    lams = _lam_values(lam)
    h, w, b = int(height), int(width), lams.shape[0]
    if mode == "batch" and b and (lams != lams[0]).any():
        raise ValueError("lam: mode='batch' draws one box from one lambda, but the batch's lambdas differ; "
                         "use mode='sample' (one box per sample) or pairs drawn with lam_mode='batch'")
    rng = _rng(generator)
    draws = min(b, 1) if mode == "batch" else b
    size = np.array([h, w], np.int64)
    if minmax is not None:
        lo, hi = _check_minmax(minmax)
        low = np.floor(size * lo).astype(np.int64)
        high = np.floor(size * hi).astype(np.int64)
        cut = _integers(rng, np.broadcast_to(low, (draws, 2)), np.broadcast_to(high, (draws, 2)))
        start = _integers(rng, np.zeros((draws, 2), np.int64), size - cut + 1)
        lower, upper = start, start + cut
    else:
        ratio = np.sqrt(1.0 - lams[:draws])[:, None]
        cut = np.floor(size * ratio).astype(np.int64)
        centre = _integers(rng, np.zeros((draws, 2), np.int64), np.broadcast_to(size, (draws, 2)))
        lower = np.clip(centre - cut // 2, 0, size)
        upper = np.clip(centre + (cut + 1) // 2, 0, size)
    boxes = np.stack([lower[:, 0], upper[:, 0], lower[:, 1], upper[:, 1]], axis=1)
    boxes = np.array(np.broadcast_to(boxes, (b, 4)), dtype=np.int64)  # a writable copy
    result = CutBoxes(torch.from_numpy(boxes), h, w)
    if correct_lam or minmax is not None:
        return result, result.lam()
    return result, torch.from_numpy(lams.astype(np.float32))


def pair_generator(seed: int, shard_id: int, epoch: int, batch_index: int) -> np.random.Generator:
    """The generator of one batch's pairs: a pure function of where the batch is."""
    return np.random.default_rng([int(seed), int(shard_id), int(epoch), int(batch_index)])


class PairFeed:
    """Every batch's pairs, a pure function of (seed, shard, epoch, batch index).

    The one source of pairs of both loader backends and of the DALI pipelines: :meth:`draw` calls
    :func:`sample_pairs` with the generator :func:`pair_generator` seeds from where the batch
    sits, so a batch's mixture never depends on threads, prefetching or the backend. Needs neither
    DALI nor a GPU; it is also ``fastgenlabel.dali.PairFeed``, the form
    ``fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True)`` takes.

    Args:
        alpha: lambda ~ Beta(alpha, alpha), >= 0; 0 disables mixing (identity pairs, lambda 1).
        pairing, lam_mode: as for :func:`sample_pairs`.
        seed: base seed; shard_id: this rank's shard (ranks draw different pairs).
        batch_size: B (use :meth:`draw` directly for variable batch sizes).

    Calling it with DALI's ``BatchInfo`` (anything with ``epoch_idx`` and ``iteration``) returns
    ``(perm, lam)``: (B, 1) int64 and float32 arrays (:func:`split_pairs`).
    """

    def __init__(self, alpha: float, *, pairing: str = "permutation", lam_mode: str = "batch", seed: int = 0,
                 shard_id: int = 0, batch_size: int):
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing: expected one of {PAIRINGS}, got {pairing!r}")
        if lam_mode not in LAM_MODES:
            raise ValueError(f"lam_mode: expected one of {LAM_MODES}, got {lam_mode!r}")
        self.alpha, self.pairing, self.lam_mode = check_alpha(alpha), pairing, lam_mode
        self.seed, self.shard_id, self.batch_size = int(seed), int(shard_id), int(batch_size)

    def draw(self, batch_size: int, epoch: int, batch_index: int) -> MixPairs:
        """The MixPairs of batch ``batch_index`` of ``epoch`` (CPU tensors)."""
        rng = pair_generator(self.seed, self.shard_id, epoch, batch_index)
        return sample_pairs(batch_size, self.alpha, pairing=self.pairing, lam_mode=self.lam_mode, generator=rng)

    def __call__(self, info):
        pairs = self.draw(self.batch_size, info.epoch_idx, info.iteration)
        return split_pairs(pairs)


def split_pairs(pairs: MixPairs):
    """MixPairs -> (perm, lam) as (B, 1) int64 and float32 arrays: a batch of (1,) samples each,
    a form DALI's external_source takes. (Lists of B (1,) arrays, the other form, cost DALI a
    Python conversion per sample: ``python bench/dali_feed.py``, 2 cores, batch 256, the
    loader's four inputs: 4.3-5.0 ms per batch as lists, 2.3-3.6 ms as arrays.)"""
    perm = np.ascontiguousarray(pairs.perm.numpy().reshape(-1, 1))
    lam = np.ascontiguousarray(pairs.lam.numpy().astype(np.float32).reshape(-1, 1))
    return perm, lam
