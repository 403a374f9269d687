"""The relabel stage (``fastgenlabel.relabel``): the numba-cpu kernels against the reference.

The reference is ``genlabel_target(model, mix(z, pairs), labels, labels[perm], lam, gamma, ...)``
(float64 model arithmetic on the float32-mixed features). The kernels compute in float32 from
float32 parameters, so they match it within a tolerance per model kind.

Tolerance table: max |kernel - reference| over all target entries (probabilities), float32 z.
Measured on this suite's data (class means ~1.5 sd apart, features offset by 3, n_c >= 30, full
covariance n_c >= 2 d) and on the larger sizes of ``bench/``, then doubled or more:

| kind | measured (worst case seen)               | ATOL  |
|------|------------------------------------------|-------|
| diag | 2e-6 (K = 1000, d = 256)                 | 1e-5  |
| tied | 1.3e-6 (K = 1000, d = 64)                | 1e-5  |
| full | 3e-7 (K = 10); 1.4e-5 (K = 1000, d = 64) | 5e-5  |
| kde  | 2e-7 (d <= 64)                           | 1e-5  |

The error is dominated by rounding the parameters (means, Cholesky factors) to float32, and grows
with the condition number of the precision matrices: the full covariance at K = 1000, d = 64 with
n_c = 2 d is the least well conditioned case here. Indices (labels, partners) are exact.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fastgenlabel as fg
from fastgenlabel.kernels import BackendError
from fastgenlabel.kernels.relabel import IMPLS, explain_relabel, params_for, relabel
from fastgenlabel.kernels.relabel import params as relabel_params
from fastgenlabel.models.base import NotFittedError

ATOL = {"diag": 1e-5, "tied": 1e-5, "full": 5e-5, "kde": 1e-5}
KINDS = ("diag", "tied", "full", "kde")


# ---- data and models ----------------------------------------------------------------------------

def make_data(rng, k, d, n_per_class, *, empty=(), offset=3.0, sep=1.5):
    """Class means ~sep apart per feature, unequal feature scales, correlated noise."""
    mu = rng.standard_normal((k, d)) * sep
    scale = 0.5 + rng.random(d)
    mix_m = np.eye(d) + rng.standard_normal((d, d)) * (0.3 / np.sqrt(d))
    y = np.arange(n_per_class * k) % k
    y = y[~np.isin(y, empty)]
    z = (mu[y] + rng.standard_normal((y.size, d)) @ mix_m) * scale + offset
    return z.astype(np.float32), y


def fit(kind, z, y, k, prior="uniform"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty classes warn by design
        if kind == "kde":
            return fg.KDEClassModel(prior=prior).fit(z, y, k)
        return fg.GaussianClassModel(kind, prior=prior).fit(z, y, k)


def per_class(kind, d):
    return max(2 * d, 30) if kind in ("full", "kde") else 30


_MODELS: dict = {}


def model_for(kind, k, d, *, prior="uniform", empty=(), seed=0):
    key = (kind, k, d, prior, tuple(empty), seed)
    if key not in _MODELS:
        rng = np.random.default_rng(seed)
        n = per_class(kind, d) if k <= 10 else (max(2 * d, 8) if kind == "full" else 8)
        z, y = make_data(rng, k, d, n, empty=empty)
        _MODELS[key] = (fit(kind, z, y, k, prior), z, y)
    return _MODELS[key]


def batch(rng, z, y, b, lam_mode, *, live=None):
    """b unmixed samples drawn near the training data, their labels and pairs."""
    idx = rng.choice(len(z), b)
    zb = np.ascontiguousarray(z[idx] + 0.1 * rng.standard_normal((b, z.shape[1])).astype(np.float32))
    labels = y[idx].astype(np.int64)
    pairs = fg.sample_pairs(b, 1.0, lam_mode=lam_mode, generator=rng)
    return zb, pairs, labels


def reference(model, z, pairs, labels, gamma, k, smoothing):
    return relabel(model, z, pairs, labels, gamma, num_classes=k, smoothing=smoothing, backend="reference")


def run_checked(model, z, pairs, labels, gamma, k, smoothing, kind, backend="numba-cpu"):
    """Run on poisoned output, check it is fully written, matches the reference and left the
    inputs alone."""
    before = (z.copy(), labels.copy(), pairs.perm.clone(), pairs.lam.clone())
    out = np.full((z.shape[0], k), np.nan, np.float32)
    got = relabel(model, z, pairs, labels, gamma, num_classes=k, smoothing=smoothing, backend=backend, out=out)
    assert got is out
    assert np.isfinite(out).all(), "output not fully written"
    want = reference(model, z, pairs, labels, gamma, k, smoothing)
    np.testing.assert_allclose(out, want, rtol=0, atol=ATOL[kind])
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(z, before[0])
    np.testing.assert_array_equal(labels, before[1])
    assert torch.equal(pairs.perm, before[2]) and torch.equal(pairs.lam, before[3])
    return out


# ---- against the reference ---------------------------------------------------------------------

CASES = [
    # (B, K, d, gamma, smoothing, lam_mode, prior, empty classes)
    pytest.param(1, 2, 2, 1.0, 0.0, "batch", "uniform", (), id="B1-K2-d2"),
    pytest.param(7, 10, 64, 0.5, 0.1, "sample", "empirical", (), id="B7-K10-d64"),
    pytest.param(33, 10, 2, 1.0, 0.0, "sample", "uniform", (3, 7), id="B33-K10-d2-empty"),
    pytest.param(5, 10, 8, 0.0, 0.2, "batch", "empirical", (), id="B5-K10-d8-gamma0"),
    pytest.param(9, 1000, 2, 0.5, 0.0, "sample", "empirical", (5,), id="B9-K1000-d2-empty"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b,k,d,gamma,eps,lam_mode,prior,empty", CASES)
def test_matches_reference(kind, b, k, d, gamma, eps, lam_mode, prior, empty):
    rng = np.random.default_rng(b * 1000 + k + d)
    model, z, y = model_for(kind, k, d, prior=prior, empty=empty)
    zb, pairs, labels = batch(rng, z, y, b, lam_mode)
    run_checked(model, zb, pairs, labels, gamma, k, eps, kind)


@pytest.mark.parametrize("kind,k,d,b", [
    pytest.param("diag", 1000, 64, 64, id="diag-K1000-d64"),
    pytest.param("tied", 1000, 64, 64, id="tied-K1000-d64"),
    pytest.param("full", 1000, 64, 17, id="full-K1000-d64"),
    pytest.param("diag", 10, 300, 31, id="diag-d300"),
    pytest.param("tied", 10, 300, 31, id="tied-d300"),
    pytest.param("full", 10, 300, 31, id="full-d300"),
])
def test_matches_reference_large(kind, k, d, b):
    rng = np.random.default_rng(k + d + b)
    model, z, y = model_for(kind, k, d, prior="empirical")
    zb, pairs, labels = batch(rng, z, y, b, "sample")
    run_checked(model, zb, pairs, labels, 0.5, k, 0.1, kind)


@pytest.mark.parametrize("form", ["always", "never"])
@pytest.mark.parametrize("k,d,b,gamma", [(2, 1, 1, 1.0), (7, 5, 9, 0.5), (10, 300, 31, 1.0), (4, 3, 5, 0.0)])
def test_numba_cpu_full_product_and_factor_forms(form, k, d, b, gamma):
    """Full covariance on the CPU: one float32 product (gemm.py, from K >= 32 and K d^2 >= 2^20 by default)
    and the factor kernel, both against the reference."""
    from fastgenlabel.kernels.relabel import gemm

    rng = np.random.default_rng(k * d + b)
    model, z, y = model_for("full", k, d, prior="empirical", empty=(1,) if k > 2 else ())
    zb, pairs, labels = batch(rng, z, y, b, "sample")
    with gemm.policy(form):
        run_checked(model, zb, pairs, labels, gamma, k, 0.05, "full")


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_random_inputs(kind):
    """Several fresh draws per kind, gamma in {0, 0.5, 1}, both lambda modes."""
    rng = np.random.default_rng()  # fresh entropy on purpose; the seed is in the message on failure
    seed = int(rng.integers(1 << 31))
    rng = np.random.default_rng(seed)
    k, d = int(rng.integers(2, 12)), int(rng.integers(1, 12))
    model, z, y = model_for(kind, k, d, prior=str(rng.choice(["uniform", "empirical"])), seed=seed)
    for gamma in (0.0, 0.5, 1.0):
        zb, pairs, labels = batch(rng, z, y, int(rng.integers(1, 20)), str(rng.choice(["batch", "sample"])))
        try:
            run_checked(model, zb, pairs, labels, gamma, k, float(rng.choice([0.0, 0.1])), kind)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, K={k}, d={d}, gamma={gamma}: {e}") from None


def test_non_triangular_precision_factor():
    """Any factor with Sigma^-1 = F F^T works (the kernels then run full, not triangular, loops)."""
    rng = np.random.default_rng(3)
    z, y = make_data(rng, 4, 5, 30)
    model = fit("full", z, y, 4)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    model.precision_chol = model.precision_chol @ torch.from_numpy(q)  # F Q (F Q)^T = F F^T
    assert not relabel_params.pack(model).tri
    zb, pairs, labels = batch(rng, z, y, 6, "sample")
    run_checked(model, zb, pairs, labels, 0.7, 4, 0.0, "full")


# ---- semantics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_empty_classes_get_exactly_zero(kind):
    model, z, y = model_for(kind, 6, 3, empty=(1, 4))
    rng = np.random.default_rng(1)
    zb, pairs, labels = batch(rng, z, y, 8, "sample")
    out = relabel(model, zb, pairs, labels, 1.0, num_classes=6, backend="numba-cpu")
    assert (out[:, [1, 4]] == 0).all()
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-6)


def test_lambda_one_is_genlabel_of_the_sample():
    model, z, y = model_for("diag", 5, 4)
    zb = z[:6].copy()
    pairs = fg.MixPairs(torch.tensor([5, 4, 3, 2, 1, 0]), torch.ones(6))
    got = relabel(model, zb, pairs, y[:6], 1.0, num_classes=5, backend="numba-cpu")
    want = fg.genlabel_posterior(model.log_joint(zb.astype(np.float64)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_identical_class_models_give_the_prior():
    """Every class fitted on the same points (class 0 on them twice): y_gen is the prior."""
    base = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    z = np.concatenate([base] * 4)
    y = np.repeat([0, 0, 1, 2], 40)  # empirical prior 1/2, 1/4, 1/4
    for kind in ("diag", "tied", "full"):
        model = fit(kind, z, y, 3, prior="empirical")
        rng = np.random.default_rng(0)
        zb, pairs, labels = batch(rng, z, y, 5, "sample")
        got = relabel(model, zb, pairs, labels, 1.0, num_classes=3, backend="numba-cpu")
        np.testing.assert_allclose(got, np.tile([0.5, 0.25, 0.25], (5, 1)), atol=1e-5)


@pytest.mark.parametrize("kind", ["full", "diag", "tied"])
@pytest.mark.parametrize("scale", [1e19, 1e30, 3e38])
def test_huge_features_never_give_nan(kind, scale):
    """float32 overflow of the log-likelihoods, downwards (full, diag: -inf, the mixup label) or
    upwards (tied: +inf, shared among those classes), never gives NaN."""
    model, z, y = model_for(kind, 3, 2)
    zb = np.array([[scale, -scale], [0.3 * scale, scale]], np.float32)
    pairs = fg.MixPairs(torch.tensor([1, 0]), torch.tensor([0.3, 1.0]))
    out = relabel(model, zb, pairs, np.array([0, 2]), 0.5, num_classes=3, backend="numba-cpu")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-6)


def test_torch_cpu_tensors_in_torch_out():
    model, z, y = model_for("tied", 5, 4)
    rng = np.random.default_rng(2)
    zb, pairs, labels = batch(rng, z, y, 6, "sample")
    got = relabel(model, torch.from_numpy(zb), pairs, torch.from_numpy(labels).to(torch.int32), 0.5,
                  num_classes=5, backend="numba-cpu")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == (6, 5)
    want = relabel(model, zb, pairs, labels, 0.5, num_classes=5, backend="numba-cpu")
    np.testing.assert_array_equal(got.numpy(), want)
    out = torch.full((6, 5), float("nan"))
    assert relabel(model, torch.from_numpy(zb), pairs, torch.from_numpy(labels), 0.5, num_classes=5, out=out) is out
    np.testing.assert_array_equal(out.numpy(), want)


def test_empty_batch_and_validate_false():
    model, z, y = model_for("diag", 3, 2)
    pairs = fg.sample_pairs(0)
    out = relabel(model, z[:0], pairs, y[:0], num_classes=3, backend="numba-cpu")
    assert out.shape == (0, 3) and out.dtype == np.float32
    rng = np.random.default_rng(0)
    zb, pairs, labels = batch(rng, z, y, 4, "sample")
    np.testing.assert_array_equal(
        relabel(model, zb, pairs, labels, num_classes=3, validate=False),
        relabel(model, zb, pairs, labels, num_classes=3))


# ---- backends and refusals ---------------------------------------------------------------------

def test_auto_prefers_numba_cpu_and_falls_back_with_reasons():
    model, z, y = model_for("diag", 3, 2)
    rng = np.random.default_rng(0)
    zb, pairs, labels = batch(rng, z, y, 4, "sample")
    verdicts = explain_relabel(model, zb, pairs, labels, num_classes=3)
    assert [impl.name for impl in IMPLS] == ["numba-cuda", "numba-cpu", "reference"]
    assert "device" in verdicts["numba-cuda"] and verdicts["numba-cpu"] is None
    v64 = explain_relabel(model, zb.astype(np.float64), pairs, labels, num_classes=3)
    assert "dtype" in v64["numba-cpu"] and "float64" in v64["numba-cpu"]
    strided = np.asfortranarray(zb)
    assert "contiguity" in explain_relabel(model, strided, pairs, labels, num_classes=3)["numba-cpu"]
    # auto falls back to the reference and still returns float32
    got = relabel(model, strided.astype(np.float64), pairs, labels, num_classes=3)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, relabel(model, zb, pairs, labels, num_classes=3), atol=1e-5)
    with pytest.raises(BackendError, match=r"numba-cpu: dtype"):
        relabel(model, zb.astype(np.float64), pairs, labels, num_classes=3, backend="numba-cpu")
    with pytest.raises(BackendError, match=r"numba-cuda: device"):
        relabel(model, zb, pairs, labels, num_classes=3, backend="numba-cuda")
    with pytest.raises(ValueError, match="backend"):
        relabel(model, zb, pairs, labels, num_classes=3, backend="cuda")


def test_unsupported_model_kind_runs_on_the_reference():
    class Wrapped(fg.GaussianClassModel):
        kind = "wrapped-gaussian"

    rng = np.random.default_rng(0)
    z, y = make_data(rng, 3, 2, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Wrapped("diag").fit(z, y, 3)
    zb, pairs, labels = batch(rng, z, y, 4, "sample")
    why = explain_relabel(model, zb, pairs, labels, num_classes=3)["numba-cpu"]
    assert why.startswith("model:") and "Wrapped" in why
    np.testing.assert_array_equal(relabel(model, zb, pairs, labels, num_classes=3),
                                  reference(model, zb, pairs, labels, 1.0, 3, 0.0))


# ---- bad inputs: clear errors naming the argument ------------------------------------------------

def _args():
    model, z, y = model_for("diag", 3, 2)
    rng = np.random.default_rng(0)
    zb, pairs, labels = batch(rng, z, y, 4, "sample")
    return dict(model=model, z=zb, pairs=pairs, labels=labels, gamma=0.5, num_classes=3)


BAD = [
    ("z", lambda a: a["z"].astype(np.int32), TypeError),
    ("z", lambda a: a["z"][:, :1].copy(), ValueError),
    ("z", lambda a: a["z"][None], ValueError),
    ("z", lambda a: np.where(np.arange(4)[:, None] == 2, np.inf, a["z"]).astype(np.float32), ValueError),
    ("z", lambda a: np.where(np.arange(4)[:, None] == 1, np.nan, a["z"]).astype(np.float32), ValueError),
    ("labels", lambda a: a["labels"].astype(np.float32), TypeError),
    ("labels", lambda a: a["labels"][:3], ValueError),
    ("labels", lambda a: np.array([0, 1, 3, 0]), ValueError),
    ("labels", lambda a: np.array([0, -1, 2, 0]), ValueError),
    ("labels", lambda a: torch.zeros(4, dtype=torch.int64, device="meta"), ValueError),
    ("pairs", lambda a: fg.sample_pairs(5), ValueError),
    ("pairs", lambda a: (a["pairs"].perm, a["pairs"].lam), TypeError),
    ("gamma", lambda a: 1.5, ValueError),
    ("gamma", lambda a: -0.1, ValueError),
    ("smoothing", lambda a: 2.0, ValueError),
    ("num_classes", lambda a: 4, ValueError),
    ("num_classes", lambda a: 0, ValueError),
    ("out", lambda a: np.empty((4, 4), np.float32), ValueError),
    ("out", lambda a: np.empty((4, 3), np.float64), TypeError),
    ("out", lambda a: torch.empty((4, 3)), TypeError),
    ("model", lambda a: object(), TypeError),
    ("model", lambda a: fg.GaussianClassModel, TypeError),  # the class, not a fitted model
    ("gamma", lambda a: True, ValueError),
    ("gamma", lambda a: np.True_, ValueError),
    ("gamma", lambda a: "0.5", ValueError),
    ("smoothing", lambda a: "1e-1", ValueError),
    ("pairs", lambda a: _changed(a["pairs"], "perm", 0, 7), ValueError),  # written after sample_pairs:
    ("pairs", lambda a: _changed(a["pairs"], "lam", 1, float("nan")), ValueError),  # read out of bounds, NaN
]


def _changed(pairs, field, i, value):
    moved = pairs.to("cpu")
    t = getattr(moved, field).clone()
    t[i] = value
    object.__setattr__(moved, field, t)
    return moved


@pytest.mark.parametrize("name,bad,exc", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_inputs_name_the_argument(name, bad, exc):
    a = _args()
    a[name] = bad(a)
    with pytest.raises(exc, match=f"^{name}"):
        relabel(a.pop("model"), a.pop("z"), a.pop("pairs"), a.pop("labels"), **a)


@pytest.mark.parametrize("alias", ["z", "labels"])
@pytest.mark.parametrize("as_torch", [False, True])
def test_out_that_overlaps_an_input_is_refused(alias, as_torch):
    """The kernels read z and labels while they write out (the product form reads z after writing
    its scores): an out sharing their memory would give wrong targets, so it is refused."""
    a = _args()
    base = np.zeros(64, np.float32 if alias == "z" else np.int64)
    if alias == "z":
        base[:8] = a["z"].ravel()
        a["z"] = base[:8].reshape(4, 2)
        out = base[4:16].reshape(4, 3)
    else:
        base[:4] = a["labels"]
        a["labels"] = base[:4]
        out = base.view(np.float32)[:12].reshape(4, 3)
    if as_torch:
        a = {**a, "z": torch.from_numpy(a["z"]), "labels": torch.from_numpy(a["labels"])}
        out = torch.from_numpy(out)
    with pytest.raises(ValueError, match=f"^out: overlaps {alias}"):
        relabel(a.pop("model"), a.pop("z"), a.pop("pairs"), a.pop("labels"), out=out, **a)


def test_pairs_written_after_sampling_are_refused_without_validate_too():
    """On the CPU the pairs' check is cheap, so validate=False keeps it: never an out-of-bounds read."""
    a = _args()
    pairs = _changed(a["pairs"], "perm", 0, 10_000_000)
    with pytest.raises(ValueError, match="^pairs: perm must lie in"):
        relabel(a["model"], a["z"], pairs, a["labels"], num_classes=3, validate=False)


