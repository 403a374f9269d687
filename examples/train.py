"""Multi-process training with mixup + GenLabel: DDP, a sharded GenLabelLoader, class models fitted across ranks.

Run on GPUs (NCCL) or CPUs (gloo) with torchrun, or as a plain single process:

    torchrun --nproc_per_node 2 examples/train.py --device cpu --data DIR --epochs 1
    torchrun --nproc_per_node 8 examples/train.py --device cuda --data /imagenet/train --image-size 224 ...
    python examples/train.py --data DIR --deep

DIR is a folder of class sub-folders of images. Every rank reads its own shard of every epoch
(``LoaderConfig(shard_id=rank, num_shards=world)``) and prints the checksum of its class model,
which is the same on every rank (``fastgenlabel.distributed.model_checksum``).

``--timeout SECONDS`` bounds how long a rank waits for the others, to join and in every
collective (``init_process_group(timeout=...)``): a rank that hangs without dying makes the
others fail after that long instead of torch's default 30 minutes (under NCCL through torch's
async error handling, on by default, which aborts the waiting ranks).

Two variants (docs/MATH.md section 4):

- default, (a) in docs/MATH.md: z is a PCA of 8 x 8 thumbnails, fitted as ``fastgenlabel fit`` does
  (``fastgenlabel.fit.fit_image_folder``): every rank reads its shard, rank 0 fits the PCA on every
  rank's thumbnails and broadcasts it, every rank streams its shard's features into a
  ``StreamingFit`` whose ``result()`` all-reduces the statistics; the loader then emits GenLabel
  targets (exact: the map is linear). ``--model-file`` / ``--feature-map`` load the files written
  by ``fastgenlabel fit`` instead.
- ``--deep``, (c): the paper's deep variant. Warm up without mixup (``--warmup`` epochs), fit the
  class models on the network's own penultimate features (streamed over an unmixed pass of every
  shard, all-reduced), then train with mixup where the GenLabel label comes from the features of
  the *mixed* batch, computed in the training step by ``fastgenlabel.loader.deep_targets``.
  Here the features are the training forward's (train-mode batch norm), detached: one forward
  per step. The class models are fitted once, after the warm-up, as in the paper.

Mixing: ``--alpha`` (mixup), and timm's ``--cutmix-alpha``, ``--mix-prob``, ``--switch-prob`` and
``--mix-mode`` (batch / pair / elem): CutMix and mixup switched in the loader's pixel stage. The
targets of cut samples come from the features of the cut-and-pasted images, in both variants
(docs/MATH.md section 8); samples left unmixed keep their one-hot targets.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import fastgenlabel as fg
from fastgenlabel.distributed import model_checksum
from fastgenlabel.features import ThumbnailPCA, check_model_matches
from fastgenlabel.fit import ModuleFeatures, StreamingFit
from fastgenlabel.fit.folder import default_backend, fit_image_folder
from fastgenlabel.functional import soft_target_cross_entropy
from fastgenlabel.loader import GenLabelLoader, LoaderConfig, deep_targets

# ---- the network: a small ResNet-style CNN (torchvision's BasicBlock, narrower) ---------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + idt)


class SmallResNet(nn.Module):
    """stem -> 3 BasicBlocks (16, 32, 64 channels) -> global average -> Linear. ``features(x)``: (B, 64)."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


# ---- process group -----------------------------------------------------------------------------------

def setup(device_arg: str, timeout: float | None = None):
    """(rank, world, device); initialises torch.distributed when launched by torchrun, with a
    collective ``timeout`` in seconds (None: torch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        # Ranks share the CPU: one thread each (more spin-waits on busy cores, see docs/SCALING.md).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world, **kwargs)
    return rank, world, device


def log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", flush=True)


# ---- loaders -----------------------------------------------------------------------------------------

def make_loader(args, rank, world, device, **kw) -> GenLabelLoader:
    base = dict(data=args.data, batch_size=args.batch_size, image_size=args.image_size, shard_id=rank,
                num_shards=world, seed=args.seed, device=device.type, device_id=device.index or 0,
                backend=args.backend, num_threads=args.threads, crop_scale=(0.35, 1.0), alpha=args.alpha,
                cutmix_alpha=args.cutmix_alpha, prob=args.mix_prob, switch_prob=args.switch_prob,
                mode=args.mix_mode, gamma=args.gamma)
    base.update(kw)
    return GenLabelLoader(LoaderConfig(**base))


def unmixed_loader(args, rank, world, device, **kw) -> GenLabelLoader:
    """One deterministic pass over this rank's shard: no mixing, centre crops, every sample once."""
    return make_loader(args, rank, world, device, alpha=0.0, cutmix_alpha=0.0, train=False, shuffle=False,
                       last_batch="partial", **kw)


