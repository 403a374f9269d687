"""KDEClassModel against scipy.stats.gaussian_kde; capped and uncapped merging; edge cases."""
import zlib

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from fastgenlabel import GaussianClassModel, KDEClassModel, genlabel_target
from fastgenlabel.models import KDEStats
from fastgenlabel.models.kde import JITTER, SINGULAR_TOL

# Our kernel covariance is scipy's, h^2 S, for a non-singular S: float64 rounding apart.
RTOL, ATOL = 1e-9, 1e-9


def seed_of(*params) -> int:
    return zlib.crc32(repr(params).encode())


def make_data(rng, d, sizes, spread=3.0):
    """Classes with their own mean and a well-conditioned random shape, in random order."""
    zs, ys = [], []
    for c, n in enumerate(sizes):
        a = np.linalg.qr(rng.normal(size=(d, d)))[0] * rng.uniform(0.5, 2.0, size=d)
        zs.append(rng.normal(size=(n, d)) @ a + spread * rng.normal(size=d))
        ys.append(np.full(n, c))
    z, y = np.concatenate(zs), np.concatenate(ys)
    order = rng.permutation(len(y))
    return z[order], y[order]


def queries(rng, z, n=20):
    i, j = rng.integers(0, len(z), size=(2, n))
    lam = rng.uniform(size=(n, 1))
    return np.concatenate([z[i[:5]], lam * z[i] + (1 - lam) * z[j], 2 * z[j[:5]]])


def pooled_scale(z, y):
    """tr(S_pool) / d of the pooled within-class covariance of the classes with two or more points (1 if zero)."""
    scatter, dof = 0.0, 0
    for c in np.unique(y):
        x = z[y == c]
        if len(x) >= 2:
            scatter, dof = scatter + np.trace(np.cov(x.T).reshape(z.shape[1], -1)) * (len(x) - 1), dof + len(x) - 1
    return scatter / dof / z.shape[1] if dof and scatter else 1.0


def regularised(cov, scale):
    """The documented kernel shape: S itself, or S + 1e-8 scale I where S is singular (scale: the pooled one)."""
    d = cov.shape[0]
    try:
        chol = np.linalg.cholesky(cov)
        if (np.diag(chol) ** 2 / np.diag(cov) > SINGULAR_TOL).all():
            return cov
    except np.linalg.LinAlgError:
        pass
    return cov + JITTER * scale * np.eye(d)


def manual_kde_logpdf(x, q, factor, scale):
    """The documented kernel h^2 S (regularised where S is singular), from scipy's multivariate
    normal (works for n <= d)."""
    n, d = x.shape
    cov = factor ** 2 * regularised(np.cov(x.T).reshape(d, d), scale)
    diffs = (q[:, None, :] - x[None, :, :]).reshape(-1, d)
    parts = scipy.stats.multivariate_normal(np.zeros(d), cov).logpdf(diffs).reshape(len(q), n)
    return scipy.special.logsumexp(parts, axis=1) - np.log(n)


