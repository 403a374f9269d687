"""The relabel stage's CUDA kernels under NUMBA_ENABLE_CUDASIM=1 (or on a GPU with
FASTGENLABEL_GPU_TESTS=1), against the reference.

Torch CUDA tensors do not exist here, so ``relabel_device`` is launched on simulator device arrays
(``cuda.to_device``), exactly as the torch glue launches it on views of torch tensors. Under the
simulator ``cuda.py`` uses tiny blocks (8 threads, 2-sample tiles, 4-feature chunks), so with K up
to 10 and d = 9 every strided loop, partial tile and chunk runs. Tolerances: tests/test_relabel.py.
"""
import importlib
import os
import warnings

import numpy as np
import pytest
import torch
from numba import float32, float64, int32

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or os.environ.get("FASTGENLABEL_GPU_TESTS") == "1", \
    "run through tests/test_cudasim.py (or with FASTGENLABEL_GPU_TESTS=1 on a GPU)"

import fastgenlabel as fg  # noqa: E402
from fastgenlabel.kernels import BackendError  # noqa: E402
from fastgenlabel.kernels._interop import cuda_modules  # noqa: E402
from fastgenlabel.kernels.relabel import cuda as kernels  # noqa: E402
from fastgenlabel.kernels.relabel import linear, params_for, relabel  # noqa: E402
from fastgenlabel.kernels.relabel import params as relabel_params  # noqa: E402

cuda = cuda_modules()
ATOL = {"diag": 1e-5, "tied": 1e-5, "full": 5e-5, "kde": 1e-5}
KINDS = ("diag", "tied", "full", "kde")


def make_model(kind, k, d, *, prior="uniform", empty=(), seed=0):
    rng = np.random.default_rng(seed)
    n = max(2 * d, 12)
    mu = rng.standard_normal((k, d)) * 1.5
    y = np.arange(n * k) % k
    y = y[~np.isin(y, empty)]
    z = ((mu[y] + rng.standard_normal((y.size, d))) * (0.5 + rng.random(d)) + 3).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = fg.KDEClassModel(prior=prior) if kind == "kde" else fg.GaussianClassModel(kind, prior=prior)
        model.fit(z, y, k)
    return model, z, y


def batch(rng, z, y, b, lam_mode):
    idx = rng.choice(len(z), b)
    zb = np.ascontiguousarray(z[idx] + 0.1 * rng.standard_normal((b, z.shape[1])).astype(np.float32))
    return zb, fg.sample_pairs(b, 1.0, lam_mode=lam_mode, generator=rng), y[idx].astype(np.int64)


def run_device(model, zb, pairs, labels, gamma, smoothing, *, params=None):
    """Launch the kernels like ``_run_cuda`` does; poisoned output, inputs checked unchanged."""
    params = params or params_for(model)
    b, k = zb.shape[0], params.num_classes
    arrays = {name: cuda.to_device(a) for name, a in params.arrays.items()}
    args = [cuda.to_device(a) for a in (zb, pairs.perm.numpy(), pairs.lam.numpy(), labels)]
    out = cuda.to_device(np.full((b, k), np.nan, np.float32))
    stream = cuda.stream()
    kernels.relabel_device(params, arrays, *args, gamma, smoothing, out, stream=stream)
    stream.synchronize()
    for dev, host in zip(args, (zb, pairs.perm.numpy(), pairs.lam.numpy(), labels)):
        np.testing.assert_array_equal(dev.copy_to_host(), host)
    for name, a in params.arrays.items():
        np.testing.assert_array_equal(arrays[name].copy_to_host(), a)
    got = out.copy_to_host()
    assert np.isfinite(got).all(), "output not fully written"
    return got


def reference(model, zb, pairs, labels, gamma, smoothing):
    return relabel(model, zb, pairs, labels, gamma, num_classes=model.num_classes, smoothing=smoothing,
                   backend="reference")


