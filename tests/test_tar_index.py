"""The on-disk index of WebDataset tar shards: saved after the first scan, reused while the shard is
unchanged, and never trusted when stale, foreign or corrupt (tar files written here; no DALI needed)."""
import io
import os
import tarfile

import numpy as np
import pytest

from fastgenlabel.loader import scan
from fastgenlabel.loader import tar_index as files_module
from fastgenlabel.loader.tar_index import INDEX_SUFFIX, index_shard, sidecar_paths


def write_shard(path, first: int, n: int, mode: str = "w", key: str = "train/s") -> None:
    """n samples {key}{first}.. with a small fake image (only the headers are read) and label i % 3."""
    with tarfile.open(path, mode) as tar:
        for i in range(first, first + n):
            for ext, data in (("jpg", bytes([i % 256]) * (40 + i)), ("cls", f"{i % 3}".encode()),
                              ("label", f"{i % 5}".encode())):
                info = tarfile.TarInfo(f"{key}{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def assert_same(a, b) -> None:
    assert (a.paths, a.members, a.classes) == (b.paths, b.members, b.classes)
    for field in ("labels", "offsets", "sizes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


@pytest.fixture
def count_indexing(monkeypatch):
    """How often the tar headers are read."""
    calls = []

    def counted(shard, *args):
        calls.append(shard)
        return index_shard(shard, *args)

    monkeypatch.setattr(files_module, "index_shard", counted)
    return calls


@pytest.fixture
def shard(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "shards").mkdir()
    path = tmp_path / "shards" / "train-0.tar"
    write_shard(path, 0, 7)
    return path


def fresh_scan(data, monkeypatch, **kw):
    """A scan that reads every header (no saved index is looked at or written)."""
    with monkeypatch.context() as m:
        m.setattr(files_module, "cached_shard_index", index_shard)
        return scan(data, **kw)


def test_the_index_is_saved_next_to_the_shard_and_reused(shard, monkeypatch, count_indexing):
    first = scan(shard)
    assert count_indexing == [str(shard)] and (shard.parent / (shard.name + INDEX_SUFFIX)).is_file()
    second = scan(shard)
    assert count_indexing == [str(shard)]  # read from the sidecar
    assert_same(second, first)
    assert_same(second, fresh_scan(shard, monkeypatch))
    assert second.members[6] == "train/s0006.jpg" and second.read(6).tobytes() == bytes([6]) * 46
    assert not (shard.parent.parent / "cache").exists()


def test_member_names_beyond_ascii_come_back_unchanged(tmp_path, monkeypatch, count_indexing):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_shard(tmp_path / "u.tar", 0, 4, key="zürich/čaj-日本-")
    first = scan(tmp_path / "u.tar")
    assert first.members[1] == "zürich/čaj-日本-0001.jpg"
    assert_same(scan(tmp_path / "u.tar"), first)
    assert len(count_indexing) == 1
    assert_same(first, fresh_scan(tmp_path / "u.tar", monkeypatch))


def test_globs_and_folders_skip_the_sidecars(shard):
    write_shard(shard.parent / "train-1.tar", 7, 3)
    scan(shard.parent)
    assert len(list(shard.parent.glob(f"*{INDEX_SUFFIX}"))) == 2
    for data in (shard.parent, str(shard.parent / "*"), str(shard.parent / "train-*")):
        assert len(scan(data)) == 10


@pytest.mark.parametrize("change", ["touch", "append", "rewrite"])
def test_a_changed_shard_is_indexed_again(shard, monkeypatch, count_indexing, change):
    scan(shard)
    if change == "touch":
        st = os.stat(shard)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    elif change == "append":
        write_shard(shard, 7, 2, mode="a")
    else:  # another shard of the same size, with the old mtime
        st = os.stat(shard)
        write_shard(shard, 100, 7)
        assert os.stat(shard).st_size == st.st_size
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    changed = scan(shard)
    assert count_indexing == [str(shard)] * 2
    assert_same(changed, fresh_scan(shard, monkeypatch))
    assert len(changed) == (9 if change == "append" else 7)
    scan(shard)
    assert len(count_indexing) == 2  # the rewritten sidecar is used


def test_other_member_extensions_are_indexed_again(shard, monkeypatch, count_indexing):
    assert scan(shard).labels.tolist() == [i % 3 for i in range(7)]
    other = scan(shard, label_ext="label")
    assert other.labels.tolist() == [i % 5 for i in range(7)] and len(count_indexing) == 2
    assert_same(other, fresh_scan(shard, monkeypatch, label_ext="label"))


def corrupt(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":  # the zip's CRC catches it
        i = data.index(b"s0003")
        path.write_bytes(data[:i] + b"X" + data[i + 1:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not an npz":
        path.write_bytes(b"garbage" * 100)
    else:  # a well-formed npz with one array replaced
        with np.load(path) as z:
            arrays = dict(z)
        key, value = {"a pickle": ("names", np.array([object()], dtype=object)),
                      "another version": ("version", np.asarray(0)),
                      "offset past the end": ("offsets", arrays["offsets"] + 10**9),
                      "names ends of another shape": ("name_ends", arrays["name_ends"].reshape(1, -1))}[how]
        with path.open("wb") as f:
            np.savez(f, **dict(arrays, **{key: value}))


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "empty", "not an npz", "a pickle", "another version",
                                 "offset past the end", "names ends of another shape"])
def test_a_corrupt_sidecar_is_ignored_and_rewritten(shard, monkeypatch, count_indexing, how):
    scan(shard)
    sidecar = sidecar_paths(str(shard))[0]
    corrupt(sidecar, how)
    assert_same(scan(shard), fresh_scan(shard, monkeypatch))
    assert len(count_indexing) == 2
    scan(shard)
    assert len(count_indexing) == 2  # rewritten, and good again
    assert not [p for p in shard.parent.iterdir() if p.name.endswith(".tmp")]


def make_read_only(folder, monkeypatch) -> None:
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anyway: refuse as a read-only mount would
        real = files_module._save_index

        def save(path, *args):
            if path.parent == folder:
                raise PermissionError(13, "Read-only file system", str(path))
            return real(path, *args)

        monkeypatch.setattr(files_module, "_save_index", save)


def test_a_read_only_folder_keeps_the_index_in_the_cache_dir(shard, tmp_path, monkeypatch, count_indexing):
    make_read_only(shard.parent, monkeypatch)
    try:
        first = scan(shard)
        assert sorted(p.name for p in shard.parent.iterdir()) == [shard.name]
        cached = list((tmp_path / "cache" / "fastgenlabel" / "tar-index").iterdir())
        assert [p.name for p in cached] == [sidecar_paths(str(shard))[1].name]
        assert cached[0].name.startswith("train-0.tar-") and cached[0].name.endswith(INDEX_SUFFIX)
        assert_same(scan(shard), first)
        assert len(count_indexing) == 1
        # neither place writable: indexed every time, no error
        monkeypatch.setenv("XDG_CACHE_HOME", str(shard))  # a file: no folder can be made under it
        assert_same(scan(shard), first)
        assert_same(scan(shard), first)
        assert len(count_indexing) == 3
    finally:
        shard.parent.chmod(0o755)


def test_a_shard_edited_in_place_with_its_mtime_set_back_is_indexed_again(tmp_path, monkeypatch, count_indexing):
    """A label in the middle of a 600 KB shard (beyond the hashed first and last 64 KiB) changed in
    place, the size and mtime kept: the ctime tells."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shard = tmp_path / "big.tar"
    write_shard(shard, 0, 200)
    assert scan(shard).labels[100] == 1 and shard.stat().st_size > 4 * files_module.EDGE_BYTES
    st = os.stat(shard)
    with tarfile.open(shard) as tar:
        member = tar.getmember("train/s0100.cls")  # holds b"1"
    with open(shard, "r+b") as f:  # the same size, the same inode
        f.seek(member.offset_data)
        f.write(b"2")
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shard).st_size == st.st_size and os.stat(shard).st_mtime_ns == st.st_mtime_ns
    edited = scan(shard)
    assert edited.labels[100] == 2
    assert count_indexing == [str(shard)] * 2
    assert_same(edited, fresh_scan(shard, monkeypatch))


def test_the_stamp_hashes_the_shards_first_and_last_bytes(shard, monkeypatch, count_indexing):
    """Where a file system keeps no reliable ctime, a change at either end is still seen."""
    scan(shard)
    stamp = files_module._index_stamp(str(shard), ["jpg"], ["cls"])
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # the end-of-archive padding
    shard.write_bytes(bytes(data))
    other = files_module._index_stamp(str(shard), ["jpg"], ["cls"])
    assert other["shard_edges_sha256"] != stamp["shard_edges_sha256"]
