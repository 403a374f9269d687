"""fastgenlabel.Mixup against a timm-equivalent Mixup (tests/timm_reference.py) on the same draws.

timm itself does not import here (it needs torchvision, which would replace torch); the
reference follows timm 1.0.29's code paths and draws from NumPy's global state, as timm does, so
seeding ``np.random`` the same way before each gives both the same draws.
"""
import numpy as np
import pytest
import torch
from timm_reference import TimmMixup

import fastgenlabel
from fastgenlabel import GaussianClassModel, Mixup
from fastgenlabel.features import ThumbnailPCA, thumbnails_torch
from fastgenlabel.functional import genlabel_target, mix
from fastgenlabel.functional.switch import CUTMIX, MIXUP, UNMIXED

K = 5
F32 = float(np.finfo(np.float32).eps)

SETTINGS = [
    dict(mixup_alpha=1.0, cutmix_alpha=0.0),
    dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3),
    dict(mixup_alpha=0.0, cutmix_alpha=1.0, cutmix_minmax=(0.2, 0.8)),
    dict(mixup_alpha=1.0, cutmix_alpha=1.0, correct_lam=False, prob=0.8),
]


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_images_and_targets_equal_timms_on_the_same_draws(mode, setting):
    kwargs = dict(SETTINGS[setting], mode=mode, label_smoothing=0.1, num_classes=K)
    rng = np.random.default_rng([setting, len(mode)])
    ours, ref = Mixup(**kwargs, backend="numba-cpu"), TimmMixup(**kwargs)
    for step in range(6):
        x = torch.from_numpy(rng.standard_normal((8, 3, 12, 10)).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, K, 8))
        np.random.seed(1000 * setting + step)
        want_x, want_t = ref(x.clone(), y)
        np.random.seed(1000 * setting + step)
        got_x, got_t = ours(x, y)
        assert got_x.dtype == torch.float32 and got_x.shape == x.shape
        # float32 products of the same factors; the weights' rounding can differ by an ulp
        torch.testing.assert_close(got_x, want_x, rtol=4 * F32, atol=4 * F32 * float(x.abs().max()))
        torch.testing.assert_close(got_t, want_t, rtol=4 * F32, atol=4 * F32)
        assert torch.allclose(got_t.sum(1), torch.ones(8))


def test_draws_leave_the_global_state_where_timm_leaves_it():
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, mode="elem", num_classes=K)
    x, y = torch.zeros(8, 3, 9, 9), torch.zeros(8, dtype=torch.int64)
    np.random.seed(3)
    TimmMixup(**kwargs)(x.clone(), y)
    after_ref = np.random.random()
    np.random.seed(3)
    Mixup(**kwargs)(x, y)
    assert np.random.random() == after_ref


def test_mixup_enabled_off_gives_smoothed_one_hot_and_the_images():
    m = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=K, label_smoothing=0.2)
    m.mixup_enabled = False
    x = torch.randn(6, 3, 5, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    got_x, got_t = m(x, y)
    torch.testing.assert_close(got_x, x, rtol=0, atol=0)
    want = torch.full((6, K), 0.2 / K)
    want[torch.arange(6), y] = 1 - 0.2 + 0.2 / K
    torch.testing.assert_close(got_t, want)


@pytest.mark.parametrize("b", [1, 3, 7])
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_odd_batches_leave_the_middle_sample_alone(b, mode):
    m = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode, num_classes=K, label_smoothing=0.0, generator=b)
    x = torch.randn(b, 3, 8, 8)
    y = torch.arange(b) % K
    got_x, got_t = m(x, y)
    mid = b // 2
    torch.testing.assert_close(got_x[mid], x[mid], rtol=0, atol=0)
    torch.testing.assert_close(got_t[mid], torch.nn.functional.one_hot(y[mid], K).float())
    assert torch.isfinite(got_x).all() and torch.allclose(got_t.sum(1), torch.ones(b))


def test_uint8_input_normalised_in_one_pass():
    mean, std = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]
    rng = np.random.default_rng(2)
    x8 = torch.from_numpy(rng.integers(0, 256, (6, 3, 10, 12), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, K, 6))
    kwargs = dict(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=K)
    np.random.seed(7)
    want_x, want_t = TimmMixup(**kwargs)(x8.float(), y)
    want_x = (want_x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    np.random.seed(7)
    got_x, got_t = Mixup(**kwargs, mean=mean, std=std)(x8, y)
    assert got_x.dtype == torch.float32
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t, want_t, rtol=4 * F32, atol=4 * F32)
    np.random.seed(7)
    hwc, _ = Mixup(**kwargs, mean=mean, std=std, input_layout="HWC", dtype="bfloat16")(
        x8.permute(0, 2, 3, 1).contiguous(), y)
    assert hwc.dtype == torch.bfloat16
    torch.testing.assert_close(hwc.float(), want_x, rtol=8e-3, atol=8e-3 * float(want_x.abs().max()))