# ---- class models --------------------------------------------------------------------------------------

def make_class_model(args):
    if args.class_model == "kde":
        return fg.KDEClassModel(max_points_per_class=args.max_points_per_class)
    return fg.GaussianClassModel(args.covariance, reg=args.reg)


def fit_thumbnail_model(args, rank, world, device, num_classes):
    """PCA of thumbnails + class models, as ``fastgenlabel fit`` does it: every rank reads its shard, the PCA
    is fitted on rank 0 and broadcast, the statistics are all-reduced (each image counted once)."""
    result = fit_image_folder(args.data, make_class_model(args), dim=args.dim, thumbnail=8,
                              image_size=args.image_size, batch_size=args.batch_size, backend=args.backend,
                              device=device.type, num_threads=args.threads, seed=args.seed, progress=False,
                              log=(lambda line: log(rank, line)))
    if result.model.num_classes != num_classes:
        raise ValueError(f"data: {result.model.num_classes} classes for the model, {num_classes} for the loader")
    return result.feature_map, result.model


def fit_deep_model(args, rank, world, device, net, num_classes):
    """Class models on the network's penultimate features of every rank's shard (unmixed, eval mode)."""
    loader = unmixed_loader(args, rank, world, device)
    fit = StreamingFit(make_class_model(args), num_classes)
    t0 = time.perf_counter()
    # shard=(rank, world): an unshuffled sharded pass is padded to equal shards; count every image once.
    report = fit.consume(loader, features=ModuleFeatures(net.body, device=device), progress=False,
                         shard=(rank, world))
    model = fit.result()
    log(rank, f"fitted the class models on the network's features: {report} (+ all-reduce "
              f"{time.perf_counter() - t0 - report.seconds:.2f} s)")
    return model


# ---- training ----------------------------------------------------------------------------------------

def train_epoch(ddp, loader, opt, epoch, *, class_model=None, gamma=1.0):
    """One epoch; with ``class_model`` the GenLabel label comes from the features of the mixed batch."""
    loader.set_epoch(epoch)
    ddp.train()
    total, seen, t0 = 0.0, 0, time.perf_counter()
    for batch in loader:
        images, targets = batch.images, batch.targets
        if class_model is None:
            out = ddp(images)  # (logits, features) when the net is wrapped for the deep variant
            loss = soft_target_cross_entropy(out[0] if isinstance(out, tuple) else out, targets)
        else:
            # The deep variant: one forward (DDP wraps _WithFeatures); relabel from the detached features
            # of the mixed (or cut-and-pasted) images; unmixed samples keep their one-hot targets.
            logits, h = ddp(images)
            loss = soft_target_cross_entropy(logits, deep_targets(class_model, h, batch, gamma))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(batch)
        seen += len(batch)
    return total / max(seen, 1), seen / (time.perf_counter() - t0)


