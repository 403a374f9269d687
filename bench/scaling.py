"""Memory and time of the class-model fit and of the relabel kernel against K, d and the covariance.

Writes docs/SCALING.md (``python bench/scaling.py --out docs/SCALING.md``); a few minutes on two
CPU cores. Method, per configuration (K classes, d features, model):

- data: N = 20,000 float32 rows, z ~ N(0, I) + a class offset, labels uniform in [0, K).
- fit, streamed: ``StreamingFit.update`` over batches of 256 with the default chunking, timed to
  the last merge (reported per 10k samples); ``merge``: one ``stats.merge`` of two full
  statistics (the fixed O(K d^2) cost paid per chunk of up to 65,536 rows; the Gaussian
  all-reduce costs about as much per rank, plus the transfer); ``finalize``: ``model.fit_stats``
  (Cholesky factors etc.), once per fit.
- peak memory: the process's peak resident set above its level before the fit (Linux VmHWM,
  reset through /proc/self/clear_refs), which includes the (B, ...) temporaries.
- parameter memory: bytes of the statistics (float64, what the all-reduce moves) and of the
  fitted model's parameters (float64), and of the kernels' packed float32 arrays.
- relabel: ``fastgenlabel.relabel(model, z, pairs, labels, num_classes=K, backend=...)`` on a
  (256, d) float32 batch, per-batch lambda; warmed up (compiles), then the median of repeated calls
  (at least 3, up to ~0.5 s).

Other engineers' jobs share the machine's cores: the figures are noisy; compare orders of magnitude.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fastgenlabel as fg
from fastgenlabel.fit import StreamingFit
from fastgenlabel.functional import sample_pairs
from fastgenlabel.kernels.relabel import params_for

N, BATCH = 20_000, 256
KS, DS = (10, 100, 1000), (16, 64, 256, 1024)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (0 when unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> int:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def _model_param_bytes(model) -> int:
    names = ("means", "variances", "precision_chol", "log_norm", "class_points", "kernel_chol")
    return sum(_nbytes(getattr(model, n, None)) for n in names)


def _stats_bytes(stats) -> int:
    return sum(_nbytes(getattr(stats, n)) for n in ("count", "mean", "m2", "points", "labels", "keys")
               if hasattr(stats, n))


def _median_time(fn, min_reps=3, budget=0.5) -> float:
    times = []
    t_end = time.perf_counter() + budget
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _data(k, d, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, N)
    offsets = rng.normal(size=(k, d)).astype(np.float32) * 2
    z = rng.normal(size=(N, d)).astype(np.float32) + offsets[y]
    return torch.from_numpy(z), torch.from_numpy(y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(k: int, d: int, make, relabel_backend: str) -> dict:
    z, y = _data(k, d)
    dev = z.device
    _sync(dev)
    base = _reset_peak()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    fit = StreamingFit(make(), k)
    t0 = time.perf_counter()
    for i in range(0, N, BATCH):
        fit.update(z[i:i + BATCH], y[i:i + BATCH])
    stats = fit.stats
    _sync(dev)
    t_stream = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = make().fit_stats(stats)
    _sync(dev)
    t_final = time.perf_counter() - t0
    if dev.type == "cuda":  # GPU memory (the tensors live there)
        peak = max(0, torch.cuda.max_memory_allocated(dev) - base)
    else:
        peak = max(0, _status("VmHWM") - base)

    def merge():
        stats.merge(stats)
        _sync(dev)

    t_merge = _median_time(merge, min_reps=1, budget=0.2)
    packed = params_for(model)
    pairs = sample_pairs(BATCH, 1.0, generator=0)
    zb, yb = z[:BATCH].contiguous(), y[:BATCH].contiguous()
    pairs = pairs.to(zb.device)

    def call():
        fg.relabel(model, zb, pairs, yb, 1.0, num_classes=k, backend=relabel_backend)
        _sync(dev)

    t0 = time.perf_counter()
    call()  # compiles on first use of this kind
    t_first = time.perf_counter() - t0
    t_relabel = _median_time(call)
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    try:
        call()
        t_relabel_all = _median_time(call)
    finally:
        numba.set_num_threads(threads)
    return {
        "stream_per_10k": t_stream * 10_000 / N, "merge": t_merge, "finalize": t_final, "peak": peak,
        "stats_bytes": _stats_bytes(stats), "param_bytes": _model_param_bytes(model),
        "packed_bytes": _nbytes(packed.arrays), "relabel": t_relabel, "relabel_first": t_first,
        "relabel_all": t_relabel_all,
    }


def configurations(quick: bool):
    for kind in ("diag", "tied", "full"):
        for k in KS:
            for d in DS:
                if d == 1024 and kind == "full":
                    continue  # K d^2 doubles of 8 GB at K = 1000: see the text
                if quick and (k > 100 or d > 64):
                    continue
                yield f"gaussian {kind}", k, d, (lambda kind=kind: fg.GaussianClassModel(kind))
    for k in (10, 100):
        for d in (16, 64):
            yield "kde (cap 1000/class)", k, d, (lambda: fg.KDEClassModel(max_points_per_class=1000))


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return ""


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _machine() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba

    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"numba {numba.__version__} ({numba.get_num_threads()} threads), numpy {np.__version__}, "
            f"Python {platform.python_version()}, commit {commit} (+ working tree)")


def _gpu_name(device: str) -> str:
    try:
        return torch.cuda.get_device_name(torch.device(device))
    except (RuntimeError, AssertionError, ValueError):
        return "unknown GPU"


def render(rows, seconds: float, backend: str, threads: int, device: str = "cpu") -> str:
    where = "CPU only" if device == "cpu" else f"features on {device} ({_gpu_name(device)}); host"
    lines = [
        "# Scaling: fitting the class models and relabeling, against K, d and the covariance",
        "",
        f"Produced by `python bench/scaling.py {' '.join(sys.argv[1:])}` "
        f"in {seconds:.0f} s. **{where}**: {_machine()}.",
        "",
        ("The machine has 2 cores that other engineers' jobs were using at the same time: the figures "
         "are noisy (compare orders of magnitude, not percent). GPU figures: docs/SCALING-gpu.md "
         "(`python bench/scaling.py --device cuda --out docs/SCALING-gpu.md`)."
         if device == "cpu" else
         "One GPU; timings synchronise the device. The CPU table and the discussion of where full "
         "covariance stops being sensible are in docs/SCALING.md."),
        "",
        "Method (see the docstring of `bench/scaling.py`): N = 20,000 float32 rows streamed through "
        "`fastgenlabel.fit.StreamingFit` in batches of 256; *fit / 10k* is the streaming time per 10,000 "
        "samples; *merge* one `stats.merge` (paid per chunk of up to 65,536 rows; the all-reduce costs "
        "about as much, plus the transfer); *finalize* `fit_stats` (Cholesky etc., once); *peak* the extra "
        "resident memory of the whole fit (GPU memory with `--device cuda`); *stats* the bytes the "
        "all-reduce moves; *params* the fitted model's float64 parameters; *packed* the relabel kernels' "
        "float32 arrays; *relabel* the median time of "
        f"`fastgenlabel.relabel(..., backend=\"{backend}\")` for one batch of B = 256 (after a warm-up "
        f"that compiles), and the samples/s it gives. Fit and relabel run with {threads} torch/Numba thread(s) "
        "(`--threads`); *relabel, all threads* repeats the relabel with Numba's full thread pool "
        f"({os.cpu_count()} here). On this shared machine (load averages of 3 to 5 on 2 cores were seen) "
        "the parallel kernels wait for descheduled workers: 1 thread is one to two orders of magnitude "
        "faster than 2 for small K d. That is the reason the loader runs its per-batch relabel with "
        "`target_threads=1` on the CPU.",
        "",
        "## Fitting at scale, in short",
        "",
        "- `fastgenlabel.fit.StreamingFit(model, K)`: `update(z, y)` per batch (statistics in float64 on the "
        "features' device; Chan's merge for the Gaussians, a capped seeded sample for KDE), `result()` fits; "
        "under `torch.distributed` it all-reduces every rank's statistics first (bit-identical model on every "
        "rank; ranks without samples take part). `consume(batches, features=...)` / `fit_batches(...)` do the "
        "loop with a feature source (the input, a fitted ThumbnailPCA, any torch module run in eval/no_grad, "
        "stored embeddings by index), a tqdm bar and samples/s.",
        "- `fastgenlabel fit DIR --out model.npz [--model gaussian|kde --covariance full|diag|tied --dim N ...]`: "
        "a folder of class sub-folders -> PCA of thumbnails + class model (two files), or `--features stored "
        "--embeddings E.npy`.",
        "- `torchrun --nproc_per_node N examples/train.py --data DIR [--deep]`: DDP training with a sharded "
        "GenLabelLoader; each rank prints its class model's checksum.",
        "",
        "## Measurements",
        "",
        "| model | K | d | fit / 10k | merge | finalize | peak | stats | params | packed | relabel B=256 | samples/s "
        "| relabel, all threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, k, d, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {k} | {d} | {r['error']} |  |  |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {name} | {k} | {d} | {_fmt_s(r['stream_per_10k'])} | {_fmt_s(r['merge'])} | {_fmt_s(r['finalize'])} "
            f"| {_fmt_bytes(r['peak'])} | {_fmt_bytes(r['stats_bytes'])} | {_fmt_bytes(r['param_bytes'])} "
            f"| {_fmt_bytes(r['packed_bytes'])} | {_fmt_s(r['relabel'])} | {BATCH / r['relabel']:,.0f} "
            f"| {_fmt_s(r['relabel_all'])} |")
    lines += [
        "",
        "## Parameter memory per model (formulas)",
        "",
        "| model | statistics (float64, all-reduced) | fitted parameters (float64) | relabel kernels (float32) | "
        "relabel work per sample |",
        "|---|---|---|---|---|",
        "| gaussian full | K (d^2 + d + 1) x 8 B | K (d^2 + d + 1) x 8 B (precision Cholesky factors) "
        "| K (d^2 + d) x 4 B | K d^2 / 2 multiply-adds |",
        "| gaussian diag | K (2d + 1) x 8 B | K (2d + 1) x 8 B | 2 K d x 4 B | 3 K d |",
        "| gaussian tied | (K d + d^2 + K) x 8 B | (K d + d^2 + K) x 8 B | (K d + d) x 4 B "
        "| K d (then O(K) per mixed sample) |",
        "| kde | M (d + 2) x 8 B, M = kept points | M d + K d^2 | (M + K) d + K d^2 x 4 B | M d |",
        "",
        "Examples: full covariance at K = 1000, d = 256 keeps 0.52 GB of statistics and as much again of "
        "fitted factors (and needs ~3x that while finalizing); at d = 1024 it would be 8.4 GB each, which is "
        "why the table skips it. Diagonal at K = 1000, d = 1024 is 16 MB; tied 8 MB + 8 MB.",
        "",
        "## Where full covariance stops being sensible",
        "",
        "Full against the cheap variants, from the table above (relabel of one B = 256 batch; full's "
        "statistics and its peak memory while fitting):",
        "",
        "| K | d | K d^2 | full: relabel | diag | tied | full: statistics | full: peak (fit) | full: finalize |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(name.split()[-1], k, d): r for name, k, d, r in rows if "error" not in r}
    for (kind, k, d), r in sorted(by.items(), key=lambda t: (t[0][1] * t[0][2] ** 2, t[0][1])):
        if kind != "full":
            continue
        diag, tied = by.get(("diag", k, d)), by.get(("tied", k, d))
        lines.append(f"| {k} | {d} | {k * d * d:.1e} | {_fmt_s(r['relabel'])} | "
                     f"{_fmt_s(diag['relabel']) if diag else '-'} | {_fmt_s(tied['relabel']) if tied else '-'} "
                     f"| {_fmt_bytes(r['stats_bytes'])} | {_fmt_bytes(r['peak'])} | {_fmt_s(r['finalize'])} |")
    largest = by.get(("full", 1000, 256))
    took = f"it took {_fmt_s(largest['relabel'])} per batch in this run" if largest else "it was not measured in this run"
    lines += [
        "",
        "- *Relabel*: full costs K d^2 / 2 multiply-adds per sample against K d for diag and tied (tied then "
        "O(K) per mixed sample), and its time follows K d^2. On this CPU (one thread), from K d^2 ~ 10^6 "
        "on, a batch of 256 takes from about ten to tens of milliseconds: as long as decoding and augmenting "
        f"the batch, so the relabel stops being free. At K = 1000, d = 256 (K d^2 = 6.6 x 10^7) {took} "
        "(one thread; runs on this shared machine differ by up to 3x). A GPU moves the line up by the ratio "
        "of its throughput, not past it.",
        "- *Memory*: K (d^2 + d + 1) x 8 bytes per copy of the statistics, the same again for the fitted "
        "factors, half of it for the kernels' float32 copy; finalizing (Cholesky and triangular inverse per "
        "class) holds ~4 copies at once: 2 GB at K = 1000, d = 256; at d = 1024 it would be 8.4 GB per copy "
        "(not measured). The all-reduce (`fastgenlabel.distributed.all_reduce_stats`: in-place SUMs of "
        "re-centred statistics) needs one extra copy per rank; `all_gather_stats` would hold world copies.",
        "- *Statistics*: a full covariance needs well over d samples per class to be more than its "
        "regulariser; with ~1,000 images per class (ImageNet) that caps d at a few hundred anyway.",
        "- Rule of thumb: full covariance while K d^2 <= ~10^6 (e.g. K = 10 at d <= 256, K = 100 at d <= 64-100, "
        "K = 1000 at d <= 32) and n_c >> d; above, `tied` (the exact posterior for a shared covariance) "
        "or `diag`, whose relabel stays within milliseconds to a few tens of them per batch up to K = 1000, d = 1024.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the Markdown report here (default: print it)")
    parser.add_argument("--quick", action="store_true", help="only K <= 100, d <= 64 (a smoke run)")
    parser.add_argument("--backend", default=None,
                        help="relabel backend (default: numba-cpu, or numba-cuda with --device cuda)")
    parser.add_argument("--device", default="cpu", help="where the features (and so the statistics) live")
    parser.add_argument("--threads", type=int, default=1, help="torch and Numba threads (1: robust on busy cores)")
    args = parser.parse_args(argv)
    if args.backend is None:
        args.backend = "numba-cuda" if args.device.startswith("cuda") else "numba-cpu"
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc otherwise keeps freed large blocks in its heap (a dynamic mmap threshold up to 32 MB), so the
        # peak-memory column of a configuration would hide behind the previous one's freed memory.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    global _data
    if args.device != "cpu":
        plain = _data

        def _data(k, d, seed=0):  # noqa: F811 - the same data on the device
            z, y = plain(k, d, seed)
            return z.to(args.device), y.to(args.device)
    t_start = time.perf_counter()
    rows = []
    for name, k, d, make in configurations(args.quick):
        try:
            r = measure(k, d, make, args.backend)
        except (RuntimeError, ValueError, MemoryError) as e:
            r = {"error": f"{type(e).__name__}: {str(e)[:60]}"}
        rows.append((name, k, d, r))
        if "error" in r:
            print(f"{name:22s} K={k:5d} d={d:5d} {r['error']}", file=sys.stderr)
        else:
            print(f"{name:22s} K={k:5d} d={d:5d} fit/10k {_fmt_s(r['stream_per_10k']):>10s} "
                  f"finalize {_fmt_s(r['finalize']):>10s} peak {_fmt_bytes(r['peak']):>9s} "
                  f"relabel {_fmt_s(r['relabel']):>10s}", file=sys.stderr, flush=True)
    text = render(rows, time.perf_counter() - t_start, args.backend, args.threads, args.device)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
