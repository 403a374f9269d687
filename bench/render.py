"""Render a pytest-benchmark JSON file as one markdown table, plus the issue's goal ratios.

    python bench/render.py out/bench.json [--out out/bench.md]

Every row: workload (the benchmark group), implementation, median, interquartile range, rounds,
the ratio to the fastest implementation of the same workload and, for CUDA cases, the per-call
time of calls queued back to back between CUDA events and the GPU's own time per call with the
host ahead (``bench/queued.py``). Goals compare two implementations of one workload measured in
the same run; on CUDA they use the queued time (as the anchor figures were measured, with CUDA
events; it includes host overhead where the host is the slower side), elsewhere the median. The
goal table also shows the GPU time of the same rows, so host-bound rows are told apart.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

UNVALIDATED = "numba-cuda (validate=False)"  # relabel without the public default's finite/range check

CUTMIX_CPU = "numba-cpu float32 cutmix"  # bench/test_bench_pixel.py: a box per sample, the same batch

# (goal, workload regex, impl A, impl B, time(B) / time(A) must be at least this)
GOALS = [
    ("GPU pixel B=256: within 1.4x of the copy-bandwidth floor (floor / kernel >= 0.71)", r"^pixel B=256 .*\[cuda\]",
     "numba-cuda float16", "copy floor (same bytes, D2D copy)", 1 / 1.4),
    ("GPU pixel B=256: >= 2x faster than torch.compile", r"^pixel B=256 .*\[cuda\]", "numba-cuda float16",
     "torch.compile", 2.0),
    ("GPU pixel B=256: >= 10x faster than torch eager normalise + timm Mixup", r"^pixel B=256 .*\[cuda\]",
     "numba-cuda float16", "torch eager + timm Mixup(batch)", 10.0),
    ("CPU pixel: >= 3x faster than torch eager normalise + timm Mixup", r"^pixel B=.*\[cpu\]", "numba-cpu float32",
     "torch eager + timm Mixup(batch)", 3.0),
    ("CPU pixel: >= 3x faster than torch eager normalise + mixup (timm stand-in)", r"^pixel B=.*\[cpu\]",
     "numba-cpu float32", "torch eager + eager mixup (timm batch stand-in)", 3.0),
    ("CPU pixel B=256 CutMix: >= 3x faster than torch eager normalise + timm-style CutMix", r"^pixel B=256 .*\[cpu\]",
     CUTMIX_CPU, "torch eager + timm-style CutMix (elem)", 3.0),
    ("CPU pixel B=256 CutMix: within 1.2x of the same stage's mixup (mixup / CutMix >= 0.83)",
     r"^pixel B=256 .*\[cpu\]", CUTMIX_CPU, "numba-cpu float32", 1 / 1.2),
    ("CPU relabel B=256 K=1000 diag: >= 1.5x faster than torch's float32 matmul form", r"^relabel diag B=256 K=1000 .*\[cpu\]",
     "numba-cpu", "torch matmul float32", 1.5),
    ("CPU relabel B=256 K=1000 tied: >= 1.5x faster than torch's float32 matmul form", r"^relabel tied B=256 K=1000 .*\[cpu\]",
     "numba-cpu", "torch eager linear", 1.5),
    ("CPU relabel B=256 K=1000 full: >= 2x faster than torch precision-Cholesky", r"^relabel full B=256 K=1000 .*\[cpu\]",
     "numba-cpu", "torch precision-Cholesky", 2.0),
    ("GPU relabel B=256 K=1000 full: >= 10x faster than MultivariateNormal.log_prob + softmax",
     r"^relabel full B=256 K=1000 .*\[cuda\]", "numba-cuda", "torch MultivariateNormal", 10.0),
    ("... the same, as the loader calls it (validate=False: no device sync)",
     r"^relabel full B=256 K=1000 .*\[cuda\]", UNVALIDATED, "torch MultivariateNormal", 10.0),
    ("... the same on a separated model (full-sep: classes as far apart as real features')",
     r"^relabel full-sep B=256 K=1000 .*\[cuda\]", "numba-cuda", "torch MultivariateNormal", 10.0),
]

# (goal, workload regex, impl, the median must be at most this many seconds)
ABSOLUTE_GOALS = [
    (f"GPU relabel B=256 K=1000 {kind}{', d=256' if kind == 'full' else ''}: under {label}"
     + ("" if impl == "numba-cuda" else ", as the loader calls it (validate=False: no device sync)"),
     rf"^relabel {kind} B=256 K=1000 {'d=256 ' if kind == 'full' else ''}.*\[cuda\]", impl, limit)
    for kind, label, limit in [("diag", "30 us", 30e-6), ("tied", "30 us", 30e-6), ("full", "0.3 ms", 0.3e-3)]
    for impl in ("numba-cuda", UNVALIDATED)
] + [
    ("GPU relabel B=256 K=1000 full-sep, d=256: under 0.3 ms (a separated model, refined product)",
     r"^relabel full-sep B=256 K=1000 d=256 .*\[cuda\]", "numba-cuda", 0.3e-3),
    ("GPU pixel B=256 (H200 anchor): under 50 us", r"^pixel B=256 .*\[cuda\]", "numba-cuda float16", 50e-6),
]


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.2f} s"


def _opt(seconds: float | None) -> str:
    return "" if seconds is None else _fmt_time(seconds)


def render(data: dict) -> str:
    machine = data.get("machine_info", {})
    commit = machine.get("fastgenlabel_commit") or data.get("commit_info", {}).get("id", "?")[:10]
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    lines = [
        f"Machine: {cpu} ({machine.get('cpu', {}).get('count', '?')} cores)"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU")
        + f"; torch threads {machine.get('torch_threads', '?')}",
        f"Versions: {', '.join(f'{k} {v}' for k, v in machine.get('versions', {}).items())}; commit {commit}; "
        f"{data.get('datetime', '')}",
        "",
        "| workload | implementation | median | IQR | rounds | x fastest | queued (CUDA events) | GPU time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[str, list] = defaultdict(list)
    for b in data.get("benchmarks", []):
        groups[b.get("group") or b["name"]].append(b)
    medians: dict[tuple[str, str], float] = {}
    device: dict[tuple[str, str], float | None] = {}
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: b["stats"]["median"])
        best = rows[0]["stats"]["median"]
        for b in rows:
            impl = b.get("extra_info", {}).get("impl", b["name"])
            s = b["stats"]
            queued = b.get("extra_info", {}).get("queued_s")
            gpu = device[(group, impl)] = b.get("extra_info", {}).get("device_s")
            medians[(group, impl)] = queued if queued is not None else s["median"]
            lines.append(f"| {group} | {impl} | {_fmt_time(s['median'])} | {_fmt_time(s['iqr'])} | {s['rounds']} | "
                         f"{s['median'] / best:.2f} | {_opt(queued)} | {_opt(gpu)} |")
    goal_lines = []
    for goal, pattern, fast, base, factor in GOALS:
        for group in sorted(groups):
            if re.search(pattern, group) and (group, fast) in medians and (group, base) in medians:
                ratio = medians[(group, base)] / medians[(group, fast)]
                verdict = "met" if ratio >= factor else "NOT met"
                a, b = device.get((group, fast)), device.get((group, base))
                gpu_ratio = f"{b / a:.2f}x" if a and b else ""
                goal_lines.append(f"| {goal} | {group} | {ratio:.2f}x | {gpu_ratio} | {verdict} |")
    for goal, pattern, impl, limit in ABSOLUTE_GOALS:
        for group in sorted(groups):
            if re.search(pattern, group) and (group, impl) in medians:
                t = medians[(group, impl)]
                goal_lines.append(f"| {goal} | {group} | {_fmt_time(t)} | {_opt(device.get((group, impl)))} | "
                                  f"{'met' if t <= limit else 'NOT met'} |")
    if goal_lines:
        lines += ["", "| goal | workload | measured | same, GPU time only | verdict |", "|---|---|---:|---:|---|",
                  *goal_lines]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        text = render(json.load(f))
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
