"""Streaming fit: many batches equal one fit; feature sources; clear errors."""
import numpy as np
import pytest
import torch

import fastgenlabel as fg
from fastgenlabel.features import ThumbnailPCA, thumbnails
from fastgenlabel.fit import (
    FitReport,
    InputFeatures,
    LinearMapFeatures,
    ModuleFeatures,
    StreamingFit,
    as_source,
    fit_batches,
)

K, D, N = 5, 6, 700


def _data(seed=0, n=N, d=D, k=K):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, d)) * (1 + y[:, None]) + 3.0 * y[:, None] + 100.0  # offset: tests stability
    return z, y


def _batches(z, y, sizes=(1, 64, 0, 33, 128, 7)):
    """Irregular batch sizes (an empty batch among them), cycling until the data is used up."""
    i, j = 0, 0
    while i < len(y):
        b = sizes[j % len(sizes)]
        yield z[i:i + b], y[i:i + b]
        i, j = i + b, j + 1


@pytest.mark.parametrize("chunk_rows", [1, 50, None])
@pytest.mark.parametrize("covariance", ["full", "diag", "tied"])
def test_streaming_gaussian_equals_one_fit(covariance, chunk_rows):
    z, y = _data()
    one = fg.GaussianClassModel(covariance).fit(z, y, K)
    fit = StreamingFit(fg.GaussianClassModel(covariance), K, chunk_rows=chunk_rows)
    for zb, yb in _batches(z, y):
        fit.update(zb, yb)
    model = fit.result()
    assert fit.num_samples == N
    torch.testing.assert_close(model.stats.count, one.stats.count, rtol=0, atol=0)
    torch.testing.assert_close(model.stats.mean, one.stats.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.stats.m2, one.stats.m2, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(model.log_likelihood(z), one.log_likelihood(z), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cap", [None, 1, 9])
@pytest.mark.parametrize("chunk_rows", [1, 50, None])
def test_streaming_kde_keeps_identical_points(cap, chunk_rows):
    z, y = _data(1, n=300)
    one = fg.KDEClassModel(max_points_per_class=cap, seed=3).fit(z, y, K)
    fit = StreamingFit(fg.KDEClassModel(max_points_per_class=cap, seed=3), K, chunk_rows=chunk_rows)
    for zb, yb in _batches(z, y):
        fit.update(zb, yb)
    model = fit.result()
    for name in ("count", "points", "labels", "keys"):
        assert torch.equal(getattr(model.stats, name), getattr(one.stats, name)), name
    np.testing.assert_array_equal(model.log_likelihood(z[:50]), one.log_likelihood(z[:50]))


def test_statistics_stay_on_the_features_device_in_float64():
    z, y = _data()
    fit = StreamingFit(fg.GaussianClassModel("diag"), K, chunk_rows=1)
    fit.update(torch.from_numpy(z[:10]).float(), torch.from_numpy(y[:10]))
    assert fit.stats.mean.dtype == torch.float64 and fit.stats.mean.device == torch.device("cpu")
    assert fit.device == torch.device("cpu") and fit.dim == D


def test_buffered_batches_are_copies():
    z, y = _data()
    fit = StreamingFit(fg.GaussianClassModel("full"), K)
    buf_z, buf_y = np.empty((100, D)), np.empty(100, np.int64)
    for i in range(0, N, 100):  # the caller reuses one buffer for every batch
        buf_z[:], buf_y[:] = z[i:i + 100], y[i:i + 100]
        fit.update(buf_z, buf_y)
    expected = fg.GaussianClassModel("full").fit(z, y, K)
    torch.testing.assert_close(fit.result().stats.m2, expected.stats.m2, rtol=1e-10, atol=1e-10)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                        torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool2d(2))

    def forward(self, x):
        return self.body(x)  # (B, 4, 2, 2): flattened to d = 16 by the source


def test_torch_module_source_runs_eval_no_grad_and_restores_mode():
    net = _Net().train()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(120, 3, 8, 8)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, 120))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 120, 16)]
    report_lines = []
    model = fit_batches(fg.GaussianClassModel("diag"), batches, 3, features=net, progress=False,
                        log=report_lines.append)
    assert net.training, "the module's training mode is restored"
    net.eval()
    with torch.no_grad():
        ref = net(x).reshape(120, -1)
    expected = fg.GaussianClassModel("diag").fit(ref, y, 3)
    assert model.dim == 16
    torch.testing.assert_close(model.stats.m2, expected.stats.m2, rtol=1e-10, atol=1e-10)
    assert "samples/s" in report_lines[0]


def test_module_source_output_has_no_grad():
    net = torch.nn.Linear(4, 2)
    z = ModuleFeatures(net)(torch.ones(3, 4))
    assert not z.requires_grad and z.shape == (3, 2)


def test_stored_embeddings_are_looked_up_by_index(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 50)
    np.save(tmp_path / "emb.npy", emb)
    order = rng.permutation(50)
    batches = [(None, labels[order[i:i + 8]], order[i:i + 8]) for i in range(0, 50, 8)]
    model = fit_batches(fg.GaussianClassModel("full"), batches, 3, features=str(tmp_path / "emb.npy"), progress=False)
    expected = fg.GaussianClassModel("full").fit(emb[order], labels[order], 3)
    np.testing.assert_allclose(model.log_likelihood(emb), expected.log_likelihood(emb), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="index"):
        fit_batches(fg.GaussianClassModel(), [(None, labels[:4])], 3, features=str(tmp_path / "emb.npy"),
                    progress=False)


