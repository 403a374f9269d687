"""``fastgenlabel demo``: the whole flow on real images, in a few minutes on two CPU cores.

Data: scikit-learn's ``load_digits`` (1,797 real 8 x 8 handwritten digits, 10 classes; shipped
with scikit-learn, so nothing is downloaded), upscaled to 32 x 32 RGB JPEG files in one folder per
class, split 80/20 (stratified, seeded) into ``train/`` and ``test/``. Digits are small, real and
have classes that mixing confuses (a 3 mixed with an 8 looks like a 9: the manifold intrusion
GenLabel addresses); CIFAR-like sets would need a download.

Steps: write the JPEGs; one pass of the DALI loader without mixing collects 8 x 8 thumbnails of
the training crops (the class model must describe the crops it will relabel); fit a ThumbnailPCA
(d = 16) and one full-covariance Gaussian per class; train a small CNN for a
few epochs with mixup and with mixup + GenLabel (same seed, same batches and pairs); print the
loader's and the training's images/s and the test accuracy of both; save a PNG grid of mixed
samples captioned with their mixup and GenLabel labels.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ._args import nonnegative_int, positive_int
from .features import ThumbnailPCA
from .functional import soft_target_cross_entropy
from .models import GaussianClassModel


def write_image_folder(images: np.ndarray, labels: np.ndarray, root, *, quality: int = 95, prefix: str = "") -> list:
    """Write (N, H, W, 3) uint8 images as JPEG files ``root/<label>/<prefix><i>.jpg``.

    Returns:
        The N paths written, in order.
    """
    from PIL import Image

    root = Path(root)
    paths = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        d = root / str(int(y))
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{prefix}{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(p, quality=quality)
        paths.append(p)
    return paths


def digits_rgb(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, size, size, 3) uint8 images (bicubic upscaling) and (N,) labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in small])
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(np.int64)


def write_digits(out, size: int = 32, test_fraction: float = 0.2, seed: int = 0, limit: int | None = None
                 ) -> tuple[Path, Path]:
    """Write the digits into ``out/train`` and ``out/test`` (stratified split); returns both folders.

    ``limit`` keeps only the first ``limit`` digits (for quick tests).
    """
    images, labels = digits_rgb(size)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    out = Path(out)
    write_image_folder(images[~test], labels[~test], out / "train")
    write_image_folder(images[test], labels[test], out / "test")
    return out / "train", out / "test"


class SmallCNN(torch.nn.Module):
    """Conv(3->16) - Conv(16->32) - pool - Conv(32->64) - pool - global average - Linear: 25k parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def _loader(data, **kw):
    from .fit.folder import default_backend
    from .loader import GenLabelLoader, LoaderConfig

    base = dict(data=str(data), image_size=32, crop_scale=(0.7, 1.0), crop_ratio=(0.85, 1.18), flip=False,
                mean=(127.5,) * 3, std=(127.5,) * 3, device="cpu", num_threads=1,
                backend=default_backend())  # DALI where it is installed, else PIL + torch
    base.update(kw)
    return GenLabelLoader(LoaderConfig(**base))


def _eval_batch(folder, largest: int = 128) -> int:
    return min(largest, sum(1 for _ in Path(folder).glob("*/*.jpg")))


def fit_features(train_dir, *, thumbnail: int, dim: int, seed: int):
    """One unmixed pass over training crops -> thumbnails -> ThumbnailPCA and a full Gaussian per class."""
    loader = _loader(train_dir, batch_size=_eval_batch(train_dir), alpha=0.0, train=True, shuffle=False, last_batch="partial",
                     return_thumbnails=True, thumbnail=thumbnail, seed=seed)
    thumbs, labels = [], []
    for batch in loader:
        thumbs.append(batch.thumbnails)
        labels.append(batch.labels)
    thumbs, labels = torch.cat(thumbs).numpy(), torch.cat(labels)
    fmap = ThumbnailPCA(thumbnail, dim).fit(thumbs)
    model = GaussianClassModel("full").fit(torch.from_numpy(fmap.transform(thumbs)), labels, loader.num_classes)
    model.feature_map_digest = fmap.digest  # the saved pair is checked when loaded together
    return fmap, model


def evaluate(net, test_dir) -> float:
    loader = _loader(test_dir, batch_size=_eval_batch(test_dir), alpha=0.0, train=False, shuffle=False, last_batch="partial")
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            correct += int((net(batch.images).argmax(1) == batch.labels).sum())
            total += len(batch)
    return correct / total


