"""The DALI backend's external source: reading ahead changes nothing that comes out, nor where errors surface."""
import threading
import time
import warnings

import numpy as np
import pytest
from jpegs import write_folder

from fastgenlabel.functional.pairs import PairFeed
from fastgenlabel.loader.files import CorruptImageError, scan
from fastgenlabel.loader.source import EpochSource


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    return write_folder(tmp_path, 3, 7, lambda k, i: rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))


def source(files, read_ahead, **kw):
    args = dict(batch_size=4, last_batch="partial", shuffle=True, seed=3, shard_id=0, num_shards=1)
    args.update(kw)
    return EpochSource(files, PairFeed(1.0, seed=5, batch_size=4, lam_mode="sample"), read_ahead=read_ahead, **args)


def passes(src, epochs):
    """What DALI sees: iter once, then next across epochs (the loader sets the epoch between them)."""
    it = iter(src)
    out = []
    for epoch in epochs:
        src.epoch = epoch
        batch_items = []
        while True:
            try:
                batch_items.append(next(it))
            except StopIteration:
                break
        out.append(batch_items)
    return out


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for part_x, part_y in zip(x, y):
            assert len(part_x) == len(part_y)
            for u, v in zip(part_x, part_y):
                np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("read_ahead", [1, 2, 5])
def test_reading_ahead_gives_the_same_batches(folder, read_ahead):
    files = scan(folder)
    want = passes(source(files, 0), [0, 1, 4])
    src = source(files, read_ahead)
    got = passes(src, [0, 1, 4])
    for w, g in zip(want, got):
        same(w, g)
    assert [len(p) for p in got] == [6, 6, 6]  # 21 samples: five full batches and a partial one
    src.close()


def test_reading_ahead_is_done_by_another_thread(folder, monkeypatch):
    files = scan(folder)
    readers = set()
    real = type(files).read

    def read(self, i):
        readers.add(threading.current_thread().name)
        return real(self, i)

    monkeypatch.setattr(type(files), "read", read)
    src = source(files, 2)
    passes(src, [0])
    assert readers and all(name.startswith("fastgenlabel-read") for name in readers)
    src.close()


def corrupt(folder, batch, position, data):
    """Overwrite the file at ``position`` of epoch 0's batch ``batch`` with ``data``: (files, its path)."""
    files = scan(folder)
    bad = files.paths[source(files, 0).batches(0)[batch][position]]
    with open(bad, "wb") as f:
        f.write(data)
    return files, bad


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_a_corrupt_file_raises_at_its_own_batch(folder, read_ahead):
    files, bad = corrupt(folder, 2, 1, b"not an image at all")
    src = source(files, read_ahead)
    it = iter(src)
    first = [next(it), next(it)]  # batches 0 and 1 come out although batch 2 is already read
    assert len(first) == 2
    with pytest.raises(CorruptImageError, match=bad.rsplit("/", 1)[-1]):
        next(it)
    src.close()


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_skip_warns_when_the_batch_is_handed_out(folder, read_ahead):
    files, bad = corrupt(folder, 3, 0, b"\xff\xd8 truncated")
    src = source(files, read_ahead, on_bad_image="skip")
    it = iter(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            next(it)
    with pytest.warns(UserWarning, match="skipping corrupt"):
        encoded, indices, perm, lam = next(it)
    assert len(encoded) == len(indices) == len(perm) == 3
    src.close()


def test_close_stops_the_reader(folder):
    files = scan(folder)
    before = set(threading.enumerate())
    src = source(files, 3)
    it = iter(src)
    next(it)
    mine = [t for t in threading.enumerate() if t not in before and t.name.startswith("fastgenlabel-read")]
    assert mine
    src.close()
    assert src._reader is None and not src._pending
    deadline = time.time() + 5
    while any(t.is_alive() for t in mine) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in mine)


def test_jpeg_codes_are_walked_once_per_sample_and_the_markers_every_time(folder, monkeypatch):
    """The Huffman walk of a JPEG's last scan costs up to most of a decode: the DALI source checks a
    sample on its first read only; the torch backend's dataset, which decodes with PIL anyway, walks
    the codes once per sample and the markers on every read."""
    from fastgenlabel.loader import encoded
    from fastgenlabel.loader.images import ImageFileDataset

    walks, structures = [], []
    real_walk, real_structure = encoded._last_scan_problem, encoded.jpeg_structure
    monkeypatch.setattr(encoded, "_last_scan_problem", lambda *a: walks.append(1) or real_walk(*a))
    monkeypatch.setattr(encoded, "jpeg_structure", lambda *a: structures.append(1) or real_structure(*a))
    monkeypatch.setattr("fastgenlabel.loader.files.jpeg_structure", encoded.jpeg_structure)
    files = scan(folder)
    passes(source(files, 0), [0, 1, 2])
    assert (len(walks), len(structures)) == (len(files), len(files))
    walks.clear(), structures.clear()
    passes(source(files, 2), [0, 1])  # reading ahead on threads
    assert (len(walks), len(structures)) == (len(files), len(files))
    walks.clear(), structures.clear()
    dataset = ImageFileDataset(files, 8)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            dataset[i]
    assert (len(walks), len(structures)) == (len(files), 3 * len(files))