CASES = [
    # (B, K, d, gamma, smoothing, lam_mode, prior, empty classes)
    pytest.param(1, 2, 2, 1.0, 0.0, "batch", "uniform", (), id="B1-K2-d2"),
    pytest.param(5, 10, 9, 0.5, 0.1, "sample", "empirical", (3,), id="B5-K10-d9-empty"),
    pytest.param(3, 3, 3, 0.0, 0.2, "sample", "uniform", (), id="B3-K3-d3-gamma0"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b,k,d,gamma,eps,lam_mode,prior,empty", CASES)
def test_kernels_match_reference(kind, b, k, d, gamma, eps, lam_mode, prior, empty):
    if kind in ("full", "kde") and k == 10:
        k = 6  # the per-(tile, class) and per-(sample, class) grids are the slowest to simulate
        empty = (1,)
    model, z, y = make_model(kind, k, d, prior=prior, empty=empty, seed=b + k + d)
    rng = np.random.default_rng(b * 100 + k)
    zb, pairs, labels = batch(rng, z, y, b, lam_mode)
    got = run_device(model, zb, pairs, labels, gamma, eps)
    np.testing.assert_allclose(got, reference(model, zb, pairs, labels, gamma, eps), rtol=0, atol=ATOL[kind])
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    for c in empty:
        if gamma == 1.0 and eps == 0.0:
            assert (got[:, c] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_empty_classes_get_exactly_zero(kind):
    model, z, y = make_model(kind, 4, 3, empty=(0, 2))
    zb, pairs, labels = batch(np.random.default_rng(1), z, y, 3, "sample")
    got = run_device(model, zb, pairs, labels, 1.0, 0.0)
    assert (got[:, [0, 2]] == 0).all()
    np.testing.assert_allclose(got, reference(model, zb, pairs, labels, 1.0, 0.0), atol=ATOL[kind])


@pytest.mark.parametrize("kind", ["diag", "tied"])
@pytest.mark.parametrize("b,d", [(1, 9), (2, 7), (3, 9), (7, 7)])
def test_fused_kernel_tiles_and_class_loops(kind, b, d):
    """diag_fused: partial sample tiles (TS = 2 here), K over several class tiles (TPB = 8), d
    over several feature chunks (TD = 4) with register groups (LOADS = 2) and their tails
    (d = 7: chunks of 4 and 3; d = 9: 4, 4 and 1), one launch per call."""
    model, z, y = make_model(kind, 19, d, prior="empirical", empty=(4,), seed=b)
    zb, pairs, labels = batch(np.random.default_rng(b), z, y, b, "sample")
    got = run_device(model, zb, pairs, labels, 0.6, 0.05)
    np.testing.assert_allclose(got, reference(model, zb, pairs, labels, 0.6, 0.05), atol=ATOL[kind])


@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_fused_kernel_counters_reset_for_the_next_launch(kind):
    """diag_fused's per-tile counters (three class tiles here: K = 19, TPB = 8) are zero again
    after each launch, so one array serves launch after launch on a stream; gamma = 0 launches
    one class tile and never counts."""
    model, z, y = make_model(kind, 19, 5, seed=7)
    params = params_for(model)
    arrays = {name: cuda.to_device(a) for name, a in params.arrays.items()}
    done = cuda.to_device(np.zeros(kernels.sample_tiles(7) + 2, np.int32))
    rng = np.random.default_rng(7)
    for gamma in (1.0, 0.0, 0.7):
        zb, pairs, labels = batch(rng, z, y, 7, "sample")
        args = [cuda.to_device(a) for a in (zb, pairs.perm.numpy(), pairs.lam.numpy(), labels)]
        out = cuda.to_device(np.full((7, 19), np.nan, np.float32))
        kernels.relabel_device(params, arrays, *args, gamma, 0.0, out, done=done)
        np.testing.assert_allclose(out.copy_to_host(), reference(model, zb, pairs, labels, gamma, 0.0),
                                   atol=ATOL[kind])
        assert (done.copy_to_host() == 0).all()
    with pytest.raises(ValueError, match="done: 1 counters for 4 sample tiles"):
        kernels.relabel_device(params, arrays, *args, 1.0, 0.0, out, done=cuda.to_device(np.zeros(1, np.int32)))


def test_full_with_a_non_triangular_factor():
    model, z, y = make_model("full", 3, 9)
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((9, 9)))
    model.precision_chol = model.precision_chol @ torch.from_numpy(q)  # same precision, dense factor
    params = relabel_params.pack(model)
    assert not params.tri
    zb, pairs, labels = batch(np.random.default_rng(3), z, y, 3, "sample")
    got = run_device(model, zb, pairs, labels, 1.0, 0.0, params=params)
    np.testing.assert_allclose(got, reference(model, zb, pairs, labels, 1.0, 0.0), atol=ATOL["full"])


def product_arrays(model):
    """The arrays ``_run_cuda`` gives ``relabel_device`` for the product form, as device arrays:
    the factor form's, with the product's centre and error bound."""
    from fastgenlabel.kernels.relabel.params import gemm_params_for

    g = gemm_params_for(model, torch.device("cpu"))
    arrays = {name: cuda.to_device(a) for name, a in params_for(model).arrays.items()}
    arrays.update(product_center=cuda.to_device(g["center"].numpy()), bound=cuda.to_device(g["bound"].numpy()))
    return g, arrays


@pytest.mark.parametrize("b,k,d,gamma,eps,empty", [(1, 2, 2, 1.0, 0.0, ()), (5, 6, 9, 0.5, 0.1, (1,)),
                                                   (3, 4, 3, 0.0, 0.2, ())])
def test_full_product_scores_then_finish(b, k, d, gamma, eps, empty):
    """The large-K d^2 CUDA path: scores from gemm.py's product (computed by torch), then
    ``refine_finish`` (``scores_ready``), as ``_run_cuda`` launches it."""
    from fastgenlabel.kernels.relabel import gemm

    model, z, y = make_model("full", k, d, prior="empirical", empty=empty, seed=b + k)
    zb, pairs, labels = batch(np.random.default_rng(b), z, y, b, "sample")
    g, arrays = product_arrays(model)
    scores = torch.full((b, k), float("nan"))
    gemm.scores(g, torch.from_numpy(zb), pairs.perm, pairs.lam.to(torch.float32), scores)
    out = cuda.to_device(scores.numpy() if gamma > 0 else np.full((b, k), np.nan, np.float32))
    args = [cuda.to_device(a) for a in (zb, pairs.perm.numpy(), pairs.lam.numpy(), labels)]
    stream = cuda.stream()
    kernels.relabel_device(params_for(model), arrays, *args, gamma, eps, out, stream=stream, scores_ready=True)
    stream.synchronize()
    got = out.copy_to_host()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference(model, zb, pairs, labels, gamma, eps), rtol=0, atol=ATOL["full"])


@cuda.jit
def refine_only(z, perm, lam, product_center, bound, order, center, factor, tri, bias, out, logits):
    """``refine_row`` alone (``refine_finish`` without its ``finish_row``), to see which logits it
    rescores."""
    buf = cuda.shared.array(0, float32)
    red = cuda.shared.array(kernels.TPB, float64)
    picked = cuda.shared.array(kernels.TPB, int32)
    count = cuda.shared.array(1, int32)
    kernels.refine_row(cuda.blockIdx.x, z, perm, lam, product_center, bound, order, center, factor, tri, bias, out,
                       logits, buf, red, picked, count)


def rescored_by_rule(zb, perm, lam, g, bias, scores):
    """The entries the refinement must rescore, from the rule written out in NumPy (float64)."""
    from fastgenlabel.kernels.relabel import math as rm

    zm = lam[:, None] * zb.astype(np.float64) + (1 - lam[:, None]) * zb[perm].astype(np.float64)
    xn2 = ((zm - g["center"].numpy()) ** 2).sum(1)
    rho, pa, spread = g["bound"].numpy().astype(np.float64)
    err = float(rm.PRODUCT_GAMMA) * (0.5 * rho * xn2 + pa * np.sqrt(xn2) + 0.5 * spread)
    logits = scores + bias
    cut = logits.max(1) - float(rm.PRODUCT_MARGIN) - 2 * err
    return (err > float(rm.PRODUCT_TRUST))[:, None] & (logits >= cut[:, None]) & np.isfinite(bias)[None, :]


@pytest.mark.parametrize("k,d,b,spread,dense", [(10, 9, 6, 300.0, False), (12, 5, 4, 3000.0, False),
                                                (9, 17, 3, 300.0, False), (7, 6, 4, 300.0, True),
                                                (19, 3, 3, 0.0, False)])
def test_refine_matches_the_cpu_kernel(k, d, b, spread, dense):
    """The CUDA refinement against ``cpu.refine_scores`` on the same product scores: the entries
    the rule picks are rescored (to float32 rounding), the rest are untouched (K = 19 spans three
    candidate rounds under the simulator, TPB = 8; spread 0 rescores nothing; ``dense``: a non-triangular factor,
    the same precision); then ``refine_finish``, refinement and targets in one launch, against
    the CPU's refine_scores + finish."""
    from fastgenlabel.kernels.relabel import cpu, gemm

    rng = np.random.default_rng(k + d)
    centers = rng.normal(size=(k, d)) * 0.5
    centers[:, 0] += np.where(np.arange(k) < k // 2, spread, -spread) if spread else 0.0
    y = np.repeat(np.arange(k), 4 * d + 8)
    z = (centers[y] + rng.normal(size=(len(y), d))).astype(np.float32)
    model = fg.GaussianClassModel("full").fit(z, y, k)
    if dense:
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        model.precision_chol = model.precision_chol @ torch.from_numpy(q)
    zb = np.ascontiguousarray(z[rng.integers(0, len(y) // 2, b)])
    labels = y[:b].astype(np.int64)
    pairs = fg.sample_pairs(b, 1.0, lam_mode="sample", generator=k)
    p = params_for(model)
    assert p.tri == (not dense)
    g, arrays = product_arrays(model)
    perm, lam = pairs.perm.numpy(), pairs.lam.to(torch.float32).numpy()
    scores = gemm.scores(g, torch.from_numpy(zb), pairs.perm, torch.from_numpy(lam), torch.empty(b, k)).numpy()
    a = p.arrays
    picked = rescored_by_rule(zb, perm, lam, g, a["bias"], scores)
    assert picked.any() == bool(spread)
    want = scores.copy()
    cpu.refine_scores(zb, perm, lam, g["center"].numpy(), g["bound"].numpy(), a["order"], a["center"], a["factor"],
                      p.tri, a["bias"], want)
    args = [cuda.to_device(x) for x in (zb, perm, lam)]
    product = [arrays[name] for name in ("product_center", "bound", "order", "center", "factor")]
    logits = cuda.device_array((b, k), np.float64)
    refine_only[b, kernels.TPB, 0, 8 * d](*args, *product, int(p.tri), arrays["bias"], cuda.to_device(scores), logits)
    got = logits.copy_to_host()  # float64 logits on CUDA; the CPU keeps them relative to their row's largest
    approximate = scores.astype(np.float64) + a["bias"]
    np.testing.assert_array_equal(got[~picked], approximate[~picked])
    np.testing.assert_allclose(want, (got - got.max(1, keepdims=True)).astype(np.float32), rtol=2e-5, atol=1e-3)
    if spread:  # the rescored entries moved to the factor form's values, away from the product's
        assert np.abs(got[picked] - approximate[picked]).max() > 1e-3

    cpu.finish(perm, lam, labels, np.float32(0.9), np.float32(0.95), np.float32(0.05 / k), want)
    out = cuda.to_device(scores)
    kernels.refine_finish[b, kernels.TPB, 0, 8 * d](*args, *product, int(p.tri), cuda.to_device(labels),
                                                    arrays["bias"], np.float32(0.9), np.float32(0.95),
                                                    np.float32(0.05 / k), logits, out)
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=0, atol=ATOL["full"])


@pytest.mark.parametrize("b,d", [(1, 2), (3, 5), (2, 9)])
def test_quad_split_writes_both_tf32_halves_of_phi(b, d):
    """The full-covariance product's operand on CUDA (``gemm.split_features``): one kernel writes
    [hi; lo] of phi = [x_i x_j (i <= j), x_i, 1]; hi + lo is phi exactly, hi is TF32-exact, phi is
    ``gemm.features``' (several blocks per sample: T = 6 .. 55 over 2 blocks of 8 threads)."""
    from fastgenlabel.kernels.relabel import gemm
    from fastgenlabel.kernels.relabel.params import gemm_params_for

    model, z, y = make_model("full", 4, d, seed=d)
    zb, pairs, _ = batch(np.random.default_rng(b + d), z, y, b, "sample")
    g = gemm_params_for(model, torch.device("cpu"))
    width = g["w"].shape[1]
    args = [cuda.to_device(a) for a in (zb, pairs.perm.numpy(), pairs.lam.numpy(), g["center"].numpy(),
                                        g["pair_i"].numpy(), g["pair_j"].numpy())]
    out = cuda.to_device(np.full((2 * b, width), np.nan, np.float32))
    kernels.quad_split[kernels.quad_split_grid(b, width), kernels.TPB, 0, 4 * d](*args, out)
    got = out.copy_to_host()
    hi, lo = got[:b], got[b:]
    assert np.isfinite(got).all()
    assert ((hi.view(np.uint32) & 0x1FFF) == 0).all()
    phi = gemm.features(g, torch.from_numpy(zb), pairs.perm, pairs.lam.to(torch.float32)).numpy()
    np.testing.assert_array_equal(hi + lo, (hi.astype(np.float64) + lo).astype(np.float32))
    np.testing.assert_allclose(hi + lo, phi, rtol=2e-6, atol=1e-6)
    assert (np.abs(lo) <= np.abs(phi) * 2.0 ** -10 + 1e-30).all()


@pytest.mark.parametrize("kind", ["diag", "tied", "full", "full-product", "kde"])
def test_a_huge_score_shared_by_every_class_keeps_float32_accuracy(kind):
    """tests/test_relabel.py's dead feature firing at 30 (up to 4.5e6 nats in every class's score):
    the float32 scores lost up to 0.11 of the targets; the float64 logits keep the tolerance."""
    from test_relabel import dead_feature

    from fastgenlabel.kernels.relabel import gemm

    model, zb, labels, pairs = dead_feature(kind.split("-")[0], 30.0)
    want = reference(model, zb, pairs, labels, 1.0, 0.0)
    assert want.max(1).min() < 0.9  # not saturated
    if kind == "full-product":
        g, arrays = product_arrays(model)
        scores = gemm.scores(g, torch.from_numpy(zb), pairs.perm, pairs.lam.to(torch.float32), torch.empty(16, 3))
        out = cuda.to_device(scores.numpy())
        args = [cuda.to_device(a) for a in (zb, pairs.perm.numpy(), pairs.lam.numpy(), labels)]
        kernels.relabel_device(params_for(model), arrays, *args, 1.0, 0.0, out, scores_ready=True)
        got = out.copy_to_host()
    else:
        got = run_device(model, zb, pairs, labels, 1.0, 0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL[kind.split("-")[0]])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy scalars report the overflow
@pytest.mark.parametrize("kind", ["diag", "full"])
def test_huge_features_give_the_cpu_kernels_targets_never_nan(kind):
    """|z| ~ 1e30: diag's float32 terms overflow, every logit is -inf and y_gen = y_mix; full's u
    stays in float32's range and its float64 logits rank the classes. As the CPU kernels, never NaN."""
    model, z, y = make_model(kind, 3, 2)
    zb = np.array([[1e30, -1e30], [3e30, 1e30]], np.float32)
    pairs = fg.MixPairs(torch.tensor([1, 0]), torch.tensor([0.25, 1.0]))
    labels = np.array([0, 2])
    got = run_device(model, zb, pairs, labels, 0.5, 0.0)
    assert np.isfinite(got).all()
    with linear.policy("never"):  # the CPU's fused kernels (its product form rescores diag in float64)
        want = fg.relabel(model, zb, pairs, labels, 0.5, num_classes=3, backend="numba-cpu")
    np.testing.assert_allclose(got, want, atol=1e-6)
    if kind == "diag":
        np.testing.assert_allclose(got, [[0.25, 0, 0.75], [0, 0, 1]], atol=1e-6)


def test_tied_classes_far_from_the_mean_keep_float32_accuracy():
    """whiten_rows + diag_fused on two groups of close classes 100 standard deviations out: the
    targets are unsaturated and match the float64 reference (the former affine form lost 3e-3)."""
    rng = np.random.default_rng(5)
    k, d = 8, 5
    centers = rng.normal(size=(k, d)) * 0.15
    centers[:, 0] += np.where(np.arange(k) < k // 2, 100.0, -100.0)
    y = np.repeat(np.arange(k), 30)
    z = (centers[y] + rng.normal(size=(len(y), d))).astype(np.float32)
    model = fg.GaussianClassModel("tied").fit(z, y, k)
    idx = rng.integers(0, len(y) // 2, 6)
    zb, labels = np.ascontiguousarray(z[idx]), y[idx]
    pairs = fg.sample_pairs(6, 1.0, lam_mode="sample", generator=2)
    want = reference(model, zb, pairs, labels, 1.0, 0.0)
    assert want.max(1).mean() < 0.99
    np.testing.assert_allclose(run_device(model, zb, pairs, labels, 1.0, 0.0), want, rtol=0, atol=ATOL["tied"])


@pytest.fixture
def fake_cuda_glue(monkeypatch):
    """Under the simulator: CPU tensors whose memory the simulator wraps as device arrays, torch's
    CUDA calls made no-ops, so that the torch glue (``_run_cuda``, ``gemm.split_features``) runs:
    its views, streams, counters and parameter caches."""
    import contextlib
    import types

    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from fastgenlabel.kernels import _interop

    if not os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the GPU runs the real glue in tests/test_relabel.py")
    relabel_module = importlib.import_module("fastgenlabel.kernels.relabel")
    monkeypatch.setattr(_interop, "device_view", lambda t: FakeCUDAArray(t.detach().numpy()))
    monkeypatch.setattr(_interop, "current_stream", lambda: cuda.stream())
    monkeypatch.setattr(_interop, "numba_stream", lambda handle: cuda.stream())
    monkeypatch.setattr(relabel_module, "_COUNTERS", {})
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    return relabel_module


@pytest.mark.parametrize("kind,form", [("diag", "auto"), ("tied", "auto"), ("full", "never"), ("full", "always"),
                                       ("kde", "auto")])
def test_torch_glue_end_to_end(fake_cuda_glue, kind, form):
    """``_run_cuda`` as a GPU runs it, twice (views, counters and parameters cached per model and
    stream); K = 19 spans three class tiles of the fused kernel."""
    from fastgenlabel.kernels.relabel import _check_call, gemm

    k = 6 if kind in ("full", "kde") else 19
    model, z, y = make_model(kind, k, 5, prior="empirical", empty=(2,), seed=k)
    rng = np.random.default_rng(k)
    for b in (5, 3):
        zb, pairs, labels = batch(rng, z, y, b, "sample")
        out = torch.full((b, k), float("nan"))
        call = _check_call(model, torch.from_numpy(zb), pairs, torch.from_numpy(labels), 0.7, k, 0.05, out, True)
        with gemm.policy(form):
            got = fake_cuda_glue._run_cuda(call)
        assert got is out
        np.testing.assert_allclose(out.numpy(), reference(model, zb, pairs, labels, 0.7, 0.05), atol=ATOL[kind])
    for counters, _view in fake_cuda_glue._COUNTERS.values():
        assert int(counters.count_nonzero()) == 0


def test_product_form_cuda_scores(fake_cuda_glue):
    """The CUDA form of the full-covariance product: [hi; lo] by quad_split through the glue, then
    the two products of ``split_scores`` against W's TF32 halves; equal to the CPU form's scores."""
    from fastgenlabel.kernels.relabel import gemm
    from fastgenlabel.kernels.relabel.params import gemm_params_for

    model, z, y = make_model("full", 5, 4, seed=3)
    zb, pairs, _ = batch(np.random.default_rng(3), z, y, 4, "sample")
    g = dict(gemm_params_for(model, torch.device("cpu")))
    g["w_hi"], g["w_lo"] = gemm.split_tf32(g["w"])
    zt, lam = torch.from_numpy(zb), pairs.lam.to(torch.float32)
    halves = gemm.split_features(g, zt, pairs.perm, lam)
    got = gemm.split_scores(g, halves, torch.empty(4, 5))
    want = gemm.scores(g, zt, pairs.perm, lam, torch.empty(4, 5))  # the CPU form: phi @ W^T, float32
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", ["tied", "diag"])
def test_features_at_the_float32_limit_never_give_nan(kind):
    """|z| ~ 3e38: the float32 terms overflow to +inf, every logit is -inf or the row shares its
    mass among the classes that are left; never NaN, rows sum to 1."""
    model, z, y = make_model(kind, 3, 2)
    zb = np.array([[3e38, -3e38], [-3e38, 3e38]], np.float32)
    pairs = fg.MixPairs(torch.tensor([1, 0]), torch.tensor([0.5, 1.0]))
    got = run_device(model, zb, pairs, np.array([0, 2]), 1.0, 0.0)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)


def test_refusals():
    model, z, y = make_model("diag", 3, 2)
    zb, pairs, labels = batch(np.random.default_rng(0), z, y, 2, "batch")
    with pytest.raises(BackendError, match="numba-cuda: device"):
        relabel(model, zb, pairs, labels, num_classes=3, backend="numba-cuda")
    with pytest.raises(BackendError, match="numba-cuda: device"):
        relabel(model, torch.from_numpy(zb), pairs, torch.from_numpy(labels), num_classes=3, backend="numba-cuda")
    big = relabel_params.RelabelParams("kde", 2, 10_000, True, {})
    assert "shape" in kernels.refuse_shape(big, 4)
    assert "shape" in kernels.refuse_shape(relabel_params.RelabelParams("full", 40, 20_000, True, {}), 4)
    assert kernels.refuse_shape(relabel_params.RelabelParams("full", 1000, 64, True, {}), 100_000) is None
    assert kernels.quad_split_grid(100_000, 2144)[0] == 100_000  # the batch on x: up to 2^31 - 1 blocks
    assert kernels.refuse_shape(params_for(model), 4) is None


# ---- the diag/tied product form on CUDA (linear.py): linear_split, split_scores, linear_finish -----

def run_linear_glue(glue, model, zb, pairs, labels, gamma, eps):
    """``_run_cuda`` with ``linear.policy("always")`` on poisoned output; checks that the product
    form ran (its device arrays are cached on the model) and that the output is fully written."""
    from fastgenlabel.kernels.relabel import _check_call

    b, k = zb.shape[0], model.num_classes
    out = torch.full((b, k), float("nan"))
    call = _check_call(model, torch.from_numpy(zb), pairs, torch.from_numpy(labels), gamma, k, eps, out, True)
    with linear.policy("always"):
        assert glue._run_cuda(call) is out
    assert relabel_params._cache(model).linear_devices, "the product form did not run"
    assert torch.isfinite(out).all(), "output not fully written"
    return out.numpy()


@pytest.mark.parametrize("kind", ["diag", "tied"])
@pytest.mark.parametrize("b,k,d,gamma,eps,empty", [(1, 2, 2, 1.0, 0.0, ()), (5, 19, 9, 0.5, 0.1, (3,)),
                                                   (3, 3, 3, 0.0, 0.2, ()), (7, 11, 4, 1.0, 0.0, (0, 6))])
def test_linear_product_form_matches_reference(fake_cuda_glue, kind, b, k, d, gamma, eps, empty):
    """The CUDA product form of diag and tied through the torch glue: B = 1 and odd batches, K
    not a multiple of TPB (8 here), empty classes, gamma 0 / 0.5 / 1, smoothing."""
    model, z, y = make_model(kind, k, d, prior="empirical", empty=empty, seed=b + k + d)
    zb, pairs, labels = batch(np.random.default_rng(b * 100 + k), z, y, b, "sample")
    got = run_linear_glue(fake_cuda_glue, model, zb, pairs, labels, gamma, eps)
    np.testing.assert_allclose(got, reference(model, zb, pairs, labels, gamma, eps), rtol=0, atol=ATOL[kind])
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    if gamma == 1.0 and eps == 0.0:
        assert (got[:, list(empty)] == 0).all()


def linear_inputs(model, kind, zb, pairs):
    """The CPU form's phi and scores (``cpu.relabel_host``), the CUDA form's per-row bounds
    (``math.split_linear_error``, from ``cpu.linear_features``' ``linear_error``), and phi's TF32
    halves as ``linear_split`` lays them out (``linear.width`` wide)."""
    from fastgenlabel.kernels.relabel import cpu, gemm
    from fastgenlabel.kernels.relabel import math as rm
    from fastgenlabel.kernels.relabel.params import linear_params_for

    lp = linear_params_for(model)
    b = zb.shape[0]
    phi = np.empty((b, lp["mcol"].shape[0]), np.float32)
    err = np.empty(b)
    cpu.linear_features(zb, pairs.perm.numpy(), pairs.lam.to(torch.float32).numpy(), lp["center"], kind == "diag",
                        lp["mcol"], lp["wnorm"], phi, err)
    scores = (torch.from_numpy(phi) @ torch.from_numpy(lp["w"]).T).numpy()
    err = rm.split_linear_error(err / rm.linear_error(1.0, phi.shape[1]), phi.shape[1])
    padded = np.zeros((b, linear.width(phi.shape[1])), np.float32)
    padded[:, :phi.shape[1]] = phi
    hi, lo = gemm.split_tf32(torch.from_numpy(padded))
    return lp, phi, scores, err, torch.cat([hi, lo]).numpy()


@cuda.jit
def linear_row_only(halves, quad, mcol, wnorm, const, bias, a, sv, sbar, chol, scores, logits):
    """``linear_row`` alone (``linear_finish`` without its ``finish_row``), to see which logits it
    rescores."""
    ybuf = cuda.shared.array(0, float64)
    red = cuda.shared.array(kernels.TPB, float64)
    picked = cuda.shared.array(kernels.TPB, int32)
    count = cuda.shared.array(1, int32)
    kernels.linear_row(cuda.blockIdx.x, halves, quad, mcol, wnorm, const, bias, a, sv, sbar, chol, scores, logits,
                       ybuf, red, picked, count)


@pytest.mark.parametrize("kind", ["diag", "tied"])
@pytest.mark.parametrize("spread", [0.0, 1000.0])
def test_linear_row_rescores_what_the_cpu_rescores(kind, spread):
    """``linear_row`` against the CPU's rule on the same scores: rows past the trust level have the
    classes within the cutoff rescored exactly (as ``cpu.linear_exact``: to float64 rounding for
    diag; tied's y, float64 sums rounded to float32, may differ by an ulp), then the row is stored
    relative to its largest; the other rows' logits are score + const exactly. Classes 1,000 sd
    out flag every row and the rescoring moves the logits (the product alone is off); spread 0
    (well mixed classes) rescores nothing. Then ``linear_finish``, the whole kernel, against
    ``cpu.finish`` of those logits (K = 12: two candidate rounds of TPB = 8)."""
    from test_relabel import far_clusters

    from fastgenlabel.kernels.relabel import cpu
    from fastgenlabel.kernels.relabel import math as rm

    if spread:
        model, zb, labels, _ = far_clusters(kind, 12, 6, spread)
    else:
        model, z, y = make_model(kind, 12, 6, seed=4)
        zb, _, labels = batch(np.random.default_rng(4), z, y, 5, "sample")
    zb, labels = np.ascontiguousarray(zb[:5]), labels[:5].astype(np.int64)
    pairs = fg.sample_pairs(5, 1.0, lam_mode="sample", generator=3)
    lp, phi, scores, err, halves = linear_inputs(model, kind, zb, pairs)
    assert (err > rm.PRODUCT_TRUST).all() if spread else (err <= rm.PRODUCT_TRUST).all()
    bias = params_for(model).arrays["bias"]
    quad = kind == "diag"
    a = lp["a"] if quad else lp["t"]
    extra = (lp["s"], lp["sbar"], a) if quad else (a, lp["mcol"], lp["chol"])
    dev = [cuda.to_device(halves), int(quad), *(cuda.to_device(x) for x in (lp["mcol"], lp["wnorm"], lp["const"], bias,
                                                                          a, *extra))]
    logits = cuda.device_array(scores.shape, np.float64)
    linear_row_only[5, kernels.TPB, 0, 8 * 6](*dev, cuda.to_device(scores), logits)
    got = logits.copy_to_host()
    approx = np.where(np.isfinite(lp["const"]), scores.astype(np.float64) + lp["const"], -np.inf)
    cut = approx.max(1) - float(rm.PRODUCT_MARGIN) - 2 * err
    picked = (err > rm.PRODUCT_TRUST)[:, None] & (approx >= cut[:, None]) & np.isfinite(lp["const"])[None]
    assert picked.any() == bool(spread)
    y = phi.astype(np.float64) @ lp["chol"].astype(np.float64) if not quad else np.zeros((5, 0))
    exact = np.array([[cpu.linear_exact(phi[r], c, quad, *(
        (lp["a"], lp["s"], lp["sbar"], lp["a"]) if quad else (a, a, lp["mcol"], a)), y[r])
        for c in range(12)] for r in range(5)]) + bias
    want = np.where(picked, exact, approx)
    flagged = err > rm.PRODUCT_TRUST
    want[flagged] -= want[flagged].max(1, keepdims=True)  # a rescored row is stored relative to its largest
    np.testing.assert_array_equal(got[~flagged], approx[~flagged])
    # tied: y's float64 sums in another order (the block's threads) differ by float64 rounding only
    np.testing.assert_allclose(got[flagged], want[flagged], rtol=0, atol=1e-6)
    if spread:  # the rescoring moved the logits: the product alone is off by more than that
        rel = approx - approx.max(1, keepdims=True)
        assert np.abs(got[picked] - rel[picked]).max() > 1e-2

    targets = (want - want.max(1, keepdims=True)).astype(np.float32)
    g, keep, add = np.float32(0.9), np.float32(0.95), np.float32(0.05 / 12)
    perm, lam = pairs.perm.numpy(), pairs.lam.to(torch.float32).numpy()
    cpu.finish(perm, lam, labels, g, keep, add, targets)
    out = cuda.to_device(scores)
    kernels.linear_finish[5, kernels.TPB, 0, 8 * 6](dev[0], cuda.to_device(perm), cuda.to_device(lam), *dev[1:],
                                                     cuda.to_device(labels), g, keep, add, logits, out)
    np.testing.assert_allclose(out.copy_to_host(), targets, rtol=0, atol=ATOL[kind])


@pytest.mark.parametrize("kind", ["diag", "tied"])
@pytest.mark.parametrize("case", ["dead-3", "dead-30", "far-1000"])
def test_linear_product_form_keeps_float32_accuracy(fake_cuda_glue, kind, case):
    """tests/test_relabel.py's cases that made float64 necessary, on the CUDA product form: a dead
    unit firing at 3 and 30 (tolerance of the kernels), classes 1,000 sd from the centre (every row
    flagged and rescored; the far-cluster tolerance 2e-4, 8 of its 64 rows to keep the simulator quick)."""
    from test_relabel import dead_feature, far_clusters

    if case.startswith("dead"):
        model, zb, labels, pairs = dead_feature(kind, float(case.split("-")[1]))
        atol, k = ATOL[kind], 3
    else:
        model, zb, labels, _ = far_clusters(kind, 32, 48, 1000.0)
        zb, labels, atol, k = np.ascontiguousarray(zb[:8]), labels[:8], 2e-4, 32
        pairs = fg.sample_pairs(8, 1.0, generator=1)
    labels = labels.astype(np.int64)
    want = reference(model, zb, pairs, labels, 1.0, 0.0)
    assert want.max(1).min() < 0.99  # not saturated
    got = run_linear_glue(fake_cuda_glue, model, zb, pairs, labels, 1.0, 0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert k == model.num_classes


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy scalars report the overflow
@pytest.mark.parametrize("kind", ["diag", "tied"])
@pytest.mark.parametrize("scale", [1e30, 3e38])
def test_linear_product_form_huge_features_never_nan(fake_cuda_glue, kind, scale):
    """|z| ~ 1e30 and ~ 3e38: phi or the product overflows, the row is rescored exactly in float64
    (or every logit is -inf and y_gen = y_mix): never NaN, rows sum to 1, and at 1e30 the targets
    are the CPU product form's."""
    model, z, y = make_model(kind, 3, 2)
    zb = np.array([[scale, -scale], [-scale, scale]], np.float32)
    pairs = fg.MixPairs(torch.tensor([1, 0]), torch.tensor([0.25, 1.0]))
    labels = np.array([0, 2])
    got = run_linear_glue(fake_cuda_glue, model, zb, pairs, labels, 0.5, 0.0)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    if scale == 1e30:
        want = fg.relabel(model, zb, pairs, labels, 0.5, num_classes=3, backend="numba-cpu")
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: under the simulator the tests above run the glue")
@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_linear_product_form_on_the_gpu(kind):
    """The CUDA product form through ``relabel`` on a GPU (torch tensors, streams, cuBLAS's
    split-TF32 products): the shapes of the simulator's glue tests plus K = 300, d = 64, the dead
    unit at 3 and 30 and classes 1,000 sd out (tests/test_relabel.py's tolerances)."""
    from test_relabel import dead_feature, far_clusters

    cases = []
    for b, k, d, gamma, eps, empty in [(1, 2, 2, 1.0, 0.0, ()), (5, 19, 9, 0.5, 0.1, (3,)), (3, 3, 3, 0.0, 0.2, ()),
                                       (7, 300, 64, 1.0, 0.0, (0, 6))]:
        model, z, y = make_model(kind, k, d, prior="empirical", empty=empty, seed=b + k + d)
        zb, pairs, labels = batch(np.random.default_rng(b * 100 + k), z, y, b, "sample")
        cases.append((model, zb, pairs, labels, gamma, eps, ATOL[kind]))
    for fire in (3.0, 30.0):
        model, zb, labels, pairs = dead_feature(kind, fire)
        cases.append((model, zb, pairs, labels, 1.0, 0.0, ATOL[kind]))
    model, zb, labels, pairs = far_clusters(kind, 32, 48, 1000.0)
    cases.append((model, zb, pairs, labels, 1.0, 0.0, 2e-4))
    for model, zb, pairs, labels, gamma, eps, atol in cases:
        want = reference(model, zb, pairs, labels.astype(np.int64), gamma, eps)
        with linear.policy("always"):
            got = relabel(model, torch.from_numpy(zb).cuda(), pairs.to("cuda"), torch.from_numpy(labels).cuda(), gamma,
                          num_classes=model.num_classes, smoothing=eps, backend="numba-cuda")
        assert relabel_params._cache(model).linear_devices, "the product form did not run"
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=0, atol=atol)


def test_linear_scores_ready_needs_the_product_arrays():
    """diag/tied with ``scores_ready`` read the product form's arrays: without them, a clear error
    (gamma 0 reads no scores and needs none)."""
    model, z, y = make_model("diag", 3, 2)
    zb, pairs, labels = batch(np.random.default_rng(0), z, y, 2, "batch")
    params = params_for(model)
    arrays = {name: cuda.to_device(a) for name, a in params.arrays.items()}
    args = [cuda.to_device(a) for a in (zb, pairs.perm.numpy(), pairs.lam.numpy(), labels)]
    out = cuda.to_device(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="linear: diag/tied scores_ready needs"):
        kernels.relabel_device(params, arrays, *args, 1.0, 0.0, out, scores_ready=True)
    kernels.relabel_device(params, arrays, *args, 0.0, 0.1, out, scores_ready=True)
    np.testing.assert_allclose(out.copy_to_host(), reference(model, zb, pairs, labels, 0.0, 0.1), atol=1e-6)