class _WithFeatures(nn.Module):
    """Wraps the net so that DDP's forward returns (logits, features)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        h = self.net.body(x)
        return self.net.head(h), h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder of class sub-folders of images")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--cutmix-alpha", type=float, default=0.0, help="CutMix's Beta parameter (0: no CutMix)")
    p.add_argument("--mix-prob", type=float, default=1.0, help="probability of mixing a batch / pair / sample")
    p.add_argument("--switch-prob", type=float, default=0.5, help="probability of CutMix rather than mixup")
    p.add_argument("--mix-mode", choices=("batch", "pair", "elem"), default=None,
                   help="timm's mode (default: batch for CutMix or --mix-prob < 1; else the loader's own pairs)")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--deep", action="store_true", help="the paper's deep variant (features of the mixed batch)")
    p.add_argument("--warmup", type=int, default=1, help="--deep: epochs without mixup before the fit")
    p.add_argument("--class-model", choices=("gaussian", "kde"), default="gaussian")
    p.add_argument("--covariance", choices=("full", "diag", "tied"), default="full")
    p.add_argument("--reg", type=float, default=1e-3)
    p.add_argument("--max-points-per-class", type=int, default=1000)
    p.add_argument("--dim", type=int, default=16, help="PCA components (default variant)")
    p.add_argument("--model-file", default=None, help="a model written by `fastgenlabel fit` (with --feature-map)")
    p.add_argument("--feature-map", default=None, help="its feature map (MODEL.features.npz)")
    p.add_argument("--backend", choices=("auto", "dali", "torch"), default="auto",
                   help="the loader's backend (auto: DALI when installed, else PIL + torch)")
    p.add_argument("--threads", type=int, default=1, help="DALI threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others (to join, and in every collective) "
                        "before it fails (default: torch's 30 minutes)")
    args = p.parse_args(argv)
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        p.error(f"--timeout: expected a finite number of seconds > 0, got {args.timeout}")
    if (args.model_file is None) != (args.feature_map is None):
        p.error("--model-file and --feature-map go together (the files `fastgenlabel fit` writes)")
    if args.backend == "auto":
        args.backend = default_backend()

    rank, world, device = setup(args.device, args.timeout)
    try:
        train(args, rank, world, device)
        if dist.is_initialized():
            # No rank tears its gloo connections down while a peer still uses them: that aborts
            # the peer ("terminate called without an active exception"; seen 1 run in 10 on 2 cores).
            dist.barrier()
    finally:
        gc.collect()  # train()'s DDP module and loaders are gone before the group is destroyed
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def train(args, rank: int, world: int, device: torch.device) -> None:
    """The training run of one rank (the default or the deep variant)."""
    torch.manual_seed(args.seed)
    probe = unmixed_loader(args, rank, world, device)
    k = probe.num_classes
    net = SmallResNet(k).to(device)
    wrapped = _WithFeatures(net) if args.deep else net
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(wrapped, device_ids=ids) if world > 1 else wrapped
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    log(rank, f"world {world}, device {device}, {k} classes, {len(probe)} unmixed batches in this shard")

    if not args.deep:
        if args.model_file:
            class_model, fmap = fg.load_model(args.model_file), ThumbnailPCA.load(args.feature_map)
            check_model_matches(class_model, fmap, f"--model-file {args.model_file!r}",
                                f"--feature-map {args.feature_map!r}")
        else:
            fmap, class_model = fit_thumbnail_model(args, rank, world, device, k)
        log(rank, f"class-model checksum {model_checksum(class_model)} ({class_model!r})")
        loader = make_loader(args, rank, world, device, model=class_model, feature_map=fmap)
        for epoch in range(args.epochs):
            loss, ips = train_epoch(ddp, loader, opt, epoch)
            log(rank, f"epoch {epoch}: loss {loss:.4f}, {ips:,.0f} images/s on this rank")
    else:
        plain = make_loader(args, rank, world, device, alpha=0.0, cutmix_alpha=0.0)
        for epoch in range(args.warmup):
            loss, ips = _warmup_epoch(ddp, plain, opt, epoch)
            log(rank, f"warm-up epoch {epoch}: loss {loss:.4f}, {ips:,.0f} images/s on this rank")
        class_model = fit_deep_model(args, rank, world, device, net, k)
        log(rank, f"class-model checksum {model_checksum(class_model)} ({class_model!r})")
        mixed = make_loader(args, rank, world, device)  # model=None: the loader's targets are mixup's
        for epoch in range(args.warmup, args.warmup + args.epochs):
            loss, ips = train_epoch(ddp, mixed, opt, epoch, class_model=class_model, gamma=args.gamma)
            log(rank, f"epoch {epoch}: loss {loss:.4f}, {ips:,.0f} images/s on this rank")
    if world > 1:
        # DDP keeps the replicas equal: check it once.
        flat = torch.cat([q.detach().reshape(-1) for q in net.parameters()]).to(torch.float64)
        s = torch.stack([flat.sum(), (flat * flat).sum()]).to(device if device.type == "cuda" else "cpu")
        ref = s.clone()
        dist.broadcast(ref, 0)
        log(rank, f"parameters equal to rank 0's: {bool(torch.allclose(s, ref))}")


def _warmup_epoch(ddp, loader, opt, epoch):
    """Plain training (the loader's alpha is 0, so its targets are one-hot)."""
    return train_epoch(ddp, loader, opt, epoch)


if __name__ == "__main__":
    raise SystemExit(main())
