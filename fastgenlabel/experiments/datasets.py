"""The paper's synthetic sets and scikit-learn's bundled tabular sets, drawn from seeded generators.

Every loader is a pure function of a ``numpy.random.Generator``: the same generator state gives
the same arrays. Train, validation and test sets are separate draws (synthetic sets) or a
stratified split (tabular sets); nothing is shared between them.

Sizes follow docs/MATH.md section 6 (the authors' scripts):

==============  ====  ===  =======================  ===================  ======================
name            d     K    train                    validation           test
==============  ====  ===  =======================  ===================  ======================
2d-cube         2     2    20 per class             none                 10,000 per class
3d-cube         3     8    20 per class             none                 10,000 per class
grid9           2     9    5,000 per class          none                 1,000 per class
moon            2     2    1,000                    1,000                1,000
circle          2     2    1,000                    1,000                1,000
two-circle      2     2    2,000                    2,000                2,000
iris            4     3    70 % (stratified)        none                 30 %
wine            13    3    70 % (stratified)        none                 30 %
breast-cancer   30    2    70 % (stratified)        none                 30 %
digits          64    10   70 % (stratified)        none                 30 %
==============  ====  ===  =======================  ===================  ======================

Tabular features are standardised with the training split's mean and standard deviation
(a feature constant on the training split is only centred).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TABULAR_TEST_FRACTION = 0.3


@dataclass(frozen=True)
class Split:
    """Features (N, d) float32 and integer labels (N,) int64."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        if self.x.ndim != 2 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"Split: expected x (N, d) and y (N,), got {self.x.shape} and {self.y.shape}")

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class Dataset:
    """One draw of a dataset: train, optional validation, and test splits."""

    name: str
    num_classes: int
    train: Split
    test: Split
    val: Split | None = None

    @property
    def dim(self) -> int:
        return self.train.x.shape[1]


def _split(x, y) -> Split:
    return Split(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64))


def _seed_for_sklearn(rng: np.random.Generator) -> int:
    """An int seed for scikit-learn functions, drawn from ``rng``."""
    return int(rng.integers(0, 2**31 - 1))


# ---- synthetic sets --------------------------------------------------------------------------

CUBE2D_CENTRES = np.array([[-1.0, 0.0], [1.0, 0.0]])


def _cube2d_draw(rng: np.random.Generator, per_class: int):
    """Class 0 ~ U([-2, 0] x [-1, 1]), class 1 ~ U([0, 2] x [-1, 1]): two touching squares."""
    y = np.repeat(np.arange(2), per_class)
    x = CUBE2D_CENTRES[y] + rng.uniform(-1.0, 1.0, size=(y.shape[0], 2))
    return x, y


def cube2d(rng: np.random.Generator, train_per_class: int = 20, test_per_class: int = 10_000) -> Dataset:
    """The 2-D cube: two unit-width squares that touch along x = 0."""
    return Dataset("2d-cube", 2, _split(*_cube2d_draw(rng, train_per_class)),
                   _split(*_cube2d_draw(rng, test_per_class)))


CUBE3D_CENTRES = np.array([[sx, sy, sz] for sx in (1.0, -1.0) for sy in (1.0, -1.0) for sz in (1.0, -1.0)])


def _cube3d_draw(rng: np.random.Generator, per_class: int):
    """Class c ~ uniform in the side-2 cube centred at ``CUBE3D_CENTRES[c]`` (an octant of [-2, 2]^3)."""
    y = np.repeat(np.arange(8), per_class)
    x = CUBE3D_CENTRES[y] + rng.uniform(-1.0, 1.0, size=(y.shape[0], 3))
    return x, y


def cube3d(rng: np.random.Generator, train_per_class: int = 20, test_per_class: int = 10_000) -> Dataset:
    """The 3-D cube: eight octant classes; mixing two of them often lands in a third."""
    return Dataset("3d-cube", 8, _split(*_cube3d_draw(rng, train_per_class)),
                   _split(*_cube3d_draw(rng, test_per_class)))


# The true class centres the authors' cube scripts relabel with (their oracle; training.py).
ORACLE_CENTRES = {"2d-cube": CUBE2D_CENTRES, "3d-cube": CUBE3D_CENTRES}

GRID9_CENTRES = np.array([[a, b] for a in (-10.0, 0.0, 10.0) for b in (-10.0, 0.0, 10.0)])
GRID9_VARIANCE = 0.1


def _grid9_draw(rng: np.random.Generator, per_class: int):
    y = np.repeat(np.arange(9), per_class)
    x = GRID9_CENTRES[y] + rng.normal(scale=np.sqrt(GRID9_VARIANCE), size=(y.shape[0], 2))
    return x, y


def grid9(rng: np.random.Generator, train_per_class: int = 5_000, test_per_class: int = 1_000) -> Dataset:
    """Nine Gaussians N(c, 0.1 I) at c in {-10, 0, 10}^2; the test set is a separate draw.

    (The authors' notebook re-seeds each class's generator, so its test points are the first
    1,000 training points of every class; here the test set is drawn apart.)
    """
    return Dataset("grid9", 9, _split(*_grid9_draw(rng, train_per_class)), _split(*_grid9_draw(rng, test_per_class)))


