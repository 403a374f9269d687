"""Loader inputs refused early and edge cases of sampling and features."""
import numpy as np
import pytest
import torch

from fastgenlabel.features import StoredEmbeddings, thumbnails
from fastgenlabel.loader import LoaderConfig
from fastgenlabel.loader.sampling import shard_order


@pytest.mark.parametrize("kw,field", [
    (dict(mean=(float("nan"), 1.0, 1.0)), "mean"), (dict(mean=(1.0, 2.0)), "mean"), (dict(std=(1.0, 0.0, 1.0)), "std"),
    (dict(mean=None), "mean"), (dict(target_threads=0), "target_threads"),
    (dict(channels_last=True, layout="HWC"), "channels_last"), (dict(channels_last=1), "channels_last"),
])
def test_config_refuses_bad_normalisation_and_threads(kw, field):
    with pytest.raises(ValueError, match=field):
        LoaderConfig(**kw)
    LoaderConfig(mean=None, std=None)  # both None: mix only


@pytest.mark.parametrize("n,shards", [(2, 5), (3, 7), (10, 4), (1, 3)])
def test_every_shard_gets_its_share_even_with_more_shards_than_samples(n, shards):
    parts = [shard_order(n, seed=1, epoch=2, shuffle=True, shard_id=r, num_shards=shards) for r in range(shards)]
    per_shard = -(-n // shards)
    assert all(len(p) == per_shard for p in parts)
    assert set(np.concatenate(parts).tolist()) == set(range(n))


def test_thumbnails_of_a_flipped_view():
    x = np.random.default_rng(0).integers(0, 256, (2, 6, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(thumbnails(x[:, :, ::-1], 2), thumbnails(np.ascontiguousarray(x[:, :, ::-1]), 2))


def test_stored_embeddings_name_npz_archives_and_float32_overflow(tmp_path):
    np.savez(tmp_path / "emb.npz", a=np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="npz archive"):
        StoredEmbeddings(tmp_path / "emb.npz")
    big = np.ones((4, 2)) * 1e300
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(ValueError, match="beyond float32"):
        StoredEmbeddings(tmp_path / "big.npy").lookup(torch.arange(2))


def test_a_feature_map_for_other_thumbnails_is_refused_when_fitted_and_when_given(tmp_path):
    from PIL import Image

    from fastgenlabel.features import ThumbnailPCA

    rng = np.random.default_rng(0)
    for k in range(2):
        (tmp_path / f"c{k}").mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"c{k}" / f"{i}.png")
    with pytest.raises(ValueError, match="thumbs: 27 values"):
        ThumbnailPCA(4, 2).fit(rng.normal(size=(10, 27)))
    gray = ThumbnailPCA(4, 2).fit(rng.normal(size=(10, 16)))  # one channel: fine for the map itself
    with pytest.raises(ValueError, match="feature_map: fitted on 16 values"):
        from fastgenlabel.loader import GenLabelLoader

        GenLabelLoader(LoaderConfig(data=str(tmp_path), feature_map=gray, backend="torch", batch_size=2))


class _ToTensorImages(torch.utils.data.Dataset):
    """Image files as torchvision's ``ToTensor`` gives them, float (C, H, W) in [0, 1], permuted to
    (H, W, C); ``normalise`` also applies ImageNet's Normalize (values below 0 and above 1)."""

    def __init__(self, files, normalise=False):
        from fastgenlabel.loader.images import ImageFileDataset

        self.pixels = ImageFileDataset(files, 16, train=False)
        self.normalise = normalise
        self.num_classes = files.num_classes

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        img, label, index = self.pixels[i]
        chw = img.permute(2, 0, 1).float().div(255)  # ToTensor
        if self.normalise:
            mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
            chw = (chw - mean[:, None, None]) / std[:, None, None]
        return chw.permute(1, 2, 0), label, index


def test_float_images_in_0_1_units_are_refused_by_default_and_read_with_float_range(tmp_path):
    from PIL import Image

    from fastgenlabel import GaussianClassModel
    from fastgenlabel.features import ThumbnailPCA
    from fastgenlabel.loader import GenLabelLoader, scan
    from fastgenlabel.loader.images import ImageFileDataset

    rng = np.random.default_rng(0)
    for k in range(2):
        (tmp_path / f"c{k}").mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(60 * k, 120 + 60 * k, (20, 18, 3), dtype=np.uint8)).save(
                tmp_path / f"c{k}" / f"{i}.png")
    files = scan(str(tmp_path))
    fmap = ThumbnailPCA(2, 3).fit(rng.uniform(0, 255, (20, 12)))
    model = GaussianClassModel("diag").fit(torch.randn(8, 3) * 50, torch.arange(8) % 2, 2)
    cfg = LoaderConfig(backend="torch", batch_size=4, shuffle=False, device="cpu", feature_map=fmap, model=model)

    def first(dataset, **kw):
        return next(iter(GenLabelLoader(cfg, dataset=dataset, **kw)))

    with pytest.raises(ValueError, match=r"float_range: the dataset's float images lie in \[.*\], as 0-1 images.*"
                                         r"pass float_range='0-1'"):
        first(_ToTensorImages(files))
    want = first(ImageFileDataset(files, 16, train=False))  # the same pixels as uint8
    got = first(_ToTensorImages(files), float_range="0-1")
    torch.testing.assert_close(got.images, want.images, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.features, want.features, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got.targets, want.targets, rtol=1e-4, atol=1e-5)
    raw = first(_ToTensorImages(files), float_range="0-1", mean=None, std=None)  # mixed pixels, 0-255 units
    torch.testing.assert_close(raw.images, first(ImageFileDataset(files, 16, train=False), mean=None, std=None).images,
                               rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match=r"float_range: '0-1', but the dataset's float images lie in .*drop Normalize"):
        first(_ToTensorImages(files, normalise=True), float_range="0-1")
    with pytest.raises(ValueError, match="float_range: expected one of"):
        LoaderConfig(float_range="0-1.0")
