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
from fastgenlabel.kernels.relabel import gemm
from fastgenlabel.kernels.relabel.params import gemm_params_for

TARGET_ATOL = 5e-5  # as the factor form's "full" row in tests/test_relabel.py


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> TF32 (10 stored mantissa bits), round to nearest: what a tensor core reads."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def exact_logits(model, z_mix: torch.Tensor) -> torch.Tensor:
    """log p_c(z_mix) + log pi_c in float64: the reference's logits."""
    return model.log_joint(z_mix.to(torch.float64))


def product_logits(model, zb, pairs) -> torch.Tensor:
    g = gemm_params_for(model, torch.device("cpu"))
    z = torch.from_numpy(zb)
    out = torch.full((z.shape[0], model.num_classes), float("nan"))
    gemm.scores(g, z, pairs.perm, pairs.lam.to(torch.float32), out)
    assert torch.isfinite(out).all(), "scores not fully written"
    return out.to(torch.float64) + g["bias"].to(torch.float64)


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
    """Score error <= ~1e-7 (d + max_c a_c^T P_c a_c) (module docstring), emulated TF32 included."""
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
    got = scores.double() + g["bias"].double()
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
    assert gemm.flops(1000, 256, 256) == pytest.approx(3 * 2 * 256 * 1000 * 256 * 259 / 2)


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


def test_spread_keeps_inaccurate_models_off_the_product():
    """A model whose classes sit far from the centre (two groups of close classes, 30 standard
    deviations out) at a size where the product would run: the product's targets are off by more
    than 1e-4, so "auto" keeps the model on the factor form, which is accurate."""
    model, zb, labels, pairs = far_clusters("full", 32, 182, 30.0)
    assert gemm.use_gemm(32, 182)  # by size alone
    assert gemm.spread(model) * gemm.ERROR_PER_SPREAD > gemm.MAX_TARGET_ERROR
    want = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=32, backend="reference")
    got = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=32, backend="numba-cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=TARGET_ATOL)
    with gemm.policy("always"):
        forced = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=32, backend="numba-cpu")
    assert np.abs(forced - want).max() > 1e-4


def test_use_gemm_spread_rule():
    limit = gemm.MAX_TARGET_ERROR / gemm.ERROR_PER_SPREAD
    assert gemm.use_gemm(1000, 256, spread=0.5 * limit) and not gemm.use_gemm(1000, 256, spread=2 * limit)
    calls = []
    assert not gemm.use_gemm(16, 256, spread=lambda: calls.append(1) or 0.0)
    assert not calls  # the spread is computed only when the sizes qualify
    with gemm.policy("always"):
        assert gemm.use_gemm(1000, 256, spread=2 * limit)
