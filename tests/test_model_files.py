"""Model files: exact round trips, no pickle, and a clear ModelFileError for every bad file."""
import io
import json
import pickle
import zipfile

import numpy as np
import pytest

import fastgenlabel.models.io as model_io
from fastgenlabel import GaussianClassModel, KDEClassModel, ModelFileError, load_model

MODELS = {
    "gaussian-full": lambda: GaussianClassModel("full"),
    "gaussian-diag": lambda: GaussianClassModel("diag", reg=0.01, prior="empirical"),
    "gaussian-tied": lambda: GaussianClassModel("tied", reg=0.3),
    "kde-scott": lambda: KDEClassModel(),
    "kde-silverman": lambda: KDEClassModel("silverman", prior="empirical"),
    "kde-float-capped": lambda: KDEClassModel(0.37, max_points_per_class=6, seed=-5),
}


def make_data(seed=0, sizes=(12, 1, 9, 20)):
    rng = np.random.default_rng(seed)
    z = np.concatenate([rng.normal(size=(n, 3)) + 2 * c for c, n in enumerate(sizes)])
    return z, np.repeat(np.arange(len(sizes)), sizes)


def save(kind, tmp_path):
    z, y = make_data()
    model = MODELS[kind]().fit(z, y, 4)
    path = tmp_path / "model.npz"
    model.save(path)
    return model, path, z


@pytest.fixture(params=sorted(MODELS))
def saved(request, tmp_path):
    """Every model kind: for the tests whose outcome depends on the arrays a kind stores."""
    return save(request.param, tmp_path)


@pytest.fixture(params=["gaussian-full", "kde-float-capped"])
def saved_one(request, tmp_path):
    """One model of each family: for tests of the file format itself."""
    return save(request.param, tmp_path)


def test_round_trip_is_exact(saved):
    model, path, z = saved
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.config() == model.config()
    assert loaded.num_classes == model.num_classes and loaded.dim == model.dim
    np.testing.assert_array_equal(loaded.class_counts.numpy(), model.class_counts.numpy())
    np.testing.assert_array_equal(loaded.log_likelihood(z), model.log_likelihood(z))
    np.testing.assert_array_equal(loaded.log_joint(z), model.log_joint(z))
    assert type(model).load(str(path)).config() == model.config()  # str paths too
    assert [p.name for p in path.parent.iterdir()] == ["model.npz"]  # no temporary file left


def test_empty_classes_survive_the_round_trip(tmp_path):
    z, y = make_data()
    with pytest.warns(RuntimeWarning):
        model = GaussianClassModel().fit(z, np.where(y == 1, 0, y), 4)
    model.save(tmp_path / "m.npz")
    with pytest.warns(RuntimeWarning):
        loaded = load_model(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.log_likelihood(z), model.log_likelihood(z))


def test_loading_the_wrong_class_is_an_error(saved_one):
    model, path, _ = saved_one
    other = KDEClassModel if isinstance(model, GaussianClassModel) else GaussianClassModel
    with pytest.raises(ModelFileError, match=other.__name__):
        other.load(path)


def test_unfitted_models_cannot_be_saved(tmp_path):
    from fastgenlabel.models import NotFittedError

    with pytest.raises(NotFittedError):
        GaussianClassModel().save(tmp_path / "m.npz")


