"""Benchmarks of the relabel stage: GenLabel targets (B, K) for a mixed batch of features (B, d).

Run: ``python -m pytest bench/test_bench_relabel.py --benchmark-columns=median,iqr,min,rounds``
(``-k "not reference"`` skips the float64 reference, ``-k cuda`` selects the GPU cases).

Method: B in {64, 256}, K in {10, 1000}, d in {64, 256} for the diagonal, tied and full
covariance Gaussians, and a small KDE; per-sample lambda, a random permutation, gamma = 0.5,
smoothing 0.1. Every implementation computes the whole target from the unmixed features (mixing,
log-likelihoods, prior, softmax, blend). Warm-up rounds compile the Numba kernels and pack the
model's parameters (cached on the model) before timing; CUDA cases synchronise inside the timed
function. Slow cases use ``benchmark.pedantic`` with few rounds, and the float64 reference is
skipped where one call would take more than a few seconds here. Report medians with their
spread; pytest-benchmark's JSON records the machine, ``bench/conftest.py`` the commit and versions.

Workloads are benchmark groups ``relabel <kind> B=.. K=.. d=.. [cpu|cuda]``; implementations are
``extra_info["impl"]``:

- ``numba-cpu`` / ``numba-cuda``: ``fastgenlabel.relabel`` on that backend;
- ``reference``: ``fastgenlabel.relabel(backend="reference")`` (mix + ``genlabel_target``, float64);
- what users write today, in float32 torch: ``torch MultivariateNormal`` (full: one
  ``MultivariateNormal(means, scale_tril)`` over the K classes, ``log_prob`` + softmax),
  ``torch precision-Cholesky`` (full: chunked batched matmul u = (z - mu_c) L_c),
  ``torch eager broadcast`` and ``torch matmul float32`` / ``float64`` (diag: the scores as two
  matrix products) and ``torch eager linear`` (tied: the affine scores, as one matmul);
- ``numba-cpu: fused kernel``: diag and tied on the float64-sum kernel the product form replaced;
- ``numba-cpu: torch.mm product``: diag and tied with the product through ``torch.mm`` instead of
  MKL inside the kernel's parallel region (``kernels/relabel/mkl.py``).
"""
from __future__ import annotations

import json
import pathlib
import tempfile

import numpy as np
import pytest
import torch
from queued import record_queued
from startup import fresh_process_json

import fastgenlabel as fg
from fastgenlabel.models.gaussian import GaussianStats

BATCHES = (64, 256)
SIZES = ((10, 64), (10, 256), (1000, 64), (1000, 256))
SEPARATED = 3.0  # "full-sep": class means 3 standard deviations apart per feature (~2,900 squared at d = 256)
GAMMA, EPS = 0.5, 0.1
HAS_CUDA = torch.cuda.is_available()
ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_BUDGET = 3e9  # skip the float64 reference above this many multiply-adds per call

_MODELS: dict = {}
_BATCHES: dict = {}


def model(kind: str, k: int, d: int, sep: float = 0.3):
    """A fitted model from synthetic statistics (means, well-conditioned covariances): no data to
    generate, so even K = 1000, d = 256 full covariance sets up in seconds.

    ``sep``: the spread of the class means in within-class standard deviations. 0.3 (the default
    workloads) makes classes that overlap heavily, all within ~30 squared standard deviations of
    the overall mean; real features are far more separated (scikit-learn's digits, PCA to 32-64
    dimensions: 2,000-195,000), which the "full-sep" workloads model with ``SEPARATED``."""
    key = (kind, k, d, sep)
    if key not in _MODELS:
        g = torch.Generator().manual_seed(k * 1000 + d)
        n = torch.full((k,), 100.0, dtype=torch.float64)
        mean = torch.randn(k, d, generator=g, dtype=torch.float64) * sep + 1.0
        if kind == "diag":
            m2 = n.unsqueeze(1) * (0.5 + torch.rand(k, d, generator=g, dtype=torch.float64))
        elif kind == "tied":
            a = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
            m2 = n.sum() * (a @ a.T + torch.eye(d, dtype=torch.float64))
        else:  # identity plus a random rank-8 part per class: cheap to make, well conditioned
            a = torch.randn(k, d, 8, generator=g, dtype=torch.float64) / 8 ** 0.5
            m2 = n.view(-1, 1, 1) * (a @ a.transpose(1, 2) + torch.eye(d, dtype=torch.float64))
        m = fg.GaussianClassModel(kind, prior="empirical")
        _MODELS[key] = m.fit_stats(GaussianStats(kind, n, mean, m2))
    return _MODELS[key]