@pytest.mark.parametrize("bandwidth", ["scott", "silverman", 0.3])
@pytest.mark.parametrize("d", [1, 2, 5, 20])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_log_likelihood_matches_scipy_gaussian_kde(bandwidth, d, k):
    rng = np.random.default_rng(seed_of(bandwidth, d, k))
    # Unequal sizes, above d: scipy refuses singular class covariances (test_near_singular_classes
    # checks those against the formula itself).
    sizes = rng.integers(2 * d + 2, 3 * d + 30, size=k)
    z, y = make_data(rng, d, sizes)
    model = KDEClassModel(bandwidth).fit(z, y, k)
    q = queries(rng, z)
    expected = np.stack([scipy.stats.gaussian_kde(z[y == c].T, bw_method=bandwidth).logpdf(q.T)
                         for c in range(k)], axis=1)
    np.testing.assert_allclose(model.log_likelihood(q), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bandwidth", ["scott", "silverman", 0.5])
@pytest.mark.parametrize("d, sizes", [(5, [3, 4, 7]), (20, [6, 21, 9, 23])])
def test_near_singular_classes(bandwidth, d, sizes):
    # scipy's gaussian_kde refuses n_c <= d; the jitter keeps ours defined. Compare with the formula.
    rng = np.random.default_rng(seed_of("d>n", bandwidth, d))
    z, y = make_data(rng, d, sizes)
    model = KDEClassModel(bandwidth).fit(z, y, len(sizes))
    q = queries(rng, z, 8)
    for c, n in enumerate(sizes):
        factor = model.factor(n, d)
        expected = manual_kde_logpdf(z[y == c], q, factor, pooled_scale(z, y))
        np.testing.assert_allclose(model.log_likelihood(q)[:, c], expected, rtol=1e-6)  # cond ~1e9


@pytest.mark.parametrize("n, d", [(10, 2), (100, 7)])
def test_factors(n, d):
    x = np.random.default_rng(0).normal(size=(d, n))
    assert KDEClassModel("scott").factor(n, d) == pytest.approx(scipy.stats.gaussian_kde(x).factor, rel=1e-14)
    assert KDEClassModel("silverman").factor(n, d) == pytest.approx(
        scipy.stats.gaussian_kde(x, "silverman").factor, rel=1e-14)
    assert KDEClassModel(0.25).factor(n, d) == 0.25


def test_empirical_prior():
    rng = np.random.default_rng(4)
    z, y = make_data(rng, 2, [10, 40])
    q = queries(rng, z)
    model = KDEClassModel(prior="empirical").fit(z, y, 2)
    np.testing.assert_allclose(model.log_joint(q), model.log_likelihood(q) + np.log([0.2, 0.8]), rtol=1e-12)


def split_stats(model, z, y, k, cuts):
    bounds = [0, *cuts, len(y)]
    stats = [model.compute_stats(z[a:b], y[a:b], k) for a, b in zip(bounds, bounds[1:])]
    merged = stats[0]
    for s in stats[1:]:
        merged = merged.merge(s)
    return merged


@pytest.mark.parametrize("bandwidth", ["scott", 0.4])
def test_uncapped_merge_equals_a_single_fit_exactly(bandwidth):
    rng = np.random.default_rng(seed_of("merge", bandwidth))
    z, y = make_data(rng, 3, [30, 1, 17, 25])
    model = KDEClassModel(bandwidth)
    merged = split_stats(model, z, y, 4, [10, 11, 50])
    single = KDEClassModel(bandwidth).fit(z, y, 4)
    q = queries(rng, z)
    np.testing.assert_array_equal(model.fit_stats(merged).log_likelihood(q), single.log_likelihood(q))
    np.testing.assert_array_equal(merged.count.numpy(), [30, 1, 17, 25])


@pytest.mark.parametrize("cap", [1, 4, 20, 1000])
@pytest.mark.parametrize("cuts", [[], [7], [33, 34, 80]])
def test_capped_merge_equals_capping_the_union(cap, cuts):
    rng = np.random.default_rng(seed_of("cap", cap, len(cuts)))
    sizes = [60, 3, 25, 1, 0]
    z, y = make_data(rng, 2, sizes)
    model = KDEClassModel(max_points_per_class=cap, seed=11)
    merged = split_stats(model, z, y, 5, cuts)
    union = model.compute_stats(z, y, 5)
    # The same keys for the same samples, however the data was split.
    for field in ("points", "labels", "keys", "count"):
        torch.testing.assert_close(getattr(merged, field), getattr(union, field), rtol=0, atol=0)
    np.testing.assert_array_equal(np.bincount(merged.labels.numpy(), minlength=5), np.minimum(sizes, cap))
    np.testing.assert_array_equal(merged.count.numpy(), sizes)
    # Each class keeps the samples with the smallest keys of the union.
    keys = KDEClassModel(max_points_per_class=10 ** 6, seed=11).compute_stats(z, y, 5)
    for c in range(5):
        mine = keys.keys[keys.labels == c]
        kept = np.sort(merged.keys[merged.labels == c].numpy())
        np.testing.assert_array_equal(kept, np.sort(mine.numpy())[:cap])
    with pytest.warns(RuntimeWarning, match=r"\[4\]"):
        fitted = KDEClassModel(max_points_per_class=cap, seed=11).fit_stats(merged)
    q = queries(rng, z)
    with pytest.warns(RuntimeWarning):
        single = KDEClassModel(max_points_per_class=cap, seed=11).fit(z, y, 5)
    np.testing.assert_array_equal(fitted.log_likelihood(q), single.log_likelihood(q))


def test_the_capped_sample_is_spread_over_the_data_and_seeded():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(400, 2))
    y = np.zeros(400, np.int64)
    first = KDEClassModel(max_points_per_class=40, seed=1).compute_stats(z, y, 1)
    again = KDEClassModel(max_points_per_class=40, seed=1).compute_stats(z, y, 1)
    other = KDEClassModel(max_points_per_class=40, seed=2).compute_stats(z, y, 1)
    assert torch.equal(first.points, again.points)
    assert not torch.equal(torch.sort(first.keys).values, torch.sort(other.keys).values)
    rows = {tuple(r) for r in z.tolist()}
    kept = [z.tolist().index(list(p)) for p in first.points.tolist()]
    assert all(tuple(p) in rows for p in first.points.tolist())
    assert max(kept) > 200 and min(kept) < 200  # not simply the first rows
    # Two batches of the same size keep different positions (keys do not repeat per batch).
    a = KDEClassModel(max_points_per_class=5).compute_stats(z[:200], y[:200], 1)
    b = KDEClassModel(max_points_per_class=5).compute_stats(z[200:], y[200:], 1)
    assert not torch.equal(torch.sort(a.keys).values, torch.sort(b.keys).values)


