"""``fastgenlabel bench loader``: images/s of the loader, with and without mixup + GenLabel, and a baseline.

Four contestants read the same JPEG folder at the same batch size and crop size:

- ``dali``: the loader's DALI pipeline without mixing or relabeling (decode + random resized crop
  + ``crop_mirror_normalize`` with a random flip), one-hot targets: the same front end (the
  loader's external source) as the next contestant, so their ratio is the cost of mixup + GenLabel.
- ``dali-reader``: plain DALI as its users write it, and as the anchor figures measured it:
  ``fn.readers.file`` (DALI's own reader threads, DALI's order), ``decoders.image_random_crop``,
  ``resize``, ``crop_mirror_normalize`` with a random flip, through ``DALIGenericIterator``; labels
  as they come. What a user switching from plain DALI compares against.
- ``dali+mixup+genlabel``: the same pipeline with the in-graph mix stage (flip, normalise, mix,
  thumbnails) and GenLabel targets (PCA of 8x8 thumbnails, d = 32, full Gaussians) by ``relabel``.
- ``torch-baseline``: what users run today. With torchvision and timm importable:
  ``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``
  in a ``DataLoader``, then ``timm.data.Mixup``. Without them (as beside torch 2.13 CPU here): the
  same steps written with PIL and torch ops (:class:`ImageFileDataset`, normalisation, batch mixup
  with the flipped batch, timm's default), and it is labelled ``torch-baseline (PIL + torch ops)``.

Method: every contestant runs ``--warmup`` batches first (compiles kernels, fills prefetch
queues), then ``--batches`` timed batches, ``--repeats`` times, the contestants taking turns
(so a slow spell of a shared machine hits all of them); the median images/s is reported with
the spread (min, max). On the CPU there is nothing to synchronise; on a GPU the timed region ends with
``torch.cuda.synchronize()``.

What a user decides on is printed as ratios, taken repeat by repeat (the contestants of one
repeat ran side by side) and reported as their median and range: each contestant against the
torch baseline (what switching from a DataLoader + mixup gives) and against plain DALI (what
mixup + GenLabel costs a DALI user). The crop side defaults to the data's own (the median
shorter side of a sample of its images, at most 224), so small images are not upscaled to
ImageNet's size. The GenLabel contestants' feature map and class model are fitted here, on a
few batches, for timing only: their quality is no concern of the run, and their fit warnings
(too few samples per class for the covariance) are not shown.
"""
from __future__ import annotations

import argparse
import importlib
import io
import platform
import statistics
import time
import warnings

import numpy as np
import torch

from .._args import nonnegative_int, positive_int

CONTESTANTS = ("dali", "dali-reader", "dali+mixup+genlabel", "dali+mixup+genlabel(per-sample)", "torch-baseline")
MAX_IMAGE_SIZE = 224  # the default crop never exceeds ImageNet's
SIZE_SAMPLE = 64  # images whose sizes choose the default crop


