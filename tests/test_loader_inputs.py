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
