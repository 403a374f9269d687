"""Per-dataset training protocols: the authors' settings for small nets (docs/MATH.md section 6).

A :class:`Protocol` is plain data; :func:`protocol_for` returns the default of a dataset and
:func:`dataclasses.replace` overrides fields (the CLI's ``--gamma``, ``--bandwidth``, ``--epochs``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Protocol:
    """How one dataset is trained and relabeled.

    Attributes:
        hidden: widths of the MLP's hidden layers (ReLU after each); input d and output K come
            from the data.
        optimizer: "sgd" (momentum, weight decay) or "adam" (default betas, no weight decay).
        lr: initial learning rate.
        momentum, weight_decay: SGD's.
        epochs: passes over the training set.
        batch_size: samples per step; the last batch of an epoch may be smaller (not dropped).
        milestones: epochs after which the learning rate is divided by 10.
        clip: gradient-norm clip (None: no clipping).
        alpha: lambda ~ Beta(alpha, alpha), one lambda per batch, random-permutation pairing.
        gamma: weight of the GenLabel label in the target.
        bandwidth: KDE bandwidth: "scott", "silverman" or a float factor (scipy's ``bw_method``).
        kde_max_points: keep at most this many training points per class in the KDE (a seeded
            uniform subsample; None keeps all).
        top2: the authors' top-2 GenLabel label instead of the posterior over all classes.
    """

    hidden: tuple[int, ...]
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 100
    batch_size: int = 128
    milestones: tuple[int, ...] = ()
    clip: float | None = 5.0
    alpha: float = 1.0
    gamma: float = 1.0
    bandwidth: str | float = "scott"
    kde_max_points: int | None = None
    top2: bool = False

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs} and {self.batch_size}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma: expected a value in [0, 1], got {self.gamma!r}")


# The small-cube protocol: MLP d-64-128-K, SGD, 40 epochs, batch 128 (the whole 2-D training set;
# two steps per epoch on the 3-D cube, as the authors' script).
_CUBE = Protocol(hidden=(64, 128), epochs=40, batch_size=128)
# The moon protocol: MLP d-64-128-128-128-K, SGD, 100 epochs, lr / 10 at 60 and 80.
_MOON = Protocol(hidden=(64, 128, 128, 128), epochs=100, batch_size=128, milestones=(60, 80))

PROTOCOLS: dict[str, Protocol] = {
    "2d-cube": replace(_CUBE, gamma=1.0),
    "3d-cube": replace(_CUBE, gamma=0.8, top2=True),
    "grid9": Protocol(hidden=(64, 128, 128), optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=10,
                      batch_size=1000, clip=None, gamma=1.0, kde_max_points=500),
    "moon": replace(_MOON, gamma=1.0, bandwidth=0.2),
    "circle": replace(_MOON, gamma=0.8, bandwidth=0.2),
    "two-circle": replace(_MOON, gamma=1.0, bandwidth=0.1, milestones=(20, 50)),
}

# Tabular sets: the moon protocol, with the batch scaled so that an epoch has about as many
# steps as a moon epoch (1,000 / 128, about 8): batch = min(128, ceil(n_train / 8)).
TABULAR_PROTOCOL = replace(_MOON, gamma=1.0, bandwidth="scott")
STEPS_PER_EPOCH = 8

# --quick: fewer epochs where a run would be slow, and a smaller KDE sample on the 9-class grid.
QUICK_OVERRIDES: dict[str, dict] = {
    "moon": {"epochs": 50, "milestones": (30, 40)},
    "grid9": {"epochs": 5, "kde_max_points": 200},
}
QUICK_DATASETS = ("2d-cube", "moon", "grid9", "iris")
QUICK_SEEDS = 2


def tabular_batch_size(n_train: int) -> int:
    return max(1, min(128, math.ceil(n_train / STEPS_PER_EPOCH)))


def protocol_for(name: str, n_train: int, *, quick: bool = False) -> Protocol:
    """The default protocol of dataset ``name`` with ``n_train`` training samples."""
    if name in PROTOCOLS:
        proto = PROTOCOLS[name]
    else:
        proto = replace(TABULAR_PROTOCOL, batch_size=tabular_batch_size(n_train))
    if quick and name in QUICK_OVERRIDES:
        proto = replace(proto, **QUICK_OVERRIDES[name])
    return proto


def with_epochs(proto: Protocol, epochs: int) -> Protocol:
    """``proto`` shortened (or stretched) to ``epochs``, its lr milestones scaled alike."""
    scale = epochs / proto.epochs
    milestones = tuple(sorted({max(1, round(m * scale)) for m in proto.milestones if round(m * scale) < epochs}))
    return replace(proto, epochs=epochs, milestones=milestones)