def _contestants(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CONTESTANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected contestants of {', '.join(CONTESTANTS)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a folder of class sub-folders of JPEG files")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help=f"crop side (default: the images' median shorter side, from up to {SIZE_SAMPLE} of "
                             f"them, at most {MAX_IMAGE_SIZE})")
    parser.add_argument("--batches", type=positive_int, default=20, help="timed batches per repeat")
    parser.add_argument("--warmup", type=nonnegative_int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--only", type=_contestants, default=None,
                        help=f"comma-separated contestants to run, of: {', '.join(CONTESTANTS)}")


def data_image_size(data, limit: int = MAX_IMAGE_SIZE, sample: int = SIZE_SAMPLE) -> int:
    """The crop side that fits ``data``: the median shorter side of up to ``sample`` of its images
    (spread evenly over the dataset, sizes read from the image headers), at most ``limit``."""
    from PIL import Image

    from .files import scan

    files = scan(data)
    sides = []
    for i in np.unique(np.linspace(0, len(files) - 1, min(sample, len(files))).astype(np.int64)):
        try:
            with Image.open(io.BytesIO(files.read(int(i)).tobytes())) as im:
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001 - an unreadable image says nothing about the size; the loader names it
            continue
    return max(1, min(limit, int(statistics.median(sides)))) if sides else limit


def _time_once(it, batches: int, sync) -> float:
    """images/s over ``batches`` batches of an already warm iterator."""
    n = 0
    sync()
    t = time.perf_counter()
    for _ in range(batches):
        images, _targets = next(it)
        n += images.shape[0]
    sync()
    return n / (time.perf_counter() - t)


def _cycle(loader):
    while True:
        yield from loader


def genlabel_parts(data, *, image_size: int, threads: int, device: str, batch_size: int, fit_batches: int = 8):
    """A ThumbnailPCA and full Gaussians fitted on a few unmixed batches (enough for timing)."""
    from ..features import ThumbnailPCA
    from ..models import GaussianClassModel
    from ..models.base import FitWarning
    from .config import LoaderConfig
    from .loader import GenLabelLoader

    loader = GenLabelLoader(LoaderConfig(data=data, batch_size=batch_size, image_size=image_size, alpha=0.0,
                                         return_thumbnails=True, thumbnail=8, device=device, num_threads=threads,
                                         last_batch="partial"))
    thumbs, labels = [], []
    for i, b in enumerate(loader):
        thumbs.append(b.thumbnails.cpu())
        labels.append(b.labels.cpu())
        if i + 1 == fit_batches:
            break
    thumbs = torch.cat(thumbs).numpy()
    fmap = ThumbnailPCA(8, min(32, thumbs.shape[0] - 1, thumbs.shape[1])).fit(thumbs)
    z = torch.from_numpy(fmap.transform(thumbs))
    with warnings.catch_warnings():  # a stand-in fitted on a few batches for timing: its fit is no user's concern
        warnings.simplefilter("ignore", FitWarning)
        model = GaussianClassModel("full").fit(z, torch.cat(labels), loader.num_classes)
    return fmap, model


def dali_loader(data, *, genlabel: bool, batch_size: int, image_size: int, threads: int, device: str,
                parts=None, mix_mode: str = "auto"):
    from .config import LoaderConfig
    from .loader import GenLabelLoader

    c = LoaderConfig(data=data, batch_size=batch_size, image_size=image_size, device=device, num_threads=threads,
                     mix_mode=mix_mode)
    if not genlabel:
        return GenLabelLoader(c, alpha=0.0, extra={"baseline": True})
    fmap, model = parts
    return GenLabelLoader(c, alpha=1.0, feature_map=fmap, model=model, gamma=1.0)


def dali_reader_loader(data, *, batch_size: int, image_size: int, threads: int, device: str):
    """Plain DALI (``fn.readers.file`` ... ``crop_mirror_normalize``), yielding (images, labels) torch tensors."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from ..dali import _compat
    from .config import IMAGENET_MEAN, IMAGENET_STD

    _compat.require_dali()
    gpu = device != "cpu" and torch.cuda.is_available()

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=torch.cuda.current_device() if gpu else None,
                  seed=0)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=str(data), random_shuffle=True, name="Reader")
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=list(IMAGENET_MEAN),
                                          std=list(IMAGENET_STD), mirror=fn.random.coin_flip())
        return images, labels

    it = DALIGenericIterator(pipe(), ["images", "labels"], reader_name="Reader", auto_reset=True,
                             last_batch_policy=LastBatchPolicy.DROP)

    def batches():
        for item in _cycle(it):
            yield item[0]["images"], item[0]["labels"]

    return batches()


def baseline_loader(data, *, batch_size: int, image_size: int, threads: int, device: str):
    """torch DataLoader + transforms + mixup; torchvision/timm when importable. Returns (name, iterable)."""
    from .config import IMAGENET_MEAN, IMAGENET_STD

    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    have_tv, have_timm = _imports("torchvision"), _imports("timm")
    if have_tv:
        import torchvision
        from torchvision import transforms as T

        tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD])])
        dataset = torchvision.datasets.ImageFolder(data, transform=tf)
        num_classes = len(dataset.classes)
    else:
        from .files import scan
        from .images import ImageFileDataset

        files = scan(data)
        dataset = ImageFileDataset(files, image_size, train=True)
        num_classes = files.num_classes
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=threads,
                                         drop_last=True, pin_memory=dev.type == "cuda", persistent_workers=threads > 0)
    if have_timm:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, num_classes=num_classes, label_smoothing=0.0)
    else:
        mixup = _torch_mixup(num_classes)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)

    def batches():
        for item in _cycle(loader):
            x, y = item[0].to(dev, non_blocking=True), torch.as_tensor(item[1]).to(dev, non_blocking=True)
            if not have_tv:  # (B, H, W, C) uint8 -> normalised (B, C, H, W) float, as ToTensor + Normalize
                x = (x.permute(0, 3, 1, 2).float() - mean) / std
            yield mixup(x, y)

    parts = ("torchvision" if have_tv else "PIL") + " + " + ("timm Mixup" if have_timm else "torch ops")
    return f"torch-baseline ({parts})", batches


def _imports(name: str) -> bool:
    """Whether ``name`` imports: a torchvision built for another torch is installed but raises."""
    try:
        importlib.import_module(name)
    except Exception:  # any failure means "use the fallback"
        return False
    return True


def _torch_mixup(num_classes: int):
    """timm's ``Mixup(mode="batch")`` without cutmix: one lambda, partner = the flipped batch."""
    rng = np.random.default_rng(0)

    def mixup(x, y):
        lam = float(rng.beta(1.0, 1.0))
        x = x.mul(lam).add_(x.flip(0), alpha=1 - lam)
        one_hot = torch.nn.functional.one_hot(y, num_classes).float()
        return x, lam * one_hot + (1 - lam) * one_hot.flip(0)

    return mixup


def run(data, *, batch_size: int, image_size: int, batches: int, warmup: int, repeats: int, threads: int,
        device: str = "cpu", only=None) -> list[dict]:
    """Measure every contestant; returns rows with name, median and spread of images/s.

    Repeats are interleaved (contestant A, B, C, A, B, C, ...) so that a slow spell of a shared
    machine lands on every contestant alike.
    """
    sync = torch.cuda.synchronize if device != "cpu" and torch.cuda.is_available() else (lambda: None)
    want = None if only is None else set(only)
    iters = {}
    if want is None or "dali" in want:
        iters["dali"] = _cycle(dali_loader(data, genlabel=False, batch_size=batch_size, image_size=image_size,
                                           threads=threads, device=device))
    if want is None or "dali-reader" in want:
        iters["dali-reader"] = dali_reader_loader(data, batch_size=batch_size, image_size=image_size, threads=threads,
                                                  device=device)
    parts = None
    if want is None or "dali+mixup+genlabel" in want:
        parts = genlabel_parts(data, image_size=image_size, threads=threads, device=device, batch_size=batch_size)
        iters["dali+mixup+genlabel"] = _cycle(dali_loader(data, genlabel=True, batch_size=batch_size,
                                                          image_size=image_size, threads=threads, device=device,
                                                          parts=parts))
    if want is not None and "dali+mixup+genlabel(per-sample)" in want:
        parts = parts or genlabel_parts(data, image_size=image_size, threads=threads, device=device,
                                        batch_size=batch_size)
        iters["dali+mixup+genlabel(per-sample)"] = _cycle(dali_loader(
            data, genlabel=True, batch_size=batch_size, image_size=image_size, threads=threads, device=device,
            parts=parts, mix_mode="sample"))
    if want is None or "torch-baseline" in want:
        name, make = baseline_loader(data, batch_size=batch_size, image_size=image_size, threads=threads,
                                     device=device)
        iters[name] = make()
    for it in iters.values():
        for _ in range(warmup):
            next(it)
    rates = {name: [] for name in iters}
    for _ in range(repeats):
        for name, it in iters.items():
            rates[name].append(_time_once(it, batches, sync))
    return [{"name": n, "median": statistics.median(r), "min": min(r), "max": max(r), "runs": r}
            for n, r in rates.items()]


def ratio(rows: list[dict], name: str, base: str) -> tuple[float, float, float] | None:
    """(median, min, max) over the repeats of ``name``'s images/s over ``base``'s (None if either is absent)."""
    by = {r["name"]: r["runs"] for r in rows}
    if name not in by or base not in by:
        return None
    r = [a / b for a, b in zip(by[name], by[base])]
    return statistics.median(r), min(r), max(r)


def _fmt(x) -> str:
    return "-" if x is None else f"{x[0]:.2f}x [{x[1]:.2f}-{x[2]:.2f}]"


def main(args) -> int:
    image_size = args.image_size or data_image_size(args.data)
    rows = run(args.data, batch_size=args.batch_size, image_size=image_size, batches=args.batches,
               warmup=args.warmup, repeats=args.repeats, threads=args.threads, device=args.device, only=args.only)
    how = "" if args.image_size else " (the images' median shorter side, at most 224; --image-size sets it)"
    print(f"fastgenlabel bench loader: {args.data}, batch {args.batch_size}, crop {image_size}{how}, "
          f"{args.threads} threads/workers, device {args.device}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print(f"images/s: median [min-max] of {args.repeats} repeats of {args.batches} batches; ratios: per repeat, "
          "median [min-max]")
    torch_base = next((r["name"] for r in rows if r["name"].startswith("torch-baseline")), None)
    width = max(44, *(len(r["name"]) + 2 for r in rows))
    print(f"{'contestant':<{width}} {'images/s':>9} {'min':>7} {'max':>7}   {'vs torch-baseline':<22} "
          "vs plain DALI (dali-reader)")
    for r in rows:
        print(f"{r['name']:<{width}} {r['median']:>9.0f} {r['min']:>7.0f} {r['max']:>7.0f}   "
              f"{_fmt(ratio(rows, r['name'], torch_base)):<22} {_fmt(ratio(rows, r['name'], 'dali-reader'))}")
    loader = "dali+mixup+genlabel"
    lines = []
    if (x := ratio(rows, loader, torch_base)) is not None:
        lines.append(f"from {torch_base} to the loader with mixup + GenLabel: {_fmt(x)} the images/s")
    if (x := ratio(rows, loader, "dali-reader")) is not None:
        lines.append(f"from plain DALI (fn.readers.file, no mixup) to the loader with mixup + GenLabel: {_fmt(x)} "
                     "the images/s")
    if (x := ratio(rows, loader, "dali")) is not None:
        lines.append(f"mixup + GenLabel keeps {100 * x[0]:.1f}% [{100 * x[1]:.1f}-{100 * x[2]:.1f}%] of the "
                     "loader's own DALI pipeline without them")
    if lines:
        print("\nshould you switch?\n  " + "\n  ".join(lines))
    return 0
