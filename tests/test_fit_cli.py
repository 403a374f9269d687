"""``fastgenlabel fit`` on real JPEG files written into tmp_path."""
import contextlib

import numpy as np
import pytest
import torch

import fastgenlabel as fg
from fastgenlabel.cli import main
from fastgenlabel.features import ThumbnailPCA
from fastgenlabel.fit.sources import LinearMapFeatures
from fastgenlabel.loader.files import ImageFiles

PIL = pytest.importorskip("PIL.Image")
K, PER_CLASS = 3, 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in range(K):
        d = root / f"class{c}"
        d.mkdir()
        for i in range(PER_CLASS):
            img = np.zeros((36, 44, 3))
            img[..., c] = 180
            img = (img + rng.normal(0, 30, img.shape)).clip(0, 255).astype(np.uint8)
            PIL.fromarray(img).save(d / f"{i:03d}.jpg", quality=90)
    return root


def _thumbnails(folder, size, t, **crops):
    from fastgenlabel.loader import GenLabelLoader, LoaderConfig

    loader = GenLabelLoader(LoaderConfig(data=str(folder), batch_size=16, alpha=0.0, shuffle=False,
                                         last_batch="partial", return_thumbnails=True, thumbnail=t,
                                         image_size=size, backend="torch", device="cpu", **{"train": False, **crops}))
    th, y = zip(*[(b.thumbnails, b.labels) for b in loader])
    return torch.cat(th).numpy(), torch.cat(y)


def _no_reads(self, i):
    raise AssertionError(f"sample {i} was read: the check belongs before the pass over the data")


def _features_as_fit(fmap, thumbs, batch_size):
    """The features exactly as ``fit`` computes them: the feature map's torch projection, batch by batch.

    Not ``fmap.transform(numpy)``: NumPy's and torch's float32 products round differently (both within
    the bound tests/test_features.py checks, 4-5 ulp of |z| ~ 1e3 here), and far from a class (log p ~ -5e4,
    variances ~ 20) the log-likelihood multiplies such a difference by |z - mu| / v ~ 1e3."""
    t = torch.from_numpy(thumbs)
    return torch.cat([LinearMapFeatures(fmap)(t[i:i + batch_size]) for i in range(0, len(t), batch_size)]).numpy()


CROPS = ["--crop-scale", "0.5", "0.9", "--crop-ratio", "0.8", "1.25", "--no-flip"]


@pytest.mark.parametrize("pca_samples, flags, crops", [
    (1000, [], {"train": True}),  # the loader's default random crops and flips; one pass (thumbnails kept)
    (40, CROPS, {"train": True, "crop_scale": (0.5, 0.9), "crop_ratio": (0.8, 1.25), "flip": False}),  # PCA on a
    (1000, ["--no-augment"], {"train": False}),                                      # subsample, then a pass
])
def test_fit_gaussian_pca_writes_model_and_feature_map(folder, tmp_path, capsys, pca_samples, flags, crops):
    """The model is fitted on the crops the training loader will make (the flags' augmentation)."""
    out = tmp_path / "model.npz"
    rc = main(["fit", str(folder), "--out", str(out), "--dim", "6", "--image-size", "24", "--batch-size", "16",
               "--backend", "torch", "--covariance", "diag", "--reg", "1e-3", "--pca-samples", str(pca_samples),
               "--no-progress", *flags])
    assert rc == 0
    text = capsys.readouterr().out
    assert "samples/s" in text and "model.features.npz" in text
    if flags == CROPS:
        assert "crop_scale=(0.5, 0.9), crop_ratio=(0.8, 1.25), flip=False)" in text
    model = fg.load_model(out)
    fmap = ThumbnailPCA.load(tmp_path / "model.features.npz")
    assert (model.num_classes, model.dim, model.covariance, model.reg) == (K, 6, "diag", 1e-3)
    assert model.class_counts.tolist() == [PER_CLASS] * K
    thumbs, labels = _thumbnails(folder, 24, 8, **crops)
    z = _features_as_fit(fmap, thumbs, 16)
    expected = fg.GaussianClassModel("diag", reg=1e-3).fit(z, labels, K)
    # The same float32 features, so only the float64 statistics' summation order differs (streamed by
    # batch against one pass): agreement to float64 rounding amplified by |log p| <= 1e5.
    np.testing.assert_allclose(model.log_likelihood(z), expected.log_likelihood(z), rtol=1e-9, atol=1e-9)
    assert "features: 6" in __import__("fastgenlabel._info", fromlist=["x"]).describe_model(out)


