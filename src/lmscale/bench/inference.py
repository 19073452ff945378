"""``lmscale bench inference``: prefill and decoding of whole models, predicted from FLOPs and bytes, then measured.

Every point is one model (mixer, preset, dtype, random weights) doing one thing:
- ``prefill``: a forward pass over B prompts of T tokens that keeps the final state and the last
  position's logits (what a server does before decoding), timed as tokens per second;
- ``decode``: one token per sequence after a context of L tokens, timed per step. The context is
  prefilled with random tokens (chunk by chunk, so memory stays bounded), then the step runs in a CUDA
  graph (``lmscale.decode.GraphedStep``) where the model's state has a fixed layout, or eagerly where it
  does not (the record says which). Attention runs with its static KV cache, sized to the context, so
  the Transformer is decoded the way the recurrent models are: the fair baseline.

Beside each measurement sits its roofline prediction, max(FLOPs / peak, bytes / bandwidth), from the
mixers' cost models (``Mixer.cost``, ``Mixer.step_cost``) and ceilings measured on the same device at
the start of the run (a large matmul in the point's dtype, a large copy), so that the ratio measured /
predicted says how far each model runs from what its arithmetic and its memory traffic allow. On a GPU
the device's datasheet ceilings are recorded too.

Energy comes two ways. Estimated: the same FLOPs and bytes priced by per-operation energies from the
literature (``lmscale.profile.energy``). Measured, on NVIDIA GPUs: NVML's energy counter over windows of
at least ``ENERGY_WINDOW_S``, minus the idle power measured before (a missing NVML leaves the energy
columns "not measured", never zero).

A point that cannot fit is recorded as ``skipped`` with the arithmetic that says so; an out-of-memory
error is caught and recorded too, so a sweep never stops halfway. Points that have a record in the output
folder are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EXPERIMENT = "inference"
GPU_PRESETS = ("50M", "125M", "350M", "760M", "1.3B")
CPU_PRESETS = ("50M", "125M")
PREFILL_LENGTHS = (512, 2048, 8192, 32768)
DECODE_CONTEXTS = (1024, 8192, 32768, 131072)
DECODE_BATCHES = (1, 16)
PREFILL_CHUNK = 8192  # a decode point's context goes in this many tokens at a time
MIN_PREFILL_CHUNK = 64  # ... or fewer, down to this, where a chunk's forward would not fit in memory
ENERGY_WINDOW_S = 1.0  # NVML's counter updates every ≈ 20–100 ms: a window of a second keeps the error ≈ 5 %
MEMORY_MARGIN = 0.9  # plan to use at most this share of the free memory
DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class Point:
    """One measurement. ``length`` is T for a prefill, the context L before the timed steps for a decode."""

    mixer: str
    preset: str
    phase: str
    length: int
    batch_size: int = 1
    dtype: str = "bfloat16"
    decode_tokens: int = 32  # steps per timed repeat
    repeats: int = 5
    energy: bool = True
    seed: int = 0

    @property
    def key(self) -> tuple:
        return (self.mixer, self.preset, self.phase, self.length, self.batch_size, self.dtype)

    @property
    def run_id(self) -> str:
        return f"{self.phase}-{self.mixer}-{self.preset}-{self.dtype}-b{self.batch_size}-l{self.length}"

    def check(self) -> None:
        from lmscale.config import ConfigError

        if self.phase not in ("prefill", "decode"):
            raise ConfigError("phase", self.phase, "must be 'prefill' or 'decode'")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
        for name in ("length", "batch_size", "decode_tokens", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, value, "must be a positive integer")
        model_config(self)  # an unknown mixer or preset fails here, naming the valid ones


def model_config(point: Point):
    """The preset for ``point``, its context just long enough: a static KV cache is preallocated to it."""
    from lmscale.presets import preset

    context = point.length + (point.decode_tokens * (point.repeats + 1) + 8 if point.phase == "decode" else 0)
    options = {"kv_cache": "static"} if point.mixer == "attention" else {}
    return preset(point.preset, point.mixer, max_seq_len=context, **({"mixer_options": options} if options else {}))


def points(mixers: Iterable[str], presets: Iterable[str], dtypes: Iterable[str] = ("bfloat16",),
           prefill_lengths: Iterable[int] = PREFILL_LENGTHS, contexts: Iterable[int] = DECODE_CONTEXTS,
           batches: Iterable[int] = DECODE_BATCHES, **fields: Any) -> list[Point]:
    """The grid, smallest preset first: per model, the prefills at batch 1, then the decodes at each batch
    size and context (a sweep cut short by its time limit has whole sizes, every mixer and dtype)."""
    grid = []
    for name in presets:
        for dtype in dtypes:
            for mixer in mixers:
                grid += [Point(mixer, name, "prefill", T, 1, dtype, **fields) for T in prefill_lengths]
                grid += [Point(mixer, name, "decode", L, B, dtype, **fields) for B in batches for L in contexts]
    return grid


# --- predictions -----------------------------------------------------------------------------------

def predicted_cost(model, point: Point) -> dict[str, float]:
    """Analytic FLOPs and bytes of one prefill (B prompts of T tokens) or one decode step (B sequences at
    context L), from the mixers' cost models plus the MLPs, the head and the embedding rows.

    Weights are read once per call whatever B is; each sequence adds its own activations and state traffic.
    """
    import torch

    dtype = getattr(torch, point.dtype)
    cfg, B = model.cfg, point.batch_size
    item = dtype.itemsize
    mlp_weights = sum(p.numel() for b in model.blocks for p in b.mlp.parameters()) * item
    head_weights = model.head.weight.numel() * item  # tied with the embedding: read once, by the head
    mlp_flops = 3 * 2 * cfg.d_model * cfg.d_hidden  # per token per layer (SwiGLU)
    head_flops = 2 * cfg.d_model * cfg.vocab_size  # per position whose logits are computed
    mixer_weights = sum(b.mixer.weight_bytes(dtype) for b in model.blocks)
    if point.phase == "prefill":
        T = point.length
        costs = [b.mixer.cost(T, dtype) for b in model.blocks]
        flops = B * (sum(c.flops for c in costs) + cfg.n_layers * T * mlp_flops + head_flops)
        # the MLP's activations in and out (x, its two projections, the product) per token per layer
        mlp_traffic = cfg.n_layers * T * (2 * cfg.d_model + 3 * cfg.d_hidden) * item
        per_sequence = sum(c.bytes for c in costs) - mixer_weights + mlp_traffic + T * cfg.d_model * item
    else:
        L = point.length
        costs = [b.mixer.step_cost(L, dtype) for b in model.blocks]
        flops = B * (sum(c.flops for c in costs) + cfg.n_layers * mlp_flops + head_flops)
        mlp_traffic = cfg.n_layers * (2 * cfg.d_model + 3 * cfg.d_hidden) * item
        per_sequence = sum(c.bytes for c in costs) - mixer_weights + mlp_traffic + (cfg.d_model + cfg.vocab_size) * item
    weights = mixer_weights + mlp_weights + head_weights
    return {"flops": float(flops), "bytes": float(weights + B * per_sequence), "weight_bytes": float(weights)}


def counted_forward_flops(point: Point) -> float:
    """FLOPs of one prefill counted by ``torch.utils.flop_counter`` on the mixers' PyTorch forms (it cannot
    see Triton kernels), to check the analytic count. It runs on the meta device: every op is dispatched and
    counted, none computes, so any size and length takes seconds (≤ 10 s at 50M, T = 32K, on 2 cores).

    Softmax attention is counted by ``causal_sdpa_flops``, which counts a causal call's attended pairs
    only, as the cost models do; an explicit mask is counted as its whole square (the meta device has no
    mask values to read), so the masked forms (Based's sliding windows, Transformer-XL's segments) count
    above their analytic cost and their ratio is expected below 1. The ratio is recorded, not forced."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lmscale.bench.training import torch_forms
    from lmscale.model import LanguageModel

    cfg = model_config(point)
    forms = torch_forms(point.mixer, point.preset)
    if forms:
        cfg = type(cfg)(**{**cfg.to_dict(), "mixer_options": {**cfg.mixer_options, **forms}})
    with torch.device("meta"):
        model = LanguageModel(cfg).to(dtype=getattr(torch, point.dtype)).eval()
        idx = torch.zeros(point.batch_size, point.length, dtype=torch.long)
    counter, attention = FlopCounterMode(display=False), causal_sdpa_flops()
    with counter, attention, torch.no_grad():
        model(idx, return_state=True, last_only=True)
    return float(counter.get_total_flops() + attention.flops)


