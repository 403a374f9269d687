"""Per-call time of CUDA work queued back to back (CUDA events), beside the synchronised wall time.

pytest-benchmark times each call with a device synchronisation inside, which adds the sync's
latency and hides nothing of the host's overhead. ``record_queued`` adds two figures:

- ``queued_s``: ``n`` calls queued without synchronising, between two CUDA events: what a
  training loop sees. When the host is slower than the GPU it equals the host's time per call;
  when the GPU is busier, the GPU's.
- ``device_s``: the GPU's own time per call. The stream is first held by a spin kernel
  (``torch.cuda._sleep``) that outlasts the host's queueing of the ``n`` calls, so the GPU runs
  them back to back with no host gaps. None when the host could not queue them in time (a call
  that synchronises, or a host slower than the spin).
"""
import time

import torch

_CYCLES_PER_S: dict = {}


def _spin_rate() -> float:
    """Cycles of ``torch.cuda._sleep`` per second on the current device (measured once)."""
    dev = torch.cuda.current_device()
    if dev not in _CYCLES_PER_S:
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # warm
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _CYCLES_PER_S[dev] = cycles / (start.elapsed_time(end) / 1e3)
    return _CYCLES_PER_S[dev]


def _between_events(call, n: int, spin_s: float = 0.0) -> tuple[float, float]:
    """(GPU seconds between the events / n, host seconds to queue the n calls)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if spin_s:
        torch.cuda._sleep(int(spin_s * _spin_rate()))
    start.record()
    t = time.perf_counter()
    for _ in range(n):
        call()
    end.record()
    host = time.perf_counter() - t
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / n, host


def device_time(call, n: int = 30, tries: int = 2) -> float | None:
    """The GPU's seconds per call, with the host ahead of the GPU; None if it could not get ahead
    (a call that synchronises). The spin is twice the host's last queueing time plus 2 ms; a
    measurement counts when the host queued everything within 80% of it (else the spin is sized
    again from the slower pass, ``tries`` times in all)."""
    call()
    torch.cuda.synchronize()
    _, host = _between_events(call, n)
    for _ in range(tries):
        spin = 2 * host + 2e-3
        per_call, host = _between_events(call, n, spin)
        if host < 0.8 * spin:
            return per_call
    return None


def record_queued(benchmark, call, n: int = 30) -> None:
    call()
    torch.cuda.synchronize()
    benchmark.extra_info["queued_s"] = _between_events(call, n)[0]
    benchmark.extra_info["device_s"] = device_time(call, n)
