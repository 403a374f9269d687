"""GenLabelLoader on the CPU, both backends: targets equal the reference recomputed from each batch's
pairs and features, images are the mixed images, epochs/shards/last-batch policies behave."""
import numpy as np
import pytest
import torch
from PIL import Image

import fastgenlabel as fgl
from fastgenlabel.features import ThumbnailPCA, thumbnails
from fastgenlabel.loader import GenLabelLoader, LoaderBatch, LoaderConfig

pytest.importorskip("nvidia.dali")

BACKENDS = ["dali", "torch"]
N, K = 21, 3


def write_dataset(root, per_class=(7, 7, 7), seed=0):
    """JPEG files of varied sizes, one folder per class; class k is brighter than class k-1."""
    rng = np.random.default_rng(seed)
    for k, n in enumerate(per_class):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(n):
            h, w = 20 + 3 * i, 18 + 2 * k + i
            img = (rng.integers(0, 70, (h, w, 3)) + 70 * k).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{k}" / f"{i:03d}.jpg", quality=92)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("images"))


def config(data, **kw):
    base = dict(data=str(data), batch_size=8, image_size=16, device="cpu", num_threads=1, seed=3,
                mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0))
    base.update(kw)
    return LoaderConfig(**base)


@pytest.fixture(scope="module")
def fitted(data):
    return fit_on_one_pass(data)


def fit_on_one_pass(data):
    """A ThumbnailPCA and full Gaussians fitted on one unmixed pass (thumbnails written by the graph)."""
    loader = GenLabelLoader(config(data, alpha=0.0, train=False, shuffle=False, last_batch="partial",
                                   return_thumbnails=True, thumbnail=4))
    batches = list(loader)
    thumbs = torch.cat([b.thumbnails for b in batches]).numpy()
    labels = torch.cat([b.labels for b in batches])
    fmap = ThumbnailPCA(4, 5).fit(thumbs)
    model = fgl.GaussianClassModel("full").fit(torch.from_numpy(fmap.transform(thumbs)), labels, K)
    return fmap, model


