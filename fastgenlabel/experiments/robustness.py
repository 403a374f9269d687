"""Robust accuracy: the authors' decision-based attack and a white-box PGD, at the authors' radius.

- :func:`boundary_robust`: foolbox's ``BoundaryAttack`` (Brendel et al., 2018), as the authors'
  ``attack_and_test`` runs it: an L2 attack, success iff a misclassified point lies within L2
  distance eps. It starts from the nearest point of a seeded pool that the model classifies
  differently (foolbox's own start, blended uniform noise, raises when it finds none).
- :func:`pgd_robust`: L-inf PGD written here in torch (random start, signed-gradient steps on the
  logit margin, projection on the eps-ball and the data bounds); a point is broken if any iterate
  is misclassified. The margin, not the cross-entropy, whose gradient vanishes in float32 on a
  confident network (gradient masking: PGD would then report points robust that are not).

eps = :data:`RADIUS_FRACTION` x (Xmax - Xmin), the scalar range of the training features, as the
authors. A point is robust iff it is classified correctly and the attack finds no misclassified
point within eps. foolbox is the optional ``robust`` extra; only :func:`boundary_robust` needs it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

RADIUS_FRACTION = 0.1
BOUNDARY_STEPS = 1000  # the authors' option ``attack_step``; foolbox's default is 25,000
PGD_STEPS = 20
ATTACK_POINTS = 200  # test points attacked per run (a seeded subsample of larger test sets)
POOL_UNIFORM = 1000  # uniform draws in the data bounds added to the starting-point pool


def attack_radius(x_train: np.ndarray, fraction: float = RADIUS_FRACTION) -> float:
    """``fraction * (max - min)`` over every training feature value, the authors' epsilon."""
    x_train = np.asarray(x_train)
    if x_train.size == 0 or not np.isfinite(x_train).all():
        raise ValueError("x_train: expected a non-empty finite array")
    if not fraction > 0:
        raise ValueError(f"fraction: expected > 0, got {fraction!r}")
    return float(fraction * (x_train.max() - x_train.min()))