def write_shards(folder, paths):
    """The folder's JPEGs, in its sample order (sorted classes, sorted files), split over tar shards ``paths``."""
    import io
    import tarfile

    samples = [(folder / f"class{c}" / f"{i:03d}.jpg", c) for c in range(K) for i in range(PER_CLASS)]
    per = -(-len(samples) // len(paths))
    for s, path in enumerate(paths):
        with tarfile.open(path, "w") as tar:
            for jpg, c in samples[s * per:(s + 1) * per]:
                for ext, data in (("jpg", jpg.read_bytes()), ("cls", f"{c}".encode())):
                    info = tarfile.TarInfo(f"class{c}/{jpg.stem}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_fit_on_several_shard_arguments_equals_the_folder(folder, tmp_path):
    """``fastgenlabel fit a.tar 'b-{1..2}.tar' --out m.npz``: the same images as tar shards give the same
    feature map and model as the folder."""
    shards = [tmp_path / "a.tar", tmp_path / "b-1.tar", tmp_path / "b-2.tar"]
    write_shards(folder, shards)
    common = ["--dim", "6", "--image-size", "24", "--batch-size", "16", "--backend", "torch", "--covariance", "diag",
              "--reg", "1e-3", "--no-progress"]
    assert main(["fit", str(shards[0]), str(tmp_path / "b-{1..2}.tar"), "--out", str(tmp_path / "shards.npz"),
                 *common]) == 0
    assert main(["fit", str(folder), "--out", str(tmp_path / "folder.npz"), *common]) == 0
    model, expected = fg.load_model(tmp_path / "shards.npz"), fg.load_model(tmp_path / "folder.npz")
    fmap, expected_fmap = (ThumbnailPCA.load(tmp_path / f"{name}.features.npz") for name in ("shards", "folder"))
    np.testing.assert_allclose(fmap.components, expected_fmap.components, rtol=1e-5, atol=1e-6)
    assert model.class_counts.tolist() == [PER_CLASS] * K
    z = expected_fmap.transform(_thumbnails(folder, 24, 8)[0])
    np.testing.assert_allclose(model.log_likelihood(z), expected.log_likelihood(z), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="is a folder; a list names tar shards"), debug():
        main(["fit", str(shards[0]), str(folder), "--out", str(tmp_path / "x.npz"), *common])


@pytest.mark.slow
def test_fit_kde_with_dali_reader(folder, tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "kde.npz"
    rc = main(["fit", str(folder), "--out", str(out), "--model", "kde", "--bandwidth", "0.5",
               "--max-points-per-class", "7", "--dim", "4", "--image-size", "24", "--batch-size", "32",
               "--backend", "dali", "--device", "cpu", "--no-progress"])
    assert rc == 0
    model = fg.load_model(out)
    assert isinstance(model, fg.KDEClassModel) and model.bandwidth == 0.5 and model.max_points_per_class == 7
    assert torch.bincount(model.stats.labels).tolist() == [7] * K
    assert model.class_counts.tolist() == [PER_CLASS] * K


def test_fit_stored_embeddings(folder, tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(K * PER_CLASS, 5)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    out = tmp_path / "m.npz"
    assert main(["fit", str(folder), "--out", str(out), "--features", "stored", "--embeddings",
                 str(tmp_path / "emb.npy"), "--covariance", "tied", "--batch-size", "7", "--no-progress"]) == 0
    labels = np.repeat(np.arange(K), PER_CLASS)  # sorted class folders, sorted files
    expected = fg.GaussianClassModel("tied").fit(emb, labels, K)
    np.testing.assert_allclose(fg.load_model(out).log_likelihood(emb), expected.log_likelihood(emb), rtol=1e-10)
    assert not (tmp_path / "m.features.npz").exists()


@contextlib.contextmanager
def debug():
    """FASTGENLABEL_DEBUG=1: the CLI raises instead of printing ``error: ...`` and returning 2."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTGENLABEL_DEBUG", "1")
        yield


def fails(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgenlabel fit: error: ") and match in err, err
    assert "Traceback" not in err


def test_fit_errors_name_the_argument(folder, tmp_path, capsys):
    fails(["fit", str(folder), "--out", str(tmp_path / "x.npz"), "--features", "stored"], capsys, "embeddings")
    np.save(tmp_path / "short.npy", np.zeros((5, 2), np.float32))
    fails(["fit", str(folder), "--out", str(tmp_path / "x.npz"), "--features", "stored",
           "--embeddings", str(tmp_path / "short.npy")], capsys, "rows")
    fails(["fit", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npz")], capsys, "data")
    with pytest.raises(SystemExit):
        main(["fit", str(folder), "--out", str(tmp_path / "x.npz"), "--bandwidth", "wide"])
    with debug(), pytest.raises(FileNotFoundError, match="data"):
        main(["fit", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npz")])


@pytest.mark.slow
@pytest.mark.parametrize("pca_samples", [1000, 40])
def test_fit_under_torchrun_counts_every_image_once(folder, tmp_path, pca_samples):
    """Two gloo ranks read their shards (89 images: the shards are padded); rank 0 writes the same model
    a single process fits with the same feature map."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "class0" / "000.jpg").unlink()  # 89 images
    out = tmp_path / "m.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastgenlabel", "fit", str(data), "--out", str(out), "--dim", "5", "--image-size", "24",
           "--batch-size", "8", "--backend", "torch", "--device", "cpu", "--pca-samples", str(pca_samples),
           "--no-progress", "--no-augment"]  # centre crops: the same features whichever rank reads an image
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sums = dict(re.findall(r"rank (\d): class-model checksum ([0-9a-f]+)", proc.stdout))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], proc.stdout
    model = fg.load_model(out)
    assert model.class_counts.tolist() == [PER_CLASS - 1, PER_CLASS, PER_CLASS]
    fmap = ThumbnailPCA.load(tmp_path / "m.features.npz")
    thumbs, labels = _thumbnails(data, 24, 8)
    z = fmap.transform(thumbs)
    expected = fg.GaussianClassModel("full").fit(z, labels, K)
    # float32 projections of differently sized batches round differently: compare at float32 precision.
    torch.testing.assert_close(model.stats.mean, expected.stats.mean, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(model.log_likelihood(z), expected.log_likelihood(z), rtol=1e-4)


def test_options_of_the_other_model_are_refused(folder, tmp_path, capsys):
    """--covariance does nothing for a KDE (nor --bandwidth for a Gaussian): said, not ignored."""
    out = str(tmp_path / "m.npz")
    assert main(["fit", str(folder), "--out", out, "--model", "kde", "--covariance", "diag"]) == 2
    assert "--covariance: applies to --model gaussian only" in capsys.readouterr().err
    assert main(["fit", str(folder), "--out", out, "--bandwidth", "0.5"]) == 2
    assert "--bandwidth, --max-points-per-class: apply to --model kde only" in capsys.readouterr().err
    assert main(["fit", str(folder), "--out", out, "--no-augment", "--no-flip"]) == 2
    assert "--no-augment fits on centre crops instead" in capsys.readouterr().err


def test_fit_checks_its_outputs_before_reading_and_writes_them_atomically(folder, tmp_path, capsys, monkeypatch):
    """A folder as --out, or --dim beyond the thumbnails, fail at once (no pass over the data);
    --features-out gets exactly its name, in a folder that is made; no temporary is left."""
    with monkeypatch.context() as m:
        m.setattr(ImageFiles, "read", _no_reads)
        fails(["fit", str(folder), "--out", str(tmp_path)], capsys, "--out")
        fails(["fit", str(folder), "--out", str(tmp_path / "m.npz"), "--dim", "200", "--thumbnail", "8"], capsys,
              "--dim")
    fmap = tmp_path / "new" / "deeper" / "map.bin"
    assert main(["fit", str(folder), "--out", str(tmp_path / "m.npz"), "--features-out", str(fmap), "--dim", "4",
                 "--image-size", "24", "--no-progress"]) == 0
    assert ThumbnailPCA.load(fmap).dim == 4 and fg.load_model(tmp_path / "m.npz").num_classes == K
    assert not list(tmp_path.rglob("*.tmp*"))


def test_help_and_argument_errors_import_no_torch():
    """``fastgenlabel --help``, no command and an unknown one are answered before torch is imported
    (it takes seconds); a subcommand's own options import its module."""
    import subprocess
    import sys

    code = ("import sys\nfrom fastgenlabel.cli import main\n"
            "for argv in (['--help'], [], ['bogus'], ['bench']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'numba', 'nvidia.dali') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "fastgenlabel", "--help"], capture_output=True,
                         text=True)
    assert run.returncode == 0 and "usage: fastgenlabel" in run.stdout
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "fastgenlabel.cli" in imported and "torch" not in imported


@pytest.mark.slow
def test_a_fit_interrupted_between_its_two_writes_is_refused_at_load(folder, tmp_path):
    """fit writes MODEL.features.npz, then MODEL.npz. Pair A, then only a new map (as a fit killed
    between the two writes leaves it): the loader refuses the pair, naming both files."""
    from fastgenlabel.loader import GenLabelLoader, LoaderConfig

    out, fmap = tmp_path / "m.npz", tmp_path / "m.features.npz"
    common = ["--dim", "4", "--image-size", "24", "--backend", "torch", "--no-progress", "--no-augment"]
    assert main(["fit", str(folder), "--out", str(out), *common]) == 0
    config = LoaderConfig(data=str(folder), batch_size=8, backend="torch", device="cpu", image_size=24,
                          model=str(out), feature_map=str(fmap))
    assert next(iter(GenLabelLoader(config))).targets.shape == (8, K)  # pair A belongs together
    model_a = out.read_bytes()
    # The next fit (other crops: another map) is "killed" after its first write: the old model stays.
    assert main(["fit", str(folder), "--out", str(out), *common[:-1]]) == 0
    out.write_bytes(model_a)
    with pytest.raises(ValueError, match="another feature map") as info:
        GenLabelLoader(config)
    assert str(out) in str(info.value) and str(fmap) in str(info.value)
    assert not list(tmp_path.glob("*.tmp*"))


def test_pca_samples_below_the_pca_minimum_fail_before_reading(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ImageFiles, "read", _no_reads)
    for n in ("1", "3"):  # the PCA needs N >= 2 samples and N >= dim components
        fails(["fit", str(folder), "--out", str(tmp_path / "m.npz"), "--dim", "4", "--pca-samples", n], capsys,
              "--pca-samples: the PCA of 4 components needs at least max(2, dim) = 4 images")
    fails(["fit", str(folder), "--out", str(tmp_path / "m.npz"), "--dim", "1", "--pca-samples", "1"], capsys,
          "--pca-samples")
    fails(["fit", str(folder), "--out", str(tmp_path / "m.npz"), "--dim", "100", "--thumbnail", "8"], capsys,
          f"dim: 100 principal components, but the dataset has only {K * PER_CLASS} images")
    assert not (tmp_path / "m.npz").exists()


def test_a_full_covariance_too_large_for_memory_is_refused_before_the_pass(folder, tmp_path, capsys):
    """K = 3 classes of d = 200000 stored features: 3 * 200000^2 * 8 bytes = 960 GB of statistics."""
    np.save(tmp_path / "wide.npy", np.zeros((K * PER_CLASS, 200_000), np.float32))
    args = ["fit", str(folder), "--out", str(tmp_path / "x.npz"), "--features", "stored",
            "--embeddings", str(tmp_path / "wide.npy")]
    fails(args, capsys, "covariance='full': K = 3 classes and d = 200000 features need (K, d, d) float64 "
          "statistics of 960 GB")
    fails(args, capsys, "use covariance='diag' (K d values) or 'tied'")


@pytest.mark.slow
def test_timeout_bounds_the_wait_for_a_rank_that_never_joins(folder, tmp_path):
    """Rank 0 of 2 under torchrun's environment, rank 1 never started: with --timeout 3 rank 0 fails
    within seconds (torch's default would wait 30 minutes)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fastgenlabel", "fit", str(folder), "--out", str(tmp_path / "m.npz"),
           "--device", "cpu", "--backend", "torch", "--timeout", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)  # torch's default: 30 min
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "1/2 clients joined" in proc.stderr or "timed out" in proc.stderr.lower(), proc.stderr[-2000:]
    assert not (tmp_path / "m.npz").exists()
    assert "--timeout SECONDS" in subprocess.run([sys.executable, "-m", "fastgenlabel", "fit", "--help"],
                                                 capture_output=True, text=True).stdout