def test_linear_map_source_on_images_and_thumbnails():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    y = rng.integers(0, 2, 40)
    pca = ThumbnailPCA(4, 5).fit(thumbnails(images, 4))
    src = as_source(pca)
    assert isinstance(src, LinearMapFeatures)
    z_img = src(torch.from_numpy(images))
    z_th = src(torch.from_numpy(thumbnails(images, 4)))
    torch.testing.assert_close(z_img, z_th)
    model = fit_batches(fg.GaussianClassModel("tied"), [(torch.from_numpy(images[i:i + 10]), y[i:i + 10])
                                                        for i in range(0, 40, 10)], 2, features=pca, progress=False)
    expected = fg.GaussianClassModel("tied").fit(pca.transform(thumbnails(images, 4)), y, 2)
    torch.testing.assert_close(model.stats.m2, expected.stats.m2, rtol=1e-4, atol=1e-2)  # float32 projections


def test_as_source_kinds():
    assert isinstance(as_source(None), InputFeatures)
    assert isinstance(as_source(torch.nn.Identity()), ModuleFeatures)
    assert as_source(lambda x: x * 2)(torch.ones(2, 2, 2)).shape == (2, 4)
    with pytest.raises(TypeError, match="features"):
        as_source(3)
    assert InputFeatures()(np.ones((3, 2, 2))).shape == (3, 4)


def test_consume_reports_throughput_and_shows_progress(capsys):
    z, y = _data()
    fit = StreamingFit(fg.GaussianClassModel("diag"), K)
    report = fit.consume(_batches(z, y), progress=True)
    assert isinstance(report, FitReport) and report.samples == N and report.samples_per_second > 0
    assert "samples/s" in str(report)
    assert "fit" in capsys.readouterr().err  # the tqdm bar


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_padding_is_dropped_so_every_sample_counts_once(world):
    from fastgenlabel.loader.sampling import batch_indices, shard_order

    z, y = _data(n=45)  # 45 % world != 0 for 2 and 4: the loader pads the shards
    parts = []
    for rank in range(world):
        order = shard_order(45, seed=0, epoch=0, shuffle=False, shard_id=rank, num_shards=world)
        batches = [(z[b], y[b], b) for b in batch_indices(order, 4, "partial")]
        fit = StreamingFit(fg.GaussianClassModel("full"), K)
        fit.consume(batches, shard=(rank, world), progress=False)
        parts.append(fit.stats)
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    one = fg.GaussianClassModel("full").fit(z, y, K)
    torch.testing.assert_close(merged.count, one.stats.count, rtol=0, atol=0)
    torch.testing.assert_close(merged.m2, one.stats.m2, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="shard: .*indices"):
        StreamingFit(fg.GaussianClassModel(), K).consume([(z[:3], y[:3])], shard=(0, 2), progress=False)
    with pytest.raises(ValueError, match="shard: expected"):
        StreamingFit(fg.GaussianClassModel(), K).consume([(z[:3], y[:3], [0, 1, 2])], shard=(2, 2), progress=False)


# ---- bad inputs ---------------------------------------------------------------------------------

def test_changing_d_between_batches_names_z_and_the_batch():
    fit = StreamingFit(fg.GaussianClassModel(), K)
    fit.update(np.zeros((3, 4)), [0, 1, 2])
    with pytest.raises(ValueError, match=r"z: batch 1 has 5 features per row.*had 4"):
        fit.update(np.zeros((3, 5)), [0, 1, 2])


@pytest.mark.parametrize("bad", [[0, 1, 5], [-1, 0, 0]])
def test_labels_out_of_range_name_y(bad):
    fit = StreamingFit(fg.GaussianClassModel(), K)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 5\).*batch 0"):
        fit.update(np.zeros((3, 4)), bad)


def test_empty_stream_is_an_error():
    fit = StreamingFit(fg.GaussianClassModel(), K)
    with pytest.raises(ValueError, match="empty"):
        fit.result()
    fit.update(np.zeros((0, 4)), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="empty"):
        fit.result()
    with pytest.raises(ValueError, match="empty"):
        fit_batches(fg.KDEClassModel(), [], K, progress=False)


def test_other_bad_inputs():
    fit = StreamingFit(fg.GaussianClassModel(), K)
    with pytest.raises(ValueError, match="z: .*NaN"):
        fit.update(np.array([[0.0, np.nan]]), [0])
    with pytest.raises(ValueError, match="y: expected 2 labels"):
        fit.update(np.zeros((2, 2)), [0])
    with pytest.raises(TypeError, match="y: expected integer"):
        fit.update(np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match=r"z: expected shape \(B, d\)"):
        fit.update(np.zeros(3), [0, 1, 2])
    with pytest.raises(ValueError, match="batches: expected items"):
        fit_batches(fg.GaussianClassModel(), [np.zeros((2, 2))], K, progress=False)
    with pytest.raises(TypeError, match="model"):
        StreamingFit(object(), K)
    with pytest.raises(ValueError, match="num_classes"):
        StreamingFit(fg.GaussianClassModel(), 0)
    with pytest.raises(ValueError, match="chunk_rows"):
        StreamingFit(fg.GaussianClassModel(), K, chunk_rows=0)
    assert fit.num_samples == 0, "rejected batches leave no trace"
