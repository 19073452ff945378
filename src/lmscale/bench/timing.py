"""Timing device work honestly: events, warm-up, many repeats, inputs rotated past the L2 cache, graphs.

Device work is asynchronous, so a host clock around a launch measures the launch. Each timed call is
bracketed by CUDA events instead; the gap between two events also counts the time the GPU waited for
the host, which is exactly the overhead a CUDA graph removes, so eager and graphed numbers compare.
Repeated calls on one buffer that fits in the L2 cache (50 MB on an H100) time the cache, not the
memory: ``rotation_sets`` says how many input sets to cycle through so their total exceeds twice the
L2 size, and every call finds its inputs evicted by the calls between. Without CUDA, the same
functions time with the host clock, so the harness itself can be tested on a CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

ASSUMED_L2_BYTES = 50 * 10**6  # an H100's L2, for devices that do not report theirs


@dataclass(frozen=True)
class Budget:
    """How long to warm up and to measure: milliseconds of work, bounded by call counts.

    A fixed number of repeats would spend seconds on a 30 ms call and learn nothing from ten 10 µs
    calls; a time budget gives every case about the same wall time and enough samples for quantiles.
    """

    warmup_ms: float = 50.0
    rep_ms: float = 300.0
    min_warmup: int = 2
    min_reps: int = 5
    max_reps: int = 2000


@dataclass(frozen=True)
class Timing:
    """Quantiles of the per-call times, in milliseconds."""

    ms_median: float
    ms_p10: float
    ms_p90: float
    repeats: int

    def metrics(self) -> dict[str, float | int]:
        return {"ms_median": self.ms_median, "ms_p10": self.ms_p10, "ms_p90": self.ms_p90, "repeats": self.repeats}


def l2_cache_bytes(device: torch.device) -> int:
    """The device's L2 size from its properties; ``ASSUMED_L2_BYTES`` where it does not say (CPU, old torch)."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return ASSUMED_L2_BYTES


def rotation_sets(bytes_per_set: int, device: torch.device, max_sets: int = 256) -> int:
    """Input sets to cycle through so that together they exceed twice the L2 cache (at least one)."""
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be positive, got {bytes_per_set}")
    return max(1, min(max_sets, 2 * l2_cache_bytes(device) // bytes_per_set + 1))


def tensor_bytes(*tensors: Any) -> int:
    """Bytes held by the tensors among ``tensors`` (others, e.g. None, count zero)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _quantiles(times_ms: list[float]) -> Timing:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist()
    return Timing(ms_median=q[0], ms_p10=q[1], ms_p90=q[2], repeats=len(times_ms))


def time_calls(calls: Sequence[Callable[[], Any]], device: torch.device, budget: Budget = Budget()) -> Timing:
    """Time ``calls[i % len(calls)]()`` for i = 0, 1, …: one call per input set, rotating.

    Warm-up runs until ``budget.warmup_ms`` have passed (and at least ``min_warmup`` calls), so
    compilation, autotuning and allocator growth stay out of the numbers; its median sets how many timed
    calls fit in ``budget.rep_ms``. Any asynchronous device error surfaces here, at the synchronise.
    """
    if not calls:
        raise ValueError("time_calls needs at least one call")
    clock = _EventClock(device) if device.type == "cuda" else _HostClock()
    n, warm = len(calls), []
    while len(warm) < max(budget.min_warmup, n) or sum(warm) < budget.warmup_ms:
        clock.start()
        calls[len(warm) % n]()
        warm.append(clock.stop_and_wait())
    per_call = sorted(warm)[len(warm) // 2]  # the median: a first call that compiled does not count
    reps = min(budget.max_reps, max(budget.min_reps, math.ceil(budget.rep_ms / max(per_call, 1e-6))))
    return _quantiles(clock.time_each([calls[i % n] for i in range(reps)]))


class _EventClock:
    """CUDA events around each call; read only after all calls were queued, so timing adds no syncs."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop_and_wait(self) -> float:
        torch.cuda.synchronize(self.device)
        return (time.perf_counter() - self._t0) * 1e3

    def time_each(self, calls: list[Callable[[], Any]]) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in calls]
        ends = [torch.cuda.Event(enable_timing=True) for _ in calls]
        torch.cuda.synchronize(self.device)
        for call, start, end in zip(calls, starts, ends):
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]


class _HostClock:
    """The CPU fallback: work on the CPU is synchronous, so the host clock is the truth."""

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop_and_wait(self) -> float:
        return (time.perf_counter() - self._t0) * 1e3

    def time_each(self, calls: list[Callable[[], Any]]) -> list[float]:
        times = []
        for call in calls:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        return times


def capture_graphs(calls: Sequence[Callable[[], Any]], device: torch.device, warmup: int = 3,
                   steps: int = 1) -> list[Callable[[], Any]]:
    """One CUDA graph per call (per input set): each returned function replays its graph and returns the
    outputs the call produced during capture, which every replay overwrites in place.

    ``steps`` > 1: instead, ONE graph of ``steps`` calls cycling through the input sets, as a model's
    layers follow one another in a decoding graph, each with its own weights and state; a replay's time
    divided by ``steps`` is then the time of one call without the graph's launch.

    Warm-up runs on a side stream first, as capture requires: it compiles and autotunes kernels and
    lets the caching allocator settle, none of which may happen inside a capture. Graphs bake in their
    tensors' addresses, so rotating inputs means one graph per input set.
    """
    if device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device, not {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for call in calls:
            for _ in range(warmup):
                call()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    replays = []
    for sequence in ([calls[i % len(calls)] for i in range(steps)],) if steps > 1 else ([c] for c in calls):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in sequence:
                outputs = call()
        replays.append(_replayer(graph, outputs))
    torch.cuda.synchronize(device)
    return replays


def _replayer(graph: torch.cuda.CUDAGraph, outputs: Any) -> Callable[[], Any]:
    def replay() -> Any:
        graph.replay()
        return outputs

    return replay


def top_kernels(call: Callable[[], Any], device: torch.device, n: int = 8) -> list[list[Any]]:
    """Where one call's time goes: its n most expensive kernels (on the CPU, operators) as
    [name, ms, launches], from one profiled call after one unprofiled one. Kernel names are cut to 100
    characters (cuBLAS names run to several hundred)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    call()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        call()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            rows.append([event.key[:100], us / 1e3, event.count])
    return sorted(rows, key=lambda row: -row[1])[:n]
