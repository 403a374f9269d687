"""Fit a class model on a folder of images (what ``fastgenlabel fit`` runs).

Features, as the loader will compute them at training time (docs/MATH.md section 4):

- ``"pca"``: a :class:`~fastgenlabel.features.ThumbnailPCA` of the t x t thumbnails of the
  images as the training loader crops them (``augment``: one random resized crop, flipped at
  random, per image; else centre crops), fitted on a seeded subsample of ``pca_samples`` images,
  then the class model streamed over every image. One pass over the data when N <= ``pca_samples``
  (the thumbnails are kept), two otherwise. Images are read by :class:`fastgenlabel.GenLabelLoader`
  (DALI, or PIL with ``backend="torch"``) without mixing.
- ``"stored"``: an (N, d) ``.npy`` of embeddings in the dataset's sample order; no image is decoded.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ..features import StoredEmbeddings, ThumbnailPCA
from ..models import ClassModel
from .sources import LinearMapFeatures, StoredFeatures
from .streaming import FitReport, StreamingFit, owned_mask

FEATURES = ("pca", "stored")


@dataclasses.dataclass
class FolderFit:
    """The result of :func:`fit_image_folder`."""

    model: ClassModel
    feature_map: ThumbnailPCA | None
    reports: dict  # pass name -> FitReport
    classes: tuple


def default_backend() -> str:
    """"dali" when DALI imports, else "torch" (PIL decoding)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "torch"
    return "dali"


