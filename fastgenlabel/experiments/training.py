"""An MLP and its training loop for vanilla, mixup and mixup + GenLabel (z = x, the input itself).

One run is a pure function of (dataset, protocol, method, seed): ``torch.manual_seed(seed)``
fixes the initial weights (the same for every method of a seed), and a ``numpy`` generator
seeded from ``seed`` draws the batch order and the mixup pairs.

GenLabel targets come from the fused ``relabel`` kernels (backend "auto"), the path users run;
each run checks its first batch against the ``genlabel_target`` reference within
:data:`RELABEL_ATOL`. The top-2 label (3-D cube) has no kernel and uses the reference.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..functional import genlabel_target, mix, mixup_target, sample_pairs, soft_target_cross_entropy
from ..kernels.relabel import explain_relabel, relabel
from ..models import GaussianClassModel, KDEClassModel
from ..models.gaussian import GaussianStats
from .datasets import ORACLE_CENTRES, Dataset, Split
from .protocol import Protocol

METHODS = ("vanilla", "mixup", "genlabel-gauss", "genlabel-kde", "genlabel-oracle")
METHOD_LABELS = {
    "vanilla": "vanilla",
    "mixup": "mixup",
    "genlabel-gauss": "mixup+GenLabel (Gauss)",
    "genlabel-kde": "mixup+GenLabel (KDE)",
    "genlabel-oracle": "mixup+GenLabel (authors' oracle)",
}
ORACLE_DATASETS = tuple(ORACLE_CENTRES)
# Largest |relabel - genlabel_target| allowed on a run's first batch: the kernels' documented bound
# for full covariance (tests/test_relabel.py: 1.4e-5 worst case seen, 5e-5 allowed), doubled for
# the ill-conditioned covariances of few samples in many dimensions (digits: d = 64, n_c ~ 125).
RELABEL_ATOL = 1e-4


def mlp(dim: int, hidden: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """``dim - hidden[0] - ... - hidden[-1] - num_classes`` with ReLU between layers."""
    layers: list[nn.Module] = []
    width = dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def oracle_class_model(dataset: str, counts) -> GaussianClassModel:
    """The authors' cube oracle: class c ~ N(true centre of cube c, I), not fitted on the data.

    ``counts`` (K,): training samples per class, kept as the model's class counts (the prior is
    uniform either way). The data's own covariance is I / 3 (uniform on a side-2 cube).
    """
    if dataset not in ORACLE_CENTRES:
        raise ValueError(f"genlabel-oracle: the authors' oracle exists for {ORACLE_DATASETS}, not {dataset!r}")
    centres = torch.as_tensor(ORACLE_CENTRES[dataset], dtype=torch.float64)
    k, d = centres.shape
    n = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if n.shape != (k,) or bool((n < 1).any()):
        raise ValueError(f"counts: expected {k} positive class counts, got {np.asarray(counts).tolist()}")
    # Sufficient statistics whose maximum-likelihood covariance is exactly I (reg = 0).
    scatter = n.view(k, 1, 1) * torch.eye(d, dtype=torch.float64).expand(k, d, d)
    return GaussianClassModel(covariance="full", reg=0.0).fit_stats(GaussianStats("full", n, centres, scatter))


def fit_class_model(method: str, proto: Protocol, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0,
                    dataset: str | None = None):
    """The class model a GenLabel method relabels with: fitted on the training split, or the oracle."""
    if method == "genlabel-oracle":
        return oracle_class_model(dataset, np.bincount(y, minlength=num_classes))
    z = torch.from_numpy(x).to(torch.float64)
    labels = torch.from_numpy(y)
    if method == "genlabel-gauss":
        return GaussianClassModel(covariance="full").fit(z, labels, num_classes)
    if method == "genlabel-kde":
        return KDEClassModel(bandwidth=proto.bandwidth, max_points_per_class=proto.kde_max_points,
                             seed=seed).fit(z, labels, num_classes)
    raise ValueError(f"method: {method!r} uses no class model")


@torch.no_grad()
def accuracy(net: nn.Module, split: Split, batch_size: int = 20_000) -> float:
    """Fraction of ``split`` classified correctly."""
    net.eval()
    x = torch.from_numpy(split.x)
    y = torch.from_numpy(split.y)
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(1, x.shape[0])


@dataclass
class RunResult:
    """One training run. Accuracies are fractions in [0, 1].

    ``val_selected_acc`` is the test accuracy of the epoch with the best validation accuracy
    (the latest such epoch on ties); None when the dataset has no validation split.
    ``attack`` holds the robust accuracies of :func:`.robustness.robust_accuracies` when measured.
    """

    dataset: str
    method: str
    seed: int
    test_acc: float
    val_selected_acc: float | None
    best_epoch: int | None
    net: nn.Module | None = None
    attack: dict | None = None
    val_acc: float | None = None  # validation accuracy after the last epoch (None: no validation split)
    relabel_backend: str | None = None  # the backend "auto" picked (None: no GenLabel, or top-2)
    relabel_max_diff: float | None = None  # max |relabel - reference| on the first batch


def _optimizer(net: nn.Module, proto: Protocol) -> torch.optim.Optimizer:
    if proto.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=proto.lr, weight_decay=proto.weight_decay)
    return torch.optim.SGD(net.parameters(), lr=proto.lr, momentum=proto.momentum, weight_decay=proto.weight_decay)


def _target_key(data: Dataset, proto: Protocol, method: str, seed: int) -> tuple:
    """What a run's GenLabel targets depend on: not the network, so not the learning rate or the optimiser."""
    return (data.name, len(data.train), data.dim, method, int(seed), proto.gamma, proto.top2, proto.alpha,
            proto.batch_size, proto.epochs, proto.bandwidth, proto.kde_max_points)