def test_exported_and_timm_defaults():
    assert fastgenlabel.Mixup is Mixup
    m = Mixup()
    assert (m.mixup_alpha, m.cutmix_alpha, m.mix_prob, m.switch_prob, m.mode, m.correct_lam, m.label_smoothing,
            m.num_classes, m.mixup_enabled) == (1.0, 0.0, 1.0, 0.5, "batch", True, 0.1, 1000, True)
    assert Mixup(cutmix_minmax=(0.3, 0.7), mixup_alpha=0.0).cutmix_alpha == 1.0


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(mode="half"), ValueError, "mode: expected one of"),
    (dict(mixup_alpha=0.0), ValueError, "mixup_alpha, cutmix_alpha: at least one"),
    (dict(prob=2.0), ValueError, "prob: expected a probability"),
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(features=object()), ValueError, "features: a feature map is only used with a model"),
])
def test_bad_arguments_name_themselves(kwargs, err, match):
    with pytest.raises(err, match=match):
        Mixup(**kwargs)


def test_bad_calls_name_themselves():
    m = Mixup(num_classes=K)
    with pytest.raises(ValueError, match=r"labels: must lie in \[0, 5\)"):
        m(torch.zeros(2, 3, 4, 4), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        m(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="images: expected a batch of 4 dimensions"):
        m(torch.zeros(3, 4, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="features: per-sample embeddings are only used with a model"):
        m(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), torch.zeros(2, 3))


# --- GenLabel targets (docs/MATH.md section 8) ---------------------------------------------------------------

def fitted_model(z, y):
    return GaussianClassModel("diag").fit(z, y, K)


def test_stored_embeddings_are_interpolated_by_the_targets_lambda():
    rng = np.random.default_rng(4)
    b, d = 9, 6
    z = torch.from_numpy(rng.standard_normal((b, d)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, K, b))
    model = fitted_model(torch.from_numpy(rng.standard_normal((200, d)).astype(np.float32)),
                         torch.from_numpy(rng.integers(0, K, 200)))
    m = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.7, mode="elem", num_classes=K, label_smoothing=0.1,
              model=model, gamma=0.7, generator=5)
    x = torch.from_numpy(rng.standard_normal((b, 3, 8, 8)).astype(np.float32))
    draw = m.draw(b, 8, 8)
    assert {int(k) for k in draw.kind} >= {MIXUP, CUTMIX, UNMIXED}
    got = m.targets(draw, y, features=z)
    perm, lam = draw.pairs.perm, draw.pairs.lam
    want = genlabel_target(model, mix(z.double(), draw.pairs), y, y[perm], lam.double(), 0.7, num_classes=K,
                           smoothing=0.1).float()
    unmixed = (draw.kind == UNMIXED) | (draw.pairs.lam == 1)
    want[unmixed] = torch.nn.functional.one_hot(y[unmixed], K).float() * 0.9 + 0.1 / K
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _, t = Mixup(mixup_alpha=1.0, num_classes=K, model=model, generator=1)(x, y, z)  # the call form
    assert torch.allclose(t.sum(1), torch.ones(b), atol=1e-5)


def test_linear_features_are_those_of_the_cut_and_pasted_image():
    rng = np.random.default_rng(6)
    b, h, w, t = 8, 12, 12, 4
    mean, std = [120.0, 110.0, 100.0], [60.0, 55.0, 50.0]
    train = rng.integers(0, 256, (300, h, w, 3), dtype=np.uint8)
    pca = ThumbnailPCA(thumbnail=t, dim=5).fit(thumbnails_torch(torch.from_numpy(train), t).numpy())
    feats = pca.transform(thumbnails_torch(torch.from_numpy(train), t))
    model = fitted_model(feats, torch.from_numpy(rng.integers(0, K, 300)))
    m = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.8, mode="elem", num_classes=K, label_smoothing=0.1,
              model=model, gamma=0.6, features=pca, mean=mean, std=std, input_layout="HWC", generator=8)
    x8 = torch.from_numpy(rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, K, b))
    draw = m.draw(b, h, w)
    assert {int(k) for k in draw.kind} >= {MIXUP, CUTMIX}
    out = fastgenlabel.mix_images(x8, draw.pairs, mean, std, boxes=draw.boxes)
    got = m.targets(draw, y, mixed=out)
    # the reference: cut and paste / mix the raw pixels in float64, then the map, then the label
    x = x8.double()
    mixed = x.clone()
    for i in range(b):
        j = b - 1 - i
        if draw.kind[i] == CUTMIX:
            y0, y1, x0, x1 = draw.boxes.boxes[i].tolist()
            mixed[i, y0:y1, x0:x1] = x[j, y0:y1, x0:x1]
        elif draw.kind[i] == MIXUP:
            lam = float(draw.pairs.lam[i])
            mixed[i] = lam * x[i] + (1 - lam) * x[j]
    thumbs = torch.nn.functional.adaptive_avg_pool2d(mixed.permute(0, 3, 1, 2), t).permute(0, 2, 3, 1).reshape(b, -1)
    z = (thumbs - torch.from_numpy(pca.mean).double()) @ torch.from_numpy(pca.components).double().T
    want = genlabel_target(model, z, y, y.flip(0), draw.pairs.lam.double(), 0.6, num_classes=K,
                           smoothing=0.1).float()
    unmixed = (draw.kind == UNMIXED) | (draw.pairs.lam == 1)
    want[unmixed] = torch.nn.functional.one_hot(y[unmixed], K).float() * 0.9 + 0.1 / K
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(m(x8, y)[1].sum(1), torch.ones(b), atol=1e-5)