def kde_model(k: int, d: int, n: int = 200):
    key = ("kde", k, d, n)
    if key not in _MODELS:
        rng = np.random.default_rng(d)
        y = np.arange(n * k) % k
        z = rng.standard_normal((n * k, d)) + rng.standard_normal((k, d))[y] * 2
        _MODELS[key] = fg.KDEClassModel(bandwidth=0.3).fit(z.astype(np.float32), y, k)
    return _MODELS[key]


def inputs(m, b: int, device: str = "cpu") -> dict:
    key = (id(m), b, device)
    if key not in _BATCHES:
        rng = np.random.default_rng(b)
        k, d = m.num_classes, m.dim
        means = m.means.numpy() if hasattr(m, "means") else np.zeros((k, d))
        labels = rng.integers(0, k, b)
        z = (means[labels] + 0.5 * rng.standard_normal((b, d))).astype(np.float32)
        pairs = fg.sample_pairs(b, 1.0, lam_mode="sample", generator=b)
        _BATCHES[key] = dict(z=torch.from_numpy(z).to(device), labels=torch.from_numpy(labels).to(device),
                             pairs=pairs.to(device), out=torch.empty((b, k), device=device))
    return _BATCHES[key]


def label(benchmark, kind, b, k, d, device, impl):
    benchmark.group = f"relabel {kind} B={b} K={k} d={d} [{device}]"
    benchmark.extra_info.update(impl=impl, kind=kind, batch=b, num_classes=k, dim=d, device=device)


def rounds(kind, b, k, d, device="cpu") -> int:
    work = b * k * (d * d if kind.startswith("full") else d)
    if device == "cuda":
        return 30
    return 50 if work < 1e9 else 2  # tens of ms at most per call below 1e9: enough rounds for a stable median


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ---- what users write today (float32 torch) ------------------------------------------------------

def blend(log_joint, pairs, labels, k):
    y_gen = torch.softmax(log_joint, dim=1)
    lam = pairs.lam.unsqueeze(1)
    one_hot = torch.nn.functional.one_hot(labels, k).to(y_gen.dtype)
    y_mix = lam * one_hot + (1 - lam) * one_hot[pairs.perm]
    return (GAMMA * y_gen + (1 - GAMMA) * y_mix) * (1 - EPS) + EPS / k


class TorchFull:
    """``MultivariateNormal(means, scale_tril).log_prob`` and the precision-Cholesky form."""

    def __init__(self, m, device):
        p = m.precision_chol.to(device)
        eye = torch.eye(m.dim, dtype=torch.float64)
        sigma = m.stats.m2 / m.stats.count.view(-1, 1, 1) + m.reg * eye  # the model's covariances
        self.mvn = torch.distributions.MultivariateNormal(
            m.means.to(device).float(), scale_tril=torch.linalg.cholesky(sigma).to(device).float())
        self.means, self.chol = m.means.to(device).float(), p.float()
        self.bias = (m.log_norm + m.log_prior).to(device).float()
        self.log_prior = m.log_prior.to(device).float()
        self.k = m.num_classes

    def mvn_target(self, z, pairs, labels):
        z_mix = fg.mix(z, pairs)
        return blend(self.mvn.log_prob(z_mix.unsqueeze(1)) + self.log_prior, pairs, labels, self.k)

    def chol_target(self, z, pairs, labels, chunk=64):
        z_mix = fg.mix(z, pairs)
        lj = torch.empty((z.shape[0], self.k), device=z.device)
        for c0 in range(0, self.k, chunk):
            diff = z_mix.unsqueeze(0) - self.means[c0:c0 + chunk].unsqueeze(1)  # (kc, B, d)
            u = torch.bmm(diff, self.chol[c0:c0 + chunk])
            lj[:, c0:c0 + chunk] = (-0.5 * u.square().sum(-1)).T
        return blend(lj + self.bias, pairs, labels, self.k)


def torch_diag(m, device):
    mu, iv = m.means.to(device).float(), (1 / m.variances).to(device).float()
    bias = (m.log_norm + m.log_prior).to(device).float()

    def target(z, pairs, labels):
        z_mix = fg.mix(z, pairs)
        lj = -0.5 * ((z_mix.unsqueeze(1) - mu).square() * iv).sum(-1) + bias
        return blend(lj, pairs, labels, m.num_classes)

    return target


