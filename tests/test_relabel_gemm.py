"""The full-covariance product form (``kernels/relabel/gemm.py``) against the factor form.

The CUDA path computes full-covariance scores as ``phi @ W^T`` with split-TF32 operands. Here the
same code runs on CPU tensors (plain float32 products); the TF32 rounding of the tensor cores is
emulated to show that the split restores float32 accuracy and that an unsplit product would not.
On a GPU, tests/test_relabel.py runs both CUDA forms against the reference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_relabel import batch, far_clusters, fit, make_data

import fastgenlabel as fg
from fastgenlabel.functional import mix
from fastgenlabel.kernels.relabel import _check_call, gemm
from fastgenlabel.kernels.relabel import math as rm
from fastgenlabel.kernels.relabel.params import gemm_params_for, params_for

TARGET_ATOL = 5e-5  # as the factor form's "full" row in tests/test_relabel.py


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> TF32 (10 stored mantissa bits), round to nearest: what a tensor core reads."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def exact_logits(model, z_mix: torch.Tensor) -> torch.Tensor:
    """log p_c(z_mix) + log pi_c in float64: the reference's logits."""
    return model.log_joint(z_mix.to(torch.float64))


def product_logits(model, zb, pairs, device="cpu") -> torch.Tensor:
    """The product form's logits (unrefined), float64 on the host; on CUDA the split-TF32 products."""
    dev = torch.device(device)
    g = gemm_params_for(model, dev)
    z = torch.from_numpy(zb).to(dev)
    out = torch.full((z.shape[0], model.num_classes), float("nan"), device=dev)
    gemm.scores(g, z, pairs.perm.to(dev), pairs.lam.to(torch.float32).to(dev), out)
    assert torch.isfinite(out).all(), "scores not fully written"
    return out.cpu().to(torch.float64) + torch.from_numpy(params_for(model).arrays["bias"]).to(torch.float64)


@pytest.mark.parametrize("b,k,d", [(1, 2, 1), (5, 3, 2), (17, 10, 9), (64, 100, 64), (8, 7, 300)])
@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
def test_product_form_matches_reference_posterior(b, k, d, lam_mode):
    rng = np.random.default_rng(b * 1000 + k * 10 + d)
    z, y = make_data(rng, k, d, max(2 * d, 30), empty=(1,) if k > 2 else ())
    model = fit("full", z, y, k, prior="empirical")
    zb, pairs, _ = batch(rng, z, y, b, lam_mode)
    zb_before = zb.copy()
    got = torch.softmax(product_logits(model, zb, pairs), dim=1)
    want = torch.softmax(exact_logits(model, mix(torch.from_numpy(zb), pairs)), dim=1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=TARGET_ATOL)
    np.testing.assert_array_equal(zb, zb_before)
    if k > 2:  # the empty class gets no mass, never NaN
        assert torch.all(got[:, 1] == 0)


def test_split_is_exact_and_tf32_representable():
    x = torch.randn(1000, dtype=torch.float32) * torch.logspace(-20, 20, 1000)
    hi, lo = gemm.split_tf32(x)
    assert torch.equal(hi + lo, x)
    assert torch.equal(tf32_round(hi), hi)
    assert torch.all(lo.abs() <= x.abs() * 2.0 ** -10)


def test_split_products_recover_float32_accuracy_under_tf32_rounding():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 2000, generator=g)
    w = torch.randn(50, 2000, generator=g)
    exact = a.double() @ w.double().T
    a_hi, a_lo = gemm.split_tf32(a)
    w_hi, w_lo = gemm.split_tf32(w)
    r = tf32_round
    split = r(a_hi) @ r(w_hi).T + r(a_hi) @ r(w_lo).T + r(a_lo) @ r(w_hi).T
    plain = r(a) @ r(w).T
    scale = a.abs().double() @ w.abs().double().T
    err_split = ((split.double() - exact).abs() / scale).max().item()
    err_plain = ((plain.double() - exact).abs() / scale).max().item()
    assert err_split < 2e-7 and err_plain > 1e-5 and err_plain > 100 * err_split, (err_split, err_plain)


