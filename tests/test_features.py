"""Feature sources: the thumbnail map (graph kernel vs torch reference), PCA, stored embeddings."""
import numpy as np
import pytest
import torch

from fastgenlabel import mix, sample_pairs
from fastgenlabel.dali import _kernels
from fastgenlabel.features import NoFeatures, StoredEmbeddings, ThumbnailPCA, thumbnails, thumbnails_torch


@pytest.mark.parametrize("shape,t", [((13, 17, 3), 4), ((8, 8, 1), 8), ((32, 20, 3), 5), ((5, 6, 2), 1)])
def test_graph_thumbnail_kernel_matches_torch_reference(shape, t):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3,) + shape, dtype=np.uint8)
    want = thumbnails(images, t)
    for i, img in enumerate(images):
        got = np.empty(t * t * shape[2], np.float32)
        _kernels.thumbnail_into(img, t, got)
        np.testing.assert_allclose(got, want[i], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(thumbnails_torch(torch.from_numpy(images), t).numpy(), want, rtol=1e-6)


def test_thumbnail_pca_is_exact_under_mixing():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 12, 12, 3)).astype(np.float32)
    pairs = sample_pairs(16, 1.0, lam_mode="sample", generator=2)
    fmap = ThumbnailPCA(4, 6).fit(thumbnails(images, 4))
    z_of_mixed = fmap.transform(thumbnails(mix(images, pairs), 4))
    mixed_z = mix(fmap.transform(thumbnails(images, 4)), pairs)
    np.testing.assert_allclose(z_of_mixed, mixed_z, rtol=1e-4, atol=1e-3)


def _projection_bound(fmap, x):
    """Bound on |float32 (x - mean) @ C^T - exact| per element: one rounding of the difference and an
    F-term float32 dot product, gamma_(F+1) * sum_f |x_f - m_f| |C_jf| with gamma_n = n u / (1 - n u)
    (Higham, Accuracy and Stability, 3.1), u = 2^-24. Two implementations both within it differ by at
    most twice it."""
    f = x.shape[1]
    u = 2.0 ** -24
    gamma = (f + 1) * u / (1 - (f + 1) * u)
    return gamma * np.abs(x.astype(np.float64) - fmap.mean) @ np.abs(fmap.components.astype(np.float64)).T


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_numpy_and_torch_projections_agree_within_float32_bound(scale):
    """ThumbnailPCA.transform in NumPy (the user's arrays) and in torch (the loader, fit) give each
    feature within the float32 bound of the exact projection (pixel-unit thumbnails, F = 192)."""
    rng = np.random.default_rng(5)
    x = (rng.uniform(size=(300, 192)) * scale).astype(np.float32)
    x[:100] += np.float32(0.5 * scale)  # a class far from the mean
    fmap = ThumbnailPCA(8, 6).fit(x)
    exact = (x.astype(np.float64) - fmap.mean) @ fmap.components.astype(np.float64).T
    bound = _projection_bound(fmap, x)
    for z in (fmap.transform(x), fmap.transform(torch.from_numpy(x)).numpy()):
        np.testing.assert_array_less(np.abs(z - exact), bound)


def test_thumbnail_pca_fit_transform_save_load(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 12)).astype(np.float32)
    fmap = ThumbnailPCA(2, 4).fit(x)
    comps = fmap.components.astype(np.float64)
    np.testing.assert_allclose(comps @ comps.T, np.eye(4), atol=1e-5)
    z = fmap.transform(x)
    assert z.shape == (50, 4) and z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    zt = fmap.transform(torch.from_numpy(x))
    np.testing.assert_array_less(np.abs(zt.numpy() - z), 2 * _projection_bound(fmap, x))
    fmap.save(tmp_path / "map.npz")
    back = ThumbnailPCA.load(tmp_path / "map.npz")
    np.testing.assert_array_equal(back.components, fmap.components)
    assert back.thumbnail == 2 and back.dim == 4


def test_thumbnail_pca_errors(tmp_path):
    with pytest.raises(ValueError, match="dim: 20 components"):
        ThumbnailPCA(2, 20).fit(np.zeros((10, 12)))
    with pytest.raises(RuntimeError, match="not fitted"):
        ThumbnailPCA(2, 3).transform(np.zeros((1, 12)))
    with pytest.raises(ValueError, match="thumbnail"):
        ThumbnailPCA(0, 3)
    fmap = ThumbnailPCA(2, 3).fit(np.random.default_rng(0).normal(size=(10, 12)))
    with pytest.raises(ValueError, match="expected 12 values"):
        fmap.transform(np.zeros((2, 7)))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a fastgenlabel ThumbnailPCA"):
        ThumbnailPCA.load(tmp_path / "other.npz")


def test_stored_embeddings_lookup_and_checks(tmp_path):
    emb = np.arange(30, dtype=np.float64).reshape(10, 3)
    np.save(tmp_path / "emb.npy", emb)
    src = StoredEmbeddings(tmp_path / "emb.npy", num_samples=10)
    assert src.dim == 3 and len(src) == 10 and not src.exact_under_mixing
    got = src.lookup(np.array([4, 0, 9]))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), emb[[4, 0, 9]])
    assert isinstance(src.array, np.memmap)
    with pytest.raises(ValueError, match="has 10 rows, but the dataset has 11 samples"):
        StoredEmbeddings(tmp_path / "emb.npy", num_samples=11)
    with pytest.raises(IndexError):
        src.lookup([10])
    np.save(tmp_path / "bad.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"expected an \(N, d\) float array"):
        StoredEmbeddings(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StoredEmbeddings(tmp_path / "missing.npy")
    assert NoFeatures().kind == "none"