def test_genlabel_needs_features():
    rng = np.random.default_rng(0)
    model = fitted_model(torch.from_numpy(rng.standard_normal((50, 3)).astype(np.float32)),
                         torch.from_numpy(rng.integers(0, K, 50)))
    with pytest.raises(ValueError, match="features: a model without a feature map needs"):
        Mixup(num_classes=K, model=model)(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="features: expected a fitted ThumbnailPCA"):
        Mixup(num_classes=K, model=model, features="pca")


def test_a_cut_sample_with_an_empty_box_keeps_its_one_hot():
    """A box corrected to zero area pasted nothing: lambda 1, the sample's own smoothed label."""
    from fastgenlabel import CutBoxes, MixPairs
    from fastgenlabel.functional.switch import MixDraw

    rng = np.random.default_rng(9)
    z = torch.from_numpy(rng.standard_normal((4, 3)).astype(np.float32))
    model = fitted_model(torch.from_numpy(rng.standard_normal((80, 3)).astype(np.float32)),
                         torch.from_numpy(rng.integers(0, K, 80)))
    y = torch.tensor([0, 1, 2, 3])
    boxes = CutBoxes(torch.tensor([[0, 0, 0, 0], [1, 3, 1, 3], [1, 3, 1, 3], [0, 0, 0, 0]]), 4, 4,
                     torch.ones(4, dtype=torch.bool))
    draw = MixDraw(MixPairs(torch.arange(3, -1, -1), torch.tensor([1.0, 0.75, 0.75, 1.0])), boxes,
                   torch.full((4,), CUTMIX, dtype=torch.int8))
    t = Mixup(cutmix_alpha=1.0, num_classes=K, label_smoothing=0.1, model=model).targets(draw, y, features=z)
    for i in (0, 3):
        torch.testing.assert_close(t[i], torch.nn.functional.one_hot(y[i], K).float() * 0.9 + 0.1 / K)
    assert not torch.allclose(t[1], torch.nn.functional.one_hot(y[1], K).float() * 0.9 + 0.1 / K)


def test_an_int_seed_draws_anew_each_batch_and_repeats_per_mixer():
    x, y = torch.randn(8, 3, 10, 10), torch.arange(8) % K
    a, b = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=K, generator=3), \
        Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=K, generator=3)
    first, second = a(x, y)[1], a(x, y)[1]
    assert not torch.equal(first, second)
    assert torch.equal(b(x, y)[1], first) and torch.equal(b(x, y)[1], second)


def test_channels_last_batches_are_read_in_place():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((6, 3, 9, 7)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, K, 6))
    kwargs = dict(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=K)
    want = Mixup(**kwargs, generator=2, backend="numba-cpu")(x, y)
    got = Mixup(**kwargs, generator=2, backend="numba-cpu")(x.contiguous(memory_format=torch.channels_last), y)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_mixing_off_with_a_model_gives_one_hot_without_features():
    rng = np.random.default_rng(1)
    model = fitted_model(torch.from_numpy(rng.standard_normal((60, 3)).astype(np.float32)),
                         torch.from_numpy(rng.integers(0, K, 60)))
    m = Mixup(cutmix_alpha=1.0, num_classes=K, label_smoothing=0.0, model=model)
    m.mixup_enabled = False
    y = torch.tensor([1, 4, 0])
    _, t = m(torch.zeros(3, 3, 4, 4), y)
    torch.testing.assert_close(t, torch.nn.functional.one_hot(y, K).float())