def _moon_draw(rng: np.random.Generator, n: int):
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=None, random_state=_seed_for_sklearn(rng))
    return x + rng.laplace(scale=0.1, size=x.shape), y


def _circle_draw(rng: np.random.Generator, n: int):
    from sklearn.datasets import make_circles

    x, y = make_circles(n_samples=n, factor=0.8, noise=None, random_state=_seed_for_sklearn(rng))
    return x + rng.laplace(scale=0.02, size=x.shape), y


def _two_circle_draw(rng: np.random.Generator, n_per_set: int):
    from sklearn.datasets import make_circles

    x1, y1 = make_circles(n_samples=n_per_set, factor=0.8, noise=None, random_state=_seed_for_sklearn(rng))
    x2, y2 = make_circles(n_samples=n_per_set, factor=0.8, noise=None, random_state=_seed_for_sklearn(rng))
    x = np.concatenate([x1 + [1.2, 0.0], x2 - [1.2, 0.0]])
    y = np.concatenate([y1, 1 - y2])
    return x + rng.laplace(scale=0.01, size=x.shape), y


def _three_draws(name: str, draw: Callable, rng: np.random.Generator, n: int) -> Dataset:
    train, val, test = (_split(*draw(rng, n)) for _ in range(3))
    return Dataset(name, 2, train, test, val)


def moon(rng: np.random.Generator, n: int = 1000) -> Dataset:
    """make_moons(n) plus Laplace noise of scale 0.1; train, validation and test are separate draws."""
    return _three_draws("moon", _moon_draw, rng, n)


def circle(rng: np.random.Generator, n: int = 1000) -> Dataset:
    """make_circles(n, factor=0.8) plus Laplace noise of scale 0.02; three separate draws."""
    return _three_draws("circle", _circle_draw, rng, n)


def two_circle(rng: np.random.Generator, n_per_set: int = 1000) -> Dataset:
    """Two make_circles(n) sets shifted to x +- 1.2, the second's labels flipped, Laplace 0.01.

    Each split holds ``2 * n_per_set`` points; three separate draws.
    """
    return _three_draws("two-circle", _two_circle_draw, rng, n_per_set)


# ---- tabular sets shipped with scikit-learn --------------------------------------------------

def _tabular(name: str, loader: Callable, rng: np.random.Generator,
             test_fraction: float = TABULAR_TEST_FRACTION) -> Dataset:
    from sklearn.model_selection import train_test_split

    x, y = loader(return_X_y=True)
    classes, y = np.unique(y, return_inverse=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        np.asarray(x, dtype=np.float64), y, test_size=test_fraction, stratify=y,
        random_state=_seed_for_sklearn(rng),
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return Dataset(name, len(classes), _split((x_tr - mean) / std, y_tr), _split((x_te - mean) / std, y_te))


def iris(rng: np.random.Generator) -> Dataset:
    from sklearn.datasets import load_iris

    return _tabular("iris", load_iris, rng)


def wine(rng: np.random.Generator) -> Dataset:
    from sklearn.datasets import load_wine

    return _tabular("wine", load_wine, rng)


def breast_cancer(rng: np.random.Generator) -> Dataset:
    from sklearn.datasets import load_breast_cancer

    return _tabular("breast-cancer", load_breast_cancer, rng)


def digits(rng: np.random.Generator) -> Dataset:
    from sklearn.datasets import load_digits

    return _tabular("digits", load_digits, rng)


LOADERS: dict[str, Callable[[np.random.Generator], Dataset]] = {
    "2d-cube": cube2d,
    "3d-cube": cube3d,
    "grid9": grid9,
    "moon": moon,
    "circle": circle,
    "two-circle": two_circle,
    "iris": iris,
    "wine": wine,
    "breast-cancer": breast_cancer,
    "digits": digits,
}
SYNTHETIC = ("2d-cube", "3d-cube", "grid9", "moon", "circle", "two-circle")
TABULAR = ("iris", "wine", "breast-cancer", "digits")


def with_validation(data: Dataset, fraction: float, seed: int) -> Dataset:
    """``data`` with a seeded stratified ``fraction`` of its training split moved to a validation split.

    The features keep the standardisation of the whole training split (the validation points are
    part of it); the test split is unchanged.
    """
    from sklearn.model_selection import train_test_split

    if data.val is not None:
        raise ValueError(f"data: {data.name!r} already has a validation split")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: expected a value in (0, 1), got {fraction!r}")
    x_tr, x_val, y_tr, y_val = train_test_split(data.train.x, data.train.y, test_size=fraction,
                                                stratify=data.train.y, random_state=int(seed))
    return Dataset(data.name, data.num_classes, _split(x_tr, y_tr), data.test, _split(x_val, y_val))


def data_generator(name: str, seed: int) -> np.random.Generator:
    """The generator a dataset is drawn from for ``seed``: independent across names and seeds."""
    if name not in LOADERS:
        raise ValueError(f"dataset: expected one of {tuple(LOADERS)}, got {name!r}")
    return np.random.default_rng([int(seed), 0, list(LOADERS).index(name)])


def load(name: str, seed: int) -> Dataset:
    """Draw dataset ``name`` for ``seed`` (same seed, same arrays)."""
    return LOADERS[name](data_generator(name, seed))