def train(train_dir, test_dir, *, fmap, model, gamma: float, epochs: int, batch_size: int, seed: int, progress: bool,
          label: str) -> dict:
    """Train SmallCNN with the loader's targets; returns accuracy and throughput figures."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    loader = _loader(train_dir, batch_size=batch_size, alpha=1.0, feature_map=fmap, model=model, gamma=gamma,
                     seed=seed, last_batch="drop")
    net = SmallCNN(loader.num_classes)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * len(loader))
    load_time = step_time = 0.0
    seen = timed = 0  # the first batch is left out of the rates: it pays the stages' one-time compilation
    bar = tqdm(total=epochs * len(loader), desc=label, disable=not progress, unit="batch")
    for _ in range(epochs):
        net.train()
        t = time.perf_counter()
        for images, targets in loader:
            t1 = time.perf_counter()
            waited, first = t1 - t, seen == 0
            loss = soft_target_cross_entropy(net(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += images.shape[0]
            t = time.perf_counter()
            if not first:
                load_time += waited
                step_time += t - t1
                timed += images.shape[0]
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    acc = evaluate(net, test_dir)
    return {"run": label, "test_accuracy": acc, "loader_images_per_s": timed / max(load_time, 1e-9),
            "train_images_per_s": timed / max(load_time + step_time, 1e-9), "images": seen}


def save_grid(train_dir, path, *, fmap, model, gamma: float, seed: int, n: int = 16) -> None:
    """A PNG of n mixed training samples, each captioned with its mixup and GenLabel targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loader = _loader(train_dir, batch_size=n, alpha=1.0, feature_map=fmap, model=model, gamma=gamma, seed=seed,
                     lam_mode="sample")
    batch = next(iter(loader))
    from .functional import mixup_target

    mixup = mixup_target(batch.labels, batch.pairs, loader.num_classes)
    images = (batch.images.permute(0, 2, 3, 1).numpy() * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(cols * 2.6, ((n + cols - 1) // cols) * 2.9))
    for ax, img, mt, gt in zip(axes.ravel(), images, mixup, batch.targets, strict=False):
        ax.imshow(img)
        ax.set_axis_off()
        ax.set_title(f"mixup  {_top2(mt)}\nGenLabel {_top2(gt)}", fontsize=8)
    fig.suptitle(f"mixed digits: mixup label vs GenLabel target (gamma={gamma})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _top2(t: torch.Tensor) -> str:
    v, i = torch.topk(t, 2)
    return " ".join(f"{int(k)}:{float(p):.2f}" for p, k in zip(v, i, strict=True) if float(p) >= 0.005)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="output folder (data, model, grid, results)")
    parser.add_argument("--epochs", type=positive_int, default=8, help="training epochs per run")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--gamma", type=float, default=1.0, help="GenLabel weight of the second run")
    parser.add_argument("--dim", type=positive_int, default=16, help="PCA components of the 8x8 thumbnails")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N digits (quick runs)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads for training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    # One training thread beside DALI's: on two cores, more threads than cores make torch's
    # thread pool spin-wait for descheduled workers (measured: 2-8x slower steps at random).
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = out / "data"
    stamp = json.dumps({"seed": args.seed, "limit": args.limit, "size": 32}, sort_keys=True)
    if not (data / "train").is_dir() or not (data / "written").is_file() or (data / "written").read_text() != stamp:
        # none yet, or written for another seed or limit, or cut short: write it (again)
        print(f"writing scikit-learn's digits as 32x32 JPEGs into {data}")
        shutil.rmtree(data, ignore_errors=True)
        write_digits(data, seed=args.seed, limit=args.limit)
        (data / "written").write_text(stamp)
    train_dir, test_dir = data / "train", data / "test"
    print("fitting the feature map (PCA of 8x8 thumbnails) and one Gaussian per class")
    fmap, model = fit_features(train_dir, thumbnail=8, dim=args.dim, seed=args.seed)
    fmap.save(out / "feature_map.npz")
    model.save(out / "class_model.npz")
    results = []
    for label, gamma in (("mixup", 0.0), ("mixup+GenLabel", args.gamma)):
        results.append(train(train_dir, test_dir, fmap=fmap, model=model, gamma=gamma, epochs=args.epochs,
                             batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                             label=label))
    save_grid(train_dir, out / "mixed_samples.png", fmap=fmap, model=model, gamma=args.gamma, seed=args.seed)
    print()
    print(f"{'run':<16} {'test acc':>9} {'loader img/s':>13} {'train img/s':>12}")
    for r in results:
        print(f"{r['run']:<16} {r['test_accuracy']:>9.4f} {r['loader_images_per_s']:>13.0f} "
              f"{r['train_images_per_s']:>12.0f}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\ngrid of mixed samples: {out / 'mixed_samples.png'}; results: {out / 'results.json'}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 0
