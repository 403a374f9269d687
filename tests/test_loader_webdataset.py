"""GenLabelLoader over WebDataset tar shards written here (tarfile + PIL JPEGs): the same samples, order,
pairs, images and targets as the file-list path over the same JPEGs, the folder path's guarantees
(epochs, shards per rank, last-batch policies, targets = reference), and clear errors for bad shards."""
import gzip
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import fastgenlabel as fgl
from fastgenlabel.features import ThumbnailPCA
from fastgenlabel.loader import CorruptImageError, GenLabelLoader, LoaderConfig, scan

pytest.importorskip("nvidia.dali")

BACKENDS = ["dali", "torch"]
K = 3
SHARD_SIZES = (8, 8, 5)
N = sum(SHARD_SIZES)


def jpeg_bytes(i: int, rng) -> bytes:
    k = i % K
    h, w = 18 + i % 5, 20 + 2 * (i % 4)
    img = (rng.integers(0, 70, (h, w, 3)) + 70 * k).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, samples) -> None:
    """samples: (key, {ext: bytes}) in order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of 8, 8 and 5 samples (label i % 3, a .json member to ignore), and a file list of
    the very same JPEGs in the same order."""
    root = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    (root / "jpegs").mkdir()
    (root / "shards").mkdir()
    paths, lines, i = [], [], 0
    for s, n in enumerate(SHARD_SIZES):
        samples = []
        for _ in range(n):
            data = jpeg_bytes(i, rng)
            (root / "jpegs" / f"{i:04d}.jpg").write_bytes(data)
            lines.append(f"jpegs/{i:04d}.jpg {i % K}")
            samples.append((f"train/s{i:04d}", {"jpg": data, "cls": f"{i % K}\n".encode(), "json": b"{}"}))
            i += 1
        paths.append(root / "shards" / f"train-{s:03d}.tar")
        write_shard(paths[-1], samples)
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root, paths


def config(data, **kw):
    # train=False and thumbnails throughout: every DALI run shares one compiled mix-stage variant
    base = {"data": data, "batch_size": 8, "image_size": 16, "device": "cpu", "num_threads": 1, "seed": 3,
            "train": False, "return_thumbnails": True, "thumbnail": 4, "mean": (120.0, 110.0, 100.0),
            "std": (60.0, 50.0, 40.0)}
    base.update(kw)
    return LoaderConfig(**base)


