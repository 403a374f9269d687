"""GaussianClassModel against scipy.stats.multivariate_normal; merging; defined edge cases."""
import re
import warnings
import zlib

import numpy as np
import pytest
import scipy.stats
import torch

from fastgenlabel import GaussianClassModel, genlabel_target
from fastgenlabel.models import FitWarning, GaussianStats, NotFittedError

COVARIANCES = ["full", "diag", "tied"]


def seed_of(*params) -> int:
    return zlib.crc32(repr(params).encode())


def make_data(rng, d, sizes, spread=3.0):
    """Classes with their own mean and a random linear shape, in random order."""
    zs, ys = [], []
    for c, n in enumerate(sizes):
        a = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
        zs.append(rng.normal(size=(n, d)) @ a + spread * rng.normal(size=d))
        ys.append(np.full(n, c))
    z, y = np.concatenate(zs), np.concatenate(ys)
    order = rng.permutation(len(y))
    return z[order], y[order]


def scipy_log_likelihood(z, y, k, q, covariance, reg):
    d = z.shape[1]
    pooled = sum(np.cov(z[y == c].T, bias=True).reshape(d, d) * (y == c).sum() for c in range(k)) / len(y)
    out = np.empty((len(q), k))
    for c in range(k):
        zc = z[y == c]
        cov = np.cov(zc.T, bias=True).reshape(d, d) if len(zc) > 1 else np.zeros((d, d))
        if covariance == "diag":
            cov = np.diag(np.diag(cov))
        elif covariance == "tied":
            cov = pooled
        out[:, c] = scipy.stats.multivariate_normal(zc.mean(0), cov + reg * np.eye(d)).logpdf(q).reshape(-1)
    return out


