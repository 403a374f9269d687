"""mix, one_hot, mixup_target, smooth_labels: values, array types and dtypes."""
import numpy as np
import pytest
import torch

from fastgenlabel import MixPairs, mix, mixup_target, one_hot, sample_pairs, smooth_labels

TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NUMPY_DTYPES = [np.float16, np.float32, np.float64]


@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
@pytest.mark.parametrize("shape", [(6,), (6, 4), (6, 3, 5, 5)])
def test_mix_matches_the_formula(lam_mode, shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(shape)))
    original = x.clone()
    pairs = sample_pairs(6, 0.5, lam_mode=lam_mode, generator=7)
    lam = pairs.lam.double().reshape((-1,) + (1,) * (len(shape) - 1))
    out = mix(x, pairs)
    torch.testing.assert_close(out, lam * x + (1 - lam) * x[pairs.perm], rtol=1e-15, atol=0)
    assert torch.equal(x, original)  # input not modified


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_mix_keeps_torch_type_and_dtype(dtype):
    x = torch.randn(5, 3).to(dtype)
    out = mix(x, sample_pairs(5, generator=0))
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_mix_keeps_numpy_type_and_dtype(dtype):
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(dtype)
    pairs = sample_pairs(5, generator=0)
    out = mix(x, pairs)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == x.shape
    lam = pairs.lam.numpy().astype(np.float64)[:, None]
    expected = lam * x.astype(np.float64) + (1 - lam) * x.astype(np.float64)[pairs.perm.numpy()]
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol={np.float16: 2e-3}.get(dtype, 1e-6), atol=1e-6)


def test_mix_empty_batch_and_lam_one_identity():
    assert mix(np.zeros((0, 3), np.float32), sample_pairs(0)).shape == (0, 3)
    x = torch.randn(4, 2)
    assert torch.equal(mix(x, sample_pairs(4, 0.0)), x)


def test_mix_rejects_bad_inputs():
    with pytest.raises(ValueError, match="pairs"):
        mix(torch.zeros(4, 2), sample_pairs(5, generator=0))
    with pytest.raises(TypeError, match="pairs"):
        mix(torch.zeros(4, 2), (torch.arange(4), torch.ones(4)))
    with pytest.raises(TypeError, match="x"):
        mix(torch.zeros(4, 2, dtype=torch.int64), sample_pairs(4, generator=0))
    with pytest.raises(ValueError, match="x"):
        mix(torch.tensor(1.0), sample_pairs(1, generator=0))


def test_one_hot():
    out = one_hot(np.array([2, 0, 1]), 3)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.eye(3, dtype=np.float32)[[2, 0, 1]])
    assert isinstance(one_hot(torch.tensor([0]), 2), torch.Tensor)
    with pytest.raises(ValueError, match="y"):
        one_hot(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        one_hot(np.array([0]), 0)


@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
@pytest.mark.parametrize("k", [2, 5])
def test_mixup_target_matches_the_formula(lam_mode, k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, size=12)
    pairs = sample_pairs(12, lam_mode=lam_mode, generator=k)
    lam = pairs.lam.numpy()[:, None]
    eye = np.eye(k, dtype=np.float32)
    expected = lam * eye[y] + (1 - lam) * eye[y[pairs.perm.numpy()]]
    out = mixup_target(y, pairs, k)
    assert isinstance(out, np.ndarray) and out.shape == (12, k) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-6)
    assert isinstance(mixup_target(torch.from_numpy(y), pairs, k), torch.Tensor)


def test_mixup_target_smoothing_is_timms_convention():
    pairs = MixPairs(torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    out = mixup_target(np.array([0, 2]), pairs, 4, smoothing=0.1)
    on, off = 1 - 0.1 + 0.1 / 4, 0.1 / 4
    np.testing.assert_allclose(out, [[on, off, off, off], [off, off, on, off]], rtol=1e-6)


def test_mixup_target_edge_cases():
    assert mixup_target(np.zeros(0, np.int64), sample_pairs(0), 3).shape == (0, 3)
    np.testing.assert_array_equal(mixup_target(np.array([1]), sample_pairs(1, generator=0), 3), [[0, 1, 0]])
    with pytest.raises(ValueError, match="y"):
        mixup_target(np.array([0, 3]), sample_pairs(2, generator=0), 3)
    with pytest.raises(ValueError, match="pairs"):
        mixup_target(np.array([0, 1]), sample_pairs(3, generator=0), 3)
    with pytest.raises(ValueError, match="smoothing"):
        mixup_target(np.array([0, 1]), sample_pairs(2, generator=0), 3, smoothing=1.5)
    with pytest.raises(TypeError, match="y"):
        mixup_target(np.array([0.0, 1.0]), sample_pairs(2, generator=0), 3)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_smooth_labels(eps):
    t = np.array([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    out = smooth_labels(t, eps)
    np.testing.assert_allclose(out, (1 - eps) * t + eps / 3, rtol=1e-6)
    np.testing.assert_allclose(out.sum(1), 1, rtol=1e-6)
    assert isinstance(smooth_labels(torch.from_numpy(t), eps), torch.Tensor)


@pytest.mark.parametrize("eps", [-0.1, 1.1, float("nan"), "a lot", None])
def test_smooth_labels_rejects_bad_epsilon(eps):
    with pytest.raises(ValueError, match="smoothing"):
        smooth_labels(np.eye(2), eps)
