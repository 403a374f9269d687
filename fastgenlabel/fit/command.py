"""``fastgenlabel fit``: fit a class model (and its feature map) on a folder of images or WebDataset shards."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .._args import check_writable, nonnegative_int, positive_float, positive_int
from ..models import GaussianClassModel, KDEClassModel
from .folder import FEATURES, check_pca_samples, features_path_for, fit_image_folder


def _bandwidth(value: str):
    if value in ("scott", "silverman"):
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'scott', 'silverman' or a positive factor, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+",
                        help="folder of class sub-folders of images, a 'path label' list file, or WebDataset .tar "
                             "shards: one or more paths, globs ('train-*.tar'), brace ranges ('train-{000..146}.tar')")
    parser.add_argument("--out", required=True, help="model file to write (.npz)")
    parser.add_argument("--model", choices=("gaussian", "kde"), default="gaussian")
    parser.add_argument("--covariance", choices=("full", "diag", "tied"), default=None, help="gaussian only (full)")
    parser.add_argument("--reg", type=float, default=1e-4, help="gaussian only: added to the covariance diagonal")
    parser.add_argument("--prior", choices=("uniform", "empirical"), default="uniform")
    parser.add_argument("--bandwidth", type=_bandwidth, default=None, help="kde only: scott, silverman or a factor (scott)")
    parser.add_argument("--max-points-per-class", type=positive_int, default=None, help="kde only: keep a seeded sample")
    parser.add_argument("--features", choices=FEATURES, default="pca",
                        help="pca: PCA of thumbnails (fitted here, exact under mixing); stored: --embeddings")
    parser.add_argument("--dim", type=positive_int, default=32, help="pca: principal components kept (d)")
    parser.add_argument("--thumbnail", type=positive_int, default=8, help="pca: thumbnail side t")
    parser.add_argument("--image-size", type=positive_int, default=224,
                        help="pca: crop side the thumbnails come from (use the training loader's)")
    parser.add_argument("--no-augment", action="store_true",
                        help="pca: centre crops instead of the training loader's random resized crops and flips "
                             "(fit the model on the crops it will relabel: the default)")
    parser.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="pca: the training loader's crop_scale (default: LoaderConfig's, 0.08 1)")
    parser.add_argument("--crop-ratio", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="pca: the training loader's crop_ratio (default: LoaderConfig's, 3/4 4/3)")
    parser.add_argument("--no-flip", action="store_true", help="pca: the training loader has flip=False")
    parser.add_argument("--pca-samples", type=positive_int, default=20000, help="pca: images the PCA is fitted on")
    parser.add_argument("--embeddings", default=None, help="stored: (N, d) .npy in the dataset's sample order")
    parser.add_argument("--features-out", default=None,
                        help="pca: where the feature map goes (default: MODEL.features.npz next to --out)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--backend", choices=("auto", "dali", "torch"), default="auto",
                        help="image reading: DALI or PIL (auto: DALI when installed)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=positive_int, default=2, help="DALI decoding threads")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others (to join, and in every "
                             "collective) before it fails, instead of torch's default of 30 minutes")


def main(args) -> int:
    """Run the fit; under torchrun (WORLD_SIZE > 1) every rank reads its shard and rank 0 writes the files.

    ``--timeout SECONDS`` bounds how long a rank waits for the others (``init_process_group``'s
    ``timeout``): a rank that hangs without dying makes the others fail after that long instead
    of torch's 30 minutes (NCCL: with torch's default async error handling, which aborts them).

    Files: the feature map is written first, then the model, each atomically (a temporary file
    renamed into place); the model records the map's checksum, so a model and a map that do not
    belong together (a fit interrupted between the two writes) are refused when loaded together.
    """
    import torch.distributed as dist

    started = _init_distributed(args.device, getattr(args, "timeout", None))
    try:
        code = _main(args)
        if started:
            dist.barrier()  # no rank closes its connections while a peer still uses them
        return code
    finally:
        if started:
            dist.destroy_process_group()


def _pair(values) -> tuple | None:
    return None if values is None else tuple(values)


def _init_distributed(device: str, timeout: float | None = None) -> bool:
    import datetime
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    return True


def _main(args) -> int:
    from .folder import _rank_world

    rank, world = _rank_world()
    if args.no_augment and (args.crop_scale or args.crop_ratio or args.no_flip):
        raise ValueError("--crop-scale, --crop-ratio, --no-flip: describe the training loader's random crops; "
                         "--no-augment fits on centre crops instead")
    if args.model == "gaussian":
        if args.bandwidth is not None or args.max_points_per_class is not None:
            raise ValueError("--bandwidth, --max-points-per-class: apply to --model kde only")
        model = GaussianClassModel(args.covariance or "full", reg=args.reg, prior=args.prior)
    else:
        if args.covariance is not None:
            raise ValueError("--covariance: applies to --model gaussian only (a KDE's kernels take each class's "
                             "full covariance)")
        model = KDEClassModel(args.bandwidth or "scott", max_points_per_class=args.max_points_per_class,
                              prior=args.prior, seed=args.seed)
    out = Path(args.out)
    fpath = None
    if args.features == "pca":
        fpath = Path(args.features_out) if args.features_out else features_path_for(out)
        if args.dim > 3 * args.thumbnail ** 2:
            raise ValueError(f"--dim: {args.dim} components of {args.thumbnail}x{args.thumbnail}x3 thumbnails "
                             f"(at most {3 * args.thumbnail ** 2}); lower --dim or raise --thumbnail")
        check_pca_samples(args.pca_samples, args.dim, "--pca-samples")
    if rank == 0:  # before the pass over the data, not after it
        for flag, path in (("--out", out), ("--features-out", fpath)):
            if path is not None:
                check_writable(flag, path)
    t0 = time.perf_counter()
    say = print if rank == 0 else None
    data = args.data[0] if len(args.data) == 1 else args.data  # several arguments: a list of shards
    result = fit_image_folder(
        data, model, features=args.features, dim=args.dim, thumbnail=args.thumbnail,
        image_size=args.image_size, augment=not args.no_augment, crop_scale=_pair(args.crop_scale),
        crop_ratio=_pair(args.crop_ratio), flip=False if args.no_flip else None,
        embeddings=args.embeddings, batch_size=args.batch_size,
        pca_samples=args.pca_samples, backend=args.backend, device=args.device, num_threads=args.threads,
        seed=args.seed, progress=False if args.no_progress or rank else None, log=say)
    seconds = time.perf_counter() - t0
    if world > 1:
        from ..distributed import model_checksum

        print(f"rank {rank}: class-model checksum {model_checksum(result.model)}", flush=True)
    if rank != 0:
        return 0
    if result.feature_map is not None:  # the map first: a model file never points at a missing map
        result.feature_map.save(fpath)
    result.model.save(out)
    n = int(result.model.class_counts.sum())
    ranks = f" on {world} ranks" if world > 1 else ""
    print(f"wrote {out}: {result.model!r}, {n} samples of {len(result.classes)} classes "
          f"in {seconds:.1f} s{ranks} ({n / seconds:,.0f} samples/s overall)")
    if result.feature_map is not None:
        print(f"wrote {fpath}: {result.feature_map!r}")
        crops = "".join(f", {name}={value}" for name, value in (
            ("crop_scale", _pair(args.crop_scale)), ("crop_ratio", _pair(args.crop_ratio)),
            ("flip", False if args.no_flip else None)) if value is not None)
        print(f"use: LoaderConfig(data=..., model={str(out)!r}, feature_map={str(fpath)!r}, "
              f"image_size={args.image_size}{crops})" + ("  (fitted on centre crops)" if args.no_augment else ""))
    else:
        print(f"use: LoaderConfig(data=..., model={str(out)!r}, embeddings={str(args.embeddings)!r})")
    return 0