@pytest.mark.parametrize("sep", [1.0, 3.0, 10.0])
def test_cancellation_error_grows_with_mean_distance_as_documented(sep):
    """With the tensor cores' TF32 rounding emulated, the split products' score error grows with
    the classes' distance from the centre like 1e-7 (d + max_c a_c^T P_c a_c) (the bound of
    ``math.product_error`` is tested below)."""
    rng = np.random.default_rng(0)
    k, d, b = 20, 16, 64
    z, y = make_data(rng, k, d, 4 * d, sep=sep)
    model = fit("full", z, y, k)
    zb, pairs, _ = batch(rng, z, y, b, "sample")
    g = gemm_params_for(model, torch.device("cpu"))
    p_hi, p_lo = gemm.split_tf32(gemm.features(g, torch.from_numpy(zb), pairs.perm, pairs.lam))
    r = tf32_round
    w_hi, w_lo = gemm.split_tf32(g["w"])  # the halves the CUDA form keeps
    scores = r(p_hi) @ r(w_hi).T + r(p_hi) @ r(w_lo).T + r(p_lo) @ r(w_hi).T
    got = scores.double() + torch.from_numpy(params_for(model).arrays["bias"]).double()
    want = exact_logits(model, mix(torch.from_numpy(zb), pairs))
    shift = (want - got)[:, 0:1]  # the bias is shifted by a constant
    err = (got + shift - want).abs().max().item()
    chol, means = model.precision_chol, model.means
    a = means - means.mean(0)
    maha = ((a.unsqueeze(1) @ chol).squeeze(1) ** 2).sum(1).max().item()
    assert err <= 1e-6 * (d + maha), (err, maha)


def test_policy_and_threshold():
    assert gemm.use_gemm(1000, 256) and gemm.use_gemm(32, 256) and not gemm.use_gemm(16, 256)
    assert not gemm.use_gemm(1000, 16) and not gemm.use_gemm(10, 64)
    with gemm.policy("always"):
        assert gemm.use_gemm(2, 2)
    with gemm.policy("never"):
        assert not gemm.use_gemm(1000, 256)
    assert gemm.POLICY == "auto"
    with pytest.raises(ValueError, match="policy"), gemm.policy("fast"):
        pass


def test_product_form_cached_per_fit_and_only_for_full():
    rng = np.random.default_rng(3)
    z, y = make_data(rng, 4, 5, 30)
    model = fit("full", z, y, 4)
    first = gemm_params_for(model, torch.device("cpu"))
    assert gemm_params_for(model, torch.device("cpu")) is first
    model.fit(z[::-1].copy() + 1, y[::-1].copy(), 4)  # refit: new statistics, new form
    second = gemm_params_for(model, torch.device("cpu"))
    assert second is not first and not torch.equal(second["center"], first["center"])
    with pytest.raises(ValueError, match="full covariance"):
        gemm_params_for(fit("diag", z, y, 4), torch.device("cpu"))
    assert first["w"].shape == (4, gemm.width(5)) and gemm.width(5) % gemm.ALIGN == 0 and gemm.width(5) >= 21


def test_fastgenlabel_exposes_no_new_public_name():
    assert not hasattr(fg, "gemm")


@pytest.mark.parametrize("before", ["ieee", "tf32", "none"])
def test_tf32_block_restores_the_new_precision_api(before):
    """torch >= 2.9: a script that set ``fp32_precision`` must not see the legacy flag read (it
    raises then) nor its setting changed after the block."""
    from fastgenlabel.kernels.relabel.gemm import fp32_matmul

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without fp32_precision")
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = before
        with fp32_matmul(True):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == before
        with fp32_matmul(False):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == before
    finally:
        matmul.fp32_precision = old


