"""Feature sources: the thumbnail map (graph kernel vs torch reference), PCA, stored embeddings."""
import warnings

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


def _saved_map(tmp_path, name="map.npz"):
    fmap = ThumbnailPCA(2, 3).fit(np.random.default_rng(5).normal(size=(30, 12)).astype(np.float32))
    fmap.save(tmp_path / name)
    return fmap, tmp_path / name


def test_a_damaged_feature_map_is_refused_naming_the_file(tmp_path):
    """Feature maps carry a checksum, as model files do: a flipped byte, a truncated file or
    another file is a ModelFileError naming the file, not a BadZipFile, an EOFError or a wrong batch."""
    from fastgenlabel import ModelFileError

    fmap, path = _saved_map(tmp_path)
    raw = bytearray(path.read_bytes())
    at = raw.index(fmap.components.tobytes()[:8])  # inside the stored components
    raw[at + 3] ^= 0x10
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="flipped.npz' is truncated or not .* Bad CRC"):  # the zip's CRC
        ThumbnailPCA.load(tmp_path / "flipped.npz")
    with np.load(path) as f:  # a valid archive whose components changed after saving: the checksum
        arrays = {name: f[name] for name in f.files}
    arrays["components"][0, 0] += 1e-3
    np.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(ModelFileError, match="edited.npz' fails its checksum"):
        ThumbnailPCA.load(tmp_path / "edited.npz")
    for cut in (60, len(raw) // 2, len(raw) - 30):
        (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:cut])
        with pytest.raises(ModelFileError, match=r"feature map '.*cut.npz' is truncated or not a fastgenlabel"):
            ThumbnailPCA.load(tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("not an archive\n")
    with pytest.raises(ModelFileError, match="text.npz"):
        ThumbnailPCA.load(tmp_path / "text.npz")
    with pytest.raises(ModelFileError, match="missing.npz': cannot read"):
        ThumbnailPCA.load(tmp_path / "missing.npz")
    from fastgenlabel import GaussianClassModel

    GaussianClassModel("diag").fit(np.random.default_rng(0).normal(size=(10, 3)), np.arange(10) % 2, 2).save(
        tmp_path / "model.npz")
    with pytest.raises(ModelFileError, match="is a class model, not a feature map: pass it as model="):
        ThumbnailPCA.load(tmp_path / "model.npz")


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(components=a["components"][:, :7], mean=a["mean"][:7]), "7 values per thumbnail is not 2x2xC"),
    (lambda a: a.update(mean=a["mean"][:5]), r"mean of shape \(5,\)"),
    (lambda a: a.update(components=a["components"][0]), "expected a \\(d, F\\) float array"),
    (lambda a: a.update(thumbnail=np.array(0)), "thumbnail"),
    (lambda a: a.update(components=np.full_like(a["components"], np.nan)), "NaN"),
    (lambda a: a.pop("mean"), "lacks \\['mean'\\]"),
])
def test_a_malformed_feature_map_is_refused_at_load(tmp_path, change, match):
    """Well-formed archives (valid checksum) whose arrays do not make a map: refused when read,
    not an IndexError at the first batch."""
    from fastgenlabel import ModelFileError
    from fastgenlabel.models import io

    fmap, path = _saved_map(tmp_path)
    arrays = fmap._arrays()
    change(arrays)
    io.save_state(path, {}, arrays, format=io.FEATURE_MAP_FORMAT)
    with pytest.raises(ModelFileError, match=f"feature map '.*map.npz' is malformed: .*{match}"):
        ThumbnailPCA.load(path)


def test_a_feature_map_without_a_checksum_loads_with_a_warning(tmp_path):
    """Maps written before maps carried a checksum: read after the same checks, with a warning
    that says how to add one."""
    fmap, _ = _saved_map(tmp_path)
    old = tmp_path / "old.npz"
    np.savez(old, kind=np.array("thumbnail-pca"), thumbnail=np.array(2), mean=fmap.mean, components=fmap.components)
    with pytest.warns(UserWarning, match="has no checksum .* save it again"):
        back = ThumbnailPCA.load(old)
    np.testing.assert_array_equal(back.components, fmap.components)
    assert back.digest == fmap.digest  # the content's checksum: a model fitted on it still pairs with it
    back.save(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ThumbnailPCA.load(old)
    np.savez(old, kind=np.array("thumbnail-pca"), thumbnail=np.array(2), mean=fmap.mean,
             components=fmap.components[:, :5])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="malformed"):
        ThumbnailPCA.load(old)