def test_the_ways_to_name_shards(shards):
    root, paths = shards
    shard_dir = root / "shards"
    forms = [[str(p) for p in paths], paths, str(shard_dir / "train-*.tar"), str(shard_dir / "train-{000..002}.tar"),
             str(shard_dir), shard_dir]
    for form in forms:
        files = scan(form)
        assert files.paths == tuple(str(p) for p in paths for _ in range(SHARD_SIZES[paths.index(p)]))
        np.testing.assert_array_equal(files.labels, np.arange(N) % K)
        assert files.members[0] == "train/s0000.jpg" and files.num_classes == K
    one = scan(str(paths[2]))
    assert len(one) == 5 and one.name(0) == f"{paths[2]}:train/s0016.jpg"
    assert one.read(0).tobytes() == (root / "jpegs" / "0016.jpg").read_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_batches_as_the_file_list_of_the_same_jpegs(shards, backend):
    root, paths = shards
    common = {"backend": backend, "alpha": 1.0, "lam_mode": "sample", "last_batch": "partial"}
    tar = list(GenLabelLoader(config(paths, **common)))
    ref = list(GenLabelLoader(config(str(root / "list.txt"), **common)))
    assert [len(b) for b in tar] == [8, 8, 5]
    for a, b in zip(tar, ref, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.pairs.perm, b.pairs.perm) and torch.equal(a.pairs.lam, b.pairs.lam)
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_equal_reference_from_each_batchs_pairs_and_features(shards, backend):
    _, paths = shards
    plain = list(GenLabelLoader(config(paths, alpha=0.0, shuffle=False, last_batch="partial")))
    thumbs = torch.cat([b.thumbnails for b in plain]).numpy()
    labels = torch.cat([b.labels for b in plain])
    assert torch.equal(labels, torch.arange(N) % K)  # the .cls members, in shard order
    fmap = ThumbnailPCA(4, 5).fit(thumbs)
    model = fgl.GaussianClassModel("full").fit(torch.from_numpy(fmap.transform(thumbs)), labels, K)
    loader = GenLabelLoader(config(paths, backend=backend, feature_map=fmap, model=model, gamma=0.7,
                                   last_batch="fill", return_thumbnails=False))
    for batch in loader:
        assert batch.images.shape == (8, 3, 16, 16)
        expected = fgl.genlabel_target(model, fgl.mix(batch.features, batch.pairs), batch.labels,
                                       batch.labels[batch.pairs.perm], batch.pairs.lam, 0.7, num_classes=K)
        torch.testing.assert_close(batch.targets, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(batch.labels, batch.indices % K)
    assert len(loader) == 3


@pytest.mark.parametrize("policy,sizes", [("drop", [8, 8]), ("partial", [8, 8, 5]), ("fill", [8, 8, 8])])
def test_last_batch_policies(shards, policy, sizes):
    loader = GenLabelLoader(config(shards[1], last_batch=policy))
    assert [len(b) for b in loader] == sizes and len(loader) == len(sizes)


def test_epochs_set_epoch_and_shards_per_rank(shards):
    _, paths = shards
    loader = GenLabelLoader(config(paths))
    first = [b.indices for b in loader]
    second = [b.indices for b in loader]
    assert loader.epoch == 2 and not all(torch.equal(a, b) for a, b in zip(first, second))
    loader.set_epoch(0)
    assert all(torch.equal(a, b.indices) for a, b in zip(first, loader))
    ranks = [GenLabelLoader(config(paths, shard_id=r, num_shards=2, batch_size=4, last_batch="partial"))
             for r in range(2)]
    parts = [[b.indices for b in r] for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(parts[0]) == len(parts[1]) == 3  # ceil(21 / 2) = 11 each
    seen = torch.cat(parts[0] + parts[1])
    assert len(seen) == 22 and set(seen.tolist()) == set(range(N))


# ---- errors ------------------------------------------------------------------------------------------------


def one_sample(i=0, **members):
    rng = np.random.default_rng(i)
    base = {"jpg": jpeg_bytes(i, rng), "cls": b"1"}
    base.update(members)
    return (f"s{i:04d}", {k: v for k, v in base.items() if v is not None})


def test_missing_and_unmatched_shards(tmp_path):
    write_shard(tmp_path / "a.tar", [one_sample(0), one_sample(1)])
    with pytest.raises(FileNotFoundError, match=r"shard .*b\.tar' does not exist"):
        GenLabelLoader(config([tmp_path / "a.tar", tmp_path / "b.tar"], batch_size=2))
    with pytest.raises(FileNotFoundError, match=r"pattern .*x-\*\.tar' matches no files"):
        GenLabelLoader(config(str(tmp_path / "x-*.tar"), batch_size=2))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tar' does not exist"):
        GenLabelLoader(config(str(tmp_path / "nowhere.tar"), batch_size=2))


def test_corrupt_truncated_and_compressed_shards(tmp_path):
    write_shard(tmp_path / "good.tar", [one_sample(i) for i in range(4)])
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar archive at all" * 40)
    (tmp_path / "cut.tar").write_bytes(data[:1000])  # the first sample's image data is cut short
    (tmp_path / "cut_between.tar").write_bytes(data[:1536])  # cut right after the first image member
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "zipped.tar").write_bytes(gzip.compress(data))
    for name in ("garbage", "cut", "cut_between", "empty", "zipped"):
        with pytest.raises(ValueError, match=rf"shard .*{name}\.tar' is not a readable tar file"):
            scan([tmp_path / "good.tar", tmp_path / f"{name}.tar"])
    write_shard(tmp_path / "nothing.tar", [])
    with pytest.raises(ValueError, match=r"nothing\.tar' holds no samples"):
        scan(tmp_path / "nothing.tar")


def test_sample_without_image_or_label_or_with_a_bad_label(tmp_path):
    write_shard(tmp_path / "a.tar", [one_sample(0), one_sample(1, jpg=None, txt=b"hi"), one_sample(2)])
    with pytest.raises(ValueError, match=r"a\.tar', sample 's0001' .*has no image member \(\.jpg, \.jpeg, \.png\)"):
        GenLabelLoader(config(str(tmp_path / "a.tar"), batch_size=2))
    write_shard(tmp_path / "b.tar", [one_sample(0), one_sample(1), one_sample(2, cls=None)])
    with pytest.raises(ValueError, match=r"b\.tar', sample 's0002' .*has no label member \(\.cls\)"):
        GenLabelLoader(config(str(tmp_path / "b.tar"), batch_size=2))
    write_shard(tmp_path / "c.tar", [one_sample(0, cls=b"dog")])
    with pytest.raises(ValueError, match=r"label member 's0000.cls' holds 'dog', not a class index"):
        scan(tmp_path / "c.tar")
    # another label member, named in the config
    write_shard(tmp_path / "d.tar", [one_sample(0, cls=None, label=b"2"), one_sample(1, cls=None, label=b"0")])
    files = scan(tmp_path / "d.tar", label_ext="label")
    assert files.labels.tolist() == [2, 0] and files.num_classes == 3
    assert len(list(GenLabelLoader(config(str(tmp_path / "d.tar"), batch_size=2, label_ext="label")))) == 1
    with pytest.raises(ValueError, match="label_ext"):
        config(str(tmp_path / "d.tar"), label_ext="")


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_or_undecodable_image_in_a_shard_names_the_member(tmp_path, backend):
    good = [one_sample(i) for i in range(4)]
    cut = one_sample(2)
    cut[1]["jpg"] = cut[1]["jpg"][: len(cut[1]["jpg"]) // 2]
    write_shard(tmp_path / "cut.tar", good[:2] + [cut] + good[3:])
    with pytest.raises(CorruptImageError, match=r"cut\.tar:s0002\.jpg") as info:
        list(GenLabelLoader(config(str(tmp_path / "cut.tar"), backend=backend, batch_size=4, shuffle=False)))
    assert info.value.path.endswith("cut.tar:s0002.jpg")
    bad = one_sample(1, jpg=b"\xff\xd8" + bytes(range(200)) + b"\xff\xd9")
    write_shard(tmp_path / "bad.tar", good[:1] + [bad] + good[2:])
    with pytest.raises(CorruptImageError, match=r"bad\.tar:s0001\.jpg"):
        list(GenLabelLoader(config(str(tmp_path / "bad.tar"), backend=backend, batch_size=4, shuffle=False)))
    with pytest.warns(UserWarning, match=r"cut\.tar:s0002\.jpg"):
        batches = list(GenLabelLoader(config(str(tmp_path / "cut.tar"), backend=backend, batch_size=4,
                                             on_bad_image="skip")))
    assert [len(b) for b in batches] == [3]


def test_a_label_member_is_read_whole(tmp_path):
    """A .cls past 64 bytes (leading whitespace, padding) is read whole, not cut and misread."""
    write_shard(tmp_path / "a.tar", [one_sample(0, cls=b" " * 70 + b"2\n"), one_sample(1, cls=b"\n" * 70 + b"1")])
    assert scan(tmp_path / "a.tar").labels.tolist() == [2, 1]
    write_shard(tmp_path / "b.tar", [one_sample(0, cls=b"1" + b" " * 70 + b"junk")])
    with pytest.raises(ValueError, match=r"b\.tar', sample 's0000' .*label member 's0000\.cls' holds '1 +\.\.\.'"):
        scan(tmp_path / "b.tar")
    write_shard(tmp_path / "c.tar", [one_sample(0, cls=b"1" * 5000)])
    with pytest.raises(ValueError, match=r"label member 's0000\.cls' is 5000 bytes; expected a decimal class index"):
        scan(tmp_path / "c.tar")
    write_shard(tmp_path / "d.tar", [one_sample(0, cls=b"99999999999999999999")])
    with pytest.raises(ValueError, match=r"label member 's0000\.cls' holds 99999999999999999999, too large"):
        scan(tmp_path / "d.tar")


def test_adjacent_samples_with_one_key_are_refused(tmp_path):
    """Two samples under one key would be merged (one image and one label lost): refused, naming both."""
    first, second = one_sample(3), one_sample(4)
    write_shard(tmp_path / "dup.tar", [one_sample(0), first, (first[0], second[1]), one_sample(5)])
    with pytest.raises(ValueError, match=r"dup\.tar': key 's0003' names two samples \(members 's0003\.jpg' and "
                                         r"'s0003\.jpg'\)"):
        GenLabelLoader(config(str(tmp_path / "dup.tar"), batch_size=2))
    # one sample's members under one key, other extensions: one sample (WebDataset's convention)
    write_shard(tmp_path / "ok.tar", [one_sample(0), one_sample(1, png=b"x", json=b"{}")])
    assert len(scan(tmp_path / "ok.tar")) == 2