def test_merge_rejects_mismatched_statistics():
    rng = np.random.default_rng(0)
    z, y = make_data(rng, 2, [5, 5])
    stats = KDEClassModel().compute_stats(z, y, 2)
    with pytest.raises(TypeError, match="other"):
        stats.merge(object())
    with pytest.raises(ValueError, match="other"):
        stats.merge(KDEClassModel(max_points_per_class=3).compute_stats(z, y, 2))
    with pytest.raises(ValueError, match="other"):
        stats.merge(KDEClassModel().compute_stats(z, y, 3))
    with pytest.raises(ValueError, match="max_points_per_class"):
        KDEClassModel(max_points_per_class=3).fit_stats(stats)


def test_a_class_without_samples():
    rng = np.random.default_rng(6)
    z, y = make_data(rng, 3, [10, 12])
    y = np.where(y == 1, 2, y)
    with pytest.warns(RuntimeWarning, match=r"\[1\]"):
        model = KDEClassModel(prior="empirical").fit(z, y, 3)
    ll = model.log_likelihood(z)
    assert np.isneginf(ll[:, 1]).all() and np.isfinite(ll[:, [0, 2]]).all()
    target = genlabel_target(model, z, y, y[::-1], 0.5, num_classes=3)
    assert not np.isnan(target).any() and (target[:, 1] == 0).all()


def test_a_single_point_class_borrows_the_pooled_covariance():
    rng = np.random.default_rng(7)
    d = 3
    z, y = make_data(rng, d, [15, 1, 8])
    model = KDEClassModel().fit(z, y, 3)
    q = queries(rng, z)
    pooled = sum(np.cov(z[y == c].T) * ((y == c).sum() - 1) for c in (0, 2)) / (15 - 1 + 8 - 1)
    cov = 1.0 * pooled  # Scott's factor of one point is 1; the pooled covariance is not singular
    expected = scipy.stats.multivariate_normal(z[y == 1][0], cov).logpdf(q)
    ll = model.log_likelihood(q)
    assert np.isfinite(ll).all()
    np.testing.assert_allclose(ll[:, 1], expected, rtol=1e-9)