def flop_check_records(mixers: Iterable[str], presets: Iterable[str], lengths: Iterable[int],
                       dtype: str = "bfloat16") -> list[dict[str, Any]]:
    """One record per (mixer, preset, T): a batch-1 prefill's analytic FLOPs (the cost models, as every
    prediction uses them) against the counted ones (``counted_forward_flops``). Nothing is timed, so the
    records hold on any machine: the check the inference chapter's FLOP target reads."""
    import torch

    from lmscale.model import LanguageModel
    from lmscale.results import make_record

    records = []
    for mixer in mixers:
        for name in presets:
            for T in lengths:
                point = Point(mixer, name, "prefill", T, 1, dtype)
                point.check()
                with torch.device("meta"):
                    analytic = predicted_cost(LanguageModel(model_config(point)), point)["flops"]
                counted = counted_forward_flops(point)
                records.append(make_record(
                    EXPERIMENT, kind="flop-count", config={**asdict(point), "model": model_config(point).to_dict()},
                    seed=point.seed, device="meta", status="ok",
                    metrics={"flops": analytic, "flops_counted": counted, "flops_analytic_over_counted": analytic / counted},
                    run_id=f"flops-{point.run_id}"))
    return records


def causal_sdpa_flops():
    """A function mode that replaces ``scaled_dot_product_attention`` on meta tensors by an empty output of
    its shape and counts 2·2·d FLOPs (QKᵀ and AV) per attended (query, key) pair instead: for
    ``is_causal`` the lower triangle aligned at the top left, as PyTorch masks it; otherwise the whole
    square. FlopCounterMode would count the whole square of the math path that meta tensors take."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class CausalSDPA(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.flops = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not F.scaled_dot_product_attention:
                return func(*args, **kwargs)
            q, k, v = args[:3]
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            Tq, Tk = q.shape[-2], k.shape[-2]
            short = min(Tq, Tk)  # query i sees keys 0..i: a triangle, then whole rows of Tk past the keys' end
            pairs = short * (short + 1) // 2 + (Tq - short) * Tk if causal else Tq * Tk
            self.flops += 2 * pairs * (q.shape[-1] + v.shape[-1]) * q.shape[:-2].numel()
            return q.new_empty(*q.shape[:-1], v.shape[-1])

    return CausalSDPA()


def measured_ceilings(device, dtype) -> dict[str, float]:
    """Achieved matmul FLOP/s in ``dtype`` and copy bandwidth (bytes read + written per second) on this
    device: the roofline's two ceilings, measured rather than assumed (a CPU has no honest datasheet peak)."""
    import torch

    from lmscale.bench.timing import Budget, time_calls

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    budget = Budget(warmup_ms=100.0, rep_ms=1000.0 if device.type == "cuda" else 500.0, min_reps=5)
    matmul_ms = time_calls([lambda: a @ b], device, budget).ms_median
    elements = (1 << 28) if device.type == "cuda" else (1 << 25)  # 512 MiB / 64 MiB of bf16 per buffer
    src = torch.empty(elements, device=device, dtype=torch.bfloat16).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = time_calls([lambda: dst.copy_(src)], device, budget).ms_median
    return {"matmul_flops_per_s": 2 * n**3 / (matmul_ms / 1e3),
            "copy_bytes_per_s": 2 * src.numel() * src.element_size() / (copy_ms / 1e3)}