def torch_diag_matmul(m, device, dtype=torch.float32):
    """The diagonal Gaussian's scores as two matrix products, the form a torch user writes for
    speed: -1/2 (z*z) @ (1/v)^T + z @ (mu/v)^T + b_c, b_c = -1/2 sum_i mu_ci^2 / v_ci + log_norm_c
    + log pi_c; in ``dtype`` (float64: the precision the kernels keep)."""
    mu, iv = m.means.double(), 1 / m.variances.double()
    quad, lin = (-0.5 * iv).T.to(device, dtype).contiguous(), (mu * iv).T.to(device, dtype).contiguous()
    bias = (m.log_norm + m.log_prior - 0.5 * (mu * mu * iv).sum(1)).to(device, dtype)

    def target(z, pairs, labels):
        z_mix = fg.mix(z.to(dtype), pairs)
        scores = torch.addmm(bias, z_mix * z_mix, quad).addmm_(z_mix, lin)
        return blend(scores, pairs, labels, m.num_classes).float()

    return target


def torch_tied(m, device):
    """What users write for a shared covariance: the linear discriminant s_c = w_c^T z + b_c,
    w_c = P mu_c, b_c = -1/2 mu_c^T P mu_c + log pi_c (one float32 matmul)."""
    prec = m.precision_chol.double() @ m.precision_chol.double().T
    w = m.means.double() @ prec  # rows: w_c^T = mu_c^T P
    b = -0.5 * (w * m.means.double()).sum(1) + m.log_prior.double()
    w_t, bias = w.T.float().contiguous().to(device), b.float().to(device)

    def target(z, pairs, labels):
        return blend(fg.mix(z, pairs) @ w_t + bias, pairs, labels, m.num_classes)

    return target


# ---- fastgenlabel ------------------------------------------------------------------------------------

def _fastgenlabel(benchmark, m, kind, b, device, backend, impl=None, validate=True):
    k, d = m.num_classes, m.dim
    x = inputs(m, b, device)
    label(benchmark, kind, b, k, d, device, impl or backend)

    def call():
        fg.relabel(m, x["z"], x["pairs"], x["labels"], GAMMA, num_classes=k, smoothing=EPS, backend=backend,
                   out=x["out"], validate=validate)

    def run():
        call()
        sync(device)

    n = rounds(kind, b, k, d, device)
    benchmark.pedantic(run, rounds=n, warmup_rounds=1 if n <= 2 else 2)
    if device == "cuda":
        record_queued(benchmark, call)


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k,d", SIZES)
@pytest.mark.parametrize("kind", ["diag", "tied", "full"])
def test_numba_cpu(benchmark, kind, k, d, b):
    _fastgenlabel(benchmark, model(kind, k, d), kind, b, "cpu", "numba-cpu")


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k,d", SIZES)
@pytest.mark.parametrize("kind", ["diag", "tied", "full"])
def test_reference(benchmark, kind, k, d, b):
    if b * k * (d * d if kind == "full" else d) * 2 > REFERENCE_BUDGET:
        pytest.skip("the float64 reference takes more than a few seconds per call here")
    m = model(kind, k, d)
    x = inputs(m, b)
    label(benchmark, kind, b, k, d, "cpu", "reference")
    benchmark.pedantic(fg.relabel, args=(m, x["z"], x["pairs"], x["labels"], GAMMA),
                       kwargs=dict(num_classes=k, smoothing=EPS, backend="reference"), rounds=2, warmup_rounds=0)


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("d", [2, 16])
@pytest.mark.parametrize("backend", ["numba-cpu", "reference"])
def test_kde_small(benchmark, backend, d, b):
    m = kde_model(10, d)
    _fastgenlabel(benchmark, m, "kde", b, "cpu", backend)


def _full_separated(benchmark, impl, d, device):
    """Full covariance on a separated model ("full-sep", B = 256, K = 1000): fastgenlabel's
    default (the product, refined where it is inexact) and its factor kernel, against torch."""
    from fastgenlabel.kernels.relabel import gemm

    m = model("full", 1000, d, sep=SEPARATED)
    if impl.startswith("torch"):
        t = TorchFull(m, device)
        _torch(benchmark, t.mvn_target if "Multivariate" in impl else t.chol_target, "full-sep", m, 256, device, impl)
        return
    with gemm.policy("never" if impl.endswith("factor kernel") else "auto"):
        _fastgenlabel(benchmark, m, "full-sep", 256, device, f"numba-{device}", impl)


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("impl", ["numba-cpu", "numba-cpu: factor kernel", "torch precision-Cholesky",
                                  "torch MultivariateNormal"])
