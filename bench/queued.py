"""Per-call time of CUDA work queued back to back (CUDA events), beside the synchronised wall time.

pytest-benchmark times each call with a device synchronisation inside, which adds the sync's
latency and hides nothing of the host's overhead. ``record_queued`` also times ``n`` calls queued
without synchronising, between two CUDA events: what a training loop sees. When the host is
slower than the GPU it equals the host's time per call; when the GPU is busier, the GPU's.
"""
import torch


def record_queued(benchmark, call, n: int = 30) -> None:
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        call()
    end.record()
    end.synchronize()
    benchmark.extra_info["queued_s"] = start.elapsed_time(end) / n / 1e3
