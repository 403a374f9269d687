"""The diag/tied product form (``kernels/relabel/linear.py``): its error bound, its rescoring, and
its agreement with the fused kernel and the reference.

The product form computes each class's score as one float32 product ``phi @ W^T`` plus a float64
constant. Its claims, checked here: the product's error per logit stays below ``math.linear_error``
with the margin math.py states; rows whose bound exceeds the trust level are rescored exactly, so
that cases the float32 product alone gets wrong come out at float32 accuracy; and the targets
match the reference as the fused float64-sum kernel's do (tests/test_relabel.py's tolerances).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_relabel import batch, far_clusters, fit, make_data, model_for, reference, run_checked

import fastgenlabel as fg
from fastgenlabel.kernels.relabel import cpu, linear, mkl
from fastgenlabel.kernels.relabel import math as rm
from fastgenlabel.kernels.relabel.params import linear_params_for, params_for

U = 2.0 ** -24  # float32 unit roundoff
LINEAR_MARGIN = 4.0  # the factor math.py claims between the measured error and LINEAR_GAMMA


def features(arrays, kind, zb, pairs) -> np.ndarray:
    """phi of the mixed batch, by the kernel."""
    quad = kind == "diag"
    phi = np.empty((zb.shape[0], arrays["w"].shape[1]), np.float32)
    err = np.empty(zb.shape[0])
    cpu.linear_features(zb, pairs.perm.numpy(), pairs.lam.to(torch.float32).numpy(), arrays["center"], quad,
                        arrays["mcol"], arrays["wnorm"], phi, err)
    np.testing.assert_allclose(err, rm.linear_error(bound_sum(arrays, phi), phi.shape[1]), rtol=1e-6)  # sum order
    return phi


def product(arrays, phi) -> np.ndarray:
    """The float32 product's scores (B, K), as the kernel computes them (the route ``mkl.POLICY``
    picks), in float64."""
    out = np.empty((phi.shape[0], arrays["w"].shape[0]), np.float32)
    return cpu.linear_product(phi, arrays["w"], out).astype(np.float64)


# The product's two routes on the CPU: MKL inside the kernels' parallel region (the default where
# torch exposes MKL) and torch.mm; tests of the product's error and of the targets run on both.
ROUTES = ["auto", "torch"] if mkl.functions() is not None else ["torch"]


@pytest.fixture(params=ROUTES)
def route(request):
    with mkl.policy(request.param):
        yield request.param


def exact_scores(arrays, kind, phi) -> np.ndarray:
    """Every class's score with its constant, in float64 from the float32 parameters and phi: what
    ``cpu.linear_exact`` computes for one class, for all of them (NumPy)."""
    p = {n: v.astype(np.float64) for n, v in arrays.items() if n not in ("const",)}
    if kind == "diag":  # (sbar - s) x^2 + s a (2x - a): sbar x^2 - s (x - a)^2 without its cancellation
        d = p["a"].shape[1]
        x = phi[:, d:].astype(np.float64)[:, None, :]
        a, s = p["a"][None], p["s"][None]
        return 0.5 * ((p["sbar"] - s) * x * x + s * a * (2 * x - a)).sum(2)
    y = phi.astype(np.float64) @ p["chol"]  # t (2y - t): ||y||^2 - ||y - t||^2 without its cancellation
    t = p["t"][None]
    return 0.5 * (t * (2 * y[:, None, :] - t)).sum(2)


def error_ratio(model, kind, zb, pairs) -> float:
    """max over (sample, class) of |product score - exact score| / (u (sqrt(T) + 4) M_s): the
    measured counterpart of LINEAR_GAMMA / u (math.linear_error)."""
    arrays = linear_params_for(model)
    phi = features(arrays, kind, zb, pairs)
    approx = product(arrays, phi)
    bias = params_for(model).arrays["bias"]
    live = np.isfinite(arrays["const"])
    approx = approx + (arrays["const"] - bias)  # the class constant, without the bias
    exact = exact_scores(arrays, kind, phi)
    scale = U * (np.sqrt(phi.shape[1]) + 4) * bound_sum(arrays, phi)
    return float((np.abs(approx - exact)[:, live] / scale[:, None]).max())


def bound_sum(arrays, phi) -> np.ndarray:
    """M_s as ``cpu.linear_finish`` computes it."""
    p64 = phi.astype(np.float64)
    by_column = np.abs(p64) @ arrays["mcol"].astype(np.float64)
    return np.minimum(by_column, np.sqrt((p64 * p64).sum(1)) * arrays["wnorm"][0])


# ---- the CUDA form's split-TF32 products (linear.py: linear_split, gemm.split_scores) -------------

def split_error_fraction(model, kind, zb, pairs, device) -> float:
    """max over (sample, class) of |split product score - exact score| / ``math.split_linear_error``:
    the CUDA form's products of phi's and W's TF32 halves (``gemm.split_scores``) against their
    bound. On "cuda" phi's halves by ``cuda.linear_split`` and tensor cores, as ``_run_cuda`` with
    POLICY "always"; on "cpu" the same three products in plain float32 (phi split by torch)."""
    from fastgenlabel.kernels.relabel import gemm

    host, lp = linear_params_for(model), linear_params_for(model, device)
    b, width = zb.shape[0], host["mcol"].shape[0]
    if device == "cpu":
        phi = torch.zeros((b, lp["w_hi"].shape[1]))
        phi[:, :width] = torch.from_numpy(features(host, kind, zb, pairs))
        halves = torch.cat(gemm.split_tf32(phi))
    else:
        zt, lam = torch.from_numpy(zb).to(device), pairs.lam.to(device, torch.float32)
        halves = linear.split_features(lp, zt, pairs.perm.to(device), lam, kind == "diag")
    out = gemm.split_scores(lp, halves, torch.empty((b, model.num_classes), device=device))
    phi = (halves[:b] + halves[b:])[:, :width].cpu().numpy()
    approx = out.cpu().numpy().astype(np.float64) + (host["const"] - params_for(model).arrays["bias"])
    live = np.isfinite(host["const"])
    bound = rm.split_linear_error(bound_sum(host, phi), width)
    return float((np.abs(approx - exact_scores(host, kind, phi))[:, live] / bound[:, None]).max())


SPLIT_CASES = [(10, 1, 1.5), (50, 7, 1.5), (1000, 64, 0.3), (100, 256, 3.0), (30, 96, 30.0)]


def split_worst(kind, cases, device):
    worst = (0.0, None)
    for k, d, sep in cases:
        rng = np.random.default_rng(k * d)
        z, y = make_data(rng, k, d, 8 if k > 100 else 30, sep=sep)
        zb, pairs, _ = batch(rng, z, y, 64, "sample")
        worst = max(worst, (split_error_fraction(fit(kind, z, y, k), kind, zb, pairs, device), (k, d, sep)))
    return worst


@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_split_products_stay_under_their_bound(kind):
    """The CUDA form's three products of TF32 halves, in plain float32 on the CPU: the dropped
    lo x lo and the extra roundings take them past ``linear_error`` (10.2 u M_s at T = 1, tied),
    so CUDA bounds them by ``split_linear_error``; the measured error stays under half of it
    (math.py's figure: 0.39)."""
    worst = split_worst(kind, SPLIT_CASES, "cpu")
    assert 0 < worst[0] <= 0.5, worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the split-TF32 products are measured on a GPU")
@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_product_error_stays_under_the_bound_on_the_gpu(kind):
    """The same on a GPU (tensor-core accumulation need not round to nearest; the bound's constants
    were measured on the CPU), on the models above and d = 2048 (T = 4096)."""
    worst = split_worst(kind, [*SPLIT_CASES, (8, 2048, 1.5)], "cuda")
    print(f"GPU linear product error / split_linear_error, {kind}: {worst[0]:.3f} at (K, d, sep) = {worst[1]}")
    assert 0 < worst[0] <= 0.5, worst


def test_cuda_form_packs_w_as_exact_tf32_halves_once_per_fit():
    """``linear_params_for(model, device)``: W as TF32-exact halves summing to it exactly, zero
    padded to ``linear.width``; packed once per fit, packed again after a refit."""
    from fastgenlabel.kernels.relabel import gemm

    model, z, y = model_for("diag", 5, 7)
    host = linear_params_for(model)
    dev = linear_params_for(model, "cpu")
    assert dev is linear_params_for(model, "cpu")
    t = host["mcol"].shape[0]
    assert dev["w_hi"].shape == (5, linear.width(t)) == (5, gemm.ALIGN)
    assert ((dev["w_hi"].numpy().view(np.int32) & 0x1FFF) == 0).all()
    np.testing.assert_array_equal((dev["w_hi"] + dev["w_lo"]).numpy()[:, :t], host["w"])
    assert not dev["w_hi"][:, t:].any() and not dev["w_lo"][:, t:].any()
    np.testing.assert_array_equal(dev["const"].numpy(), host["const"])
    model.fit(z, y, 5)
    assert linear_params_for(model, "cpu") is not dev


@pytest.mark.parametrize("kind", ["diag", "tied"])
@pytest.mark.parametrize("k,d,sep", [(10, 1, 1.5), (50, 7, 1.5), (1000, 64, 0.3), (100, 256, 3.0), (30, 96, 30.0)])
def test_product_error_stays_under_the_bound_with_its_margin(kind, k, d, sep, route):
    """The measured error over M_s, on models from well mixed to far apart, with d from 1 to 256
    (T up to 512; the d = 2048 case below reaches T = 4096)."""
    rng = np.random.default_rng(k * d)
    z, y = make_data(rng, k, d, 8 if k > 100 else 30, sep=sep)
    model = fit(kind, z, y, k)
    zb, pairs, _ = batch(rng, z, y, 64, "sample")
    ratio = error_ratio(model, kind, zb, pairs)
    assert ratio <= rm.LINEAR_GAMMA / U / LINEAR_MARGIN, ratio
    assert ratio > 0  # the product does round: the check measures something


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_wide_features_keep_float32_accuracy(kind, route):
    """d = 2048 in-distribution data (the width the diag and tied models are meant for): the bound
    holds at T = 4096 and the targets match the reference as tests/test_relabel.py requires."""
    rng = np.random.default_rng(2048)
    k, d = 8, 2048
    z, y = make_data(rng, k, d, 40)
    model = fit(kind, z, y, k)
    zb, pairs, labels = batch(rng, z, y, 16, "sample")
    assert error_ratio(model, kind, zb, pairs) <= rm.LINEAR_GAMMA / U / LINEAR_MARGIN
    run_checked(model, zb, pairs, labels, 0.7, k, 0.05, kind)


@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_rows_past_the_bound_are_rescored_exactly(kind, route):
    """Classes 1,000 sd from the centre: the float32 product alone is off by far more than the
    tolerance (the test shows it), the rescored targets are not."""
    model, zb, labels, pairs = far_clusters(kind, 32, 48, 1000.0)
    arrays = linear_params_for(model)
    phi = features(arrays, kind, zb, pairs)
    assert (rm.linear_error(bound_sum(arrays, phi), phi.shape[1]) > rm.PRODUCT_TRUST).all()  # every row is flagged
    approx = product(arrays, phi)
    unrefined = torch.softmax(torch.from_numpy(approx + arrays["const"]), 1).numpy()
    posterior = torch.softmax(torch.from_numpy(exact_scores(arrays, kind, phi) + params_for(model).arrays["bias"]), 1)
    assert np.abs(unrefined - posterior.numpy()).max() > 1e-3
    want = reference(model, zb, pairs, labels, 1.0, 32, 0.0)
    got = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=32, backend="numba-cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)  # tests/test_relabel.py's far-cluster tolerance


@pytest.mark.parametrize("form", ["auto", "never"])
@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_product_and_fused_forms_match_the_reference_on_fresh_inputs(kind, form, route):
    """Both CPU forms of diag and tied (the product, the default; the fused float64-sum kernel)."""
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    k, d = int(rng.integers(2, 40)), int(rng.integers(1, 40))
    model, z, y = model_for(kind, k, d, prior=str(rng.choice(["uniform", "empirical"])), seed=seed,
                            empty=(int(rng.integers(k)),) if k > 2 else ())
    live = np.flatnonzero(np.bincount(y, minlength=k) > 0)
    assert live.size < k or k <= 2
    with linear.policy(form):
        for gamma in (0.0, 0.4, 1.0):
            zb, pairs, labels = batch(rng, z, y, int(rng.integers(1, 40)), str(rng.choice(["batch", "sample"])))
            try:
                out = run_checked(model, zb, pairs, labels, gamma, k, float(rng.choice([0.0, 0.1])), kind)
            except AssertionError as e:
                raise AssertionError(f"seed {seed}, K={k}, d={d}, gamma={gamma}: {e}") from None
            empty = np.setdiff1d(np.arange(k), live)
            if gamma == 1.0 and empty.size:  # an empty class gets nothing but the smoothing
                assert (out[:, empty] <= 0.1 / k + 1e-7).all()


def test_exp_rel_is_within_its_derived_bound():
    """exp_rel (the finish's vectorised exp) against float64 exp over the whole range it sees.
    Bound: the degree-7 Taylor remainder at |r| <= ln 2 / 2 (6e-9) plus Horner's rounding, 14 float32
    operations on terms summing to at most e^|r| / e^r <= 2: 14 u x 2 = 1.7e-6, relative."""
    rng = np.random.default_rng(7)
    x = np.concatenate([-rng.random(100_000) * 90, -rng.random(1000) * 1e-6, [0.0, -87.0, -86.99, -88.0, -np.inf]])
    x = x.astype(np.float32)
    got = x.copy()
    cpu.exp_rel(got, np.empty(x.shape[0], np.int32))
    want = np.exp(x.astype(np.float64))
    keep = x >= cpu.EXP_MIN
    rel = np.abs(got[keep] - want[keep]) / want[keep]
    assert rel.max() <= 14 * U * 2, rel.max()
    assert (got[~keep] == 0).all()


def test_policy_and_validation():
    model, z, y = model_for("diag", 4, 3)
    with pytest.raises(ValueError, match="policy"):
        with linear.policy("sometimes"):
            pass
    assert linear.use_linear("cpu") and not linear.use_linear("cuda")
    with linear.policy("never"):
        assert not linear.use_linear("cpu")
    with linear.policy("always"):
        assert linear.use_linear("cuda")
    full, _, _ = model_for("full", 4, 3)
    with pytest.raises(ValueError, match="diag or tied"):
        linear_params_for(full)
    assert linear_params_for(model) is linear_params_for(model)  # packed once per fit
    model.fit(z, y, 4)
    assert linear_params_for(model)["w"].shape == (4, 6)


def test_dead_unit_adds_nothing_to_the_product():
    """A unit that is 0 throughout training has the regulariser's precision in every class: its
    column of W is exactly 0 for diag (sbar is that precision), so a firing unit cannot cost digits."""
    rng = np.random.default_rng(0)
    z, y = make_data(rng, 3, 5, 50)
    z[:, -1] = 0.0
    model = fit("diag", z, y, 3)
    wt = linear_params_for(model)["w"].T
    assert (wt[4] == 0).all() and (wt[9] == 0).all()  # x_4^2 and x_4


@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_labels_out_of_range_without_validation_write_nothing_outside_the_row(kind, route):
    """validate=False promises undefined values, never a write out of bounds: the product form's
    finish adds the mixup label's entries only for labels in [0, K)."""
    model, z, y = model_for(kind, 5, 3)
    zb, pairs, _ = batch(np.random.default_rng(1), z, y, 6, "sample")
    out = np.zeros((8, 5), np.float32)  # rows 6, 7: guards; label 7 of the last row would land in row 6
    view = out[:6]
    fg.relabel(model, zb, pairs, np.array([0, 1, 2, 3, 4, 7]), 0.5, num_classes=5, backend="numba-cpu",
               out=view, validate=False)
    assert (out[6:] == 0).all()



@pytest.mark.parametrize("d", [300, 1024])
def test_repeated_features_round_coherently_within_the_bound(d, route):
    """The model behind ``math.linear_error`` assumes rounding errors that do not all go the same way.
    Features that repeat one column break that assumption: every term of a class's sum is the same
    float32 value and the accumulation rounds alike at every step (docs/MATH.md section 5). With
    torch's product in the layout the kernel uses (phi @ W^T, W row-major) the error then uses up
    the margin but stays within the bound, and the targets within the 1e-4 the trust level allows."""
    rng = np.random.default_rng(d)
    y = np.arange(40) % 2
    col = (rng.standard_normal(y.size) * np.where(y == 0, 1.0, 1.3) + 0.2 * y).astype(np.float32)
    model = fit("diag", np.ascontiguousarray(np.repeat(col[:, None], d, 1)), y, 2)
    xs = rng.uniform(-3, 3, 64).astype(np.float32)
    zb = np.ascontiguousarray(np.repeat(xs[:, None], d, 1))
    pairs = fg.sample_pairs(64, 1.0, lam_mode="sample", generator=d)
    assert error_ratio(model, "diag", zb, pairs) <= rm.LINEAR_GAMMA / U
    labels = np.arange(64) % 2
    want = reference(model, zb, pairs, labels, 1.0, 2, 0.0)
    got = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=2, backend="numba-cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_mkl_route_is_found_where_torch_links_mkl_and_restores_its_thread_setting():
    """On the x86-64 Linux wheels torch links MKL: the fast route must be found there (else the
    product silently falls back to torch.mm and the finish to a second thread pool). After a call,
    the calling thread's MKL setting is what it was before (torch itself sets it, e.g. after
    torch.set_num_threads), whatever that was."""
    import platform
    import sys

    if not (torch.backends.mkl.is_available() and sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("torch links no MKL here: the product goes through torch.mm")
    found = mkl.functions()
    assert found is not None and all(isinstance(a, int) and a for a in found)
    model, z, y = model_for("tied", 6, 5)
    zb, pairs, labels = batch(np.random.default_rng(3), z, y, 9, "sample")
    for setting in (None, 3):
        if setting is not None:
            _set_threads(found[1], setting)
        before = _thread_setting(found[1])
        with mkl.policy("auto"):
            fg.relabel(model, zb, pairs, labels, 0.5, num_classes=6, backend="numba-cpu")
        assert _thread_setting(found[1]) == before
    _set_threads(found[1], 0)


def _set_threads(address: int, count: int) -> int:
    import ctypes

    return ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(address)(count)


def _thread_setting(address: int) -> int:
    """The calling thread's MKL_Set_Num_Threads_Local value (0: none), read and put back."""
    value = _set_threads(address, 0)
    _set_threads(address, value)
    return value


def test_mkl_policy_validation():
    with pytest.raises(ValueError, match="policy"):
        with mkl.policy("sometimes"):
            pass
    with mkl.policy("torch"):
        assert not mkl.use_mkl()


@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_one_feature_near_float32s_largest_gives_the_exact_posterior(kind, route):
    """A single feature at 3e38 with the rest at 0: the product overflows, the row is rescored in
    float64 (tied: y = L^T x whitened in float64, where a float32 y overflows to inf and inf - inf
    made the targets NaN), and the targets are finite, sum to 1 and follow the exact posterior."""
    rng = np.random.default_rng(0)
    model = fit(kind, rng.normal(size=(40, 4)).astype(np.float32), np.arange(40) % 5, 5)
    zb = np.zeros((3, 4), np.float32)
    zb[0, 0], zb[2, 3] = 3e38, -2e38
    pairs = fg.MixPairs(torch.tensor([0, 1, 2]), torch.ones(3))
    labels = np.array([0, 1, 2])
    got = fg.relabel(model, zb, pairs, labels, 1.0, num_classes=5, backend="numba-cpu")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-6)
    arrays = linear_params_for(model)
    phi = features(arrays, kind, zb, pairs)
    exact = exact_scores(arrays, kind, phi) + params_for(model).arrays["bias"]
    posterior = torch.softmax(torch.from_numpy(exact), 1).numpy()
    np.testing.assert_allclose(got, posterior, rtol=0, atol=1e-6)