def train_run(data: Dataset, proto: Protocol, method: str, seed: int, *, keep_net: bool = False,
              val_selected: bool = True, target_cache: dict | None = None) -> RunResult:
    """Train one MLP on ``data`` with ``method`` and report its test accuracy after the last epoch.

    Args:
        data: the dataset draw.
        proto: the training protocol.
        method: one of :data:`METHODS`.
        seed: fixes the initial weights, the batch order and the mixup pairs.
        keep_net: return the trained network (for plots).
        val_selected: with a validation split, also test the epoch of best validation accuracy
            (one evaluation per epoch); False measures the validation split after the last epoch only.
        target_cache: a dict shared by runs that differ only in the network's training (learning
            rate, optimiser, architecture): the first GenLabel run stores its targets there, the
            others replay them instead of relabelling again. The batches and pairs are the same
            (drawn from ``seed``) and the targets do not depend on the network, so the results
            are identical to relabelling; a run with another data, method, seed or label
            setting is refused.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    k = data.num_classes
    model = None
    replay, record = None, None
    if method.startswith("genlabel") and target_cache is not None:
        key = _target_key(data, proto, method, seed)
        if target_cache and target_cache["key"] != key:
            raise ValueError(f"target_cache: holds the targets of {target_cache['key']}, not of {key}")
        if target_cache:
            replay = iter(target_cache["targets"])
        else:
            record = []
    if method.startswith("genlabel") and replay is None:
        model = fit_class_model(method, proto, data.train.x, data.train.y, k, seed=seed, dataset=data.name)

    torch.manual_seed(seed)
    rng = np.random.default_rng([int(seed), 1])
    net = mlp(data.dim, proto.hidden, k)
    opt = _optimizer(net, proto)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(proto.milestones), gamma=0.1)
    x_all = torch.from_numpy(data.train.x)
    y_all = torch.from_numpy(data.train.y)
    n = x_all.shape[0]

    fast = model is not None and not proto.top2
    backend, max_diff = None, None
    if replay is not None:
        backend, max_diff = target_cache["relabel"]
    best_val, best_state, best_epoch = -1.0, None, None
    for epoch in range(proto.epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(n))
        for i in range(0, n, proto.batch_size):
            idx = order[i:i + proto.batch_size]
            x, y = x_all[idx], y_all[idx]
            if method == "vanilla":
                logits = net(x)
                loss = nn.functional.cross_entropy(logits, y)
            else:
                pairs = sample_pairs(x.shape[0], alpha=proto.alpha, pairing="permutation", lam_mode="batch",
                                     generator=rng)
                x_mix = mix(x, pairs)
                if method == "mixup":
                    target = mixup_target(y, pairs, k)
                elif replay is not None:
                    target = next(replay)
                elif fast:
                    target = relabel(model, x, pairs, y, proto.gamma, num_classes=k, backend="auto")
                    if max_diff is None:
                        backend, max_diff = _check_relabel(model, x, x_mix, y, pairs, proto.gamma, k, target, data.name)
                else:
                    target = genlabel_target(model, x_mix, y, y[pairs.perm], pairs.lam, proto.gamma,
                                             num_classes=k, top2=proto.top2)
                if record is not None:
                    record.append(target.detach().clone())  # kept safe from any buffer reuse
                logits = net(x_mix)
                loss = soft_target_cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if proto.clip is not None:
                nn.utils.clip_grad_norm_(net.parameters(), proto.clip)
            opt.step()
        sched.step()
        if data.val is not None and val_selected:
            val = accuracy(net, data.val)
            if val >= best_val:
                best_val, best_epoch = val, epoch + 1
                best_state = copy.deepcopy(net.state_dict())

    if record is not None:
        target_cache.update(key=key, targets=record, relabel=(backend, max_diff))
    test_acc = accuracy(net, data.test)
    val_selected = None
    if best_state is not None:
        last_state = copy.deepcopy(net.state_dict())
        net.load_state_dict(best_state)
        val_selected = accuracy(net, data.test)
        net.load_state_dict(last_state)
    net.eval()
    return RunResult(data.name, method, seed, test_acc, val_selected, best_epoch, net if keep_net else None,
                     val_acc=None if data.val is None else accuracy(net, data.val),
                     relabel_backend=backend, relabel_max_diff=max_diff)


def _check_relabel(model, x, x_mix, y, pairs, gamma, k, target, dataset) -> tuple[str, float]:
    """The backend ``relabel`` chose and its largest deviation from the reference on this batch."""
    want = genlabel_target(model, x_mix, y, y[pairs.perm], pairs.lam, gamma, num_classes=k)
    diff = float((target.double() - want.double()).abs().max())
    backend = next(name for name, why in explain_relabel(model, x, pairs, y, gamma, num_classes=k).items()
                   if why is None)
    if not diff <= RELABEL_ATOL:
        raise RuntimeError(f"relabel ({backend}) differs from genlabel_target by {diff:.3g} > {RELABEL_ATOL:g} "
                           f"on the first batch of {dataset!r}")
    return backend, diff
