"""``fastgenlabel bench loader`` end to end on a tiny JPEG folder (CPU): every contestant runs, and
the ratios a user decides on are printed."""
import re

import numpy as np
import pytest
from jpegs import write_folder

from fastgenlabel.cli import main


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    return write_folder(tmp_path, 2, 12, lambda k, i: np.clip(rng.normal(80 + 90 * k, 30, (40, 48, 3)), 0, 255)
                        .astype(np.uint8))


@pytest.mark.slow  # the DALI stages' compile, once per process
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("error::fastgenlabel.models.base.FitWarning")  # its own timing model is no user's concern
def test_every_contestant_runs_and_the_ratios_are_printed(folder, capsys):
    pytest.importorskip("nvidia.dali")
    rc = main(["bench", "loader", "--data", str(folder), "--batch-size", "4", "--batches", "2",
               "--warmup", "1", "--repeats", "2", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "crop 40 (the images' median shorter side" in out  # 40 x 48 images: not 224
    ratio = r"(\d+\.\d\d)x \[(\d+\.\d\d)-(\d+\.\d\d)\]"
    rows = {}
    for line in out.splitlines():
        m = re.match(rf"(\S+(?: \([^)]*\))?)\s+(\d+)\s+(\d+)\s+(\d+)\s+{ratio}\s+{ratio}$", line)
        if m:
            rows[m.group(1).split(" (")[0]] = [float(v) for v in m.groups()[1:]]
    assert set(rows) == {"dali", "dali-reader", "dali+mixup+genlabel", "torch-baseline"}, out
    for median, lo, hi, *ratios in rows.values():
        assert 0 < lo <= median <= hi
        for r, r_lo, r_hi in (ratios[:3], ratios[3:]):
            assert 0 < r_lo <= r <= r_hi
    assert rows["torch-baseline"][3:6] == [1.0, 1.0, 1.0] and rows["dali-reader"][6:] == [1.0, 1.0, 1.0]
    assert re.search(rf"should you switch\?\n  from torch-baseline \(.*\) to the loader with mixup \+ GenLabel: {ratio}",
                     out)
    assert re.search(rf"from plain DALI \(fn.readers.file, no mixup\) to the loader with mixup \+ GenLabel: {ratio}", out)
    assert "mixup + GenLabel keeps" in out


def test_the_default_crop_fits_the_data(tmp_path):
    from fastgenlabel.loader.bench import data_image_size

    sizes = {0: (30, 20), 1: (50, 44), 2: (60, 36)}  # (H, W): shorter sides 20, 44, 36
    small = write_folder(tmp_path / "small", 3, 2, lambda k, i: np.zeros(sizes[k] + (3,), np.uint8))
    assert data_image_size(str(small)) == 36
    large = write_folder(tmp_path / "large", 1, 2, lambda k, i: np.zeros((300, 260, 3), np.uint8))
    assert data_image_size(str(large)) == 224  # never beyond ImageNet's crop


def test_ratios_are_taken_repeat_by_repeat():
    from fastgenlabel.loader.bench import ratio

    rows = [{"name": "a", "runs": [100.0, 300.0, 200.0]}, {"name": "b", "runs": [50.0, 100.0, 100.0]}]
    assert ratio(rows, "a", "b") == (2.0, 2.0, 3.0)
    assert ratio(rows, "a", "missing") is None and ratio(rows, "a", None) is None


def test_only_names_the_contestants_it_accepts(folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "loader", "--data", str(folder), "--only", "dali,foo"])
    assert exit_info.value.code == 2
    assert "expected contestants of dali, dali-reader, dali+mixup+genlabel" in capsys.readouterr().err


def test_a_package_that_fails_to_import_counts_as_missing(monkeypatch):
    """torchvision built for another torch is installed but raises on import: the stand-ins run."""
    import importlib

    from fastgenlabel.loader import bench

    real = importlib.import_module

    def broken(name, *args):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    assert bench._imports("torchvision") is False and bench._imports("json") is True