def test_loading_never_unpickles(saved, monkeypatch):
    model, path, z = saved
    calls = []
    real_load = np.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle"))
        return real_load(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(model_io.np, "load", recording_load)
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    np.testing.assert_array_equal(load_model(path).log_likelihood(z), model.log_likelihood(z))
    assert calls == [False]


def rewrite(path, change):
    """Rewrite a valid archive with ``change(arrays)`` applied; the zip itself stays valid."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    change(arrays)
    with open(path, "wb") as out:
        np.savez(out, **arrays)


def header(arrays):
    return json.loads(arrays["__meta__"].tobytes().decode())


def set_header(arrays, meta, redigest=False):
    meta = dict(meta)
    if redigest:
        meta.pop("digest")
        body = {k: v for k, v in arrays.items() if k != "__meta__"}
        meta["digest"] = model_io._digest(body, meta)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)


def test_an_object_array_is_rejected(saved_one):
    _, path, _ = saved_one
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    arrays["stats.count"] = np.array([1, "x", None], dtype=object)
    with open(path, "wb") as out:
        np.savez(out, **arrays)  # numpy pickles object arrays
    with pytest.raises(ModelFileError, match="truncated or not a fastgenlabel model"):
        load_model(path)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.1, 0.5, 0.9, 0.999])
def test_truncated_files(saved_one, keep):
    _, path, _ = saved_one
    raw = path.read_bytes()
    path.write_bytes(raw[: min(int(len(raw) * keep), len(raw) - 1)])
    with pytest.raises(ModelFileError):
        load_model(path)


def test_a_flipped_byte_inside_an_array(saved):
    model, path, _ = saved
    raw = bytearray(path.read_bytes())
    data = model.state_dict()["stats.mean" if isinstance(model, GaussianClassModel) else "stats.points"].tobytes()
    at = bytes(raw).find(data)
    assert at > 0
    raw[at + len(data) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError):
        load_model(path)


def test_a_modified_array_fails_the_checksum(saved):
    model, path, _ = saved
    original = path.read_bytes()
    for field in (k for k in model.state_dict() if k.startswith("stats.")):
        path.write_bytes(original)

        def change(arrays):
            a = arrays[field].copy()
            a.reshape(-1)[a.size // 2] += 1
            arrays[field] = a

        rewrite(path, change)
        with pytest.raises(ModelFileError, match="checksum"):
            load_model(path)


def test_a_removed_or_added_array_fails_the_checksum(saved_one):
    _, path, _ = saved_one
    rewrite(path, lambda arrays: arrays.pop("stats.count"))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)
    rewrite(path, lambda arrays: arrays.update(extra=np.zeros(3)))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def test_a_tampered_header_fails_the_checksum(saved_one):
    model, path, _ = saved_one

    def change(arrays):
        meta = header(arrays)
        meta["prior"] = "empirical" if meta["prior"] == "uniform" else "uniform"
        set_header(arrays, meta)

    rewrite(path, change)
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def test_a_tampered_header_in_place_is_rejected(saved_one):
    # Same length, so the zip's offsets stay valid; the zip's CRC or our digest catches it.
    _, path, _ = saved_one
    raw = path.read_bytes()
    tampered = raw.replace(b'"uniform"', b'"unifrom"')
    assert tampered != raw
    path.write_bytes(tampered)
    with pytest.raises(ModelFileError):
        load_model(path)


@pytest.mark.parametrize(
    "edit",
    [
        {"kind": "mixture"}, {"kind": ["gaussian"]}, {"kind": None}, {"prior": "learned"}, {"unknown_option": 1},
        {"reg": -1.0}, {"reg": "tiny"}, {"covariance": "spherical"}, {"bandwidth": "wide"}, {"seed": "x"},
        {"max_points_per_class": 0},
    ],
)
def test_a_consistent_digest_does_not_admit_bad_contents(saved_one, edit):
    # Someone rewrote the header and its digest: the model must still be checked, never half-built.
    _, path, _ = saved_one
    rewrite(path, lambda arrays: set_header(arrays, {**header(arrays), **edit}, redigest=True))
    with pytest.raises(ModelFileError, match="model file"):
        load_model(path)


def test_inconsistent_statistics_are_rejected(saved):
    model, path, _ = saved
    original = path.read_bytes()
    for field in ("stats.count", "stats.mean", "stats.m2", "stats.labels", "stats.points"):
        if field not in model.state_dict():
            continue
        path.write_bytes(original)

        def change(arrays):
            arrays[field] = arrays[field][:-1]
            set_header(arrays, header(arrays), redigest=True)

        rewrite(path, change)
        with pytest.raises(ModelFileError, match="inconsistent"):
            load_model(path)


def test_files_of_other_formats(tmp_path):
    cases = {
        "text.npz": b"GaussianClassModel(covariance='full')\n",
        "empty.npz": b"",
        "pickle.npz": pickle.dumps({"kind": "gaussian"}),
    }
    buf = io.BytesIO()
    np.save(buf, np.arange(4))
    cases["array.npy"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, weights=np.ones(3))
    cases["plain.npz"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(b'{"format": "someone.else", "version": 1}', dtype=np.uint8))
    cases["foreign.npz"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(b"\xff\xfe not json", dtype=np.uint8))
    cases["garbled.npz"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(b"[1, 2]", dtype=np.uint8))
    cases["list.npz"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes.txt", "hello")
    cases["zip.npz"] = buf.getvalue()
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ModelFileError):
            load_model(tmp_path / name)
    with pytest.raises(ModelFileError, match="cannot read"):
        load_model(tmp_path / "missing.npz")


def test_a_feature_map_is_named_as_one(tmp_path, capsys):
    """``fastgenlabel fit`` writes a model and a feature map: loading the map as a model says what it is,
    and ``fastgenlabel info`` describes both."""
    from fastgenlabel.cli import main
    from fastgenlabel.features import ThumbnailPCA

    path = tmp_path / "m.features.npz"
    ThumbnailPCA(2, 3).fit(np.random.default_rng(0).normal(size=(20, 12)).astype(np.float32)).save(path)
    with pytest.raises(ModelFileError, match="is a ThumbnailPCA feature map, not a class model: pass it as feature_map="):
        load_model(path)
    assert main(["info", str(path)]) == 0
    assert "feature map: 2x2x3 thumbnails -> 3 features" in capsys.readouterr().out
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:100])  # truncated: one line, not a traceback
    assert main(["info", str(tmp_path / "cut.npz")]) == 2
    assert "is truncated or not a fastgenlabel model" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.npz")]) == 2  # before the environment report
    printed = capsys.readouterr()
    assert "cannot read" in printed.err and "fastgenlabel environment" not in printed.out


def test_another_format_version_is_rejected(saved_one):
    _, path, _ = saved_one
    rewrite(path, lambda arrays: set_header(arrays, {**header(arrays), "version": 99}, redigest=True))
    with pytest.raises(ModelFileError, match="version"):
        load_model(path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from fastgenlabel.models.io import write_atomically

    path = tmp_path / "m.npz"
    path.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.npz"]
    with pytest.raises(IsADirectoryError, match="folder"):
        write_atomically(tmp_path, lambda f: f.write(b"x"))
    with pytest.raises(FileNotFoundError) as info:  # named by the path asked for, not the temporary
        write_atomically(tmp_path / "nodir" / "m.npz", lambda f: f.write(b"x"))
    assert info.value.filename == str(tmp_path / "nodir" / "m.npz")
    (tmp_path / "script.py").write_text("print('hello')\n")
    with pytest.raises(ModelFileError, match=r"not a fastgenlabel model \(not an .npz archive\)") as info:
        load_model(tmp_path / "script.py")
    assert "allow_pickle" not in str(info.value)


@pytest.mark.filterwarnings("ignore::fastgenlabel.models.base.FitWarning")
def test_class_names_are_saved_loaded_and_checked(saved_one, tmp_path):
    model, path, z = saved_one
    assert model.classes is None and load_model(path).classes is None  # fitted on arrays: no names
    model.classes = ["zero", "one", "two", "three"]
    model.save(tmp_path / "named.npz")
    loaded = load_model(tmp_path / "named.npz")
    assert loaded.classes == ("zero", "one", "two", "three")
    np.testing.assert_array_equal(loaded.log_joint(z), model.log_joint(z))
    with pytest.raises(ValueError, match="classes: 3 names for a model of 4 classes"):
        model.classes = ["a", "b", "c"]
    with pytest.raises(ValueError, match="classes: expected a sequence of class-name strings"):
        model.classes = [0, 1, 2, 3]
    model.fit(*make_data(sizes=(5, 5, 5)), 3)  # refitted for another K: the names belonged to the old classes
    assert model.classes is None


# ---- the model and its feature map, leftovers of killed writes, memory of a load --------------------

def test_the_feature_map_digest_round_trips_and_a_refit_clears_it(tmp_path):
    from fastgenlabel.cli import main
    from fastgenlabel.features import ThumbnailPCA, check_model_matches

    rng = np.random.default_rng(3)
    fmap = ThumbnailPCA(2, 3).fit(rng.normal(size=(40, 12)).astype(np.float32))
    z, y = fmap.transform(rng.normal(size=(40, 12)).astype(np.float32)), np.arange(40) % 2
    model = GaussianClassModel("diag").fit(z, y, 2)
    assert model.feature_map_digest is None
    model.feature_map_digest = fmap.digest
    model.save(tmp_path / "m.npz")
    fmap.save(tmp_path / "m.features.npz")
    loaded = load_model(tmp_path / "m.npz")
    assert loaded.feature_map_digest == fmap.digest == ThumbnailPCA.load(tmp_path / "m.features.npz").digest
    check_model_matches(loaded, ThumbnailPCA.load(tmp_path / "m.features.npz"))  # the pair: no error
    other = ThumbnailPCA(2, 3).fit(rng.normal(size=(40, 12)).astype(np.float32))
    other.save(tmp_path / "m.features.npz")  # a new map only: a fit killed between its two writes
    with pytest.raises(ValueError, match="another feature map") as info:
        check_model_matches(load_model(tmp_path / "m.npz"), ThumbnailPCA.load(tmp_path / "m.features.npz"),
                            "model 'm.npz'", "feature_map 'm.features.npz'")
    assert "'m.npz'" in str(info.value) and "'m.features.npz'" in str(info.value)
    assert loaded.fit(z, y, 2).feature_map_digest is None  # refitted: it may describe other features now
    assert main(["info", str(tmp_path / "m.npz")]) == 0  # the header field is not a model option


_KILLED_WRITER = r"""
import os, sys, time
from fastgenlabel.models.io import write_atomically

def write(f):
    f.write(b"half a model")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

write_atomically(sys.argv[1], write)
"""


def test_the_temporary_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    """SIGKILL cannot be caught: the killed writer leaves NAME.tmp<pid>.<host>; the next write of
    the same path removes it (its process is gone), and leaves a live writer's temporary alone."""
    import os
    import signal
    import subprocess
    import sys

    path = tmp_path / "m.npz"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert proc.stdout.readline().strip() == "writing"
        live = sorted(p.name for p in tmp_path.iterdir())
        assert len(live) == 1 and live[0].startswith(f"m.npz.tmp{proc.pid}")
        model_io.write_atomically(path, lambda f: f.write(b"one"))  # the writer still runs: its file stays
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*live, "m.npz"])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / live[0]).exists()  # what SIGKILL leaves
    model_io.write_atomically(path, lambda f: f.write(b"two"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"] and path.read_bytes() == b"two"


_LOAD_PEAK = r"""
import os, re, sys
from fastgenlabel import load_model
from fastgenlabel.models import io

load_model(sys.argv[2])  # torch's first linear algebra, outside the measurement


def status(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_of(step):
    # The high-water mark starts at the forking parent's and survives exec: reset it (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status("VmRSS")
    result = step()
    return status("VmHWM") - start, result


size = os.path.getsize(sys.argv[1])
state_peak, state = peak_of(lambda: io.load_state(sys.argv[1]))
del state
model_peak, model = peak_of(lambda: load_model(sys.argv[1]))
print(state_peak / size, model_peak / size)
"""


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="reads VmHWM (Linux)")
def test_loading_a_100_mb_model_needs_little_more_than_the_model(tmp_path):
    """A full-covariance model of K = 200, d = 256 (105 MB). Reading and verifying the file holds
    one copy of its arrays (no file buffer, no tobytes() copies: 3x before); the fitted model holds
    its statistics and its Cholesky factors (2x the file), and the fit adds only small chunks."""
    import os
    import subprocess
    import sys

    import torch

    from fastgenlabel.models import GaussianStats

    k, d = 200, 256
    g = torch.Generator().manual_seed(0)
    r = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    m2 = r + r.transpose(1, 2) + 1e3 * torch.eye(d, dtype=torch.float64)
    del r
    stats = GaussianStats("full", torch.full((k,), 1e3, dtype=torch.float64),
                          torch.randn(k, d, generator=g, dtype=torch.float64), m2)
    GaussianClassModel("full").fit_stats(stats).save(tmp_path / "big.npz")
    del stats, m2
    z, y = make_data()
    GaussianClassModel("full").fit(z, y, 4).save(tmp_path / "small.npz")
    assert (tmp_path / "big.npz").stat().st_size > 100e6
    out = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(tmp_path / "big.npz"), str(tmp_path / "small.npz")],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stderr[-2000:]
    state_peak, model_peak = map(float, out.stdout.split())
    assert state_peak < 1.15, out.stdout  # 3x before
    assert model_peak < 2.6, out.stdout  # 4x before
