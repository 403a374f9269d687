"""GenLabelLoader with timm's mixing options (CutMix, switched per sample, prob): both backends mix
the images as the reference does on the batch's own draws, the draws are a pure function of
(seed, epoch, batch), and the targets are GenLabel's from each mixed image's own features."""
import numpy as np
import pytest
import torch
from test_loader import K, config, fit_on_one_pass, write_dataset

import fastgenlabel as fgl
from fastgenlabel.features import thumbnails
from fastgenlabel.functional.images import mix_images
from fastgenlabel.functional.switch import CUTMIX, MIXUP, UNMIXED
from fastgenlabel.loader import GenLabelLoader, LoaderConfig
from fastgenlabel.loader.targets import switch_feed

pytest.importorskip("nvidia.dali")

BACKENDS = ["dali", "torch"]
# both kinds, per sample, some left unmixed: every branch of the stage in one batch
SWITCHED = dict(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", prob=0.8, switch_prob=0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def fitted(data):
    """A ThumbnailPCA and full Gaussians fitted on one unmixed pass."""
    return fit_on_one_pass(data)


def _hwc(images):
    return images.permute(0, 2, 3, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size,sizes", [(8, [8, 8, 5]), (10, [10, 10, 1])])
def test_cutmix_images_and_targets_equal_the_reference_on_the_batchs_draws(data, fitted, backend, batch_size,
                                                                            sizes):
    """Images: the reference mix (cut and paste or lambda) of the unmixed crops on the batch's
    draws. Targets: GenLabel's from the features of each mixed image, computed here from the
    output images themselves (pixel units: no normalisation), unmixed samples one-hot."""
    fmap, model = fitted
    common = dict(backend=backend, train=False, mean=None, std=None, last_batch="partial", batch_size=batch_size)
    plain = list(GenLabelLoader(config(data, alpha=0.0, **common)))
    mixed = list(GenLabelLoader(config(data, feature_map=fmap, model=model, gamma=0.7, smoothing=0.1, **SWITCHED,
                                       **common)))
    assert [len(b) for b in mixed] == sizes
    kinds = torch.cat([m.draw.kind for m in mixed])
    assert {UNMIXED, MIXUP, CUTMIX} <= set(kinds.tolist())
    for p, m in zip(plain, mixed, strict=True):
        assert torch.equal(p.indices, m.indices)
        draw = m.draw
        assert m.pairs is draw.pairs
        want = mix_images(_hwc(p.images), draw.pairs, input_layout="HWC", layout="CHW", boxes=draw.boxes)
        torch.testing.assert_close(m.images, want, rtol=1e-5, atol=1e-4)
        # features of the mixed images, from the images the loader yields: exact for cut samples too
        z_ref = torch.from_numpy(fmap.transform(thumbnails(_hwc(m.images).numpy(), 4)))
        torch.testing.assert_close(m.mixed_features, z_ref, rtol=1e-4, atol=1e-3)
        lam, labels = draw.pairs.lam, m.labels
        ref = fgl.genlabel_target(model, m.mixed_features, labels, labels[draw.pairs.perm], lam, 0.7,
                                  num_classes=K, smoothing=0.1)
        one_hot = torch.nn.functional.one_hot(labels, K) * 0.9 + 0.1 / K
        keep = ((draw.kind == UNMIXED) | (lam == 1)).reshape(-1, 1)
        torch.testing.assert_close(m.targets, torch.where(keep, one_hot.float(), ref), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.targets.sum(1), torch.ones(len(m)))
        if len(m) == 1:  # B = 1: its own partner, unmixed
            assert draw.kind.tolist() == [UNMIXED] and torch.equal(m.images, p.images)


def test_backends_draw_the_same_and_the_draws_are_a_function_of_seed_epoch_batch(data, fitted):
    fmap, model = fitted
    cfg = dict(feature_map=fmap, model=model, train=False, last_batch="partial", **SWITCHED)
    runs = {b: list(GenLabelLoader(config(data, backend=b, **cfg))) for b in BACKENDS}
    feed = switch_feed(config(data, **cfg))
    for i, (x, y) in enumerate(zip(runs["dali"], runs["torch"], strict=True)):
        want = feed.draw(len(x), 0, i, 16, 16)
        for d in (x.draw, y.draw):
            assert torch.equal(d.pairs.perm, want.pairs.perm) and torch.equal(d.pairs.lam, want.pairs.lam)
            assert torch.equal(d.kind, want.kind) and torch.equal(d.boxes.boxes, want.boxes.boxes)
            assert torch.equal(d.boxes.cut, want.boxes.cut)
        assert torch.equal(x.indices, y.indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_seed_gives_the_same_batches_and_epochs_differ(data, fitted, backend):
    fmap, model = fitted
    cfg = config(data, backend=backend, feature_map=fmap, model=model, cutmix_alpha=1.0, alpha=0.0, mode="pair")
    a, b = GenLabelLoader(cfg), GenLabelLoader(cfg)
    first = [list(a), list(a)]  # epochs 0 and 1
    again = list(b)
    for x, y in zip(first[0], again, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.targets, y.targets)
        assert torch.equal(x.draw.boxes.boxes, y.draw.boxes.boxes)
        assert set(x.draw.kind.tolist()) <= {UNMIXED, CUTMIX}  # cutmix only
    assert any(not torch.equal(x.draw.boxes.boxes, y.draw.boxes.boxes) for x, y in zip(first[0], first[1]))


def test_stored_embeddings_are_interpolated_by_the_corrected_lambda(data, tmp_path):
    """Stored embeddings: the targets are relabel's on the batch's pairs, whose lambda is the
    box-corrected one for cut samples (an approximation, MATH.md section 8); unmixed one-hot."""
    emb = np.random.default_rng(0).normal(size=(21, 4)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    loader = GenLabelLoader(config(data, backend="torch", embeddings=str(tmp_path / "emb.npy"), **SWITCHED))
    labels = torch.from_numpy(loader.files.labels)
    model = fgl.GaussianClassModel("diag").fit(torch.from_numpy(emb), labels, K)
    loader.set_model(model)
    for m in loader:
        draw = m.draw
        ref = fgl.relabel(model, m.features, draw.pairs, m.labels, 1.0, num_classes=K, backend="reference")
        keep = ((draw.kind == UNMIXED) | (draw.pairs.lam == 1)).reshape(-1, 1)
        want = torch.where(keep, torch.nn.functional.one_hot(m.labels, K).float(), torch.as_tensor(ref))
        torch.testing.assert_close(m.targets, want, rtol=1e-4, atol=1e-5)
        assert m.mixed_features is None


@pytest.mark.parametrize("kw,names", [
    (dict(mixup_alpha=0.5, alpha=0.3), "mixup_alpha, alpha"),
    (dict(mode="batch", lam_mode="sample"), "mode, lam_mode"),
    (dict(cutmix_alpha=1.0, pairing="roll"), "pairing, cutmix_alpha"),
    (dict(prob=1.5), "prob"), (dict(switch_prob=-0.1), "switch_prob"), (dict(mode="sample"), "mode"),
    (dict(cutmix_alpha=-1), "alpha"), (dict(cutmix_minmax=(0.6, 0.2)), "cutmix_minmax"),
    (dict(correct_lam="yes"), "correct_lam"), (dict(mixup_alpha=True), "mixup_alpha"),
])
def test_contradictory_or_bad_mixing_options_are_refused_naming_them(kw, names):
    with pytest.raises(ValueError, match=names):
        LoaderConfig(**kw)


def test_old_and_new_names_map_onto_each_other():
    assert LoaderConfig(mixup_alpha=0.4).mix_alpha == 0.4 and LoaderConfig(alpha=0.4).mix_alpha == 0.4
    assert LoaderConfig(mixup_alpha=0.4, alpha=0.4).switch_options() is None  # pairing's pairs, as before
    assert LoaderConfig(alpha=0.0, mixup_alpha=0.0).mixing is False
    opts = LoaderConfig(lam_mode="sample", cutmix_alpha=1.0).switch_options()
    assert opts["mode"] == "elem" and opts["mixup_alpha"] == 1.0
    assert LoaderConfig(cutmix_minmax=(0.2, 0.8), alpha=0.0).switch_options()["cutmix_alpha"] == 1.0  # as timm
    assert LoaderConfig(prob=0.5, alpha=0.0).switch_options() is None  # nothing mixes at all


def test_deep_targets_relabel_from_the_mixed_batchs_own_features(data):
    """The deep variant: features the "network" (a fixed nonlinear map here) computes from the
    yielded images, cut samples included; targets GenLabel's on them, unmixed samples one-hot."""
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3 * 4 * 4, 3, generator=g)

    def net(images):  # a nonlinear feature map of the images themselves: no interpolation would give it
        return torch.tanh(torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) @ proj / 20)

    plain = GenLabelLoader(config(data, backend="torch", alpha=0.0, train=False, shuffle=False, last_batch="partial"))
    batches = list(plain)
    h = torch.cat([net(b.images) for b in batches])
    model = fgl.GaussianClassModel("diag").fit(h, torch.cat([b.labels for b in batches]), K)
    loader = GenLabelLoader(config(data, backend="torch", smoothing=0.1, last_batch="partial", **SWITCHED))
    seen = set()
    for m in loader:
        hm = net(m.images)
        t = fgl.loader.deep_targets(model, hm, m, 0.6, smoothing=0.1)
        lam, labels = m.draw.pairs.lam, m.labels
        ref = fgl.genlabel_target(model, hm, labels, labels[m.draw.pairs.perm], lam, 0.6, num_classes=K,
                                  smoothing=0.1)
        keep = ((m.draw.kind == UNMIXED) | (lam == 1)).reshape(-1, 1)
        one_hot = (torch.nn.functional.one_hot(labels, K) * 0.9 + 0.1 / K).float()
        torch.testing.assert_close(t, torch.where(keep, one_hot, ref), rtol=1e-4, atol=1e-5)
        seen |= set(m.draw.kind.tolist())
    assert {UNMIXED, MIXUP, CUTMIX} <= seen
    with pytest.raises(ValueError, match="features"):
        fgl.loader.deep_targets(model, hm[:1], m)