def test_out_that_requires_grad_is_refused():
    a = _args()
    a = {**a, "z": torch.from_numpy(a["z"]), "labels": torch.from_numpy(a["labels"])}
    with pytest.raises(ValueError, match="^out: must not require grad"):
        relabel(a.pop("model"), a.pop("z"), a.pop("pairs"), a.pop("labels"), out=torch.empty(4, 3, requires_grad=True),
                **a)


def test_unfitted_model():
    a = _args()
    with pytest.raises(NotFittedError):
        relabel(fg.GaussianClassModel("diag"), a["z"], a["pairs"], a["labels"], num_classes=3)


# ---- parameters: packed once, refits never recompile --------------------------------------------

def test_params_cached_until_refit_and_refit_does_not_recompile(monkeypatch):
    from fastgenlabel.kernels.relabel import cpu

    rng = np.random.default_rng(5)
    z, y = make_data(rng, 4, 3, 30)
    model = fit("diag", z, y, 4)
    zb, pairs, labels = batch(rng, z, y, 5, "sample")
    relabel(model, zb, pairs, labels, num_classes=4, backend="numba-cpu")
    calls = []
    real_pack = relabel_params.pack
    monkeypatch.setattr(relabel_params, "pack", lambda m: calls.append(1) or real_pack(m))
    p1 = params_for(model)
    relabel(model, zb, pairs, labels, num_classes=4, backend="numba-cpu")
    assert params_for(model) is p1 and not calls
    signatures = len(cpu.diag_scores.signatures), len(cpu.finish.signatures)
    z2, y2 = make_data(rng, 4, 3, 25)
    model.fit(z2, y2, 4)  # new parameters, same shapes
    p2 = params_for(model)
    assert p2 is not p1 and len(calls) == 1
    run_checked(model, zb, pairs, labels, 1.0, 4, 0.0, "diag")
    model.prior = "empirical"  # reconfigured: repacked
    assert params_for(model) is not p2
    assert (len(cpu.diag_scores.signatures), len(cpu.finish.signatures)) == signatures