# Datasheet ceilings (dense bf16 tensor-core FLOP/s, HBM bandwidth) by torch.cuda.get_device_name.
DATASHEET = {
    "NVIDIA H100 80GB HBM3": (989.4e12, 3.35e12),
    "NVIDIA H200": (989.4e12, 4.8e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.04e12),
}


# --- measurement -----------------------------------------------------------------------------------

def _free_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def planned_bytes(model, point: Point, chunk: int | None = None) -> int:
    """Memory a point needs beyond what is allocated already: the state of B sequences, and the largest
    prefill chunk's activations (≈ 12 values of width d per token in flight, plus the MLP's hidden)."""
    import torch

    dtype = getattr(torch, point.dtype)
    cfg = model.cfg
    chunk = chunk or (point.length if point.phase == "prefill" else min(point.length, PREFILL_CHUNK))
    state = point.batch_size * sum(b.mixer.state_bytes(point.length, dtype) for b in model.blocks)
    activations = point.batch_size * chunk * (12 * cfg.d_model + 3 * cfg.d_hidden) * dtype.itemsize
    return state + activations


def fitting_chunk(shell, point: Point, device, free: int) -> tuple[int, int]:
    """(prefill chunk, bytes needed) for a point: its whole prompt for a prefill, else the longest power-of-two
    chunk of the context (≤ ``PREFILL_CHUNK``) that fits. On a CPU the chunk's forward is traced on the meta
    device (``lmscale.bench.forward_memory``), which sees each PyTorch form's own intermediates; a GPU runs
    kernels the trace cannot see, and its out-of-memory error is caught instead. Raises ``SkipPoint``, with
    the arithmetic, when even the smallest chunk does not fit."""
    import torch

    from lmscale.bench.forward_memory import traced_forward_bytes

    dtype = getattr(torch, point.dtype)
    weights = sum(p.numel() for p in shell.parameters()) * dtype.itemsize
    chunk = point.length if point.phase == "prefill" else min(point.length, PREFILL_CHUNK)
    smallest = chunk if point.phase == "prefill" else min(chunk, MIN_PREFILL_CHUNK)

    def needed(chunk: int) -> int:
        if device.type != "cpu":
            return weights + planned_bytes(shell, point, chunk)
        # the input state (planned at one token), and the traced forward's own bytes
        return weights + planned_bytes(shell, point, 1) + traced_forward_bytes(shell.cfg, point.batch_size, chunk, dtype)

    while True:
        need = needed(chunk)
        if need <= MEMORY_MARGIN * free or chunk <= smallest:
            break
        chunk //= 2
    if need > MEMORY_MARGIN * free:
        what = f"a forward over {chunk} tokens" if point.phase == "prefill" else f"a prefill chunk of {chunk} tokens"
        raise SkipPoint(f"needs ≈ {need / 2**30:.1f} GiB (weights, the state of {point.batch_size} "
                        f"sequence(s) at {point.length} tokens, {what}); {free / 2**30:.1f} GiB are free")
    return chunk, need