def test_full_separated(benchmark, impl, d):
    _full_separated(benchmark, impl, d, "cpu")


# ---- what users write today, CPU ---------------------------------------------------------------------

def _torch(benchmark, fn, kind, m, b, device, impl):
    x = inputs(m, b, device)
    label(benchmark, kind, b, m.num_classes, m.dim, device, impl)

    def run():
        fn(x["z"], x["pairs"], x["labels"])
        sync(device)

    n = rounds(kind, b, m.num_classes, m.dim, device)
    benchmark.pedantic(run, rounds=n, warmup_rounds=1)
    if device == "cuda":
        record_queued(benchmark, lambda: fn(x["z"], x["pairs"], x["labels"]))


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k,d", SIZES)
@pytest.mark.parametrize("impl", ["torch MultivariateNormal", "torch precision-Cholesky"])
def test_torch_full(benchmark, impl, k, d, b):
    m = model("full", k, d)
    t = TorchFull(m, "cpu")
    _torch(benchmark, t.mvn_target if "Multivariate" in impl else t.chol_target, "full", m, b, "cpu", impl)


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k,d", SIZES)
def test_torch_diag(benchmark, k, d, b):
    m = model("diag", k, d)
    _torch(benchmark, torch_diag(m, "cpu"), "diag", m, b, "cpu", "torch eager broadcast")


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k,d", SIZES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_diag_matmul(benchmark, dtype, k, d, b):
    m = model("diag", k, d)
    _torch(benchmark, torch_diag_matmul(m, "cpu", getattr(torch, dtype)), "diag", m, b, "cpu", f"torch matmul {dtype}")


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_numba_cpu_fused_kernel(benchmark, kind, d):
    """diag and tied on the fused float64-sum kernel (``linear.POLICY`` "never"): the form the product
    replaced, for the before/after comparison in one run."""
    from fastgenlabel.kernels.relabel import linear

    with linear.policy("never"):
        _fastgenlabel(benchmark, model(kind, 1000, d), kind, 256, "cpu", "numba-cpu", "numba-cpu: fused kernel")


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_numba_cpu_torch_product(benchmark, kind, d):
    """diag and tied with the product through ``torch.mm`` and the finish in Numba's pool
    (``mkl.POLICY`` "torch"): the route taken where torch exposes no MKL, and the cost of two pools."""
    from fastgenlabel.kernels.relabel import mkl

    with mkl.policy("torch"):
        _fastgenlabel(benchmark, model(kind, 1000, d), kind, 256, "cpu", "numba-cpu", "numba-cpu: torch.mm product")


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k,d", SIZES)
def test_torch_tied(benchmark, k, d, b):
    m = model("tied", k, d)
    _torch(benchmark, torch_tied(m, "cpu"), "tied", m, b, "cpu", "torch eager linear")


# ---- CUDA ------------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


@cuda_only
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k,d", SIZES)
@pytest.mark.parametrize("kind", ["diag", "tied", "full"])
def test_numba_cuda(benchmark, kind, k, d, b):
    _fastgenlabel(benchmark, model(kind, k, d), kind, b, "cuda", "numba-cuda")


@cuda_only
@pytest.mark.parametrize("k,d", SIZES)
@pytest.mark.parametrize("kind", ["diag", "tied", "full"])
def test_numba_cuda_unvalidated(benchmark, kind, k, d):
    """``validate=False``: without the finite/range check and its device-to-host sync."""
    _fastgenlabel(benchmark, model(kind, k, d), kind, 256, "cuda", "numba-cuda", "numba-cuda (validate=False)",
                  validate=False)


@cuda_only
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k,d", SIZES)
@pytest.mark.parametrize("form", ["never", "always"])
def test_numba_cuda_full_forms(benchmark, form, k, d, b):
    """Both CUDA forms of full covariance: the factor kernel (SIMT) and the split-TF32 product."""
    from fastgenlabel.kernels.relabel import gemm

    impl = {"never": "numba-cuda: factor kernel (SIMT)", "always": "numba-cuda: split-TF32 product"}[form]
    with gemm.policy(form):
        _fastgenlabel(benchmark, model("full", k, d), "full", b, "cuda", "numba-cuda", impl)