def digits_model(d):
    """Real features: scikit-learn's digits, PCA to d dimensions (classes 2,000 (d = 32) to
    195,000 (d = 64) squared standard deviations from the overall mean)."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    x, y = load_digits(return_X_y=True)
    z = PCA(d, random_state=0).fit_transform(x).astype(np.float32)
    return fit("full", z, y, 10), z, y


def bound_terms(model, g, zb, pairs, device="cpu"):
    """(measured logit error of the product form, M per sample) of one batch."""
    got = product_logits(model, zb, pairs, device)
    zm = mix(torch.from_numpy(zb).double(), pairs)
    want = exact_logits(model, zm)
    live = torch.isfinite(want[0])
    shift = (want - got)[:, live][:, :1]  # the bias is shifted by a constant
    err = (got + shift - want)[:, live].abs().max(1).values
    rho, pa, spread = (float(v) for v in g["bound"])
    xn = (zm - g["center"].double()).norm(dim=1)
    return err, 0.5 * rho * xn ** 2 + pa * xn + 0.5 * spread


def bound_cases():
    rng = np.random.default_rng(11)
    for sep in (1.0, 10.0, 30.0):
        z, y = make_data(rng, 20, 24, 100, sep=sep)
        model = fit("full", z, y, 20)
        zb, pairs, _ = batch(rng, z, y, 64, "sample")
        yield f"sep {sep}", model, zb, pairs
    for spread in (30.0, 1000.0):
        model, zb, _, pairs = far_clusters("full", 32, 48, spread)
        yield f"far {spread}", model, zb, pairs
    for d in (32, 64):
        model, z, _ = digits_model(d)
        idx = rng.integers(0, len(z), 128)
        yield f"digits d={d}", model, np.ascontiguousarray(z[idx]), fg.sample_pairs(128, 1.0, lam_mode="sample",
                                                                                      generator=d)
    for d in (128, 256):  # means at +-s (1, ..., 1), identity covariance, samples at the means
        model = star_model(d, 30.0)
        zb = np.ascontiguousarray(model.means.numpy()[np.arange(64) % 2].astype(np.float32))
        yield f"star d={d}", model, zb, fg.sample_pairs(64, 1.0, lam_mode="sample", generator=d)


def star_model(d, s, k=2):
    """k = 2 classes at +-s (1, ..., 1) with identity covariance, from exact statistics."""
    from fastgenlabel.models.gaussian import GaussianStats

    n = torch.full((k,), 1000.0, dtype=torch.float64)
    means = torch.ones(k, d, dtype=torch.float64) * s * torch.tensor([1.0, -1.0])[:, None]
    m2 = n.view(-1, 1, 1) * torch.eye(d, dtype=torch.float64).expand(k, d, d)
    return fg.GaussianClassModel("full", reg=0.0).fit_stats(GaussianStats("full", n, means, m2.clone()))


def test_error_bound_holds_with_a_margin():
    """``math.product_error``'s constant against the measured error of the CPU product, on
    compact, separated, far-clustered, star and real (digits) models: the measured error stays
    within half of it (``test_error_bound_holds_on_the_gpu`` measures the GPU's split-TF32 products)."""

    worst = (0.0, "")
    for name, model, zb, pairs in bound_cases():
        g = gemm_params_for(model, torch.device("cpu"))
        err, m = bound_terms(model, g, zb, pairs)
        worst = max(worst, (float((err / m).max()), name))
    assert worst[0] <= 0.5 * float(rm.PRODUCT_GAMMA), worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_error_bound_holds_on_the_gpu():
    """The same on a GPU: the split-TF32 tensor-core products (whose accumulation need not round
    to nearest) against ``math.product_error``'s constant."""

    worst = (0.0, "")
    for name, model, zb, pairs in bound_cases():
        g = gemm_params_for(model, torch.device("cpu"))
        err, m = bound_terms(model, g, zb, pairs, device="cuda")
        worst = max(worst, (float((err / m).max()), name))
    print("GPU product error / M:", worst)
    assert worst[0] <= 0.5 * float(rm.PRODUCT_GAMMA), worst


def test_product_error_is_the_documented_formula_and_each_term_counts():
    """``math.product_error`` against its formula written out, at points where each of its three
    terms dominates (so dropping any one of them changes the bound several-fold)."""

    gamma = float(rm.PRODUCT_GAMMA)
    for xn2, rho, pa, spread in [(1e4, 3.0, 1.0, 1.0), (1.0, 1.0, 1e4, 1.0), (1.0, 1.0, 1.0, 1e5)]:
        want = gamma * (0.5 * rho * xn2 + pa * np.sqrt(xn2) + 0.5 * spread)
        got = rm.product_error(np.float32(xn2), np.float32(rho), np.float32(pa), np.float32(spread))
        assert got == pytest.approx(want, rel=1e-6)
        parts = (0.5 * rho * xn2, pa * np.sqrt(xn2), 0.5 * spread)
        assert max(parts) > 4 * (sum(parts) - max(parts))
    assert rm.product_cutoff(np.float32(-3.0), np.float32(0.5)) == -3.0 - float(rm.PRODUCT_MARGIN) - 1.0


def test_spectral_bound_of_abs_precision_is_an_upper_bound_and_tight():
    from fastgenlabel.kernels.relabel.gemm import _abs_radius_bound

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 40, 40, generator=g, dtype=torch.float64)
    prec = a @ a.transpose(1, 2) + 0.1 * torch.eye(40, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(prec.abs()).amax(1)
    got = _abs_radius_bound(prec)
    assert torch.all(got >= exact * (1 - 1e-12)) and torch.all(got <= exact * 1.01)
    assert torch.all(got < prec.abs().sum(2).amax(1))  # tighter than the max row sum


def test_ill_conditioned_models_stay_on_the_factor_form():
    """Low-rank features with a tiny reg make the product's error bound thousands of nats
    at a typical sample, so refinement would rescore every class of every row (3x slower than the
    factor form alone on the CPU); "auto" keeps such models on the factor form (without keeping
    W), and separated, well-conditioned ones and the digits on the product."""
    from fastgenlabel.kernels.relabel import _use_product
    from fastgenlabel.kernels.relabel.params import _cache, gemm_typical_error_for

    k, d, r = 64, 128, 12
    rng = np.random.default_rng(0)
    lift = rng.normal(size=(r, d))
    y = np.repeat(np.arange(k), 2 * d + 20)
    z = ((rng.normal(size=(k, r))[y] * 3 + rng.normal(size=(len(y), r))) @ lift
         + 0.01 * rng.normal(size=(len(y), d))).astype(np.float32)
    model = fg.GaussianClassModel("full", reg=1e-6).fit(z, y, k)
    typical = gemm_typical_error_for(model)
    assert typical > 100 * gemm.MAX_TYPICAL_ERROR
    assert gemm.use_gemm(k, d) and not gemm.use_gemm(k, d, typical_error=typical)
    assert "w" not in _cache(model).gemm["host"]  # let go: "auto" will not use it
    idx = rng.integers(0, len(y), 16)
    zb, labels, pairs = np.ascontiguousarray(z[idx]), y[idx], fg.sample_pairs(16, 1.0, generator=0)
    assert not _use_product(_check_call(model, zb, pairs, labels, 1.0, k, 0.0, None, True))
    with gemm.policy("always"):  # still available: packed again
        forced = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=k, backend="numba-cpu")
    want = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=k, backend="reference")
    np.testing.assert_allclose(forced, want, rtol=0, atol=TARGET_ATOL)
    separated, *_ = far_clusters("full", 32, 182, 30.0)
    assert gemm.use_gemm(32, 182, typical_error=gemm_typical_error_for(separated))
    for d in (48, 64):  # the digits, as if K were large enough for the product
        assert 1.0 < gemm_typical_error_for(digits_model(d)[0]) <= gemm.MAX_TYPICAL_ERROR