def test_tied_scores_are_whitened_distances():
    """What the tied kernels compute: y = (z - m) L, -1/2 ||y - t_c||^2 + bias gives the model's
    posterior, and whitening commutes with mixing."""
    model, z, y = model_for("tied", 6, 5)
    p = params_for(model)
    a = {n: p.arrays[n].astype(np.float64) for n in ("center", "chol", "mu_t", "bias")}
    zz = z[:8].astype(np.float64)
    yy = (zz - a["center"]) @ a["chol"]
    s = -0.5 * ((yy[:, :, None] - a["mu_t"][None]) ** 2).sum(1) + a["bias"]
    post = torch.softmax(torch.from_numpy(s), 1).numpy()
    np.testing.assert_allclose(post, fg.genlabel_posterior(model.log_joint(zz)), atol=1e-5)
    lam = 0.3
    zm = lam * zz[:4] + (1 - lam) * zz[4:]
    np.testing.assert_allclose((zm - a["center"]) @ a["chol"], lam * yy[:4] + (1 - lam) * yy[4:], atol=1e-9)
    assert (p.arrays["istd_t"] == 1).all()


def far_clusters(kind, k, d, spread, seed=0):
    """Two groups of close classes, +-spread standard deviations from the overall mean along one
    axis, and a batch from one group: its targets are not saturated (several classes share the
    mass), but an expansion around the overall mean cancels terms of size ~spread^2."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 0.15
    centers[:, 0] += np.where(np.arange(k) < k // 2, spread, -spread)
    y = np.repeat(np.arange(k), 8 * d if kind == "full" else 20 * d // k + 10)  # full: d^2 parameters a class
    z = (centers[y] + rng.normal(size=(len(y), d))).astype(np.float32)
    model = fit(kind, z, y, k)
    idx = rng.integers(0, len(y) // 2, 64)
    return model, np.ascontiguousarray(z[idx]), y[idx], fg.sample_pairs(64, 1.0, generator=1)


@pytest.mark.parametrize("kind", ["tied", "diag", "full", "full-product"])
@pytest.mark.parametrize("spread", [100.0, 1000.0])
def test_classes_far_from_the_overall_mean_keep_float32_accuracy(kind, spread):
    """The tied kernels' former affine form (and the unrefined full-covariance
    product form, see tests/test_relabel_gemm.py) lost 3e-3 to 0.2 of the targets here."""
    from fastgenlabel.kernels.relabel import gemm

    model, zb, labels, pairs = far_clusters(kind.split("-")[0], 32, 48, spread)
    want = relabel(model, zb, pairs, labels, 1.0, num_classes=32, backend="reference")
    assert want.max(1).mean() < 0.99  # not saturated: the digits that matter are the small ones
    with gemm.policy("always" if kind == "full-product" else "auto"):
        got = relabel(model, zb, pairs, labels, 1.0, num_classes=32, backend="numba-cpu")
    atol = ATOL[kind.split("-")[0]]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 if spread > 100 else atol)


def dead_feature(kind, fire, seed=0):
    """Three classes 1 sd apart along feature 0 and a feature that is 0 throughout training (a dead
    unit: its variance is the regulariser's) but fires in the batch: the same huge term, up to
    fire^2 / 2e-4 nats, in every class's score, which the posterior does not depend on."""
    rng = np.random.default_rng(seed)
    k, d, n = 3, 6, 200
    mu = np.zeros((k, d))
    mu[:, 0] = [-1.0, 0.0, 1.0]
    y = np.repeat(np.arange(k), n)
    z = (mu[y] + rng.standard_normal((k * n, d))).astype(np.float32)
    z[:, -1] = 0.0
    idx = rng.choice(len(z), 16)
    zb = np.ascontiguousarray(z[idx])
    zb[:, -1] = fire * rng.random(16).astype(np.float32)
    return fit(kind, z, y, k), zb, y[idx], fg.sample_pairs(16, 1.0, lam_mode="sample", generator=seed)


@pytest.mark.parametrize("kind", ["diag", "tied", "full", "full-product", "kde"])
@pytest.mark.parametrize("fire", [3.0, 30.0])
def test_a_huge_score_shared_by_every_class_keeps_float32_accuracy(kind, fire):
    """A feature far out for every class: the scores were stored in float32 before their row's largest was
    subtracted (and the diag sums kept in float32 chunks), which lost 2e-4 (fire 3) to 0.11 (fire
    30) of the targets. The kernels now form logits in float64 and store them relative to the row's
    largest."""
    from fastgenlabel.kernels.relabel import gemm

    model, zb, labels, pairs = dead_feature(kind.split("-")[0], fire)
    want = relabel(model, zb, pairs, labels, 1.0, num_classes=3, backend="reference")
    assert want.max(1).min() < 0.9  # not saturated
    with gemm.policy("always" if kind == "full-product" else "auto"):
        got = relabel(model, zb, pairs, labels, 1.0, num_classes=3, backend="numba-cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL[kind.split("-")[0]])


def test_nothing_compiles_or_touches_a_gpu_at_import():
    import subprocess
    import sys

    code = ("import sys, fastgenlabel as fg; fg.relabel; "
            "assert 'fastgenlabel.kernels.relabel.cuda' not in sys.modules; "
            "assert 'fastgenlabel.kernels.relabel.cpu' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- CUDA (real device only; the kernels themselves run under the simulator in tests/cudasim) ---

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda_only
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b,k,d", [(1, 2, 2), (37, 10, 64), (64, 1000, 64)])
def test_numba_cuda_matches_reference(kind, b, k, d):
    if kind == "kde" and k > 10:
        pytest.skip("KDE at K=1000 is slow on the reference")
    rng = np.random.default_rng(b + k + d)
    model, z, y = model_for(kind, k, d, prior="empirical", empty=(1,))
    zb, pairs, labels = batch(rng, z, y, b, "sample")
    dev = torch.device("cuda")
    zt, lt, pt = torch.from_numpy(zb).to(dev), torch.from_numpy(labels).to(dev), pairs.to(dev)
    zt_before = zt.clone()
    out = torch.full((b, k), float("nan"), device=dev)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = relabel(model, zt, pt, lt, 0.5, num_classes=k, smoothing=0.1, backend="numba-cuda", out=out)
    stream.synchronize()
    assert got is out and torch.isfinite(out).all()
    want = reference(model, zb, pairs, labels, 0.5, k, 0.1)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=0, atol=ATOL[kind])
    assert torch.equal(zt, zt_before)
    assert explain_relabel(model, zt, pt, lt, num_classes=k)["numba-cpu"].startswith("device")


@cuda_only
@pytest.mark.parametrize("form", ["always", "never"])
@pytest.mark.parametrize("b,k,d", [(1, 2, 2), (37, 10, 64), (64, 1000, 64), (256, 100, 256)])
def test_numba_cuda_full_product_and_factor_forms(form, b, k, d):
    """Full covariance on the GPU by the split-TF32 product (gemm.py) and by the factor kernel."""
    from fastgenlabel.kernels.relabel import gemm

    rng = np.random.default_rng(b + k + d)
    model, z, y = model_for("full", k, d, prior="empirical", empty=(1,))
    zb, pairs, labels = batch(rng, z, y, b, "sample")
    dev = torch.device("cuda")
    zt, lt, pt = torch.from_numpy(zb).to(dev), torch.from_numpy(labels).to(dev), pairs.to(dev)
    out = torch.full((b, k), float("nan"), device=dev)
    stream = torch.cuda.Stream()
    with gemm.policy(form), torch.cuda.stream(stream):
        relabel(model, zt, pt, lt, 0.8, num_classes=k, smoothing=0.05, backend="numba-cuda", out=out)
    stream.synchronize()
    assert torch.isfinite(out).all()
    want = reference(model, zb, pairs, labels, 0.8, k, 0.05)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=0, atol=ATOL["full"])


@cuda_only
@pytest.mark.parametrize("form", ["always", "never"])
@pytest.mark.parametrize("spread", [30.0, 1000.0])
def test_numba_cuda_full_far_from_the_mean(form, spread):
    """Classes far from the overall mean on the GPU: the split-TF32 product, refined by
    ``refine_finish``, matches the reference as the factor kernel does."""
    from fastgenlabel.kernels.relabel import gemm

    model, zb, labels, pairs = far_clusters("full", 32, 96, spread)
    dev = torch.device("cuda")
    out = torch.full((len(zb), 32), float("nan"), device=dev)
    with gemm.policy(form):
        relabel(model, torch.from_numpy(zb).to(dev), pairs.to(dev), torch.from_numpy(labels).to(dev), 1.0,
                num_classes=32, backend="numba-cuda", out=out)
    want = relabel(model, zb, pairs, labels, 1.0, num_classes=32, backend="reference")
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=0, atol=2e-4 if spread > 100 else ATOL["full"])