class Energy:
    """NVML's board energy counter, with the idle power measured once; None where NVML is missing."""

    def __init__(self, device):
        self.handle, self.idle_watts, self.why = None, None, None
        if device.type != "cuda":
            self.why = "no energy counter on this device (NVML measures NVIDIA GPUs only)"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # mJ -> J
            self._read()
        except Exception as e:  # noqa: BLE001 - no NVML (package, driver or permission): energy not measured
            self.handle, self.why = None, f"NVML unavailable: {type(e).__name__}: {e}"
            return
        import torch

        torch.cuda.synchronize(device)
        time.sleep(0.5)
        e0, t0 = self._read(), time.perf_counter()
        time.sleep(2 * ENERGY_WINDOW_S)
        self.idle_watts = (self._read() - e0) / (time.perf_counter() - t0)

    def measure(self, call: Callable[[], Any], sync: Callable[[], None], work_per_call: float) -> dict[str, float] | None:
        """Run ``call`` until ``ENERGY_WINDOW_S`` has passed; joules per unit of work, gross and net of idle."""
        if self.handle is None:
            return None
        sync()
        calls, e0, t0 = 0, self._read(), time.perf_counter()
        while True:
            call()
            calls += 1
            if calls % 8 == 0 or calls < 8:
                sync()
                if time.perf_counter() - t0 >= ENERGY_WINDOW_S:
                    break
        seconds, joules = time.perf_counter() - t0, self._read() - e0
        work = calls * work_per_call
        return {"energy_window_s": seconds, "energy_joules": joules, "power_watts": joules / seconds,
                "idle_watts": self.idle_watts, "joules_per_unit": joules / work,
                "joules_per_unit_net": (joules - self.idle_watts * seconds) / work}