def queries(rng, z, n=25):
    """Training points, mixtures of pairs of them and points beyond the data."""
    i, j = rng.integers(0, len(z), size=(2, n))
    lam = rng.uniform(size=(n, 1))
    return np.concatenate([z[i[:5]], lam * z[i] + (1 - lam) * z[j], 3 * z[j[:5]]])


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("d", [1, 2, 5, 20])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_log_likelihood_matches_scipy(covariance, d, k):
    rng = np.random.default_rng(seed_of(covariance, d, k))
    sizes = rng.integers(2, 3 * d + 12, size=k)  # unequal, some with n_c <= d
    z, y = make_data(rng, d, sizes)
    reg = [1e-4, 0.05][d % 2]
    model = GaussianClassModel(covariance, reg=reg).fit(z, y, k)
    q = queries(rng, z)
    np.testing.assert_allclose(model.log_likelihood(q), scipy_log_likelihood(z, y, k, q, covariance, reg),
                               rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_log_joint_adds_the_prior(covariance):
    rng = np.random.default_rng(seed_of("prior", covariance))
    z, y = make_data(rng, 3, [10, 30, 20])
    q = queries(rng, z)
    uniform = GaussianClassModel(covariance).fit(z, y, 3)
    empirical = GaussianClassModel(covariance, prior="empirical").fit(z, y, 3)
    ll = uniform.log_likelihood(q)
    np.testing.assert_allclose(uniform.log_joint(q), ll - np.log(3), rtol=1e-12)
    np.testing.assert_allclose(empirical.log_joint(q), ll + np.log([10 / 60, 30 / 60, 20 / 60]), rtol=1e-12)
    np.testing.assert_array_equal(empirical.class_counts.numpy(), [10, 30, 20])


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_merged_batch_statistics_equal_a_single_fit(covariance):
    rng = np.random.default_rng(seed_of("merge", covariance))
    k, d = 4, 3
    z, y = make_data(rng, d, [40, 25, 1, 12], spread=50.0)
    # Batches of uneven size; class 3 is absent from the first batch, class 2 from two of them.
    first = y != 3
    idx_a = np.flatnonzero(first)[:30]
    rest = np.setdiff1d(np.arange(len(y)), idx_a)
    idx_b, idx_c = rest[: len(rest) // 3], rest[len(rest) // 3:]
    model = GaussianClassModel(covariance)
    stats = [model.compute_stats(z[i], y[i], k) for i in (idx_a, idx_b, idx_c)]
    merged = stats[0].merge(stats[1]).merge(stats[2])
    single = GaussianClassModel(covariance).fit(z, y, k)
    torch.testing.assert_close(merged.count, single.stats.count, rtol=0, atol=0)
    torch.testing.assert_close(merged.mean, single.stats.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.m2, single.stats.m2, rtol=1e-10, atol=1e-9)
    q = queries(rng, z)
    np.testing.assert_allclose(model.fit_stats(merged).log_likelihood(q), single.log_likelihood(q),
                               rtol=1e-9, atol=1e-9)
    # The merge is symmetric up to rounding.
    other = stats[2].merge(stats[0]).merge(stats[1])
    torch.testing.assert_close(other.m2, merged.m2, rtol=1e-10, atol=1e-9)


def test_merge_rejects_mismatched_statistics():
    rng = np.random.default_rng(0)
    z, y = make_data(rng, 2, [5, 5])
    full = GaussianClassModel("full").compute_stats(z, y, 2)
    with pytest.raises(TypeError, match="other"):
        full.merge(GaussianClassModel("diag").compute_stats(z, y, 2))
    with pytest.raises(ValueError, match="other"):
        full.merge(GaussianClassModel("full").compute_stats(z, y, 3))
    with pytest.raises(TypeError, match="stats"):
        GaussianClassModel("full").fit_stats(object())
    with pytest.raises(ValueError, match="stats"):
        GaussianClassModel("full").fit_stats(GaussianStats("diag", full.count, full.mean, full.m2[:, 0]))


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_a_class_without_samples(covariance):
    rng = np.random.default_rng(seed_of("empty", covariance))
    z, y = make_data(rng, 3, [20, 15, 10])
    y = np.where(y == 1, 3, y)  # K = 4 and class 1 has no samples
    with pytest.warns(RuntimeWarning, match=r"\[1\]"):
        model = GaussianClassModel(covariance, prior="empirical").fit(z, y, 4)
    ll = model.log_likelihood(z)
    assert np.isneginf(ll[:, 1]).all() and np.isfinite(ll[:, [0, 2, 3]]).all()
    assert float(model.log_prior[1]) == -np.inf
    target = genlabel_target(model, z, y, rng.permutation(y), 0.6, 1.0, num_classes=4)
    assert not np.isnan(target).any() and (target[:, 1] == 0).all()
    np.testing.assert_allclose(target.sum(1), 1, rtol=1e-6)


def test_no_samples_at_all_raises():
    with pytest.raises(ValueError, match="no training samples"):
        GaussianClassModel().fit(np.zeros((0, 2)), np.zeros(0, np.int64), 3)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_a_single_sample_class_gets_reg_times_identity(covariance):
    rng = np.random.default_rng(seed_of("one", covariance))
    z, y = make_data(rng, 4, [12, 1, 9])
    model = GaussianClassModel(covariance, reg=0.3).fit(z, y, 3)
    q = queries(rng, z)
    expected = scipy.stats.multivariate_normal(z[y == 1][0], 0.3 * np.eye(4)).logpdf(q)
    np.testing.assert_allclose(model.log_likelihood(q)[:, 1], expected, rtol=1e-10)


def test_full_covariance_of_at_most_d_samples_warns():
    """n_c <= d: the covariance is singular but for reg; say so (one sample has its own fallback)."""
    rng = np.random.default_rng(seed_of("few", "full"))
    z, y = make_data(rng, 4, [12, 4, 1])
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[1\] have at most d = 4 samples"):
        GaussianClassModel("full").fit(z, y, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaussianClassModel("diag").fit(z, y, 3)
        GaussianClassModel("full").fit(*make_data(rng, 4, [12, 5, 1]), 3)
    with pytest.warns(FitWarning):  # a loaded model carries the same caveat
        GaussianClassModel.from_state_dict(GaussianClassModel("full").fit(z, y, 3).state_dict())


def test_a_single_sample_class_uses_the_pooled_covariance_when_tied():
    rng = np.random.default_rng(seed_of("one", "tied"))
    z, y = make_data(rng, 4, [12, 1, 9])
    model = GaussianClassModel("tied", reg=1e-3).fit(z, y, 3)
    q = queries(rng, z)
    pooled = sum(np.cov(z[y == c].T, bias=True) * (y == c).sum() for c in (0, 2)) / len(y)
    expected = scipy.stats.multivariate_normal(z[y == 1][0], pooled + 1e-3 * np.eye(4)).logpdf(q)
    np.testing.assert_allclose(model.log_likelihood(q)[:, 1], expected, rtol=1e-9)


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("trial", range(6))
def test_singular_covariance_needs_reg(covariance, trial):
    rng = np.random.default_rng(seed_of("singular", covariance, trial))
    d = 2 + trial
    z, y = make_data(rng, d, [30, 40], spread=20.0)
    z = z * 10.0 ** rng.uniform(-2, 2)
    j = int(rng.integers(1, d))
    if covariance == "diag":  # diagonal covariances are singular only through a constant feature
        z[:, j] = 0.1 * 3
    else:  # a feature that is an affine function of the others
        z[:, j] = z[:, :j] @ rng.normal(size=j) + 1.7
    with pytest.raises(ValueError, match="reg"):
        GaussianClassModel(covariance, reg=0).fit(z, y, 2)
    model = GaussianClassModel(covariance).fit(z, y, 2)  # the default reg works
    q = queries(rng, z)
    assert np.isfinite(model.log_likelihood(q)).all()
    target = genlabel_target(model, q, np.zeros(len(q), np.int64), np.ones(len(q), np.int64), 0.5, num_classes=2)
    assert np.isfinite(target).all()
    np.testing.assert_allclose(target.sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_reg_zero_rejects_a_single_sample_class(covariance):
    z = np.array([[0.0, 1.0], [1.0, 0.5], [0.3, 0.2], [2.0, 2.0]])
    with pytest.raises(ValueError, match="reg.*\\[1\\]"):
        GaussianClassModel(covariance, reg=0).fit(z, np.array([0, 0, 0, 1]), 2)


def test_reg_zero_accepts_a_well_conditioned_covariance():
    rng = np.random.default_rng(3)
    z, y = make_data(rng, 3, [50, 60])
    for covariance in COVARIANCES:
        assert np.isfinite(GaussianClassModel(covariance, reg=0).fit(z, y, 2).log_likelihood(z)).all()


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_a_failed_fit_leaves_the_model_as_it_was(covariance):
    rng = np.random.default_rng(seed_of("atomic", covariance))
    z, y = make_data(rng, 3, [20, 20])
    model = GaussianClassModel(covariance, reg=0).fit(z, y, 2)
    before = model.log_likelihood(z)
    bad = z.copy()
    bad[:, 2] = 0.1 * 3 if covariance == "diag" else bad[:, 0] - bad[:, 1]
    with pytest.raises(ValueError, match="reg"), pytest.warns(RuntimeWarning, match="no"):
        model.fit(bad, y, 3)  # K = 3, class 2 empty: a warning, then the singular covariance
    assert model.num_classes == 2
    np.testing.assert_array_equal(model.log_likelihood(z), before)


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_rejected(covariance, bad):
    rng = np.random.default_rng(0)
    z, y = make_data(rng, 3, [10, 10])
    model = GaussianClassModel(covariance).fit(z, y, 2)
    broken = z.copy()
    broken[4, 1] = bad
    with pytest.raises(ValueError, match=r"^z: .*\[4\]"):
        GaussianClassModel(covariance).fit(broken, y, 2)
    with pytest.raises(ValueError, match=r"^z: "):
        model.log_likelihood(broken)
    with pytest.raises(ValueError, match=r"^z_mix: "):
        genlabel_target(model, broken, y, y, 0.5, num_classes=2)


def test_bad_labels_and_shapes_are_rejected():
    rng = np.random.default_rng(0)
    z, y = make_data(rng, 3, [10, 10])
    model = GaussianClassModel().fit(z, y, 2)
    for labels in (np.where(y == 1, 2, y), np.where(y == 1, -1, y)):
        with pytest.raises(ValueError, match=r"^y: .*\[0, 2\)"):
            GaussianClassModel().fit(z, labels, 2)
    with pytest.raises(ValueError, match="^y: "):
        GaussianClassModel().fit(z, y[:-1], 2)
    with pytest.raises(TypeError, match="^y: "):
        GaussianClassModel().fit(z, y.astype(np.float32), 2)
    with pytest.raises(ValueError, match="^z: "):
        GaussianClassModel().fit(z[:, 0], y, 2)
    with pytest.raises(ValueError, match="^z: "):
        GaussianClassModel().fit(np.zeros((20, 0)), y, 2)
    with pytest.raises(TypeError, match="^z: "):
        GaussianClassModel().fit(z.astype(np.int64), y, 2)
    with pytest.raises(ValueError, match="^num_classes: "):
        GaussianClassModel().fit(z, y, 0)
    with pytest.raises(ValueError, match=r"^z: .*3 features"):
        model.log_likelihood(z[:, :2])
    with pytest.raises(NotFittedError):
        GaussianClassModel().log_likelihood(z)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"covariance": "spherical"}, "covariance"), ({"reg": -1e-3}, "reg"), ({"reg": float("nan")}, "reg"),
     ({"reg": float("inf")}, "reg"), ({"prior": "learned"}, "prior")],
)
def test_constructor_validates(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GaussianClassModel(**kwargs)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_far_points_in_high_dimension_stay_finite_and_exact(covariance):
    rng = np.random.default_rng(seed_of("far", covariance))
    d, k = 100, 3
    z, y = make_data(rng, d, [150, 120, 130], spread=30.0)
    model = GaussianClassModel(covariance).fit(z, y, k)
    q = np.concatenate([queries(rng, z, 10), 40 * rng.normal(size=(5, d))])
    ll = model.log_likelihood(q)
    assert np.isfinite(ll).all() and (ll.max(1) < -700).any()  # exp() of these underflows
    expected = scipy_log_likelihood(z, y, k, q, covariance, 1e-4)
    np.testing.assert_allclose(ll, expected, rtol=1e-8)
    target = genlabel_target(model, q, np.zeros(len(q), np.int64), np.ones(len(q), np.int64), 0.3,
                             num_classes=k)
    np.testing.assert_allclose(target, scipy.special.softmax(expected, axis=1), rtol=1e-6, atol=1e-9)


TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_low_precision_inputs_are_fitted_in_float64(dtype, covariance):
    rng = np.random.default_rng(1)
    z, y = make_data(rng, 3, [20, 30])
    zt = torch.from_numpy(z).to(dtype)
    model = GaussianClassModel(covariance).fit(zt, torch.from_numpy(y), 2)
    reference = GaussianClassModel(covariance).fit(zt.double().numpy(), y, 2)
    out = model.log_likelihood(zt)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_array_equal(out.numpy(), reference.log_likelihood(zt.double().numpy()))
    as_numpy = model.log_likelihood(zt.double().numpy())
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float64
    assert isinstance(model.log_joint(zt), torch.Tensor) and isinstance(model.log_joint(z), np.ndarray)


def test_repr_and_empty_queries():
    rng = np.random.default_rng(2)
    z, y = make_data(rng, 2, [5, 5])
    model = GaussianClassModel("diag", reg=0.01)
    assert "diag" in repr(model)
    model.fit(z, y, 2)
    assert "num_classes=2" in repr(model) and "dim=2" in repr(model)
    assert model.log_likelihood(np.zeros((0, 2))).shape == (0, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every class has samples
        GaussianClassModel().fit(z, y, 2)


@pytest.mark.parametrize("reg", ["abc", None, True, float("nan"), -1.0])
def test_bad_reg_names_the_argument(reg):
    with pytest.raises(ValueError, match="reg"):
        GaussianClassModel(reg=reg)


def test_overflowing_or_ill_scaled_features_are_named():
    """Features beyond float64's squares name z; a covariance reg cannot regularise says so."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="z: the variances"):
        GaussianClassModel("diag").fit(rng.normal(size=(40, 3)) * 1e160, np.arange(40) % 2, 2)
    with pytest.raises(ValueError, match="singular even with reg"):
        GaussianClassModel("full").fit(rng.normal(size=(6, 8)) * 1e7, np.arange(6) % 2, 2)


def test_a_full_covariance_too_large_for_memory_is_refused_up_front():
    """K = 1000 classes of d = 20000 features: (K, d, d) float64 statistics of 3.2 TB. Refused
    before anything is allocated, naming K, d, the covariance kind, the bytes and the alternatives
    (a raw allocator error before)."""
    from fastgenlabel.fit import StreamingFit

    z, y = np.zeros((2, 20_000), np.float32), np.array([0, 1])
    message = "covariance='full': K = 1000 classes and d = 20000 features need (K, d, d) float64 statistics of 3.2 TB"
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        GaussianClassModel("full").fit(z, y, 1000)
    assert "use covariance='diag' (K d values) or 'tied' (one d x d matrix), or fewer features d" in str(info.value)
    with pytest.raises(ValueError, match=re.escape(message)):
        StreamingFit(GaussianClassModel("full"), 1000).update(z, y).result()
    with pytest.raises(ValueError, match=re.escape(message)):
        GaussianClassModel("full").check_memory(1000, 20_000, "cpu")
    GaussianClassModel("diag").check_memory(1000, 20_000, "cpu")  # 160 MB: fine