def reference_targets(batch: LoaderBatch, model, gamma, smoothing=0.0):
    perm = batch.pairs.perm
    return fgl.genlabel_target(model, fgl.mix(batch.features, batch.pairs), batch.labels, batch.labels[perm],
                               batch.pairs.lam, gamma, num_classes=K, smoothing=smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_equal_reference_from_each_batchs_pairs_and_features(data, fitted, backend):
    fmap, model = fitted
    loader = GenLabelLoader(config(data, backend=backend, feature_map=fmap, model=model, gamma=0.7, smoothing=0.1,
                                   lam_mode="sample", last_batch="partial"))
    sizes = []
    for batch in loader:
        images, targets = batch
        assert images.shape == (len(batch), 3, 16, 16) and images.dtype == torch.float32
        assert targets.shape == (len(batch), K) and targets.dtype == torch.float32
        torch.testing.assert_close(targets, reference_targets(batch, model, 0.7, 0.1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(targets.sum(1), torch.ones(len(batch)))
        assert torch.equal(batch.labels, torch.from_numpy(loader.files.labels[batch.indices.numpy()]))
        sizes.append(len(batch))
    assert sizes == [8, 8, 5] and len(loader) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_images_are_the_mixed_images_and_features_exact_under_mixing(data, backend):
    common = dict(backend=backend, train=False, mean=None, std=None, return_thumbnails=True, thumbnail=4,
                  last_batch="partial")
    plain = list(GenLabelLoader(config(data, alpha=0.0, **common)))
    mixed = list(GenLabelLoader(config(data, alpha=1.0, **common)))
    for p, m in zip(plain, mixed, strict=True):
        assert torch.equal(p.indices, m.indices)  # same order: a function of (seed, epoch)
        assert torch.equal(p.pairs.perm, torch.arange(len(p)))
        torch.testing.assert_close(m.images, fgl.mix(p.images, m.pairs), rtol=1e-5, atol=1e-4)
        # the thumbnails of the mixed images are the mixed thumbnails: linear features are exact
        of_mixed = thumbnails(m.images.permute(0, 2, 3, 1).numpy(), 4)
        torch.testing.assert_close(torch.from_numpy(of_mixed), fgl.mix(m.thumbnails, m.pairs), rtol=1e-5,
                                   atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_reads_as_images_targets_and_the_loader_knows_its_classes(data, backend):
    loader = GenLabelLoader(config(data, backend=backend))
    assert loader.classes == ("class0", "class1", "class2")
    batch = next(iter(loader))
    assert batch[0] is batch.images and batch[1] is batch.targets and batch[-1] is batch.targets
    assert batch[:] == (batch.images, batch.targets) and len(batch) == 8
    with pytest.raises(IndexError):
        batch[2]


def test_backends_agree_on_order_pairs_and_targets(data, fitted):
    fmap, model = fitted
    a = list(GenLabelLoader(config(data, backend="dali", feature_map=fmap, model=model, train=False)))
    b = list(GenLabelLoader(config(data, backend="torch", feature_map=fmap, model=model, train=False)))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.pairs.perm, y.pairs.perm)
        assert torch.equal(x.pairs.lam, y.pairs.lam)


@pytest.mark.parametrize("policy,batch_size,sizes", [
    ("drop", 8, [8, 8]), ("partial", 8, [8, 8, 5]), ("fill", 8, [8, 8, 8]), ("partial", 10, [10, 10, 1]),
    ("fill", 20, [20, 20]), ("drop", 21, [21])])
def test_last_batch_policies(data, policy, batch_size, sizes):
    loader = GenLabelLoader(config(data, last_batch=policy, batch_size=batch_size, alpha=1.0))
    batches = list(loader)
    assert [len(b) for b in batches] == sizes and len(loader) == len(sizes)
    seen = torch.cat([b.indices for b in batches])
    if policy != "drop":
        assert set(seen.tolist()) == set(range(N))
    for b in batches:
        torch.testing.assert_close(b.targets, fgl.mixup_target(b.labels, b.pairs, K))


def test_epochs_set_epoch_and_reset(data):
    loader = GenLabelLoader(config(data, alpha=1.0))
    first = [b.indices for b in loader]
    assert loader.epoch == 1
    second = [b.indices for b in loader]
    assert loader.epoch == 2 and not all(torch.equal(a, b) for a, b in zip(first, second))
    loader.set_epoch(0)
    again = list(loader)
    assert all(torch.equal(a, b.indices) for a, b in zip(first, again))
    # leave a pass early: the next pass restarts the same epoch from its beginning
    loader.set_epoch(5)
    it = iter(loader)
    early = next(it)
    del it
    loader.reset()
    full = list(loader)
    assert torch.equal(full[0].indices, early.indices)
    assert torch.equal(full[0].pairs.lam, early.pairs.lam)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_pass_ends_with_its_last_batch(data, backend):
    """Stopping right after the last batch (zip with range(len)) still moves to the next epoch,
    and set_epoch during a pass chooses the next one."""
    loader = GenLabelLoader(config(data, alpha=1.0, backend=backend))
    n = len(loader)
    first = [b.indices for _, b in zip(range(n), loader)]
    assert loader.epoch == 1
    second = [b.indices for _, b in zip(range(n), loader)]
    assert loader.epoch == 2 and not all(torch.equal(a, b) for a, b in zip(first, second))
    again = []
    for b in loader:
        again.append(b.indices)
        loader.set_epoch(0)  # during the pass: the next pass is epoch 0
    assert loader.epoch == 0
    assert all(torch.equal(a, b.indices) for a, b in zip(first, loader))


def test_shards_split_the_epoch(data):
    parts = [torch.cat([b.indices for b in GenLabelLoader(config(data, shard_id=r, num_shards=2, batch_size=5,
                                                                  last_batch="partial"))]) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 11  # ceil(21 / 2), padded by wrapping around
    assert set(parts[0].tolist()) | set(parts[1].tolist()) == set(range(N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stored_embeddings_are_looked_up_by_index_and_interpolated(data, tmp_path, backend):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(K), 7)
    emb = (rng.normal(size=(N, 4)) + 3 * labels[:, None]).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    model = fgl.GaussianClassModel("diag").fit(torch.from_numpy(emb), torch.from_numpy(labels), K)
    loader = GenLabelLoader(config(data, backend=backend, embeddings=str(tmp_path / "emb.npy"), model=model))
    for batch in loader:
        torch.testing.assert_close(batch.features, torch.from_numpy(emb[batch.indices.numpy()]))
        torch.testing.assert_close(batch.targets, reference_targets(batch, model, 1.0), rtol=1e-4, atol=1e-5)


def test_no_features_gives_mixup_targets_and_float16_images(data):
    loader = GenLabelLoader(config(data, dtype="float16", smoothing=0.2))
    for images, _targets in loader:
        assert images.dtype == torch.float16
    batch = next(iter(loader))
    torch.testing.assert_close(batch.targets, fgl.mixup_target(batch.labels, batch.pairs, K, smoothing=0.2))


def test_torch_backend_wraps_a_user_dataset_and_dataloader(data, fitted):
    fmap, model = fitted

    class Tiles(torch.utils.data.Dataset):
        num_classes = K

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return torch.full((16, 16, 3), 10 * i, dtype=torch.uint8), i % K

    loader = GenLabelLoader(config(None, backend="torch", feature_map=fmap, model=model), dataset=Tiles(), batch_size=4)
    assert len(loader) == 3
    for batch in loader:
        assert batch.indices is None
        torch.testing.assert_close(batch.targets, reference_targets(batch, model, 1.0), rtol=1e-4, atol=1e-5)
    dl = torch.utils.data.DataLoader(Tiles(), batch_size=5)
    loader = GenLabelLoader(config(None, backend="torch"), dataset=dl)
    assert len(loader) == 3 and [len(b) for b in loader] == [5, 5, 2]


class Images(torch.utils.data.Dataset):
    """Items of a given shape and dtype, labels 0..K-1: what a user's Dataset might yield."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.full(self.shape, 10 * i).to(self.dtype), i % K


def test_torch_backend_names_a_channels_first_dataset():
    """A torchvision-style dataset ((C, H, W) after ToTensor) is refused with the reason, not mixed
    as if its width were channels; (H, W, C) floats run, in the units of mean and std."""
    def first(dataset, **kw):
        return next(iter(GenLabelLoader(config(None, backend="torch", batch_size=4, num_classes=K, **kw),
                                        dataset=dataset)))

    with pytest.raises(ValueError, match=r"look like \(B, C, H, W\); the torch backend takes \(B, H, W, C\)"):
        first(Images((3, 16, 16), torch.uint8))
    with pytest.raises(ValueError, match="look like"):
        first(Images((3, 16, 16), torch.float32))
    pixels = first(Images((16, 16, 3), torch.float32))  # 0-255 floats, normalised as uint8 would be
    torch.testing.assert_close(pixels.images, first(Images((16, 16, 3), torch.uint8)).images)
    assert first(Images((16, 16, 3), torch.float32), mean=None, std=None).images.shape == (4, 3, 16, 16)


def test_set_model_switches_at_a_batch_boundary(data, fitted):
    fmap, model = fitted
    loader = GenLabelLoader(config(data, feature_map=fmap, model=model, gamma=1.0))
    it = iter(loader)
    first = next(it)
    np.testing.assert_allclose(first.targets.numpy(), reference_targets(first, model, 1.0).numpy(), atol=5e-5)
    # A refit on a different subset: every later batch, including prefetched ones, uses it alone.
    refit = fgl.GaussianClassModel("diag").fit(first.features, first.labels, K)
    loader.set_model(refit)
    for batch in it:
        np.testing.assert_allclose(batch.targets.numpy(), reference_targets(batch, refit, 1.0).numpy(), atol=5e-5)
    loader.set_model(None)
    plain = next(iter(loader))
    expected = fgl.mixup_target(plain.labels, plain.pairs, K)
    np.testing.assert_allclose(plain.targets.numpy(), expected.numpy(), atol=1e-6)


def test_set_model_rejects_another_k_or_d(data, fitted):
    fmap, model = fitted
    loader = GenLabelLoader(config(data, feature_map=fmap, model=model))
    z = torch.randn(30, fmap.dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="model: fitted on 4 classes, but the data has 3; refit"):
        loader.set_model(fgl.GaussianClassModel("diag").fit(z, torch.arange(30) % 4, 4))
    with pytest.raises(ValueError, match="model: fitted on 2-dimensional"):
        loader.set_model(fgl.GaussianClassModel("diag").fit(z[:, :2], torch.arange(30) % K, K))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_no_mixing_gives_one_hot_targets_even_with_a_model(data, fitted, backend):
    """alpha = 0: the images are not mixed, so there is nothing to relabel (the config's promise)."""
    fmap, model = fitted
    loader = GenLabelLoader(config(data, alpha=0.0, feature_map=fmap, model=model, gamma=1.0, smoothing=0.1,
                                   backend=backend))
    batch = next(iter(loader))
    want = torch.nn.functional.one_hot(batch.labels, K).float() * 0.9 + 0.1 / K
    torch.testing.assert_close(batch.targets, want)
    assert batch.features is not None  # still computed (e.g. to fit a model from the loader)


def test_benchmark_baseline_refuses_mixing_or_features(data, fitted):
    with pytest.raises(ValueError, match="extra: baseline"):
        GenLabelLoader(config(data, alpha=1.0), extra={"baseline": True})
    with pytest.raises(ValueError, match="extra: baseline"):
        GenLabelLoader(config(data, alpha=0.0, feature_map=fitted[0]), extra={"baseline": True})


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_gives_the_same_nchw_images_in_channels_last_memory(data, fitted, backend):
    """channels_last=True: (B, C, H, W) tensors whose memory is channels-last (as the stage wrote
    them, no copy), equal to the CHW output, with the same targets."""
    fmap, model = fitted
    common = dict(backend=backend, feature_map=fmap, model=model, alpha=1.0, dtype="float16")
    first = list(GenLabelLoader(config(data, **common)))
    last = list(GenLabelLoader(config(data, channels_last=True, **common)))
    assert len(first) == len(last)
    for a, b in zip(first, last, strict=True):
        assert b.images.shape == a.images.shape and b.images.dtype == torch.float16
        assert b.images.is_contiguous(memory_format=torch.channels_last) and not b.images.is_contiguous()
        assert torch.equal(b.images, a.images)
        assert torch.equal(b.targets, a.targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_images_are_the_float32_images_rounded(data, backend):
    """dtype="bfloat16": the float32 mix rounded to nearest even, as torch rounds (on DALI's CPU
    stage written as bit patterns, DALI having no bfloat16)."""
    common = dict(backend=backend, alpha=1.0, layout="HWC")
    wide = list(GenLabelLoader(config(data, **common)))
    narrow = list(GenLabelLoader(config(data, dtype="bfloat16", **common)))
    for a, b in zip(wide, narrow, strict=True):
        assert b.images.dtype == torch.bfloat16 and b.images.shape == a.images.shape
        assert torch.equal(b.images, a.images.to(torch.bfloat16))