@cuda_only
@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("form", ["never", "always"])
@pytest.mark.parametrize("kind", ["diag", "tied"])
def test_numba_cuda_linear_forms(benchmark, kind, form, d):
    """Both CUDA forms of diag and tied at B = 256, K = 1000: the fused kernel (what "auto" runs on
    CUDA) and the split-TF32 product with its bound and refinement (``linear.py``): where it pays."""
    from fastgenlabel.kernels.relabel import linear

    impl = {"never": "numba-cuda: fused kernel", "always": "numba-cuda: product (split-TF32)"}[form]
    with linear.policy(form):
        _fastgenlabel(benchmark, model(kind, 1000, d), kind, 256, "cuda", "numba-cuda", impl)


@cuda_only
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("d", [2, 16])
def test_numba_cuda_kde_small(benchmark, d, b):
    _fastgenlabel(benchmark, kde_model(10, d), "kde", b, "cuda", "numba-cuda")


@cuda_only
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k,d", SIZES)
@pytest.mark.parametrize("impl", ["torch MultivariateNormal", "torch precision-Cholesky", "torch eager broadcast",
                                  "torch eager linear"])
def test_torch_cuda(benchmark, impl, k, d, b):
    if "Cholesky" in impl or "Multivariate" in impl:
        kind, m = "full", model("full", k, d)
        t = TorchFull(m, "cuda")
        fn = t.mvn_target if "Multivariate" in impl else t.chol_target
    elif "broadcast" in impl:
        kind, m = "diag", model("diag", k, d)
        fn = torch_diag(m, "cuda")
    else:
        kind, m = "tied", model("tied", k, d)
        fn = torch_tied(m, "cuda")
    _torch(benchmark, fn, kind, m, b, "cuda", impl)


@cuda_only
@pytest.mark.parametrize("impl", ["numba-cuda", "numba-cuda: factor kernel", "torch precision-Cholesky",
                                  "torch MultivariateNormal"])
def test_cuda_full_separated(benchmark, impl):
    """Last of the GPU cases: the device script stops the benchmarks at a time limit."""
    _full_separated(benchmark, impl, 256, "cuda")


# ---- start-up: compile vs on-disk cache ---------------------------------------------------------------------

_FIRST_CALL = """
import json, time, warnings
t0 = time.perf_counter()
import numpy as np
import fastgenlabel as fg
t1 = time.perf_counter()
rng = np.random.default_rng(0)
z = rng.standard_normal((60, 4)).astype(np.float32); y = np.arange(60) % 3
times = {"import_fastgenlabel_s": t1 - t0}
for kind in ("diag", "tied", "full", "kde"):
    m = fg.KDEClassModel() if kind == "kde" else fg.GaussianClassModel(kind)
    m.fit(z, y, 3)
    pairs = fg.sample_pairs(8, generator=0)
    t2 = time.perf_counter()
    fg.relabel(m, z[:8], pairs, y[:8], 0.5, num_classes=3, backend="numba-cpu")
    t3 = time.perf_counter()
    fg.relabel(m, z[:8], pairs, y[:8], 0.5, num_classes=3, backend="numba-cpu")
    t4 = time.perf_counter()
    times[kind + "_first_call_s"] = t3 - t2
    times[kind + "_second_call_s"] = t4 - t3
print(json.dumps(times))
"""


def first_calls(cache_dir: str) -> dict:
    return fresh_process_json(_FIRST_CALL, cache_dir)


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_numba_cpu_startup(benchmark, cache):
    """A fresh process's first numba-cpu relabel call per model kind: compile (cold cache) or load
    (warm). The kinds share the finish kernel, so later kinds compile less."""
    with tempfile.TemporaryDirectory() as cache_dir:
        if cache == "warm":
            first_calls(cache_dir)
        result = {}
        benchmark.group = "relabel start-up [cpu]"
        benchmark.pedantic(lambda: result.update(first_calls(cache_dir)), rounds=1, iterations=1)
        benchmark.extra_info.update(impl=f"numba-cpu, {cache} cache", **result)
        print(f"\nrelabel numba-cpu start-up, {cache} cache: {json.dumps(result)}")