def refined_by_rule(model, zb, pairs, scores):
    """The entries ``refine_scores`` must rescore (a NumPy statement of the rule)."""

    g = gemm_params_for(model, torch.device("cpu"))
    bias = params_for(model).arrays["bias"]
    zm = mix(torch.from_numpy(zb), pairs).numpy()
    xn2 = ((zm - g["center"].numpy()) ** 2).sum(1, dtype=np.float32)
    rho, pa, spread = g["bound"].numpy()
    err = np.array([rm.product_error(v, rho, pa, spread) for v in xn2], np.float32)
    logits = scores + bias
    cut = rm.product_cutoff(logits.max(1), err)
    return (err > rm.PRODUCT_TRUST)[:, None] & (logits >= cut[:, None]) & np.isfinite(bias)[None, :]


@pytest.mark.parametrize("case", ["far", "digits", "compact"])
def test_refinement_rescores_exactly_the_classes_that_can_matter(case):
    """``cpu.refine_scores`` on the product's scores: the entries the rule picks become the factor
    form's, every other entry keeps the product's value (all logits relative to the row's largest);
    compact models are left alone."""
    from fastgenlabel.kernels.relabel import cpu
    from fastgenlabel.kernels.relabel.cpu import full_scores, mix_rows

    if case == "far":
        model, zb, _, pairs = far_clusters("full", 32, 48, 300.0)
    elif case == "digits":
        model, z, _ = digits_model(48)
        zb = np.ascontiguousarray(z[:40])
        pairs = fg.sample_pairs(40, 1.0, lam_mode="sample", generator=4)
    else:
        rng = np.random.default_rng(5)
        z, y = make_data(rng, 40, 16, 40, sep=0.3)
        model = fit("full", z, y, 40)
        zb, pairs, _ = batch(rng, z, y, 32, "batch")
    p = params_for(model)
    g = gemm_params_for(model, torch.device("cpu"))
    zt, lam = torch.from_numpy(zb), pairs.lam.to(torch.float32)
    scores = gemm.scores(g, zt, pairs.perm, lam, torch.empty(len(zb), model.num_classes)).numpy()
    picked = refined_by_rule(model, zb, pairs, scores)
    a = p.arrays
    got = scores.copy()
    cpu.refine_scores(zb, pairs.perm.numpy(), lam.numpy(), g["center"].numpy(), g["bound"].numpy(), a["order"],
                      a["center"], a["factor"], p.tri, a["bias"], got)
    zm = np.empty_like(zb)
    mix_rows(zb, pairs.perm.numpy(), lam.numpy(), zm)
    exact = np.empty_like(scores)
    full_scores(zm, p, exact)
    np.testing.assert_allclose(got[picked], exact[picked], rtol=1e-5, atol=1e-3)
    refined = picked.any(axis=1)
    logits = scores.astype(np.float64) + a["bias"]  # rows left alone: the product's, relative to their largest
    np.testing.assert_array_equal(got[~refined], (logits - logits.max(1, keepdims=True)).astype(np.float32)[~refined])
    assert (got[refined][~picked[refined]] < -rm.PRODUCT_MARGIN).all()  # the others can hold < e^-30 each
    if case == "compact":
        assert not picked.any()
    else:
        assert picked.any() and picked.sum(1).max() < model.num_classes  # some, never all