def test_version_lookups_are_cached(monkeypatch):
    """The CUDA paths ask for package versions on every call; each lookup parses metadata files
    (~0.35 ms, most of a 3 ms relabel call on the H200 before the cache)."""
    import importlib.metadata

    from fastgenlabel.kernels import compat
    from fastgenlabel.kernels._interop import cuda_modules

    cuda_modules()  # numba.cuda's own import looks versions up once
    compat._version.cache_clear()
    compat.numba_cuda_status.cache_clear()
    calls = []
    real = importlib.metadata.version
    monkeypatch.setattr(compat.metadata, "version", lambda dist: calls.append(dist) or real(dist))
    for _ in range(20):
        compat.numba_cuda_status()
        cuda_modules()
    assert sorted(set(calls)) == sorted(calls) and len(calls) <= 2, calls  # each name at most once


@cuda_only
def test_numba_cuda_reused_memory_gets_fresh_results():
    """Views are cached per (pointer, layout): a new batch in memory the caching allocator hands
    out again must be read afresh, never a stale result."""
    rng = np.random.default_rng(7)
    model, z, y = model_for("diag", 10, 16, prior="empirical")
    dev = torch.device("cuda")
    for _ in range(4):
        zb, pairs, labels = batch(rng, z, y, 32, "sample")
        zt, lt, pt = torch.from_numpy(zb).to(dev), torch.from_numpy(labels).to(dev), pairs.to(dev)
        got = relabel(model, zt, pt, lt, 0.7, num_classes=10, backend="numba-cuda").cpu().numpy()
        np.testing.assert_allclose(got, reference(model, zb, pairs, labels, 0.7, 10, 0.0), rtol=0, atol=ATOL["diag"])
        del zt, lt, pt


