"""``fastgenlabel bench loader`` end to end on a tiny JPEG folder (CPU): every contestant runs."""
import numpy as np
import pytest
from jpegs import write_folder

pytest.importorskip("nvidia.dali")

from fastgenlabel.cli import main  # noqa: E402


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    return write_folder(tmp_path, 2, 12, lambda k, i: np.clip(rng.normal(80 + 90 * k, 30, (40, 48, 3)), 0, 255)
                        .astype(np.uint8))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_contestant_runs_and_the_ratios_are_printed(folder, capsys):
    rc = main(["bench", "loader", "--data", str(folder), "--batch-size", "4", "--image-size", "16", "--batches", "2",
               "--warmup", "1", "--repeats", "1", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[-3]) for line in out.splitlines()
            if line.startswith(("dali", "torch-baseline"))}
    assert {"dali", "dali-reader", "dali+mixup+genlabel", "torch-baseline"} <= set(rows)
    assert all(v > 0 for v in rows.values())
    assert "keeps" in out and "of plain DALI (fn.readers.file, no mixup)" in out


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