def test_only_single_point_classes_use_the_identity():
    z = np.array([[0.0, 1.0], [3.0, -1.0]])
    model = KDEClassModel(0.5).fit(z, np.array([0, 1]), 2)
    q = np.array([[0.5, 0.5], [10.0, 10.0]])
    for c in range(2):
        expected = scipy.stats.multivariate_normal(z[c], 0.25 * np.eye(2)).logpdf(q)
        np.testing.assert_allclose(model.log_likelihood(q)[:, c], expected, rtol=1e-10)


def test_duplicate_points_and_constant_features_stay_finite():
    z = np.array([[1.0, 0.3], [1.0, 0.3], [1.0, 0.3], [2.0, 0.3], [2.5, 0.3]])
    model = KDEClassModel().fit(z, np.array([0, 0, 0, 1, 1]), 2)
    ll = model.log_likelihood(np.array([[1.0, 0.3], [1.5, 0.3001]]))
    assert np.isfinite(ll).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_rejected(bad):
    rng = np.random.default_rng(0)
    z, y = make_data(rng, 2, [8, 8])
    model = KDEClassModel().fit(z, y, 2)
    broken = z.copy()
    broken[3, 0] = bad
    with pytest.raises(ValueError, match=r"^z: .*\[3\]"):
        KDEClassModel().fit(broken, y, 2)
    with pytest.raises(ValueError, match=r"^z: "):
        model.log_likelihood(broken)
    with pytest.raises(ValueError, match=r"^z_mix: "):
        genlabel_target(model, broken, y, y, 0.5, num_classes=2)
    with pytest.raises(ValueError, match=r"^y: "):
        KDEClassModel().fit(z, np.where(y == 1, 5, y), 2)
    with pytest.raises(ValueError, match=r"^z: "):
        model.log_likelihood(z[:, :1])


@pytest.mark.parametrize(
    "kwargs, name",
    [({"bandwidth": "auto"}, "bandwidth"), ({"bandwidth": 0.0}, "bandwidth"), ({"bandwidth": -1}, "bandwidth"),
     ({"bandwidth": float("nan")}, "bandwidth"), ({"bandwidth": None}, "bandwidth"),
     ({"max_points_per_class": 0}, "max_points_per_class"), ({"max_points_per_class": 2.5}, "max_points_per_class"),
     ({"max_points_per_class": True}, "max_points_per_class"), ({"prior": "flat"}, "prior"),
     ({"seed": "zero"}, "seed"), ({"seed": 1.5}, "seed")],
)
def test_constructor_validates(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KDEClassModel(**kwargs)


def test_far_points_in_high_dimension_stay_finite_and_exact():
    rng = np.random.default_rng(8)
    d = 100
    z, y = make_data(rng, d, [120, 110, 130], spread=20.0)
    model = KDEClassModel().fit(z, y, 3)
    q = np.concatenate([queries(rng, z, 6), 30 * rng.normal(size=(3, d))])
    ll = model.log_likelihood(q)
    assert np.isfinite(ll).all() and (ll.max(1) < -700).any()
    expected = np.stack([manual_kde_logpdf(z[y == c], q, model.factor((y == c).sum(), d), pooled_scale(z, y))
                         for c in range(3)], 1)
    np.testing.assert_allclose(ll, expected, rtol=1e-7)
    target = genlabel_target(model, q, np.zeros(len(q), np.int64), np.full(len(q), 2), 0.7, num_classes=3)
    np.testing.assert_allclose(target, scipy.special.softmax(expected, axis=1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs(dtype):
    rng = np.random.default_rng(9)
    z, y = make_data(rng, 2, [12, 9])
    zt = torch.from_numpy(z).to(dtype)
    model = KDEClassModel(max_points_per_class=8).fit(zt, torch.from_numpy(y), 2)
    reference = KDEClassModel(max_points_per_class=8).fit(zt.double().numpy(), y, 2)
    out = model.log_likelihood(zt)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_array_equal(out.numpy(), reference.log_likelihood(zt.double().numpy()))


def test_stats_from_arrays_are_checked():
    rng = np.random.default_rng(0)
    z, y = make_data(rng, 2, [5, 5])
    arrays = KDEClassModel().compute_stats(z, y, 2).to_numpy()
    KDEStats.from_numpy(arrays)
    for field, value in [("labels", np.where(arrays["labels"] == 1, 2, arrays["labels"])),
                         ("points", np.full_like(arrays["points"], np.nan)),
                         ("count", np.array([5.0, 0.0])), ("keys", arrays["keys"][:-1])]:
        with pytest.raises(ValueError, match="stats"):
            KDEStats.from_numpy({**arrays, field: value})


# ---- the cap's hash keys: torch on the features' device, equal to a NumPy uint64 SplitMix64 ------------

def _numpy_row_keys(z: np.ndarray, seed: int) -> np.ndarray:
    """The reference: SplitMix64 over each row's float64 bits in NumPy's (wrapping) uint64."""
    def mix(h):
        h = h + np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))

    bits = np.ascontiguousarray(z, dtype=np.float64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = mix(np.full(bits.shape[0], seed % (1 << 64), dtype=np.uint64))
        for j in range(bits.shape[1]):
            h = mix(h ^ bits[:, j])
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2 ** 63 + 5, -3])
def test_row_keys_equal_the_numpy_reference(device, seed):
    from fastgenlabel.models.kde import _row_keys

    rng = np.random.default_rng(abs(seed) % 1000)
    z = rng.standard_normal((257, 5)) * np.array([1e-300, 1.0, 1e300, 3.0, 7.5])
    z[0] = 0.0
    z[1] = -0.0
    z[2, 0] = -np.finfo(np.float64).max
    got = _row_keys(torch.from_numpy(z).to(device), seed)
    assert got.device.type == device and got.dtype == torch.float64
    want = _numpy_row_keys(z, seed)
    np.testing.assert_array_equal(got.cpu().numpy(), want)
    assert (want >= 0).all() and (want < 1).all() and len(np.unique(want)) == len(want)
    # float32 features hash their float64 value, as the fit sees them
    z32 = z[3:].astype(np.float32)
    np.testing.assert_array_equal(_row_keys(torch.from_numpy(z32).to(device), seed).cpu().numpy(),
                                  _numpy_row_keys(z32.astype(np.float64), seed))


