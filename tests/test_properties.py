"""Hypothesis properties of the GenLabel target, the mixup pieces and the loss."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgenlabel import (
    GaussianClassModel,
    KDEClassModel,
    genlabel_target,
    mix,
    mixup_target,
    sample_pairs,
    smooth_labels,
    soft_target_cross_entropy,
)
from fastgenlabel.models import KDEStats

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ["full", "diag", "tied", "kde", "kde-capped"]
# Empty classes warn by design; the properties must hold regardless.
pytestmark = pytest.mark.filterwarnings("ignore:.*no training samples:RuntimeWarning")


def build(kind, prior="uniform"):
    if kind == "kde":
        return KDEClassModel(prior=prior)
    if kind == "kde-capped":
        return KDEClassModel(0.5, max_points_per_class=3, prior=prior)
    return GaussianClassModel(kind, prior=prior)


@st.composite
def problems(draw, min_size=0):
    """A fitted model, its data and a mixed batch: K, d, class sizes (0 and 1 included), scale."""
    k = draw(st.integers(2, 6))
    d = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(min_size, 7), min_size=k, max_size=k).filter(lambda s: sum(s) >= 2))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    scale = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    z = np.concatenate([scale * (rng.normal(size=(n, d)) + 3 * rng.normal(size=d)) for n in sizes])
    y = np.repeat(np.arange(k), sizes)
    b = draw(st.integers(0, 12))
    i, j = rng.integers(0, len(y), size=(2, b))
    lam = rng.uniform(size=b)
    lam[: b // 3] = draw(st.sampled_from([0.0, 1.0]))
    far = draw(st.sampled_from([1.0, 1.0, 50.0]))  # sometimes far from every class
    z_mix = far * (lam[:, None] * z[i] + (1 - lam[:, None]) * z[j])
    kind = draw(st.sampled_from(KINDS))
    prior = draw(st.sampled_from(["uniform", "empirical"]))
    return dict(k=k, z=z, y=y, kind=kind, prior=prior, z_mix=z_mix, y_a=y[i], y_b=y[j], lam=lam)


@SETTINGS
@given(problems(), st.floats(0, 1), st.floats(0, 1), st.booleans(), st.booleans())
def test_targets_are_probability_rows(p, gamma, smoothing, top2, as_torch):
    model = build(p["kind"], p["prior"]).fit(p["z"], p["y"], p["k"])
    args = [p["z_mix"].astype(np.float32), p["y_a"], p["y_b"], p["lam"]]
    if as_torch:
        args = [torch.from_numpy(a) for a in args]
    t = genlabel_target(model, *args, gamma, num_classes=p["k"], smoothing=smoothing, top2=top2)
    assert isinstance(t, torch.Tensor if as_torch else np.ndarray)
    t = np.asarray(t, dtype=np.float64)
    assert t.shape == (len(p["y_a"]), p["k"])
    assert not np.isnan(t).any() and (t >= 0).all()
    np.testing.assert_allclose(t.sum(1), 1, rtol=0, atol=1e-5)
    empty = np.bincount(p["y"], minlength=p["k"]) == 0
    if gamma == 1 and smoothing == 0:
        assert (t[:, empty] == 0).all()  # empty classes never receive GenLabel mass


@SETTINGS
@given(problems())
def test_lambda_one_and_gamma_zero_give_the_one_hot_label(p):
    model = build(p["kind"], p["prior"]).fit(p["z"], p["y"], p["k"])
    t = genlabel_target(model, p["z_mix"], p["y_a"], p["y_b"], 1.0, 0.0, num_classes=p["k"])
    np.testing.assert_array_equal(t, np.eye(p["k"])[p["y_a"]])


@st.composite
def identical_classes(draw):
    """Every class holds the same points, repeated a different number of times."""
    k = draw(st.integers(2, 6))
    d = draw(st.integers(1, 4))
    m = draw(st.integers(1, 6))
    repeats = draw(st.lists(st.integers(1, 4), min_size=k, max_size=k))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    base = rng.normal(size=(m, d)) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    lam = rng.uniform(size=(5, 1))
    i, j = rng.integers(0, m, size=(2, 5))
    return dict(k=k, base=base, repeats=repeats, z_mix=lam * base[i] + (1 - lam) * base[j],
                y_a=rng.integers(0, k, 5), y_b=rng.integers(0, k, 5), lam=lam[:, 0])


def target(model, p, gamma=1.0):
    return genlabel_target(model, p["z_mix"], p["y_a"], p["y_b"], p["lam"], gamma, num_classes=p["k"])


@SETTINGS
@given(identical_classes(), st.sampled_from(["full", "diag", "tied"]))
def test_identical_gaussians_give_the_prior(p, covariance):
    z = np.concatenate([np.tile(p["base"], (r, 1)) for r in p["repeats"]])
    y = np.repeat(np.arange(p["k"]), [r * len(p["base"]) for r in p["repeats"]])
    uniform = GaussianClassModel(covariance).fit(z, y, p["k"])
    np.testing.assert_allclose(target(uniform, p), np.full((5, p["k"]), 1 / p["k"]), rtol=0, atol=1e-6)
    empirical = GaussianClassModel(covariance, prior="empirical").fit(z, y, p["k"])
    freq = np.array(p["repeats"]) / sum(p["repeats"])
    np.testing.assert_allclose(target(empirical, p), np.tile(freq, (5, 1)), rtol=0, atol=1e-6)


@SETTINGS
@given(identical_classes(), st.sampled_from(["scott", "silverman", 0.4]))
def test_identical_kdes_give_the_prior(p, bandwidth):
    k, base = p["k"], p["base"]
    z, y = np.tile(base, (k, 1)), np.repeat(np.arange(k), len(base))
    uniform = KDEClassModel(bandwidth).fit(z, y, k)
    np.testing.assert_allclose(target(uniform, p), np.full((5, k), 1 / k), rtol=0, atol=1e-9)
    # A capped sample that kept the same points in every class, of classes of different sizes.
    m = len(base)
    count = torch.tensor([float(r * m) for r in p["repeats"]], dtype=torch.float64)
    stats = KDEStats(count, torch.from_numpy(z), torch.from_numpy(y), torch.zeros(len(y), dtype=torch.float64), m)
    empirical = KDEClassModel(bandwidth, max_points_per_class=m, prior="empirical").fit_stats(stats)
    freq = np.array(p["repeats"]) / sum(p["repeats"])
    np.testing.assert_allclose(target(empirical, p), np.tile(freq, (5, 1)), rtol=0, atol=1e-9)


@SETTINGS
@given(problems(), st.randoms(use_true_random=False), st.floats(0, 1), st.booleans())
def test_permuting_class_indices_permutes_the_columns(p, rand, gamma, top2):
    k = p["k"]
    perm = np.array(rand.sample(range(k), k))
    first = build(p["kind"], p["prior"]).fit(p["z"], p["y"], k)
    second = build(p["kind"], p["prior"]).fit(p["z"], perm[p["y"]], k)
    t = genlabel_target(first, p["z_mix"], p["y_a"], p["y_b"], p["lam"], gamma, num_classes=k, top2=top2)
    u = genlabel_target(second, p["z_mix"], perm[p["y_a"]], perm[p["y_b"]], p["lam"], gamma, num_classes=k,
                        top2=top2)
    np.testing.assert_allclose(u[:, perm], t, rtol=0, atol=1e-6)


@SETTINGS
@given(st.integers(0, 20), st.integers(1, 8), st.floats(0, 1), st.integers(0, 2 ** 32 - 1), st.booleans())
def test_label_smoothing_keeps_rows_summing_to_one(b, k, eps, seed, as_torch):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=b)
    pairs = sample_pairs(b, lam_mode="sample", generator=rng)
    t = mixup_target(torch.from_numpy(y) if as_torch else y, pairs, k, smoothing=eps)
    t = np.asarray(t, dtype=np.float64)
    np.testing.assert_allclose(t.sum(1), 1, rtol=0, atol=1e-6)
    assert (t >= eps / k - 1e-7).all()
    soft = rng.dirichlet(np.ones(k), size=b) if b else np.zeros((0, k))
    smoothed = smooth_labels(soft, eps)
    np.testing.assert_allclose(smoothed.sum(1), 1, rtol=0, atol=1e-12)
    assert (smoothed >= 0).all()


@SETTINGS
@given(problems(), st.floats(0, 1), st.integers(0, 2 ** 32 - 1), st.sampled_from(["none", "mean", "sum"]))
def test_cross_entropy_of_the_target_is_the_mixture_of_cross_entropies(p, gamma, seed, reduction):
    model = build(p["kind"], p["prior"]).fit(p["z"], p["y"], p["k"])
    z_mix = torch.from_numpy(p["z_mix"])  # float64 targets
    y_a, y_b, lam = (torch.from_numpy(p[n]) for n in ("y_a", "y_b", "lam"))
    y_gen = genlabel_target(model, z_mix, y_a, y_b, lam, 1.0, num_classes=p["k"])
    y_mix = genlabel_target(model, z_mix, y_a, y_b, lam, 0.0, num_classes=p["k"])
    t = genlabel_target(model, z_mix, y_a, y_b, lam, gamma, num_classes=p["k"])
    logits = torch.randn(len(y_a), p["k"], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 5
    combined = soft_target_cross_entropy(logits, t, reduction)
    mixed = gamma * soft_target_cross_entropy(logits, y_gen, reduction) \
        + (1 - gamma) * soft_target_cross_entropy(logits, y_mix, reduction)
    if len(y_a) or reduction != "mean":  # the mean of nothing is NaN on both sides
        torch.testing.assert_close(combined, mixed, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(st.integers(0, 40), st.floats(0, 5), st.sampled_from(["permutation", "flip", "roll"]),
       st.sampled_from(["batch", "sample"]), st.integers(0, 2 ** 32 - 1))
def test_pairs_are_permutations_with_weights_in_the_unit_interval(b, alpha, pairing, lam_mode, seed):
    pairs = sample_pairs(b, alpha, pairing=pairing, lam_mode=lam_mode, generator=seed)
    assert torch.equal(torch.sort(pairs.perm).values, torch.arange(b))
    assert bool(((pairs.lam >= 0) & (pairs.lam <= 1)).all())
    if alpha == 0:
        assert torch.equal(pairs.perm, torch.arange(b)) and bool((pairs.lam == 1).all())
    if lam_mode == "batch" and b:
        assert bool((pairs.lam == pairs.lam[0]).all())
    x = torch.randn(b, 3, dtype=torch.float64)
    mixed = mix(x, pairs)
    lo, hi = torch.minimum(x, x[pairs.perm]), torch.maximum(x, x[pairs.perm])
    assert bool(((mixed >= lo - 1e-12) & (mixed <= hi + 1e-12)).all())  # a convex combination
