"""LoaderConfig: everything a GenLabelLoader needs, validated once."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..functional.pairs import LAM_MODES, PAIRINGS, check_alpha
from .files import DEFAULT_MAX_IMAGE_PIXELS
from .sampling import LAST_BATCH_POLICIES

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
FEATURES = ("auto", "thumbnail", "stored", "none")
BACKENDS = ("dali", "torch")
DEVICES = ("auto", "cpu", "cuda")
ON_BAD_IMAGE = ("error", "skip")
FLOAT_RANGES = (None, "0-255", "0-1")
MAX_SEED = 2 ** 63 - 1  # both backends: numpy takes any seed >= 0, DALI's pipeline a signed 64-bit one


@dataclass
class LoaderConfig:
    """Configuration of :class:`fastgenlabel.GenLabelLoader`.

    Data and batching:
        data: a folder of class sub-folders, a ``path label`` file list, or WebDataset tar shards:
            a list of ``.tar`` paths, one ``.tar`` path, a glob (``"shards/train-*.tar"``), a brace
            range (``"shards/train-{0000..0146}.tar"``) or a folder of ``.tar`` files (and no class
            sub-folders). Shards are indexed once (their headers only) and read in place, so
            ordering, epochs, shards per rank and the last-batch policy are the folder's, over
            the samples in shard order. A torch Dataset or DataLoader is no ``data``: pass it as
            ``GenLabelLoader(config, dataset=...)`` with ``backend="torch"``.
        image_ext, label_ext: a WebDataset sample's image member (``;``-separated alternatives,
            the first present wins) and its label member, a decimal class index.
        batch_size: B, samples per batch (per shard).
        last_batch: "drop" (only full batches), "partial" (a shorter last batch, possibly of one
            sample) or "fill" (complete it with samples from the start of the epoch).
        shuffle, seed: a fresh order per epoch, a pure function of (seed, epoch); seed in
            [0, 2**63 - 1].
        shard_id, num_shards: this rank's share (every shard gets ceil(N / num_shards) samples).
        on_bad_image: "error" (raise CorruptImageError naming the file) or "skip" (warn with the
            file's name and leave it out of its batch, which is one sample shorter). Files whose
            container is fine but whose data fail to decode always raise, naming the file
            (``shard.tar:member`` for a WebDataset sample).
        max_image_pixels: an image whose header declares more pixels (width x height) is refused
            before it is decoded (``ImageTooLargeError``, a ``CorruptImageError``: skipped under
            "skip"), on both backends; None: no limit. The default is PIL's (2 x
            ``PIL.Image.MAX_IMAGE_PIXELS``): a decompression bomb would take gigabytes and minutes.

    Augmentation and output:
        image_size: side of the square output crop.
        train: random resized crop (``crop_scale``, ``crop_ratio``) and, with ``flip``, a random
            horizontal flip, drawn per (seed, epoch, sample) on the host, the same windows on both
            backends (:mod:`fastgenlabel.loader.crops`); False: resize the shorter side to
            ``image_size / 0.875`` and centre-crop, no flip.
        mean, std: per-channel normalisation in pixel units (0-255); ImageNet's by default.
        dtype: "float32", "float16" or "bfloat16" images (rounded to nearest even from the float32
            mix); layout "CHW" gives (B, C, H, W).
        channels_last: with layout "CHW", (B, C, H, W) tensors in channels-last memory (what
            ``torch.channels_last`` convolutions read), written so by the same pass (no copy).
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda" (device 0 or ``device_id``).

    Mixup and GenLabel:
        alpha: lambda ~ Beta(alpha, alpha), a number >= 0; 0 disables mixing (images unmixed,
            one-hot targets).
        pairing, lam_mode: as for :func:`fastgenlabel.sample_pairs`.
        mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam: timm's
            ``Mixup`` options, with timm's meanings and draws (:func:`~fastgenlabel.functional.switch.
            sample_mix`: CutMix, mixup and CutMix switched per batch / pair / sample, ``prob`` < 1
            leaving some unmixed). ``mixup_alpha`` is timm's name of ``alpha``: give either (both
            only if equal). Setting any of cutmix_alpha > 0, cutmix_minmax, prob < 1 or mode
            switches to timm's draws, partners ``B - 1 - i`` (``pairing`` must then stay at its
            default or be "flip"); ``mode`` defaults to "elem" for ``lam_mode="sample"``, else
            "batch", and contradicting lam_mode ("sample" with mode "batch" or "pair") is refused.
            Otherwise the pairs are ``pairing``'s, as without these options.
        model: a fitted class model, or the path of a saved one (``load_model``); None for plain
            mixup targets.
        features: "thumbnail" (a fitted ThumbnailPCA in ``feature_map``: exact), "stored"
            (``embeddings``: an (N, d) .npy file, interpolated: approximate), "none", or "auto"
            (whichever is given).
        feature_map: a fitted :class:`fastgenlabel.features.ThumbnailPCA` or its .npz path.
        embeddings: path of the (N, d) .npy embeddings (one row per sample, in sample order).
        gamma, smoothing: GenLabel's weight and label smoothing (docs/MATH.md section 3).
        num_classes: K; defaults to the model's, else to the dataset's class count.

    Pipeline:
        backend: "dali" (decode, crop, flip, mix in the DALI graph) or "torch" (any Dataset or
            DataLoader, mix and relabel after collation).
        num_threads: DALI CPU threads; prefetch: batches DALI prepares ahead.
        mix_mode: the CPU mix stage: "batch" (one call per batch on one thread, partners read in
            place), "sample" (partners gathered by permute_batch, the mix spread over all
            threads) or "auto" ("sample" from 4 threads on, where one thread per batch would
            become the bottleneck; "batch" below).
        thumbnail: thumbnail side when no feature map is given but thumbnails are wanted
            (``return_thumbnails``, used to fit a ThumbnailPCA from a pass of the loader).
        relabel_backend: backend of :func:`fastgenlabel.relabel` ("auto" picks the fastest).
        float_range: torch backend: the units of float images (uint8 images are 0-255 units):
            "0-1" (torchvision's ``ToTensor``, permuted to (H, W, C)): scaled to 0-255 here, so
            ``mean``, ``std`` and feature maps stay in pixel units; "0-255": taken as they are; None
            (default): as "0-255", and a first float batch whose values all lie in [0, 1] is refused
            as ambiguous (0-1 images read as 0-255 units normalise to a near-constant input).
        extra: backend options: ``num_workers`` (torch backend: DataLoader workers, default 0),
            ``baseline`` (DALI backend: DALI's crop_mirror_normalize instead of the mix stage, no
            mixing: the throughput benchmark's reference).
        target_threads: torch/Numba threads for the per-batch projection and relabel on the CPU
            (1 by default: the work is tiny and DALI's threads are busy on the same cores; None
            leaves the process's settings alone).
    """

    data: Any = None
    batch_size: int = 64
    last_batch: str = "drop"
    shuffle: bool = True
    seed: int = 0
    shard_id: int = 0
    num_shards: int = 1
    on_bad_image: str = "error"
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    image_size: int = 224
    train: bool = True
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True
    mean: tuple | None = IMAGENET_MEAN
    std: tuple | None = IMAGENET_STD
    dtype: str = "float32"
    layout: str = "CHW"
    channels_last: bool = False
    device: str = "auto"
    device_id: int = 0
    alpha: float = 1.0
    pairing: str = "permutation"
    lam_mode: str = "batch"
    mixup_alpha: float | None = None
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str | None = None
    correct_lam: bool = True
    model: Any = None
    features: str = "auto"
    feature_map: Any = None
    embeddings: Any = None
    gamma: float = 1.0
    smoothing: float = 0.0
    num_classes: int | None = None
    backend: str = "dali"
    num_threads: int = 2
    prefetch: int = 2
    mix_mode: str = "auto"
    thumbnail: int = 0
    return_thumbnails: bool = False
    relabel_backend: str = "auto"
    target_threads: int | None = 1
    image_ext: str = "jpg;jpeg;png"
    label_ext: str = "cls"
    float_range: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def mix_alpha(self) -> float:
        """The mixup Beta parameter: ``mixup_alpha`` when given, else ``alpha``."""
        return float(self.alpha if self.mixup_alpha is None else self.mixup_alpha)

    @property
    def mixing(self) -> bool:
        """Whether any sample may be mixed (mixup or CutMix)."""
        return self.mix_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None

    def switch_options(self) -> dict | None:
        """:func:`~fastgenlabel.functional.switch.sample_mix`'s keyword arguments when timm's draws
        are asked for (CutMix, ``prob`` < 1 or ``mode``) and anything mixes; None for ``pairing``'s pairs."""
        timm = self.cutmix_alpha > 0 or self.cutmix_minmax is not None or self.prob < 1 or self.mode is not None
        if not timm or not self.mixing:
            return None
        mode = self.mode or ("elem" if self.lam_mode == "sample" else "batch")
        cutmix_alpha = 1.0 if self.cutmix_minmax is not None else float(self.cutmix_alpha)  # as timm
        return dict(mixup_alpha=self.mix_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=self.cutmix_minmax,
                    prob=float(self.prob), switch_prob=float(self.switch_prob), mode=mode,
                    correct_lam=self.correct_lam)

    @property
    def written_layout(self) -> str:
        """The layout the mix stage writes: HWC for channels-last (then viewed as NCHW)."""
        return "HWC" if self.channels_last else self.layout

    def __post_init__(self):
        _check_data(self.data)
        _positive_int(self.batch_size, "batch_size")
        _positive_int(self.image_size, "image_size")
        _positive_int(self.num_shards, "num_shards")
        _positive_int(self.num_threads, "num_threads")
        _positive_int(self.prefetch, "prefetch")
        for name in ("image_ext", "label_ext"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip(" ;"):
                raise ValueError(f"{name}: expected member extensions such as 'jpg;png', got {v!r}")
        if isinstance(self.shard_id, bool) or not isinstance(self.shard_id, int) \
                or not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id: expected an integer in [0, {self.num_shards}), got {self.shard_id!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed: expected an integer in [0, 2**63 - 1] (DALI's seeds are signed 64-bit), "
                             f"got {self.seed!r}")
        _choice(self.last_batch, LAST_BATCH_POLICIES, "last_batch")
        _choice(self.on_bad_image, ON_BAD_IMAGE, "on_bad_image")
        _choice(self.dtype, ("float32", "float16", "bfloat16"), "dtype")
        _choice(self.layout, ("CHW", "HWC"), "layout")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last: expected True or False, got {self.channels_last!r}")
        if self.channels_last and self.layout != "CHW":
            raise ValueError("channels_last: gives (B, C, H, W) tensors in channels-last memory, so layout must be "
                             f"'CHW'; got layout={self.layout!r} (layout 'HWC' alone gives (B, H, W, C))")
        _choice(self.device, DEVICES, "device")
        _choice(self.pairing, PAIRINGS, "pairing")
        _choice(self.lam_mode, LAM_MODES, "lam_mode")
        _choice(self.features, FEATURES, "features")
        _choice(self.backend, BACKENDS, "backend")
        _choice(self.mix_mode, ("auto", "batch", "sample"), "mix_mode")
        _choice(self.float_range, FLOAT_RANGES, "float_range")
        if not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha: expected a finite number >= 0 (0: no mixing), got {self.alpha!r}")
        check_alpha(self.alpha)
        _check_switch_options(self)
        for name in ("gamma", "smoothing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
        if self.num_classes is not None:
            _positive_int(self.num_classes, "num_classes")
        if self.max_image_pixels is not None:
            _positive_int(self.max_image_pixels, "max_image_pixels")
        if isinstance(self.thumbnail, bool) or not isinstance(self.thumbnail, int) or self.thumbnail < 0:
            raise ValueError(f"thumbnail: expected a side length >= 0, got {self.thumbnail!r}")
        from ..functional.images import _mean_std

        _mean_std(self.mean, self.std, 3)  # the loader decodes RGB: 3 finite values each, std > 0
        if self.target_threads is not None:
            _positive_int(self.target_threads, "target_threads")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale: expected 0 < min <= max <= 1, got {self.crop_scale!r}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio: expected 0 < min <= max, got {self.crop_ratio!r}")


def _check_switch_options(self) -> None:
    """timm's options (``Mixup``'s names) next to the loader's own: refuse contradictions, naming both."""
    from ..functional.pairs import _check_minmax
    from ..functional.switch import MIX_MODES, _check_probability

    if self.mixup_alpha is not None:
        if isinstance(self.mixup_alpha, bool) or not isinstance(self.mixup_alpha, (int, float)):
            raise ValueError(f"mixup_alpha: expected a finite number >= 0, got {self.mixup_alpha!r}")
        check_alpha(self.mixup_alpha)
        if self.alpha != 1.0 and self.alpha != self.mixup_alpha:
            raise ValueError(f"mixup_alpha, alpha: two names of the mixup Beta parameter with different values "
                             f"({self.mixup_alpha!r} and {self.alpha!r}); give one")
    if isinstance(self.cutmix_alpha, bool) or not isinstance(self.cutmix_alpha, (int, float)):
        raise ValueError(f"cutmix_alpha: expected a finite number >= 0 (0: no CutMix), got {self.cutmix_alpha!r}")
    check_alpha(self.cutmix_alpha)
    if self.cutmix_minmax is not None:
        try:
            self.cutmix_minmax = _check_minmax(self.cutmix_minmax)
        except ValueError as e:
            raise ValueError(f"cutmix_{e}") from None
    _check_probability(self.prob, "prob")
    _check_probability(self.switch_prob, "switch_prob")
    if self.mode is not None:
        _choice(self.mode, MIX_MODES, "mode")
        if self.lam_mode == "sample" and self.mode != "elem":
            raise ValueError(f"mode, lam_mode: lam_mode='sample' (a lambda per sample) contradicts mode={self.mode!r}; "
                             "use mode='elem' (timm's per-sample mode) or leave lam_mode at 'batch'")
    if not isinstance(self.correct_lam, bool):
        raise ValueError(f"correct_lam: expected True or False, got {self.correct_lam!r}")
    if self.switch_options() is not None and self.pairing == "roll":
        raise ValueError("pairing, cutmix_alpha/cutmix_minmax/prob/mode: timm's draws pair sample i with B - 1 - i "
                         "(pairing 'flip'); pairing='roll' contradicts them")



def _check_data(data) -> None:
    """``data`` names files: a path, or a list of tar shard paths. A Dataset or DataLoader goes to
    ``GenLabelLoader(config, dataset=...)`` with the torch backend: say so, rather than fail in pathlib."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return
    if isinstance(data, (list, tuple)):
        bad = [p for p in data if not isinstance(p, (str, os.PathLike))]
        if not bad:
            return
        data = bad[0]
    kind = type(data).__name__
    if any(c.__name__ in ("Dataset", "IterableDataset", "DataLoader") for c in type(data).__mro__):
        raise ValueError(f"data: got a {kind}; data names files (a folder, a file list, .tar shards). Pass a "
                         f"Dataset or DataLoader as dataset= with the torch backend: "
                         f"GenLabelLoader(LoaderConfig(backend='torch', ...), dataset=your_dataset)")
    raise ValueError(f"data: expected a folder of class sub-folders, a file list or WebDataset .tar shards "
                     f"(a path, or a list of shard paths), got a {kind}")


def _positive_int(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")


def _choice(v, allowed, name: str) -> None:
    if v not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {v!r}")