def test_bandwidth_true_is_refused():
    with pytest.raises(ValueError, match="bandwidth"):
        KDEClassModel(bandwidth=True)


def test_an_ill_conditioned_class_far_out_matches_scipy():
    """d = 2, condition number 5e4, a query far out along the thin direction (log-density about
    -2e6): an absolute jitter (1e-8 I) moved it by hundreds of nats; scipy's kernel is h^2 S."""
    rng = np.random.default_rng(11)
    rot = np.linalg.qr(rng.normal(size=(2, 2)))[0]
    x = rng.normal(size=(50, 2)) @ np.diag([1.0, 5e4 ** -0.5]) @ rot.T
    assert 2e4 < np.linalg.cond(np.cov(x.T)) < 1e5
    q = np.stack([x.mean(0) + 5.0 * rot[:, 1], x.mean(0) + 0.01 * rot[:, 1], x[0]])
    model = KDEClassModel().fit(x, np.zeros(50, np.int64), 1)
    expected = scipy.stats.gaussian_kde(x.T).logpdf(q.T)
    assert expected[0] < -1e6
    np.testing.assert_allclose(model.log_likelihood(q)[:, 0], expected, rtol=1e-10)


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 1e4])
def test_the_kernel_does_not_depend_on_the_features_units(scale):
    """d = 4, 3 classes of 50 points, queries near the data: scipy's log-densities at every scale
    (with an absolute 1e-8 I the error grew from 2e-6 nats at unit scale to 88 at 1e-4)."""
    rng = np.random.default_rng(seed_of("units", scale))
    z, y = make_data(rng, 4, [50, 50, 50])
    z = z * scale
    q = queries(rng, z)
    model = KDEClassModel().fit(z, y, 3)
    expected = np.stack([scipy.stats.gaussian_kde(z[y == c].T).logpdf(q.T) for c in range(3)], axis=1)
    np.testing.assert_allclose(model.log_likelihood(q), expected, rtol=1e-9, atol=1e-7)


