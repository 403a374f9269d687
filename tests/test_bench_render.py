"""bench/render.py: the table and the goal verdicts from a pytest-benchmark JSON."""
import importlib.util
import pathlib

import pytest

SPEC = importlib.util.spec_from_file_location("render", pathlib.Path(__file__).parents[1] / "bench" / "render.py")
render = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(render)


def bench(group, impl, median, queued=None, device=None):
    extra = {"impl": impl}
    if queued is not None:
        extra["queued_s"] = queued
        extra["device_s"] = device
    return {"group": group, "name": impl, "extra_info": extra,
            "stats": {"median": median, "iqr": median / 10, "rounds": 5}}


PIXEL = "pixel B=256 224x224x3 uint8 NHWC -> NCHW [cuda]"
DIAG = "relabel diag B=256 K=1000 d=256 [cuda]"


@pytest.mark.parametrize("kernel_queued,verdict", [(40e-6, "met"), (80e-6, "NOT met")])
def test_copy_floor_goal_compares_queued_times(kernel_queued, verdict):
    data = {"benchmarks": [
        bench(PIXEL, "numba-cuda float16", 1e-3, kernel_queued, 38e-6),
        bench(PIXEL, "copy floor (same bytes, D2D copy)", 1e-3, 49e-6, 48e-6),
    ]}
    text = render.render(data)
    line = next(l for l in text.splitlines() if l.startswith("| GPU pixel B=256: within 1.4x"))
    assert line.rstrip().endswith(f"| {verdict} |")
    assert f"{49e-6 / kernel_queued:.2f}x" in line and f"{48 / 38:.2f}x" in line


def test_absolute_goal_shows_gpu_time_and_judges_the_queued_time():
    data = {"benchmarks": [bench(DIAG, "numba-cuda", 2e-4, 45e-6, 12e-6)]}
    line = next(l for l in render.render(data).splitlines() if l.startswith("| GPU relabel B=256 K=1000 diag"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:] == ["45.0 us", "12.0 us", "NOT met"]


def test_rows_without_gpu_time_leave_the_cell_empty():
    data = {"benchmarks": [bench("pixel B=64 [cpu]", "numba-cpu float32", 2e-3),
                           bench(DIAG, "numba-cuda", 2e-4, 25e-6, None)]}
    rows = [l for l in render.render(data).splitlines() if l.startswith("| pixel B=64") or l.startswith("| relabel")]
    assert rows[0].endswith("|  |  |") and rows[1].endswith("| 25.0 us |  |")


def test_relabel_goals_judge_the_public_default_and_the_loaders_call_separately():
    data = {"benchmarks": [bench(DIAG, "numba-cuda", 2e-4, 60e-6, 14e-6),
                           bench(DIAG, "numba-cuda (validate=False)", 1e-4, 28e-6, 13e-6)]}
    lines = [l for l in render.render(data).splitlines() if l.startswith("| GPU relabel B=256 K=1000 diag")]
    assert len(lines) == 2
    assert lines[0].rstrip().endswith("| 60.0 us | 14.0 us | NOT met |")
    assert "as the loader calls it" in lines[1] and lines[1].rstrip().endswith("| 28.0 us | 13.0 us | met |")


@pytest.mark.parametrize("kind,torch_impl", [("diag", "torch matmul float32"), ("tied", "torch eager linear")])
@pytest.mark.parametrize("ours,verdict", [(2e-3, "met"), (2.5e-3, "NOT met")])
def test_cpu_relabel_goal_compares_with_torchs_float32_matmul_form(kind, torch_impl, ours, verdict):
    group = f"relabel {kind} B=256 K=1000 d=64 [cpu]"
    data = {"benchmarks": [bench(group, "numba-cpu", ours), bench(group, torch_impl, 3.3e-3),
                           bench(group, "torch eager broadcast", 50e-3)]}
    lines = [l for l in render.render(data).splitlines() if l.startswith(f"| CPU relabel B=256 K=1000 {kind}")]
    assert len(lines) == 1 and lines[0].rstrip().endswith(f"| {3.3e-3 / ours:.2f}x |  | {verdict} |")


@pytest.mark.parametrize("cutmix,verdicts", [(10e-3, ("met", "met")), (13e-3, ("met", "NOT met")),
                                             (20e-3, ("NOT met", "NOT met"))])
def test_cpu_cutmix_goals_compare_with_timm_style_cutmix_and_with_mixup(cutmix, verdicts):
    group = "pixel B=256 224x224x3 uint8 NHWC -> NCHW [cpu]"
    data = {"benchmarks": [bench(group, "numba-cpu float32 cutmix", cutmix), bench(group, "numba-cpu float32", 10e-3),
                           bench(group, "torch eager + timm-style CutMix (elem)", 45e-3)]}
    lines = [l for l in render.render(data).splitlines() if l.startswith("| CPU pixel B=256 CutMix")]
    assert len(lines) == 2
    assert lines[0].rstrip().endswith(f"| {45e-3 / cutmix:.2f}x |  | {verdicts[0]} |")
    assert lines[1].rstrip().endswith(f"| {10e-3 / cutmix:.2f}x |  | {verdicts[1]} |")