@pytest.mark.parametrize("d", [48, 64])
def test_real_features_keep_float32_accuracy_on_the_product(d):
    """Digits features (classes up to 195,000 squared standard deviations out): the product
    alone is off by 0.01 to 0.4 in the logits; with refinement the targets match the reference as
    the factor form's do."""
    model, z, y = digits_model(d)
    rng = np.random.default_rng(d)
    idx = rng.integers(0, len(z), 64)
    zb, labels = np.ascontiguousarray(z[idx]), y[idx]
    pairs = fg.sample_pairs(64, 1.0, lam_mode="sample", generator=rng)
    want = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=10, backend="reference")
    with gemm.policy("always"):
        got = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=10, backend="numba-cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=TARGET_ATOL)
    err, _ = bound_terms(model, gemm_params_for(model, torch.device("cpu")), zb, pairs)
    assert err.max() > 0.01  # what the refinement repairs


def test_far_clusters_run_on_the_product_at_float32_accuracy():
    """Two groups of close classes 30 standard deviations out, at a size where "auto" takes the
    product (K = 32, d = 182): accurate, where the unrefined product is off by more than 1e-4."""
    model, zb, labels, pairs = far_clusters("full", 32, 182, 30.0)
    assert gemm.use_gemm(32, 182)
    want = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=32, backend="reference")
    got = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=32, backend="numba-cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=TARGET_ATOL)
    unrefined = torch.softmax(product_logits(model, zb, pairs), dim=1).numpy()
    assert np.abs(unrefined - want).max() > 1e-4
