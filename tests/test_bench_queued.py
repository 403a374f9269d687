"""bench/queued.py's arithmetic, on a model of one CUDA stream (no GPU needed).

The model: the host advances its own clock per call and queues GPU work; the stream runs work in
order, never before it was queued; events take the stream's time when it reaches them; a sync
moves the host clock to the stream's. ``queued_s`` must then be the slower side's time per call,
and ``device_s`` the GPU's own, or None when the host cannot get ahead (a call that syncs).
"""
import importlib.util
import pathlib

import pytest
import torch

SPEC = importlib.util.spec_from_file_location("queued", pathlib.Path(__file__).parents[1] / "bench" / "queued.py")
queued = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(queued)

RATE = 2e9  # spin-kernel cycles per second of the modelled GPU


class Stream:
    def __init__(self):
        self.host = 0.0  # host clock (s)
        self.free = 0.0  # when the stream has run everything queued so far

    def queue(self, seconds):
        self.free = max(self.free, self.host) + seconds

    def sync(self, until=None):
        self.host = max(self.host, self.free if until is None else until)


class Event:
    def __init__(self, stream):
        self.stream, self.t = stream, None

    def record(self):
        self.stream.queue(0.0)
        self.t = self.stream.free

    def synchronize(self):
        self.stream.sync(self.t)

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


@pytest.fixture
def stream(monkeypatch):
    s = Stream()
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing=False: Event(s))
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: s.queue(cycles / RATE))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: s.sync())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(queued.time, "perf_counter", lambda: s.host)
    monkeypatch.setattr(queued, "_CYCLES_PER_S", {})
    return s


def call_of(s, host, gpu, syncs=False):
    def call():
        s.host += host
        s.queue(gpu)
        if syncs:
            s.sync()
    return call


class Bench:
    def __init__(self):
        self.extra_info = {}


@pytest.mark.parametrize("host,gpu", [(50e-6, 10e-6), (5e-6, 40e-6), (20e-6, 20e-6)])
def test_queued_is_the_slower_side_and_device_time_the_gpus(stream, host, gpu):
    bench = Bench()
    queued.record_queued(bench, call_of(stream, host, gpu))
    assert bench.extra_info["queued_s"] == pytest.approx(max(host, gpu), rel=0.05)
    assert bench.extra_info["device_s"] == pytest.approx(gpu, rel=1e-6)


def test_spin_rate_is_measured_in_cycles_per_second(stream):
    assert queued._spin_rate() == pytest.approx(RATE)


def test_a_call_that_synchronises_has_no_device_time(stream):
    bench = Bench()
    queued.record_queued(bench, call_of(stream, 5e-6, 30e-6, syncs=True))
    assert bench.extra_info["queued_s"] == pytest.approx(35e-6, rel=0.05)  # host and GPU take turns
    assert bench.extra_info["device_s"] is None


def test_host_jitter_between_passes_keeps_the_device_time(stream):
    """A second pass 10% slower than the first (host noise) still measures the GPU's time."""
    calls = {"n": 0}

    def call():
        calls["n"] += 1
        stream.host += 500e-6 * (1.0 if calls["n"] <= 31 else 1.1)
        stream.queue(100e-6)

    assert queued.device_time(call) == pytest.approx(100e-6, rel=1e-6)
