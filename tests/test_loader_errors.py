"""Bad input and faults: each a clear error (or a documented, warned skip), with real files."""
import numpy as np
import pytest
import torch
from PIL import Image

import fastgenlabel as fgl
from fastgenlabel.loader import CorruptImageError, GenLabelLoader, LoaderConfig

pytest.importorskip("nvidia.dali")

BACKENDS = ["dali", "torch"]


def jpeg(path, value=100, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path, quality=90)
    return path


def folder(root, per_class=(4, 4)):
    for k, n in enumerate(per_class):
        for i in range(n):
            jpeg(root / f"c{k}" / f"{i}.jpg", 60 + 40 * k + i)
    return root


def config(data, **kw):
    base = dict(data=None if data is None else str(data), batch_size=4, image_size=16, device="cpu", num_threads=1,
                shuffle=False, last_batch="partial", mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0))
    base.update(kw)
    return LoaderConfig(**base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path, backend):
    bad = folder(tmp_path) / "c1" / "2.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match=r"c1/2\.jpg") as info:
        list(GenLabelLoader(config(tmp_path, backend=backend)))
    assert info.value.path.endswith("2.jpg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_jpeg_is_an_error_naming_the_file(tmp_path, backend):
    folder(tmp_path)
    (tmp_path / "c0" / "1.jpg").write_bytes(b"\xff\xd8" + bytes(range(200)) + b"\xff\xd9")
    with pytest.raises(CorruptImageError, match=r"c0/1\.jpg"):
        list(GenLabelLoader(config(tmp_path, backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_policy_warns_with_the_name_and_shortens_the_batch(tmp_path, backend):
    folder(tmp_path)
    (tmp_path / "c0" / "3.jpg").write_bytes(b"not a jpeg at all, just text")
    with pytest.warns(UserWarning, match=r"c0/3\.jpg"):
        batches = list(GenLabelLoader(config(tmp_path, backend=backend, on_bad_image="skip")))
    assert [len(b) for b in batches] == [3, 4]
    for b in batches:
        torch.testing.assert_close(b.targets, fgl.mixup_target(b.labels, b.pairs, 2))


def test_empty_folder_and_empty_class_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders"):
        GenLabelLoader(config(tmp_path / "empty"))
    folder(tmp_path / "data")
    (tmp_path / "data" / "c2").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*c2' holds no images"):
        GenLabelLoader(config(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GenLabelLoader(config(tmp_path / "nowhere"))


def test_class_folder_with_one_image_warns_and_works(tmp_path):
    folder(tmp_path, per_class=(4, 1))
    with pytest.warns(UserWarning, match=r"c1' holds a single image"):
        loader = GenLabelLoader(config(tmp_path))
    assert [len(b) for b in loader] == [4, 1]


def test_batch_larger_than_the_dataset(tmp_path):
    folder(tmp_path)
    with pytest.raises(ValueError, match="batch_size: 9 is larger than the 8 samples"):
        GenLabelLoader(config(tmp_path, batch_size=9))
    with pytest.raises(ValueError, match="shard 1 of 2 has"):
        GenLabelLoader(config(tmp_path, batch_size=5, shard_id=1, num_shards=2))


def test_features_file_that_does_not_match_the_dataset(tmp_path):
    folder(tmp_path)
    np.save(tmp_path / "emb.npy", np.zeros((7, 3), np.float32))
    with pytest.raises(ValueError, match="has 7 rows, but the dataset has 8 samples"):
        GenLabelLoader(config(tmp_path, embeddings=str(tmp_path / "emb.npy")))
    np.save(tmp_path / "emb8.npy", np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    model = fgl.GaussianClassModel("diag").fit(torch.randn(8, 5), torch.arange(8) % 2, 2)
    with pytest.raises(ValueError, match="fitted on 5-dimensional features, but the stored features have d = 3"):
        GenLabelLoader(config(tmp_path, embeddings=str(tmp_path / "emb8.npy"), model=model))


def test_model_fitted_for_another_k(tmp_path):
    folder(tmp_path)
    np.save(tmp_path / "emb.npy", np.zeros((8, 3), np.float32))
    model = fgl.GaussianClassModel("diag").fit(torch.randn(9, 3), torch.arange(9) % 3, 3)
    with pytest.raises(ValueError, match="model: fitted for 3 classes, but the loader has"):
        GenLabelLoader(config(tmp_path, embeddings=str(tmp_path / "emb.npy"), model=model, num_classes=2))
    folder(tmp_path / "three", per_class=(2, 2, 2))
    with pytest.raises(ValueError, match="num_classes: 2, but the dataset has 3 classes"):
        GenLabelLoader(config(tmp_path / "three", num_classes=2, batch_size=2))


def test_model_without_features_and_bad_config_fields(tmp_path):
    folder(tmp_path)
    model = fgl.GaussianClassModel("diag").fit(torch.randn(8, 3), torch.arange(8) % 2, 2)
    with pytest.raises(ValueError, match="needs features"):
        GenLabelLoader(config(tmp_path, model=model))
    with pytest.raises(ValueError, match="last_batch: expected one of"):
        config(tmp_path, last_batch="keep")
    with pytest.raises(ValueError, match="shard_id"):
        config(tmp_path, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="gamma"):
        config(tmp_path, gamma=1.5)
    with pytest.raises(ValueError, match="dataset: the DALI backend reads config.data"):
        GenLabelLoader(config(tmp_path), dataset=[1, 2])


def test_file_list_and_its_errors(tmp_path):
    folder(tmp_path / "imgs")
    (tmp_path / "list.txt").write_text("imgs/c0/0.jpg 0\nimgs/c1/0.jpg 1\n# comment\nimgs/c1/1.jpg 1\n")
    loader = GenLabelLoader(config(tmp_path / "list.txt", batch_size=3))
    (batch,) = list(loader)
    assert sorted(batch.labels.tolist()) == [0, 1, 1]
    (tmp_path / "bad.txt").write_text("imgs/c0/0.jpg zero\n")
    with pytest.raises(ValueError, match="line 1: expected 'path label'"):
        GenLabelLoader(config(tmp_path / "bad.txt"))
    (tmp_path / "missing.txt").write_text("imgs/c0/99.jpg 0\n")
    with pytest.raises(FileNotFoundError, match="99.jpg"):
        GenLabelLoader(config(tmp_path / "missing.txt"))


def test_non_finite_stored_features_name_the_file_and_samples(tmp_path):
    folder(tmp_path)
    emb = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    emb[5, 1] = np.nan
    np.save(tmp_path / "emb.npy", emb)
    model = fgl.GaussianClassModel("diag").fit(torch.randn(8, 3), torch.arange(8) % 2, 2)
    loader = GenLabelLoader(config(tmp_path, embeddings=str(tmp_path / "emb.npy"), model=model, batch_size=8))
    with pytest.raises(ValueError, match=r"emb\.npy.*sample\(s\) \[5\] contain NaN or infinity"):
        next(iter(loader))


def test_skip_warns_once_per_file_across_rebuilt_pipelines(tmp_path):
    """Leaving a pass early rebuilds the DALI pipeline and its source; a skipped file is still
    warned about once per loader."""
    import warnings

    folder(tmp_path)
    (tmp_path / "c0" / "0.jpg").write_bytes(b"not a jpeg at all, just text")
    loader = GenLabelLoader(config(tmp_path, backend="dali", on_bad_image="skip"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(loader))
        loader.reset()
        list(loader)
    skips = [w for w in caught if "c0/0.jpg" in str(w.message)]
    assert len(skips) == 1, [str(w.message) for w in caught]


def png(path, size=(16, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size + (3,), 90, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_after_the_end_marker_are_allowed(tmp_path, backend):
    """Motion photos, vendor trailers, padding: a JPEG or PNG with 1000 bytes after EOI / IEND decodes
    (an EXIF thumbnail's EOI inside the header does not end the walk early)."""
    folder(tmp_path)
    exif = Image.Exif()
    exif[0x010F] = "maker"
    Image.fromarray(np.full((16, 20, 3), 70, np.uint8)).save(tmp_path / "c0" / "0.jpg", quality=90, exif=exif)
    png(tmp_path / "c1" / "0.png")
    for path in (tmp_path / "c0" / "0.jpg", tmp_path / "c1" / "0.png"):
        path.write_bytes(path.read_bytes() + bytes(range(256)) * 3 + b"\xff\xd8" + b"\x00" * 230)
    with Image.open(tmp_path / "c1" / "0.png") as im:
        im.load()  # PIL reads them
    with Image.open(tmp_path / "c0" / "0.jpg") as im:
        im.load()
    batches = list(GenLabelLoader(config(tmp_path, backend=backend, batch_size=9, alpha=0.0)))
    assert [len(b) for b in batches] == [9]
    seen = torch.cat([b.indices for b in batches])
    assert sorted(seen.tolist()) == list(range(9))
    with warnings_as_errors():  # nothing skipped under "skip" either
        assert sum(len(b) for b in GenLabelLoader(config(tmp_path, backend=backend, batch_size=9,
                                                         on_bad_image="skip"))) == 9


def warnings_as_errors():
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")

    class Done:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            ctx.__exit__(*exc)

    return Done()


def bomb_png(path, width, height):
    """A small valid PNG declaring width x height (one zlib stream of zero rows, compressed ~1000:1)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = zlib.compressobj(9)
    row = b"\x00" * (1 + width)  # filter byte + grey pixels
    data = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_decompression_bomb_is_refused_before_decoding_with_one_limit(tmp_path, backend):

    folder(tmp_path)
    bomb = bomb_png(tmp_path / "c1" / "bomb.png", 20000, 20000)  # 4e8 pixels: 1.2 GB decoded
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(CorruptImageError, match=r"bomb\.png' declares 20000 x 20000 .*max_image_pixels = 178956970"
                                                r".*LoaderConfig\(max_image_pixels=\.\.\.\)"):
        list(GenLabelLoader(config(tmp_path, backend=backend)))
    with pytest.warns(UserWarning, match=r"skipping image .*bomb\.png' declares"):
        kept = GenLabelLoader(config(tmp_path, backend=backend, on_bad_image="skip", batch_size=3))
        assert sum(len(b) for b in kept) == 8
    # the same limit, lowered: a 16 x 20 JPEG is 320 pixels
    folder(tmp_path / "small")
    with pytest.raises(CorruptImageError, match=r"c0/0\.jpg' declares 16 x 20 = 320 pixels"):
        list(GenLabelLoader(config(tmp_path / "small", backend=backend, max_image_pixels=319)))
    assert sum(len(b) for b in GenLabelLoader(config(tmp_path / "small", backend=backend,
                                                     max_image_pixels=320))) == 8
    with pytest.raises(ValueError, match="max_image_pixels: expected a positive integer"):
        config(tmp_path, max_image_pixels=0)


@pytest.mark.slow
def test_no_pixel_limit_decodes_beyond_pils_own(tmp_path):
    """None lifts the limit on both backends; the torch backend does not fall back on PIL's."""
    (tmp_path / "c0").mkdir(parents=True)
    bomb_png(tmp_path / "c0" / "0.png", 16000, 12000)  # 1.92e8 > 2 * PIL.Image.MAX_IMAGE_PIXELS
    bomb_png(tmp_path / "c0" / "1.png", 8, 8)
    from fastgenlabel.loader.files import scan
    from fastgenlabel.loader.images import ImageFileDataset

    files = scan(tmp_path)
    with pytest.raises(CorruptImageError, match="declares 16000 x 12000"):
        ImageFileDataset(files, 8, train=False)[0]
    image = ImageFileDataset(files, 8, train=False, max_image_pixels=None)[0][0]
    assert image.shape == (8, 8, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_files_in_class_folders_are_not_read(tmp_path, backend):
    folder(tmp_path)
    (tmp_path / "c0" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 200)  # macOS AppleDouble metadata
    jpeg(tmp_path / "c1" / ".hidden.jpg")
    from fastgenlabel.loader.files import scan

    assert not [p for p in scan(tmp_path).paths if "/." in p]
    assert sum(len(b) for b in GenLabelLoader(config(tmp_path, backend=backend))) == 8


def test_file_list_that_is_no_text_or_has_a_huge_label(tmp_path):
    folder(tmp_path / "imgs")
    (tmp_path / "latin1.txt").write_bytes("imgs/c0/0.jpg 0\nimgs/c0/caf\xe9.jpg 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt' line 2: not UTF-8 text"):
        GenLabelLoader(config(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match=r"data: '.*c0/0\.jpg' is an image file; data takes a folder"):
        GenLabelLoader(config(tmp_path / "imgs" / "c0" / "0.jpg"))
    (tmp_path / "huge.txt").write_text("imgs/c0/0.jpg 0\nimgs/c0/1.jpg 99999999999999999999\n")
    with pytest.raises(ValueError, match=r"huge\.txt' line 2: label 99999999999999999999 is too large"):
        GenLabelLoader(config(tmp_path / "huge.txt"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_is_refused_beyond_the_range_both_backends_take(tmp_path, backend):
    folder(tmp_path)
    for seed in (2 ** 63, 2 ** 64, -1):
        with pytest.raises(ValueError, match=r"seed: expected an integer in \[0, 2\*\*63 - 1\]"):
            config(tmp_path, backend=backend, seed=seed)
    batch = next(iter(GenLabelLoader(config(tmp_path, backend=backend, seed=2 ** 63 - 1))))  # the largest runs
    assert len(batch) == 4


@pytest.fixture(scope="module")
def fitted_on_three_folders(tmp_path_factory):
    """``fastgenlabel fit`` on folders c0, c1, c2: the model and feature map files, and the data."""
    import contextlib
    import io

    from fastgenlabel.cli import main

    root = tmp_path_factory.mktemp("three")
    data = folder(root / "data", per_class=(4, 4, 4))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", str(data), "--out", str(root / "m.npz"), "--dim", "2", "--thumbnail", "2",
                     "--image-size", "16", "--batch-size", "4", "--backend", "torch", "--device", "cpu",
                     "--covariance", "diag", "--no-progress"]) == 0
    return data, root / "m.npz", root / "m.features.npz"


def _copy_without(src, dst, drop=(), rename=None):
    import shutil

    for d in sorted(src.iterdir()):
        if d.name not in drop:
            shutil.copytree(d, dst / (rename or {}).get(d.name, d.name))
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_fitted_on_more_classes_than_the_data_is_refused(tmp_path, fitted_on_three_folders, backend):
    data, model, fmap = fitted_on_three_folders
    assert fgl.load_model(model).classes == ("c0", "c1", "c2")  # fit stores the folder's class names
    loader = GenLabelLoader(config(data, backend=backend, model=str(model), feature_map=str(fmap)))
    assert loader.classes == ("c0", "c1", "c2") and loader.num_classes == 3
    fewer = _copy_without(data, tmp_path / "fewer", drop=("c1",))
    with pytest.raises(ValueError, match=r"model '.*m\.npz': fitted on 3 classes, but the data has 2; class names "
                                         r"first differ at label 1: 'c1' \(model\) vs 'c2' \(data\)"):
        GenLabelLoader(config(fewer, backend=backend, model=str(model), feature_map=str(fmap)))
    renamed = _copy_without(data, tmp_path / "renamed", rename={"c2": "cx"})
    with pytest.raises(ValueError, match=r"fitted on 3 classes, but the data has 3; class names first differ at "
                                         r"label 2: 'c2' \(model\) vs 'cx' \(data\)"):
        GenLabelLoader(config(renamed, backend=backend, model=str(model), feature_map=str(fmap)))
    plain = GenLabelLoader(config(fewer, backend=backend, feature_map=str(fmap)))
    with pytest.raises(ValueError, match="fitted on 3 classes, but the data has 2"):
        plain.set_model(str(model))


def test_a_model_file_without_class_names_is_checked_by_its_count(tmp_path, fitted_on_three_folders):
    data, model, fmap = fitted_on_three_folders
    unnamed = fgl.load_model(model)
    unnamed.classes = None  # as a model fitted on arrays, or saved before models carried names
    unnamed.save(tmp_path / "unnamed.npz")
    assert fgl.load_model(tmp_path / "unnamed.npz").classes is None
    from fastgenlabel._info import describe_model

    assert "class names: c0, c1, c2" in describe_model(model)
    assert "class names: none stored" in describe_model(tmp_path / "unnamed.npz")
    renamed = _copy_without(data, tmp_path / "renamed", rename={"c2": "cx"})
    loader = GenLabelLoader(config(renamed, backend="torch", model=str(tmp_path / "unnamed.npz"), feature_map=str(fmap)))
    assert loader.classes == ("c0", "c1", "cx")
    fewer = _copy_without(data, tmp_path / "fewer", drop=("c0",))
    with pytest.raises(ValueError, match=r"unnamed\.npz': fitted on 3 classes, but the data has 2; refit"):
        GenLabelLoader(config(fewer, backend="torch", model=str(tmp_path / "unnamed.npz"), feature_map=str(fmap)))


def test_a_dataset_with_class_names_is_checked_against_the_model(fitted_on_three_folders):
    """A torch Dataset's ``classes`` (as torchvision's ImageFolder has) tie a model to it too."""
    from fastgenlabel.loader import scan
    from fastgenlabel.loader.images import ImageFileDataset

    data, model, fmap = fitted_on_three_folders

    class Named(ImageFileDataset):
        classes = ["c0", "c1", "other"]

    ds = Named(scan(str(data)), 16)
    with pytest.raises(ValueError, match=r"label 2: 'c2' \(model\) vs 'other' \(data\)"):
        GenLabelLoader(config(None, backend="torch", model=str(model), feature_map=str(fmap)), dataset=ds)
    ds.classes = ["c0", "c1", "c2"]
    loader = GenLabelLoader(config(None, backend="torch", model=str(model), feature_map=str(fmap)), dataset=ds)
    assert loader.classes == ("c0", "c1", "c2")


def test_a_dataset_passed_as_data_says_to_pass_it_as_dataset(tmp_path):
    from fastgenlabel.loader import scan
    from fastgenlabel.loader.images import ImageFileDataset

    ds = ImageFileDataset(scan(str(folder(tmp_path))), 16)
    for data in (ds, torch.utils.data.DataLoader(ds, batch_size=2), [ds]):
        with pytest.raises(ValueError, match=r"data: got a (ImageFileDataset|DataLoader); .* Pass a Dataset or "
                                             r"DataLoader as dataset= with the torch backend"):
            GenLabelLoader(data=data, backend="torch")
    with pytest.raises(ValueError, match="data: expected a folder of class sub-folders.*got a int"):
        LoaderConfig(data=3)
    loader = GenLabelLoader(config(None, backend="torch"), dataset=ds)  # what the message says works
    assert len(next(iter(loader))) == 4


def photo_jpeg(path=None, size=(48, 64), gray=False, **save):
    """A photo-like JPEG (gradients and noise, so that its scans hold many codes): its bytes, also
    written to ``path`` if given."""
    import io

    rng = np.random.default_rng(size)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    pixels = np.stack([x * 4.0, y * 5.0, 128 + 90 * np.sin(x / 5.0) * np.cos(y / 7.0)], -1)
    pixels = (pixels + rng.normal(0, 12, pixels.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if gray else pixels).save(buffer, format="JPEG", **{"quality": 90, **save})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


JPEG_KINDS = {
    "baseline-420": {}, "baseline-444": {"subsampling": 0}, "optimized": {"optimize": True},
    "progressive-420": {"progressive": True}, "progressive-444": {"progressive": True, "subsampling": 0},
    "restart-blocks": {"restart_marker_blocks": 2}, "restart-rows-444": {"restart_marker_rows": 1, "subsampling": 0},
    "progressive-restart": {"progressive": True, "restart_marker_rows": 1}, "gray-progressive": {"gray": True,
                                                                                                "progressive": True},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["baseline-420", "progressive-420"])
def test_truncated_jpeg_closed_with_an_end_marker_is_corrupt(tmp_path, backend, kind):
    """Cut, then EOI appended: the decoders serve it with its missing blocks grey (libjpeg only prints
    "premature end of data segment"); the loader refuses it, or skips it with a warning."""
    import io

    folder(tmp_path)
    data = photo_jpeg(**JPEG_KINDS[kind])
    last_scan = data.rfind(b"\xff\xda")
    cut = data[: (last_scan + len(data)) // 2] + b"\xff\xd9"  # halfway through the last scan
    (tmp_path / "c1" / "2.jpg").write_bytes(cut)
    if kind.startswith("baseline"):
        with Image.open(io.BytesIO(cut)) as im:
            im.load()  # what makes it dangerous: PIL decodes it without an error (DALI too)
    with pytest.raises(CorruptImageError, match=r"c1/2\.jpg.*image data end before its last block"):
        list(GenLabelLoader(config(tmp_path, backend=backend)))
    with pytest.warns(UserWarning, match=r"c1/2\.jpg"):
        batches = list(GenLabelLoader(config(tmp_path, backend=backend, on_bad_image="skip")))
    assert sum(len(b) for b in batches) == 7


@pytest.mark.parametrize("kind", sorted(JPEG_KINDS))
def test_every_cut_of_a_jpeg_is_refused_except_between_whole_scans(kind):
    """Every truncation (then EOI) of each kind of JPEG, byte by byte, against the oracle: a cut is
    harmless exactly when it falls on a marker after a whole scan (a progressive file without its
    later refinements; a baseline file has one scan, so only the intact file). The boundaries come
    from a plain walk of the intact file's segments."""
    from fastgenlabel.loader.encoded import jpeg_structure

    save = dict(JPEG_KINDS[kind])
    data = photo_jpeg(gray=save.pop("gray", False), **save)
    assert jpeg_structure(data) == (None, 64, 48)
    pos, first_scan, boundaries = 2, None, {len(data) - 2}
    while data[pos + 1] != 0xD9:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if first_scan is not None:
            boundaries.add(pos)
        pos += 2 + length
        if marker == 0xDA:  # entropy-coded data: to the first 0xFF not followed by 0x00 or RSTn
            first_scan = first_scan or pos
            while not (data[pos] == 0xFF and data[pos + 1] != 0 and not 0xD0 <= data[pos + 1] <= 0xD7):
                pos += 1
    boundaries.add(pos)
    boundaries |= {b + 1 for b in boundaries if b + 1 < len(data) - 1}  # the marker's 0xFF kept: a fill byte
    accepted = {c for c in range(2, len(data) - 1) if jpeg_structure(data[:c] + b"\xff\xd9")[0] is None}
    assert accepted == boundaries
    assert len(boundaries) == 1 or kind.startswith(("progressive", "gray"))


def test_valid_jpegs_with_thumbnails_and_trailers_are_accepted():
    """An EXIF thumbnail (a whole JPEG, with its own EOI, inside APP1) and bytes after the EOI."""
    import struct

    from fastgenlabel.loader.encoded import jpeg_structure

    thumb = photo_jpeg(size=(8, 8))
    for kind, save in JPEG_KINDS.items():
        save = dict(save)
        data = photo_jpeg(gray=save.pop("gray", False), **save)
        app1 = b"Exif\x00\x00" + thumb
        data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:] + b"\x00" * 40 + thumb
        assert jpeg_structure(data) == (None, 64, 48), kind