def attack_subset(n: int, size: int, seed: int) -> np.ndarray:
    """Indices of the test points attacked: all of them, or a seeded sorted sample of ``size``."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng([int(seed), 2]).choice(n, size, replace=False))


def _bounds(x_train: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """A box holding the training data and the attacked points (foolbox refuses inputs outside it)."""
    return float(min(x_train.min(), x.min())), float(max(x_train.max(), x.max()))


def _check(x, y, eps):
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x, y: expected (N, d) and (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (eps >= 0 and np.isfinite(eps)):
        raise ValueError(f"eps: expected a finite value >= 0, got {eps!r}")


@torch.no_grad()
def _predict(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x).argmax(1)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} logit_j - logit_y per row: positive iff misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - true


def pgd_robust(net: nn.Module, x: np.ndarray, y: np.ndarray, eps: float, bounds: tuple[float, float],
               steps: int = PGD_STEPS, seed: int = 0) -> np.ndarray:
    """Per point, True iff correct and no PGD-L-inf iterate within ``eps`` (and ``bounds``) is misclassified.

    Step size 2.5 eps / steps (Madry et al.), one uniform random start in the eps-ball; the ascent
    is on the margin max_{j != y} logit_j - logit_y (Carlini and Wagner's loss).
    """
    _check(x, y, eps)
    net.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    lo, hi = bounds
    broken = _predict(net, xt) != yt
    if eps == 0:
        return (~broken).numpy()
    gen = torch.Generator().manual_seed(int(seed))
    step = 2.5 * eps / steps
    delta = (torch.rand(xt.shape, generator=gen) * 2 - 1) * eps
    adv = (xt + delta).clamp(lo, hi)
    for _ in range(steps):
        adv.requires_grad_(True)
        logits = net(adv)
        broken |= (logits.argmax(1) != yt).detach()
        grad, = torch.autograd.grad(_margin(logits, yt).sum(), adv)
        with torch.no_grad():
            adv = adv + step * grad.sign()
            adv = torch.minimum(torch.maximum(adv, xt - eps), xt + eps).clamp(lo, hi)
    broken |= _predict(net, adv) != yt
    return (~broken).numpy()


def _starting_points(net, xt, yt, pool, bounds, seed):
    """For each point, the nearest pool point classified differently from its label (NaN row if none)."""
    gen = torch.Generator().manual_seed(int(seed) + 1)
    lo, hi = bounds
    uniform = lo + (hi - lo) * torch.rand((POOL_UNIFORM, xt.shape[1]), generator=gen)
    cand = torch.cat([torch.as_tensor(pool, dtype=torch.float32).clamp(lo, hi), uniform, xt])
    pred = _predict(net, cand)
    dist = torch.cdist(xt, cand)
    dist[pred[None, :] == yt[:, None]] = float("inf")
    best, idx = dist.min(1)
    start = cand[idx].clone()
    start[torch.isinf(best)] = float("nan")
    return start


def import_foolbox():
    """foolbox, or an ImportError that says how to install it."""
    import warnings

    try:
        with warnings.catch_warnings():
            # foolbox 3.3.4 imports scipy.ndimage.filters, deprecated since SciPy 1.8; harmless here.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*scipy.ndimage.*")
            import foolbox
    except ImportError as e:
        raise ImportError("the boundary attack needs foolbox: pip install 'fastgenlabel[robust]'") from e
    return foolbox


class _Stacked(nn.Module):
    """Several networks as one: rows ``[offsets[m], offsets[m + 1])`` of every batch go to ``nets[m]``.

    foolbox's BoundaryAttack queries the whole batch at every step, so each attacked point keeps
    its own network; any other batch size is refused rather than routed wrongly.
    """

    def __init__(self, nets, sizes):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.sizes = [int(n) for n in sizes]

    def forward(self, x):
        if x.shape[0] != sum(self.sizes):
            raise RuntimeError(f"stacked networks: expected a batch of {sum(self.sizes)} rows, got {x.shape[0]}")
        return torch.cat([net(part) for net, part in zip(self.nets, torch.split(x, self.sizes))])


def boundary_robust_many(nets, x: np.ndarray, y: np.ndarray, eps: float, bounds: tuple[float, float],
                         pool: np.ndarray, steps: int = BOUNDARY_STEPS, seed: int = 0) -> list[np.ndarray]:
    """:func:`boundary_robust` of each network of ``nets`` on the same points, in one attack call.

    foolbox's BoundaryAttack keeps its step sizes per point and draws one Gaussian direction per
    step shared by the whole batch (its ``draw_proposals``), so a point attacked beside others
    follows the same path as attacked alone with the same seed; batching only saves the attack's
    per-step overhead, which dominates on these small networks.
    """
    _check(x, y, eps)
    foolbox = import_foolbox()
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    robust, todo, starts = [], [], []
    for net in nets:
        net.eval()
        ok = (_predict(net, xt) == yt).numpy()
        start = _starting_points(net, xt, yt, pool, bounds, seed)
        robust.append(ok)
        todo.append(np.flatnonzero(ok & ~torch.isnan(start).any(1).numpy()))
        starts.append(start)
    if eps == 0 or all(t.size == 0 for t in todo):
        return robust
    sel = [torch.from_numpy(t) for t in todo]
    fmodel = foolbox.PyTorchModel(_Stacked(nets, [t.size for t in todo]).eval(), bounds=bounds)
    attack = foolbox.attacks.BoundaryAttack(steps=steps)
    with torch.random.fork_rng(devices=[]):  # foolbox draws from torch's global generator: seed it, then restore
        torch.manual_seed(int(seed))
        _, _, success = attack(fmodel, torch.cat([xt[s] for s in sel]), torch.cat([yt[s] for s in sel]),
                               epsilons=float(eps), starting_points=torch.cat([st[s] for st, s in zip(starts, sel)]))
    for ok, t, hit in zip(robust, todo, torch.split(success, [t.size for t in todo])):
        ok[t] = ~hit.numpy()
    return robust


def boundary_robust(net: nn.Module, x: np.ndarray, y: np.ndarray, eps: float, bounds: tuple[float, float],
                    pool: np.ndarray, steps: int = BOUNDARY_STEPS, seed: int = 0) -> np.ndarray:
    """Per point, True iff correct and foolbox's BoundaryAttack finds no misclassified point within L2 ``eps``.

    ``pool`` (M, d): points the start is searched among (the training set), with uniform draws in
    ``bounds``. A correctly classified point whose label the model predicts on the whole pool gets
    no start and counts as robust: the decision-based attack cannot begin there.
    """
    return boundary_robust_many([net], x, y, eps, bounds, pool, steps=steps, seed=seed)[0]


MEASURES = ("clean", "robust", "both")


def robust_accuracies(nets, x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int, *,
                      points: int = ATTACK_POINTS, boundary_steps: int = BOUNDARY_STEPS,
                      pgd_steps: int = PGD_STEPS) -> list[dict]:
    """Both attacks on the same seeded subsample of the test set, per network of ``nets`` (the methods of a seed).

    Returns one {"robust", "pgd", "epsilon", "points"} per network; ``robust`` and ``pgd`` are
    fractions in [0, 1]. The subsample depends on the seed only, so every method of a seed is
    attacked on the same points; the BoundaryAttack runs on all networks in one call
    (:func:`boundary_robust_many`).
    """
    keep = attack_subset(len(y_test), points, seed)
    x, y = x_test[keep], y_test[keep]
    eps = attack_radius(x_train)
    bounds = _bounds(x_train, x)
    boundary = boundary_robust_many(nets, x, y, eps, bounds, x_train, steps=boundary_steps, seed=seed)
    return [{"robust": float(b.mean()), "pgd": float(pgd_robust(net, x, y, eps, bounds, steps=pgd_steps,
                                                                 seed=seed).mean()),
             "epsilon": eps, "points": int(keep.size)} for net, b in zip(nets, boundary)]