@cuda_only
@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_numba_cuda_fused_kernel_over_many_class_tiles_and_streams(kind):
    """diag_fused with K = 1000 (8 class tiles of 128 per sample tile, the last block of each
    tile finishing it): calls back to back on two streams and growing batches reuse and grow the
    per-stream counters; every result equals the reference."""
    import importlib

    relabel_module = importlib.import_module("fastgenlabel.kernels.relabel")
    rng = np.random.default_rng(11)
    model, z, y = model_for(kind, 1000, 16, prior="empirical", empty=(3,))
    dev = torch.device("cuda")
    streams = [torch.cuda.current_stream(), torch.cuda.Stream()]
    runs = []
    for i, b in enumerate([8, 300, 1, 256, 513, 64]):
        zb, pairs, labels = batch(rng, z, y, b, "sample")
        zt, lt, pt = torch.from_numpy(zb).to(dev), torch.from_numpy(labels).to(dev), pairs.to(dev)
        stream = streams[i % 2]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = relabel(model, zt, pt, lt, 0.9, num_classes=1000, smoothing=0.02, backend="numba-cuda")
        runs.append((out, stream, zt, lt, pt, reference(model, zb, pairs, labels, 0.9, 1000, 0.02)))
    for out, stream, *_keep, want in runs:
        stream.synchronize()
        np.testing.assert_allclose(out.cpu().numpy(), want, rtol=0, atol=ATOL[kind])
    for counters, _view in relabel_module._COUNTERS.values():
        assert int(counters.count_nonzero()) == 0