def measure(point: Point, device, ceilings: dict[str, float], energy: Energy) -> dict[str, Any]:
    """One point's metrics, measured in this process (see the module docstring)."""
    import numpy as np
    import torch

    from lmscale.decode import GraphedStep
    from lmscale.model import LanguageModel

    dtype = getattr(torch, point.dtype)
    torch.manual_seed(point.seed)
    with torch.device("meta"):
        shell = LanguageModel(model_config(point))
    chunk, planned = fitting_chunk(shell, point, device, _free_bytes(device))
    with torch.device(device):  # initialised where it runs: a 1.3B model's init takes seconds on a host
        model = LanguageModel(model_config(point)).to(dtype=dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(point.seed)
    vocab = model.cfg.vocab_size

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    metrics: dict[str, Any] = {"params": model.num_params(), "weight_bytes_allocated":
                               sum(p.numel() * p.element_size() for p in model.parameters()),
                               "memory_planned_bytes": planned}
    B = point.batch_size
    with torch.no_grad():
        if point.phase == "prefill":
            idx = torch.randint(0, vocab, (B, point.length), generator=g).to(device)
            call = lambda: model(idx, return_state=True, last_only=True)
            call()
            times = []
            for _ in range(point.repeats):
                sync()
                t0 = time.perf_counter()
                call()
                sync()
                times.append(time.perf_counter() - t0)
            seconds = float(np.median(times))
            metrics.update({"ms_median": 1e3 * seconds, "ms_min": 1e3 * min(times),
                            "tokens_per_second": B * point.length / seconds})
            work = B * point.length
        else:
            try:
                step = GraphedStep(model, B, device, dtype)
                metrics["decode_path"] = "cuda graph" if step.graphed else "static buffers, eager (no CUDA graph off a GPU)"
            except ValueError as e:  # a state without a fixed layout: decode eagerly, and say why
                step, metrics["decode_path"] = None, f"model.step in a loop: {e}"
            metrics["graphed"] = step is not None and step.graphed
            context = torch.randint(0, vocab, (B, point.length), generator=g).to(device)
            t0 = time.perf_counter()
            state = _prefill(model, step, context, chunk)
            metrics["prefill_chunk"] = chunk
            sync()
            metrics["prefill_seconds"] = time.perf_counter() - t0
            tokens = torch.randint(0, vocab, (point.repeats + 1, point.decode_tokens, B), generator=g).to(device)

            def run(r: int) -> None:
                nonlocal state
                for t in range(point.decode_tokens):
                    if step is not None:
                        step(tokens[r, t])
                    else:
                        _, state = model.step(tokens[r, t], state)

            run(0)  # warm-up: lazy initialisation, the first replays
            times = []
            for r in range(1, point.repeats + 1):
                sync()
                t0 = time.perf_counter()
                run(r)
                sync()
                times.append((time.perf_counter() - t0) / point.decode_tokens)
            seconds = float(np.median(times))
            metrics.update({"ms_per_step": 1e3 * seconds, "ms_per_step_min": 1e3 * min(times),
                            "tokens_per_second": B / seconds})
            timed_from = point.length + point.decode_tokens  # the position the timed repeats start at

            def call() -> None:
                """The timed window again, for the energy window (≥ 1 s: more steps than a static KV cache
                sized for the timed repeats holds). Its full-context caches go back to where the timed
                repeats started, so every pass attends what they did; a recurrent state just goes on."""
                if step is not None:
                    step.rewind_kv_caches(timed_from)
                run(1)

            work = B * point.decode_tokens
            live = step.state if step is not None else state
            metrics["state_bytes_allocated"] = sum(t.numel() * t.element_size() for t in _tensors(live))
        metrics["state_bytes_analytic"] = B * sum(b.mixer.state_bytes(point.length, dtype) for b in model.blocks)
        if point.energy:
            joules = energy.measure(call, sync, work)
            metrics["energy"] = joules
            metrics["energy_not_measured"] = None if joules is not None else energy.why
    if device.type == "cuda":
        metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    # the analytic FLOPs are checked against counted ones by ``lmscale bench flops``, on the meta device with
    # no card held: counting here took the host 2–20 s a prefill point at 1.3B while the GPU waited
    cost = predicted_cost(model, point)
    compute_s = cost["flops"] / ceilings["matmul_flops_per_s"]
    memory_s = cost["bytes"] / ceilings["copy_bytes_per_s"]
    metrics.update({
        "flops": cost["flops"], "bytes": cost["bytes"], "weight_bytes": cost["weight_bytes"],
        "predicted_ms": 1e3 * max(compute_s, memory_s),
        "bound": "compute" if compute_s >= memory_s else "memory",
        "measured_over_predicted": seconds / max(compute_s, memory_s),
        "weights_floor_ms": 1e3 * cost["weight_bytes"] / ceilings["copy_bytes_per_s"],
        **ceilings,
    })
    return metrics


def _tensors(state: Any) -> list:
    from torch import Tensor

    from lmscale.decode import state_leaves

    return [leaf for layer in state for _, leaf in state_leaves(layer) if isinstance(leaf, Tensor)]


def _prefill(model, step, context, chunk: int):
    """The context's final state, fed ``chunk`` tokens at a time (into the graph's buffers if any)."""
    if step is not None:
        step.prefill(context, chunk=chunk)
        return None
    state = None
    for start in range(0, context.shape[1], chunk):
        _, state = model(context[:, start:start + chunk], state, return_state=True, last_only=True)
    return state


class SkipPoint(Exception):
    """A point that cannot run here; its message is the reason recorded."""


def measure_and_record(point: Point, device_name: str, ceilings: dict[str, float], energy: Energy) -> dict[str, Any]:
    import torch

    from lmscale.results import make_record

    device = torch.device(device_name)
    status, metrics, extra = "ok", {}, {}
    try:
        metrics = measure(point, device, ceilings, energy)
    except SkipPoint as e:
        status, extra = "skipped", {"error": str(e)}
    except torch.cuda.OutOfMemoryError as e:
        status, extra = "skipped", {"error": f"out of memory: {str(e).splitlines()[0]}",
                                    "traceback": traceback.format_exc()[-3000:]}
    except Exception as e:  # noqa: BLE001 - any failure becomes the point's record, and the sweep goes on
        status, extra = "error", {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    config = {**asdict(point), "model": model_config(point).to_dict()}
    return make_record(EXPERIMENT, kind=f"{point.phase}-bench", config=config, seed=point.seed, metrics=metrics,
                       device=device_name, status=status, extra=extra,
                       run_id=f"{point.run_id}-{time.strftime('%Y%m%dT%H%M%S')}")


def measured_keys(out: Path) -> set[tuple]:
    """Keys of the points with an ``ok`` or ``skipped`` record in ``out``."""
    from lmscale.results import read_records

    keys = set()
    for path in sorted(Path(out).glob("*.jsonl")):
        for r in read_records(path):
            if r.get("status") in ("ok", "skipped") and r["kind"] in ("prefill-bench", "decode-bench"):
                c = r["config"]
                keys.add((c["mixer"], c["preset"], c["phase"], c["length"], c["batch_size"], c["dtype"]))
    return keys


def run_points(grid: Iterable[Point], device_name: str, out: Path, *, force: bool = False,
               time_limit_s: float | None = None, progress: bool = True) -> tuple[list[dict[str, Any]], Path]:
    """Measure every point not yet recorded in ``out``, in this process, writing this invocation's records to
    one ``.jsonl`` there after each point. Ceilings and idle power are measured once per dtype and run."""
    import torch

    from lmscale.results import write_records
    from lmscale.train import check_device

    check_device(device_name)
    device = torch.device(device_name)
    grid = list(grid)
    for point in grid:
        point.check()
    out = Path(out)
    done = set() if force else measured_keys(out) if out.is_dir() else set()
    todo = [p for p in grid if p.key not in done]
    path = out / f"inference-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    records: list[dict[str, Any]] = []
    if not todo:
        return records, path
    start = time.monotonic()
    energy = Energy(device) if any(p.energy for p in todo) else None
    ceilings: dict[str, dict[str, float]] = {}
    for point in todo:
        if time_limit_s is not None and time.monotonic() - start > time_limit_s:
            if progress:
                print(f"[stop] time limit reached before {point.run_id}", file=sys.stderr)
            break
        if point.dtype not in ceilings:
            ceilings[point.dtype] = measured_ceilings(device, getattr(torch, point.dtype))
            if device.type == "cuda":
                name = torch.cuda.get_device_name(device)
                flops, bandwidth = DATASHEET.get(name, (None, None))
                ceilings[point.dtype].update({"datasheet_flops_per_s": flops, "datasheet_bytes_per_s": bandwidth})
        record = measure_and_record(point, device_name, ceilings[point.dtype], energy)
        records.append(record)
        write_records(records, path)
        if progress:
            print(summary(record), file=sys.stderr, flush=True)
    return records, path


def summary(record: dict[str, Any]) -> str:
    c, m = record["config"], record["metrics"]
    head = f"[{record['status']}] {c['phase']:>7} {c['mixer']:>16} {c['preset']:>5} {c['dtype']:>8} B={c['batch_size']:<2} L={c['length']:<6}"
    if record["status"] != "ok":
        return f"{head} {record.get('error', '')[:200]}"
    if c["phase"] == "prefill":
        return f"{head} {m['tokens_per_second'] / 1e3:9.1f} K tok/s  ×{m['measured_over_predicted']:.2f} of the roofline"
    return f"{head} {m['ms_per_step']:8.3f} ms/step  ×{m['measured_over_predicted']:.2f} of the roofline " \
           f"({m['decode_path'].split(':')[0]})"


def frame(records: Iterable[dict[str, Any]]):
    """One row per record: the point's settings, the measurement, the prediction, energy (measured, and
    estimated with each of ``lmscale.profile.energy.TABLES``), memory and provenance."""
    import pandas as pd

    from lmscale.profile.energy import TABLES

    rows = []
    for r in records:
        if r.get("kind") not in ("prefill-bench", "decode-bench"):
            continue
        c, m, prov = r["config"], r["metrics"], r.get("provenance", {})
        hardware = prov.get("hardware", {})
        energy = m.get("energy") or {}
        tokens = c["batch_size"] * (c["length"] if c["phase"] == "prefill" else 1)  # tokens per timed call
        row = {
            "mixer": c["mixer"], "preset": c["preset"], "phase": c["phase"], "length": c["length"],
            "batch_size": c["batch_size"], "dtype": c["dtype"], "status": r["status"],
            "device": hardware.get("device"), "hardware": hardware.get("gpu") or hardware.get("cpu"),
            "ms": m.get("ms_median") if c["phase"] == "prefill" else m.get("ms_per_step"),
            "tokens_per_second": m.get("tokens_per_second"), "predicted_ms": m.get("predicted_ms"),
            "ratio": m.get("measured_over_predicted"), "bound": m.get("bound"),
            "weights_floor_ms": m.get("weights_floor_ms"), "graphed": m.get("graphed"),
            "decode_path": m.get("decode_path"), "params": m.get("params"),
            "peak_memory_bytes": m.get("peak_memory_bytes"), "state_bytes_analytic": m.get("state_bytes_analytic"),
            "state_bytes_allocated": m.get("state_bytes_allocated"), "flops": m.get("flops"), "bytes": m.get("bytes"),
            "flops_analytic_over_counted": m.get("flops_analytic_over_counted"),
            "joules_per_token": energy.get("joules_per_unit_net"), "joules_per_token_gross": energy.get("joules_per_unit"),
            "energy_not_measured": m.get("energy_not_measured"),
            "why": r.get("error"), "commit": prov.get("git_commit"), "date": prov.get("date"),
            "torch": prov.get("versions", {}).get("torch"), "run_id": r.get("run_id"),
        }
        for table in TABLES:
            if m.get("flops") is not None and c["dtype"] in table.pj_per_flop and hardware.get("device") in table.devices:
                est = table.estimate(m["flops"], m["bytes"], c["dtype"])
                row[f"estimated_joules_per_token_low[{table.citation}]"] = est["joules_low"] / tokens
                row[f"estimated_joules_per_token_high[{table.citation}]"] = est["joules_high"] / tokens
        rows.append(row)
    return pd.DataFrame(rows)


def crossover(df):
    """Per preset, batch size and dtype: the shortest context at which each mixer's decode step is faster
    than attention's (its static cache, at the same context), or None where it never is in the records."""
    import pandas as pd

    decode = df[(df["phase"] == "decode") & (df["status"] == "ok")]
    rows = []
    for (preset, batch, dtype, hardware), g in decode.groupby(["preset", "batch_size", "dtype", "hardware"]):
        attention = g[g["mixer"] == "attention"].set_index("length")["ms"]
        if attention.empty:
            continue
        for mixer, h in g[g["mixer"] != "attention"].groupby("mixer"):
            faster = sorted(L for L, ms in h.set_index("length")["ms"].items() if L in attention and ms < attention[L])
            rows.append({"preset": preset, "batch_size": batch, "dtype": dtype, "hardware": hardware, "mixer": mixer,
                         "faster_from": faster[0] if faster else None,
                         "contexts_compared": len(set(h["length"]) & set(attention.index))})
    return pd.DataFrame(rows)


def format_table(records: list[dict[str, Any]]) -> str:
    df = frame(records)
    if df.empty:
        return "nothing measured (every point had a record already, or the time limit came first)"
    cols = ["phase", "mixer", "preset", "dtype", "batch_size", "length", "status", "ms", "predicted_ms", "ratio",
            "bound", "joules_per_token"]
    return df[cols].to_string(index=False, na_rep="—", float_format=lambda x: f"{x:.4g}")