def fit_image_folder(data, model: ClassModel, *, features: str = "pca", dim: int = 32, thumbnail: int = 8,
                     image_size: int = 224, embeddings=None, batch_size: int = 256, pca_samples: int = 20000,
                     augment: bool = True, crop_scale: tuple | None = None, crop_ratio: tuple | None = None,
                     flip: bool | None = None, backend: str = "auto", device: str = "auto", num_threads: int = 2,
                     seed: int = 0, progress: bool | None = None, log=print) -> FolderFit:
    """Fit ``model`` (and, for ``features="pca"``, the feature map) on a folder of class sub-folders.

    Args:
        data: folder of class sub-folders of images, a ``path label`` list file, or WebDataset tar shards
            (anything :func:`fastgenlabel.loader.scan` takes, e.g. a list of shard paths or globs).
        model: the class model to fit.
        features: "pca" (thumbnail PCA, fitted here) or "stored" (``embeddings``).
        dim, thumbnail: PCA components d and thumbnail side t.
        image_size: side of the crop the thumbnails are taken from (use the training loader's).
        augment: crop as the training loader does (``LoaderConfig(train=True)``), so that the model
            describes the features it will relabel: a model fitted on centre crops misreads random
            resized crops (on the demo's digits under ``crop_scale=(0.08, 1)``, the classes of 35%
            of unmixed training crops against 53% when fitted on such crops; 93% against 97% under the
            demo's crops). False: centre crops.
        crop_scale, crop_ratio, flip: the training loader's augmentation (None: LoaderConfig's
            defaults, ImageNet's random resized crop and a horizontal flip).
        embeddings: (N, d) ``.npy`` path for ``features="stored"``.
        batch_size: images per batch.
        pca_samples: images the PCA is fitted on (a seeded uniform subsample); at least
            max(2, dim), checked before any image is read.
        backend: the loader's backend: "dali", "torch" or "auto".
        device: the loader's device ("auto", "cpu", "cuda": torch's current device); statistics live there.
        num_threads: DALI threads.
        seed: seed of the PCA subsample.
        progress: tqdm bars (None: when stderr is a terminal).
        log: receives one line per pass with its throughput (None: silent).

    Under ``torch.distributed`` (e.g. ``torchrun ... -m fastgenlabel fit``) every rank reads its shard,
    the PCA is fitted on rank 0 from every rank's thumbnails and broadcast, each image counts once
    (the shards' padding is dropped) and every rank gets the same all-reduced model.

    Before reading any image, a model whose statistics cannot fit in memory (a full covariance
    for K classes of d features needs 8 K d^2 bytes, twice over) is refused (ValueError naming
    K, d and the covariance). With ``features="pca"`` the fitted model records the map's checksum
    (``model.feature_map_digest``), so that the loader refuses it beside another map.

    Returns:
        a :class:`FolderFit`; for a folder of class sub-folders its model carries their names
        (``model.classes``), saved with it and checked by the loader.
    """
    from ..loader import GenLabelLoader, LoaderConfig, scan

    if features not in FEATURES:
        raise ValueError(f"features: expected one of {FEATURES}, got {features!r}")
    log = log or (lambda _line: None)
    rank, world = _rank_world()
    files = scan(data)
    k = files.num_classes
    if features == "stored":
        if embeddings is None:
            raise ValueError("embeddings: features='stored' needs the path of an (N, d) .npy file")
        stored = StoredEmbeddings(embeddings, num_samples=len(files))
        model.check_memory(k, stored.dim, "cpu")  # before the pass over the data
        source = StoredFeatures(stored)
        idx = np.arange(rank, len(files), world)  # this rank's share
        batches = [(None, torch.from_numpy(files.labels[idx[i:i + batch_size]]), idx[i:i + batch_size])
                   for i in range(0, len(idx), batch_size)]
        fit = StreamingFit(model, k)
        report = fit.consume(batches, features=source, progress=progress, desc="fit (stored)")
        log(f"class model: {report}" + (f" on rank {rank} of {world}" if world > 1 else ""))
        return FolderFit(_named(fit.result(), data, files), None, {"fit": report}, files.classes)

    check_pca_samples(pca_samples, dim)
    if min(pca_samples, len(files)) < dim:
        raise ValueError(f"dim: {dim} principal components, but the dataset has only {len(files)} images to fit "
                         f"the PCA on (at most {len(files)} components)")
    model.check_memory(k, dim, _statistics_device(device))
    backend = default_backend() if backend == "auto" else backend
    shard_size = -(-len(files) // world)
    batch_size = max(1, min(batch_size, shard_size))
    shards_or_path = list(data) if isinstance(data, (list, tuple)) else str(data)
    crops = {name: v for name, v in (("crop_scale", crop_scale), ("crop_ratio", crop_ratio), ("flip", flip))
             if v is not None}
    config = LoaderConfig(data=shards_or_path, batch_size=batch_size, alpha=0.0, train=augment, **crops,
                          last_batch="partial",
                          return_thumbnails=True, thumbnail=thumbnail, image_size=image_size, backend=backend,
                          device=device, device_id=torch.cuda.current_device() if torch.cuda.is_available() else 0,
                          num_threads=num_threads, seed=seed, shard_id=rank, num_shards=world)
    one_pass = len(files) <= pca_samples
    local_target = -(-pca_samples // world)
    loader = GenLabelLoader(dataclasses.replace(config, shuffle=not one_pass))
    thumbs, labels = [], []
    from tqdm.auto import tqdm

    bar = tqdm(total=min(len(loader), -(-local_target // batch_size)), desc="thumbnails for the PCA",
               unit="batch", disable=not _show(progress))
    t0, seen = time.perf_counter(), 0
    for batch in loader:
        th, y = batch.thumbnails, batch.labels
        if one_pass and world > 1:  # every sample once (drop the shards' padding)
            keep = owned_mask(batch.indices, rank, world)
            th, y = th[keep.to(th.device)], y[keep.to(y.device)]
        thumbs.append(th.cpu())
        labels.append(y.cpu())
        seen += len(batch)
        bar.update(1)
        if seen >= local_target:
            break
    bar.close()
    loader.reset()
    pca_report = FitReport(seen, len(thumbs), time.perf_counter() - t0)
    log(f"thumbnails for the PCA: {pca_report}" + (f" on rank {rank} of {world}" if world > 1 else ""))
    fmap = _fit_pca(torch.cat(thumbs)[:local_target], thumbnail, dim, world)
    source = LinearMapFeatures(fmap)
    fit = StreamingFit(model, k)
    if one_pass:
        t0 = time.perf_counter()
        for th, y in zip(thumbs, labels):
            fit.update(source(th), y)
        report = FitReport(fit.num_samples, fit.num_batches, time.perf_counter() - t0 + pca_report.seconds)
        log(f"class model (same pass): {report}")
    else:
        del thumbs, labels
        loader = GenLabelLoader(dataclasses.replace(config, shuffle=False))
        report = fit.consume(loader, features=source, progress=progress, desc="fit",
                             shard=(rank, world) if world > 1 else None)
        log(f"class model: {report}" + (f" on rank {rank} of {world}" if world > 1 else ""))
    fitted = _named(fit.result(), data, files)
    fitted.feature_map_digest = fmap.digest  # the pair is checked when loaded together
    return FolderFit(fitted, fmap, {"pca": pca_report, "fit": report}, files.classes)


def _named(model: ClassModel, data, files) -> ClassModel:
    """The model with a folder's class names, which the loader checks against its data's (a file
    list's or shards' classes are bare label indices: no names)."""
    from ..loader.loader import class_names

    model.classes = class_names(data, files)
    return model


def check_pca_samples(pca_samples: int, dim: int, name: str = "pca_samples") -> None:
    """The PCA of N thumbnails has at most min(N, F) components and needs N >= 2 (a centred
    sample of one is zero): refuse a ``pca_samples`` below max(2, dim) before any image is read."""
    if isinstance(pca_samples, bool) or not isinstance(pca_samples, int) or pca_samples < max(2, dim):
        raise ValueError(f"{name}: the PCA of {dim} components needs at least max(2, dim) = {max(2, dim)} "
                         f"images, got {pca_samples!r}")


def _statistics_device(device: str) -> str:
    """Where the loader's features, and so the statistics, live for ``device`` ("auto", "cpu", "cuda")."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return "cpu"


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fit_pca(thumbs: torch.Tensor, thumbnail: int, dim: int, world: int) -> ThumbnailPCA:
    """The PCA of every rank's thumbnails, fitted on rank 0 and broadcast (identical maps everywhere)."""
    if world == 1:
        return ThumbnailPCA(thumbnail, dim).fit(thumbs.numpy())
    import torch.distributed as dist

    from .. import distributed

    device = distributed.collective_device()
    gathered = distributed._gather(thumbs.to(device, torch.float32).contiguous())
    fmap = ThumbnailPCA(thumbnail, dim)
    f = thumbs.shape[1]
    mean = torch.zeros(f, dtype=torch.float32, device=device)
    comps = torch.zeros(dim, f, dtype=torch.float32, device=device)
    error = torch.zeros(1, dtype=torch.int64, device=device)
    message = None
    if dist.get_rank() == 0:
        try:
            fmap.fit(torch.cat(gathered).cpu().numpy())
            mean.copy_(torch.from_numpy(fmap.mean))
            comps.copy_(torch.from_numpy(fmap.components))
        except ValueError as e:  # tell the other ranks instead of leaving them waiting
            error.fill_(1)
            message = str(e)
    dist.broadcast(error, 0)
    if int(error):
        raise ValueError(message or "dim: the PCA could not be fitted on rank 0 (see rank 0's error)")
    dist.broadcast(mean, 0)
    dist.broadcast(comps, 0)
    fmap.mean, fmap.components = mean.cpu().numpy(), comps.cpu().numpy()
    return fmap


def _show(progress) -> bool:
    import sys

    return bool(progress) if progress is not None else sys.stderr.isatty()


def features_path_for(out) -> Path:
    """Where ``fastgenlabel fit --out model.npz`` writes its feature map: ``model.features.npz``."""
    out = Path(out)
    return out.with_name(out.name[:-4] + ".features.npz" if out.name.endswith(".npz") else out.name + ".features.npz")