def test_a_singular_class_is_regularised_relative_to_the_datas_scale():
    """Fewer points than d + 1 (S singular): h^2 (S + 1e-8 tr(S_pool)/d I), the same shape at any
    scale, so the log-densities shift by -d log s. Rounding in S (1e-16 of its largest variance)
    is 1e-8 of the regulariser, so the far-out values (1e9 nats) agree to about 1e-8 relative."""
    rng = np.random.default_rng(12)
    z, y = make_data(rng, 5, [3, 4, 30])
    q = queries(rng, z, 8)
    base = KDEClassModel().fit(z, y, 3).log_likelihood(q)
    for s in (1e-4, 1e4):
        scaled = KDEClassModel().fit(z * s, y, 3).log_likelihood(q * s)
        np.testing.assert_allclose(scaled + 5 * np.log(s), base, rtol=1e-7, atol=1e-6)
    for c, n in enumerate([3, 4, 30]):
        expected = manual_kde_logpdf(z[y == c], q, KDEClassModel().factor(n, 5), pooled_scale(z, y))
        np.testing.assert_allclose(base[:, c], expected, rtol=1e-7)


RESCALED_KINDS = {
    # GaussianClassModel's reg is an absolute variance (the paper's): rescaled with the features'
    # variances (reg s^2), the model is the same model in other units.
    "gaussian-full": lambda s: GaussianClassModel("full", reg=1e-3 * s * s),
    "gaussian-diag": lambda s: GaussianClassModel("diag", reg=1e-3 * s * s),
    "gaussian-tied": lambda s: GaussianClassModel("tied", reg=1e-3 * s * s),
    "kde": lambda s: KDEClassModel(),
    "kde-silverman": lambda s: KDEClassModel("silverman"),
    # (A capped KDE keeps a seeded sample chosen by a hash of the features' bits: rescaled
    # features keep other points, so its targets differ as another sample's would.)
}


@pytest.mark.filterwarnings("ignore:covariance='full'")  # the 3-point class: the point of the test
@pytest.mark.parametrize("kind", sorted(RESCALED_KINDS))
def test_rescaling_the_features_leaves_the_targets_unchanged(kind):
    """z -> s z for s in 1e-4, 1, 1e4: the same GenLabel targets, from the float64 reference and
    from the float32 kernels (relabel), for every model kind. One class has fewer points than
    d + 1 (singular: the KDE's regulariser acts) and one is ill-conditioned."""
    from fastgenlabel import relabel
    from fastgenlabel.functional import MixPairs

    rng = np.random.default_rng(seed_of("rescale", kind))
    d = 4
    z, y = make_data(rng, d, [30, 3, 40], spread=0.6)
    thin = y == 2
    z[thin] = z[thin].mean(0) + (z[thin] - z[thin].mean(0)) * np.array([1.0, 1.0, 1.0, 3e-3])
    perm = rng.permutation(len(y))
    lam = rng.uniform(size=len(y))
    z_mix = lam[:, None] * z + (1 - lam[:, None]) * z[perm]
    pairs = MixPairs(torch.from_numpy(perm), torch.from_numpy(lam.astype(np.float32)))
    targets, kernel = {}, {}
    for s in (1e-4, 1.0, 1e4):
        model = RESCALED_KINDS[kind](s).fit(z * s, y, 3)
        targets[s] = genlabel_target(model, z_mix * s, y, y[perm], lam, num_classes=3)
        kernel[s] = relabel(model, torch.from_numpy((z * s).astype(np.float32)), pairs, torch.from_numpy(y),
                            num_classes=3, backend="numba-cpu").numpy()
    assert (targets[1.0].max(1) < 0.999).any()  # not all one-hot: the posteriors are tested, not saturated
    for s in (1e-4, 1e4):
        np.testing.assert_allclose(targets[s], targets[1.0], rtol=0, atol=1e-9)
        np.testing.assert_allclose(kernel[s], kernel[1.0], rtol=0, atol=1e-4)
