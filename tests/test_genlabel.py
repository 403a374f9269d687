"""genlabel_posterior, genlabel_target and soft_target_cross_entropy: values, types, edge cases."""
import numpy as np
import pytest
import scipy.special
import torch

from fastgenlabel import (
    GaussianClassModel,
    KDEClassModel,
    genlabel_posterior,
    genlabel_target,
    mix,
    mixup_target,
    sample_pairs,
    soft_target_cross_entropy,
)

K, D = 3, 2


def make_data(seed=0, sizes=(20, 15, 25)):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    z = np.concatenate([rng.normal(size=(n, D)) + centres[c] for c, n in enumerate(sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    return z, y


MODELS = {
    "gaussian-full": lambda: GaussianClassModel("full"),
    "gaussian-diag": lambda: GaussianClassModel("diag", prior="empirical"),
    "gaussian-tied": lambda: GaussianClassModel("tied"),
    "kde": lambda: KDEClassModel(),
    "kde-capped": lambda: KDEClassModel(0.3, max_points_per_class=10, prior="empirical"),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def fitted(request):
    z, y = make_data()
    return MODELS[request.param]().fit(z, y, K), z, y


def batch(z, y, seed=1, lam_mode="sample"):
    pairs = sample_pairs(len(y), lam_mode=lam_mode, generator=seed)
    return mix(z, pairs), y, y[pairs.perm.numpy()], pairs.lam.numpy()


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_target_is_the_documented_mixture(fitted, gamma, smoothing):
    model, z, y = fitted
    z_mix, ya, yb, lam = batch(z, y)
    t = genlabel_target(model, z_mix, ya, yb, lam, gamma, num_classes=K, smoothing=smoothing)
    y_gen = scipy.special.softmax(np.asarray(model.log_joint(z_mix)), axis=1)
    eye = np.eye(K)
    y_mix = lam[:, None] * eye[ya] + (1 - lam[:, None]) * eye[yb]
    expected = gamma * y_gen + (1 - gamma) * y_mix
    expected = (1 - smoothing) * expected + smoothing / K
    assert isinstance(t, np.ndarray) and t.dtype == np.float64 and t.shape == (len(y), K)  # z_mix is float64
    np.testing.assert_allclose(t, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(t.sum(1), 1, rtol=1e-6)


def test_gamma_zero_is_the_mixup_target(fitted):
    model, z, y = fitted
    pairs = sample_pairs(len(y), generator=3)
    t = genlabel_target(model, mix(z, pairs), y, y[pairs.perm.numpy()], pairs.lam, 0.0, num_classes=K)
    np.testing.assert_allclose(t, mixup_target(y, pairs, K), rtol=0, atol=1e-7)


def test_posterior_covers_all_classes_not_only_the_mixed_two(fitted):
    model, z, y = fitted
    # Halfway between class 1 and class 2 lies near none of them; class 0 may get the mass.
    z_mix = np.array([[1.5, 1.5]])
    t = genlabel_target(model, z_mix, np.array([1]), np.array([2]), 0.5, 1.0, num_classes=K)
    assert t[0, 0] > 0


def test_types_follow_the_features(fitted):
    model, z, y = fitted
    z_mix, ya, yb, lam = batch(z, y)
    for dtype, out_dtype in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        t = genlabel_target(model, torch.from_numpy(z_mix).to(dtype), torch.from_numpy(ya), torch.from_numpy(yb),
                            torch.from_numpy(lam), 0.7, num_classes=K)
        assert isinstance(t, torch.Tensor) and t.dtype == out_dtype
        torch.testing.assert_close(t.sum(1), torch.ones(len(y), dtype=out_dtype), rtol=1e-6, atol=1e-6)
    for dtype, out_dtype in [(np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)]:
        t = genlabel_target(model, z_mix.astype(dtype), ya, yb, lam, 0.7, num_classes=K)
        assert isinstance(t, np.ndarray) and t.dtype == out_dtype


def test_lam_forms(fitted):
    model, z, y = fitted
    z_mix, ya, yb, _ = batch(z, y)
    scalar = genlabel_target(model, z_mix, ya, yb, 0.25, 0.5, num_classes=K)
    for lam in (np.float32(0.25), np.array(0.25), torch.tensor(0.25), np.full(len(y), 0.25), [0.25] * len(y)):
        np.testing.assert_allclose(genlabel_target(model, z_mix, ya, yb, lam, 0.5, num_classes=K), scalar)


def test_empty_batch_and_batch_of_one(fitted):
    model, z, y = fitted
    empty = genlabel_target(model, np.zeros((0, D)), np.zeros(0, np.int64), np.zeros(0, np.int64), 0.5,
                            num_classes=K)
    assert isinstance(empty, np.ndarray) and empty.shape == (0, K)
    empty_t = genlabel_target(model, torch.zeros(0, D), torch.zeros(0, dtype=torch.int64),
                              torch.zeros(0, dtype=torch.int64), torch.zeros(0), num_classes=K)
    assert isinstance(empty_t, torch.Tensor) and empty_t.shape == (0, K)
    one = genlabel_target(model, z[:1], y[:1], y[:1], 1.0, 0.5, num_classes=K)
    assert one.shape == (1, K) and one.sum() == pytest.approx(1, rel=1e-6)
    with pytest.raises(ValueError, match="z_mix"):
        genlabel_target(model, np.zeros((0, D + 1)), np.zeros(0, np.int64), np.zeros(0, np.int64), 0.5,
                        num_classes=K)


@pytest.mark.parametrize(
    "change, name",
    [
        ({"gamma": -0.1}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"gamma": float("nan")}, "gamma"),
        ({"gamma": "all"}, "gamma"), ({"lam": 1.5}, "lam"), ({"lam": -0.5}, "lam"), ({"lam": float("nan")}, "lam"),
        ({"lam": np.full(3, 0.5)}, "lam"), ({"lam": np.full((60, 1), 0.5)}, "lam"),
        ({"smoothing": 2.0}, "smoothing"), ({"num_classes": 4}, "num_classes"), ({"num_classes": 0}, "num_classes"),
        ({"y_a": np.full(60, 3)}, "y_a"), ({"y_b": np.full(60, -1)}, "y_b"), ({"y_a": np.zeros(59, np.int64)}, "y_a"),
        ({"z_mix": np.zeros((60, D + 1))}, "z_mix"), ({"z_mix": np.zeros(60)}, "z_mix"),
        ({"z_mix": np.full((60, D), np.inf)}, "z_mix"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(fitted, change, name):
    model, z, y = fitted
    args = {"z_mix": z, "y_a": y, "y_b": y[::-1], "lam": 0.5, "gamma": 0.5, "num_classes": K, **change}
    with pytest.raises(ValueError, match=f"^{name}: "):
        genlabel_target(model, args.pop("z_mix"), args.pop("y_a"), args.pop("y_b"), args.pop("lam"),
                        args.pop("gamma"), **args)


def test_label_types_are_checked(fitted):
    model, z, y = fitted
    with pytest.raises(TypeError, match="y_a"):
        genlabel_target(model, z, y.astype(np.float64), y, 0.5, num_classes=K)


def test_unfitted_model():
    from fastgenlabel.models import NotFittedError

    with pytest.raises(NotFittedError):
        genlabel_target(GaussianClassModel(), np.zeros((1, 2)), [0], [0], 0.5, num_classes=2)


def test_posterior_is_a_stable_softmax():
    lj = np.array([[-1000.0, -1001.0, -np.inf], [5.0, 5.0, 5.0], [-1e6, 0.0, -3.0]])
    out = genlabel_posterior(lj)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, scipy.special.softmax(lj, axis=1), rtol=1e-12)
    assert out[0, 2] == 0
    assert isinstance(genlabel_posterior(torch.from_numpy(lj)), torch.Tensor)
    assert genlabel_posterior(np.zeros((0, 3))).shape == (0, 3)


@pytest.mark.parametrize("bad", [[[0.0, np.nan]], [[np.inf, 0.0]], [[-np.inf, -np.inf]], [0.0, 1.0]])
def test_posterior_rejects_rows_without_a_label(bad):
    with pytest.raises(ValueError, match="log_joint"):
        genlabel_posterior(np.array(bad))


def test_top2_keeps_the_two_most_likely_classes():
    lj = np.array([[-1.0, -3.0, -2.0, -10.0], [0.0, 0.5, -7.0, 0.2]])
    out = genlabel_posterior(lj, top2=True)
    np.testing.assert_allclose(out[0], [scipy.special.expit(1.0), 0, scipy.special.expit(-1.0), 0], rtol=1e-12)
    np.testing.assert_allclose(out[1], [0, scipy.special.expit(0.3), 0, scipy.special.expit(-0.3)], rtol=1e-12)
    two = np.array([[0.3, -0.4]])
    np.testing.assert_allclose(genlabel_posterior(two, top2=True), genlabel_posterior(two))


def test_top2_target(fitted):
    model, z, y = fitted
    z_mix, ya, yb, lam = batch(z, y)
    t = genlabel_target(model, z_mix, ya, yb, lam, 1.0, num_classes=K, top2=True)
    assert ((t > 0).sum(1) <= 2).all()
    np.testing.assert_allclose(t.sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_target_cross_entropy_matches_torch(reduction):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    target = torch.softmax(torch.randn(7, 5, generator=gen, dtype=torch.float64), 1)
    ours = soft_target_cross_entropy(logits, target, reduction)
    torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(logits, target, reduction=reduction))
    hard = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 4, 0, 1]), 5)
    torch.testing.assert_close(soft_target_cross_entropy(logits, hard, reduction),
                               torch.nn.functional.cross_entropy(logits, hard.argmax(1), reduction=reduction))


def test_soft_target_cross_entropy_is_differentiable_and_validates():
    logits = torch.zeros(2, 3, requires_grad=True)
    soft_target_cross_entropy(logits, torch.full((2, 3), 1 / 3)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="target"):
        soft_target_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="target"):
        soft_target_cross_entropy(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        soft_target_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), "max")


def test_soft_target_cross_entropy_ignores_minus_inf_logits_without_mass():
    logits = torch.tensor([[0.0, -float("inf"), 1.0]])
    target = torch.tensor([[0.25, 0.0, 0.75]])
    loss = soft_target_cross_entropy(logits, target)
    want = -(target[:, [0, 2]] * torch.log_softmax(logits[:, [0, 2]], -1)).sum()
    assert torch.isfinite(loss) and torch.allclose(loss, want)
