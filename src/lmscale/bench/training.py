"""``lmscale bench train``: what one training step costs, per mixer and size, through the trainer itself.

Each point (mixer, preset) runs ``lmscale.train.training_step``, the step every training run takes
(compiled blocks, bf16 autocast, the head's loss without logits, fused AdamW, clipping), on random
tokens, in a process of its own: one point's memory peak, out-of-memory error or crash cannot touch
another's. Warm-up steps pay for compilation, autotuning and the allocator's growth; the timed steps
after them synchronise the device around each step and report the median.

A record holds, besides the config and provenance:
- ``tokens_per_second`` (tokens per step over the median step time) and the step-time quantiles;
- ``mfu``: analytic training FLOPs (3 × ``LanguageModel.flops_per_token``, matmuls only, causal
  pairs only) over the device's dense bf16 peak;
- ``mfu_counted``: the same with the FLOPs that ``torch.utils.flop_counter`` counts in one eager
  forward and backward of one sequence. It sees matmuls and SDPA, not Triton kernels, so the
  recurrent mixers are counted on their PyTorch forms (``impl="torch"``) and the loss on the plain
  head (``loss_impl="full"``); chunked forms also compute the masked upper triangle of each chunk;
- ``peak_memory_bytes`` over warm-up and timed steps (what a run of this shape needs);
- ``top_kernels`` of one profiled step: name, time, share of the step's kernel time, launches.

Points that already have an ``ok`` record in the output folder are skipped, so an interrupted run
resumes; ``force`` measures them again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EXPERIMENT = "throughput"
SIZES = ("125M", "350M")  # the sizes; --presets takes any of lmscale.presets.PRESETS
TOP_KERNELS = 15


@dataclass(frozen=True)
class Point:
    """One measurement's settings; ``key`` identifies it among the records of a folder."""

    mixer: str
    preset: str
    seq_len: int = 2048
    tokens_per_step: int = 32768
    compile: bool = True
    loss_impl: str = "auto"
    activation_checkpointing: bool = False
    micro_batches: int = 1  # the step's sequences in this many forward/backward passes (gradient accumulation)
    warmup_steps: int = 5
    timed_steps: int = 10
    profile: bool = True
    count_flops: bool = True
    seed: int = 0

    @property
    def batch_size(self) -> int:
        return self.tokens_per_step // self.seq_len

    @property
    def key(self) -> tuple:
        return (self.mixer, self.preset, self.seq_len, self.tokens_per_step, self.compile, self.loss_impl,
                self.activation_checkpointing, self.micro_batches)

    def check(self) -> None:
        from lmscale.config import ConfigError

        if self.tokens_per_step % self.seq_len:
            raise ConfigError("tokens_per_step", self.tokens_per_step,
                              f"must be a multiple of seq_len={self.seq_len} (whole sequences per step)")
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ConfigError("micro_batches", self.micro_batches,
                              f"must divide the step's {self.batch_size} sequences (tokens_per_step / seq_len)")
        if self.warmup_steps < 1 or self.timed_steps < 1:
            raise ConfigError("timed_steps", (self.warmup_steps, self.timed_steps),
                              "need at least one warm-up step (compilation) and one timed step")
        _model_config(self)  # an unknown mixer or preset fails here, naming the valid ones


def _record_key(record: dict[str, Any]) -> tuple:
    c = record["config"]
    return (c.get("mixer"), c.get("preset"), c.get("seq_len"), c.get("tokens_per_step"), c.get("compile"),
            c.get("loss_impl"), c.get("activation_checkpointing", False), c.get("micro_batches", 1))


def measured_keys(out: Path) -> set[tuple]:
    """Keys of the points with an ``ok`` record in ``out`` (any .jsonl there)."""
    from lmscale.results import read_records

    keys = set()
    for path in sorted(Path(out).glob("*.jsonl")):
        keys.update(_record_key(r) for r in read_records(path) if r.get("status") == "ok" and r["kind"] == "train-bench")
    return keys


def _model_config(point: Point, **mixer_options: Any):
    from lmscale.presets import preset

    return preset(point.preset, point.mixer, max_seq_len=max(point.seq_len, 1024),
                  **({"mixer_options": mixer_options} if mixer_options else {}))


def torch_forms(mixer: str, preset_name: str) -> dict[str, Any]:
    """Mixer options that select the PyTorch forms, which FlopCounterMode can see (Triton kernels it cannot).
    For an architecture of several mixers (``jamba``), keyed by each mixer's name, as a hybrid takes them."""
    from lmscale.mixers import MIXERS
    from lmscale.presets import ARCHITECTURES, preset

    def forms(name: str) -> dict[str, Any]:
        option = MIXERS[name].options.get("impl")
        return {"impl": "torch"} if option is not None and "torch" in option.choices else {}

    if mixer not in ARCHITECTURES:
        return forms(mixer)
    return {name: options for name in preset(preset_name, mixer).mixer_names if (options := forms(name))}


def counted_flops_per_token(point: Point, device) -> float:
    """Training FLOPs per token counted by ``torch.utils.flop_counter`` on one sequence, eager."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lmscale.model import LanguageModel
    from lmscale.train import autocast_dtype

    model = LanguageModel(_model_config(point, **torch_forms(point.mixer, point.preset))).to(device)
    dtype = autocast_dtype("auto", device)
    idx = torch.randint(0, model.cfg.vocab_size, (1, point.seq_len + 1), device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model(idx[:, :-1], targets=idx[:, 1:], loss_impl="full").backward()
    return counter.get_total_flops() / point.seq_len


def _kernel_table(step, device) -> tuple[list[dict[str, Any]], float]:
    """The most expensive kernels (operators on the CPU) of one profiled step, with their share of all."""
    from lmscale.bench.timing import top_kernels

    rows = top_kernels(step, device, n=10**6)
    total_ms = sum(ms for _, ms, _ in rows)
    return [{"name": name, "ms": ms, "share": ms / total_ms if total_ms else None, "calls": calls}
            for name, ms, calls in rows[:TOP_KERNELS]], total_ms


def measure(point: Point, device_name: str) -> dict[str, Any]:
    """The metrics of one point, measured in this process: the timed trainer, then the counted FLOPs."""
    import torch

    from lmscale.train import check_device

    point.check()
    check_device(device_name)
    device = torch.device(device_name)
    metrics = _time_training(point, device)  # its model and optimiser are freed when it returns
    if point.count_flops:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:  # the PyTorch forms it counts on may need far more memory than the kernels the step timed
            counted = counted_flops_per_token(point, device)
        except torch.cuda.OutOfMemoryError as e:
            metrics.update({"flops_counted_per_token": None, "mfu_counted": None,
                            "flops_counted_error": f"counting ran out of memory on the PyTorch forms: "
                                                   f"{str(e).splitlines()[0]}"})
            return metrics
        metrics["flops_counted_per_token"] = counted
        peak = metrics["peak_flops"]
        metrics["mfu_counted"] = metrics["tokens_per_second"] * counted / peak if peak else None
    return metrics


def _time_training(point: Point, device) -> dict[str, Any]:
    import numpy as np
    import torch

    from lmscale.config import TrainConfig
    from lmscale.distributed import World
    from lmscale.train import autocast_dtype, batch_at, build_training, peak_flops, peak_memory, training_step

    steps = point.warmup_steps + point.timed_steps + int(point.profile)
    cfg = TrainConfig(steps=steps + 1, batch_size=point.batch_size // point.micro_batches,
                      grad_accum_steps=point.micro_batches, seq_len=point.seq_len, warmup_steps=1,
                      device=str(device), compile=point.compile, loss_impl=point.loss_impl, tensorboard=False,
                      activation_checkpointing=point.activation_checkpointing,
                      seed=point.seed)
    model_cfg = _model_config(point)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(point.seed)
    world = World()
    raw, model, optimizer = build_training(model_cfg, cfg, world, device)
    dtype = autocast_dtype(cfg.autocast, device)
    tokens = np.random.default_rng(point.seed).integers(0, model_cfg.vocab_size, size=1 << 22, dtype=np.int64)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(i: int) -> None:
        x, y = batch_at(tokens, point.batch_size, point.seq_len, point.seed, i)
        result = training_step(model, raw, optimizer, x, y, cfg, world, device, dtype)
        if not result.applied:
            raise RuntimeError(f"step {i} was not applied: loss {result.loss}, gradient norm {result.grad_norm}")

    t0 = time.perf_counter()
    for i in range(point.warmup_steps):
        step(i)
    sync()
    warmup_seconds = time.perf_counter() - t0
    times = []
    for i in range(point.warmup_steps, point.warmup_steps + point.timed_steps):
        sync()
        t = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t)
    metrics: dict[str, Any] = {}
    if point.profile:  # one more step unprofiled, then the profiled one
        metrics["top_kernels"], metrics["profiled_kernel_ms"] = _kernel_table(lambda: step(steps - 1), device)
    step_s = float(np.median(times))
    flops_per_token = 3 * raw.flops_per_token(point.seq_len)
    peak, peak_source = peak_flops(cfg, device)
    metrics.update({
        "step_ms_median": 1e3 * step_s,
        "step_ms_p10": 1e3 * float(np.quantile(times, 0.1)),
        "step_ms_p90": 1e3 * float(np.quantile(times, 0.9)),
        "warmup_seconds": warmup_seconds,
        "tokens_per_second": point.tokens_per_step / step_s,
        "flops_per_token": flops_per_token,
        "mfu": point.tokens_per_step / step_s * flops_per_token / peak if peak else None,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "params": raw.num_params(),
        "params_non_embedding": raw.num_params(non_embedding=True),
        "loss_impl_resolved": _resolved_loss(point, device),
    })
    metrics["peak_memory_bytes"], metrics["peak_memory_source"] = peak_memory(device)
    if device.type == "cuda":
        metrics["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return metrics


def _resolved_loss(point: Point, device) -> str:
    from lmscale.loss import resolve_impl

    return resolve_impl(point.loss_impl, device, needs_grad=True)


def _point_config(point: Point) -> dict[str, Any]:
    return {**asdict(point), "batch_size": point.batch_size, "model": _model_config(point).to_dict()}


def measure_and_record(point: Point, device_name: str) -> dict[str, Any]:
    """One point as a record: ``ok`` with its metrics, ``oom`` or ``error`` with what went wrong."""
    import torch

    from lmscale.results import make_record

    status, metrics, extra = "ok", {}, {}
    try:
        metrics = measure(point, device_name)
    except torch.cuda.OutOfMemoryError as e:
        status, extra = "oom", {"error": str(e).splitlines()[0], "traceback": traceback.format_exc()[-4000:]}
        metrics = {"peak_memory_bytes": torch.cuda.max_memory_allocated()}
    except Exception as e:  # noqa: BLE001 - any failure becomes the point's record, and the sweep goes on
        status, extra = "error", {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    return make_record(EXPERIMENT, kind="train-bench", config=_point_config(point), seed=point.seed, metrics=metrics,
                       device=device_name, status=status, extra=extra,
                       run_id=f"{point.mixer}-{point.preset}-t{point.seq_len}-{time.strftime('%Y%m%dT%H%M%S')}")


def run_points(points: Iterable[Point], device_name: str, out: Path, *, force: bool = False,
               time_limit_s: float | None = None, point_timeout_s: float = 600.0,
               in_process: bool = False, progress: bool = True) -> tuple[list[dict[str, Any]], Path]:
    """Measure every point not yet in ``out`` (each in a child process unless ``in_process``), writing all
    records of this invocation to one ``.jsonl`` there after each point. Returns (records, path)."""
    from lmscale.results import write_records

    out = Path(out)
    done = set() if force else measured_keys(out) if out.is_dir() else set()
    path = out / f"train-bench-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    records: list[dict[str, Any]] = []
    start = time.monotonic()
    points = list(points)
    for point in points:  # every point is checked before the first is measured
        point.check()
    for point in points:
        if point.key in done:
            if progress:
                print(f"[skip] {point.mixer} {point.preset}: measured already", file=sys.stderr)
            continue
        if time_limit_s is not None and time.monotonic() - start > time_limit_s:
            if progress:
                print(f"[stop] time limit reached before {point.mixer} {point.preset}", file=sys.stderr)
            break
        record = measure_and_record(point, device_name) if in_process else _in_child(point, device_name,
                                                                                       point_timeout_s)
        records.append(record)
        write_records(records, path)
        if progress:
            print(_summary(record), file=sys.stderr, flush=True)
    return records, path


def _in_child(point: Point, device_name: str, timeout_s: float) -> dict[str, Any]:
    """Run one point in a fresh interpreter; a crash or timeout still yields a record."""
    from lmscale.results import make_record, read_records

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "point.jsonl"
        cmd = [sys.executable, "-m", "lmscale.bench.training", json.dumps(asdict(point)), device_name, str(result)]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
            if result.is_file():
                return read_records(result)[0]
            why = f"the measuring process exited with status {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        except subprocess.TimeoutExpired:
            why = f"the measuring process ran past {timeout_s:.0f} s and was stopped"
    return make_record(EXPERIMENT, kind="train-bench", config=_point_config(point), seed=point.seed, metrics={},
                       device=device_name, status="error", extra={"error": why},
                       run_id=f"{point.mixer}-{point.preset}-t{point.seq_len}-{time.strftime('%Y%m%dT%H%M%S')}")


def _summary(record: dict[str, Any]) -> str:
    c, m = record["config"], record["metrics"]
    head = f"[{record['status']}] {c['mixer']:>15} {c['preset']:>6}"
    if record["status"] != "ok":
        return f"{head}  {record.get('error', '')[:300]}"
    mfu = f"{100 * m['mfu']:.1f} %" if m.get("mfu") else "—"
    memory = f"{m['peak_memory_bytes'] / 1e9:.1f} GB" if m.get("peak_memory_bytes") else "—"
    return f"{head}  {m['tokens_per_second'] / 1e3:8.1f} K tok/s  MFU {mfu:>7}  peak {memory}"


def variant(config: dict[str, Any]) -> str:
    """How a record's step differs from the plain one (stored activations, one pass, compiled blocks), in
    words, "" for the plain step: the ways a step that does not fit is made to fit, and what they cost."""
    parts = []
    if config.get("activation_checkpointing"):
        parts.append("recomputed blocks")
    if config.get("micro_batches", 1) > 1:
        parts.append(f"{config['micro_batches']} micro-batches")
    if config.get("compile") is False:
        parts.append("eager")
    return ", ".join(parts)


def format_table(records: list[dict[str, Any]]) -> str:
    """One line per record: mixer, preset, tokens/s, both MFUs, step time, peak memory, or the failure."""
    import pandas as pd

    rows = []
    for r in records:
        c, m = r["config"], r["metrics"]
        rows.append({
            "mixer": c["mixer"] + (f" ({v})" if (v := variant(c)) else ""), "preset": c["preset"], "status": r["status"],
            "K tok/s": None if m.get("tokens_per_second") is None else round(m["tokens_per_second"] / 1e3, 1),
            "MFU %": None if m.get("mfu") is None else round(100 * m["mfu"], 1),
            "MFU counted %": None if m.get("mfu_counted") is None else round(100 * m["mfu_counted"], 1),
            "step ms": None if m.get("step_ms_median") is None else round(m["step_ms_median"], 1),
            "peak GB": None if m.get("peak_memory_bytes") is None else round(m["peak_memory_bytes"] / 1e9, 1),
            "note": r.get("error", "")[:80],
        })
    if not rows:
        return "nothing measured (every point had a record already, or the time limit came first)"
    return pd.DataFrame(rows).to_string(index=False, na_rep="—")


LOSS_CANDIDATES = ("full", "chunked", "liger", "cce")  # cce: Apple's Cut Cross-Entropy, a peer when installed


def _loss_call(impl: str, hidden, weight, targets):
    """fwd+bwd of one loss implementation; cce is the cut-cross-entropy package at its default settings."""
    from lmscale.loss import linear_cross_entropy

    def call():
        hidden.grad = weight.grad = None
        if impl == "cce":
            from cut_cross_entropy import linear_cross_entropy as cce

            loss = cce(hidden, weight, targets)
        else:
            loss = linear_cross_entropy(hidden, weight, targets, impl=impl)
        loss.backward()
        return loss.detach(), hidden.grad, weight.grad

    return call


def loss_records(presets: Iterable[str], device_name: str, tokens: int = 32768, seed: int = 0) -> list[dict[str, Any]]:
    """The head's loss, forward and backward, at each preset's width and ``tokens`` tokens in bf16: time,
    memory beyond the inputs, and the error against a float32 reference of the same bf16 inputs."""
    import importlib.util

    import torch

    from lmscale.bench.timing import time_calls
    from lmscale.presets import preset
    from lmscale.results import make_record
    from lmscale.train import check_device

    check_device(device_name)
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    for name in presets:
        cfg = preset(name, "attention")
        g = torch.Generator(device=device).manual_seed(seed)
        hidden = torch.randn(tokens, cfg.d_model, device=device, generator=g).to(dtype).requires_grad_()
        weight = (0.02 * torch.randn(cfg.vocab_size, cfg.d_model, device=device, generator=g)).to(dtype).requires_grad_()
        targets = torch.randint(0, cfg.vocab_size, (tokens,), device=device, generator=g)
        ref = _loss_call("full", hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_(),
                         targets)()
        ref = [t.clone() for t in ref]
        for impl in LOSS_CANDIDATES:
            config = {"impl": impl, "preset": name, "d_model": cfg.d_model, "vocab_size": cfg.vocab_size,
                      "tokens": tokens, "dtype": str(dtype).removeprefix("torch.")}
            package = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}.get(impl)
            if package and (device.type != "cuda" or importlib.util.find_spec(package) is None):
                why = "runs on CUDA only" if device.type != "cuda" else f"{package} is not installed"
                records.append(make_record(EXPERIMENT, kind="loss-bench", config=config, seed=seed, metrics={},
                                           device=device_name, status="skipped", extra={"error": why}))
                continue
            call = _loss_call(impl, hidden, weight, targets)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            out = call()
            metrics = {"loss_rel_error": abs(out[0].float().item() - ref[0].item()) / abs(ref[0].item())}
            for label, got, want in (("hidden", out[1], ref[1]), ("weight", out[2], ref[2])):
                metrics[f"grad_{label}_rel_error"] = ((got.float() - want).norm() / want.norm()).item()
            if device.type == "cuda":
                metrics["extra_memory_bytes"] = torch.cuda.max_memory_allocated(device) - before
            metrics.update(time_calls([call], device).metrics())
            records.append(make_record(EXPERIMENT, kind="loss-bench", config=config, seed=seed, metrics=metrics,
                                       device=device_name, run_id=f"loss-{impl}-{name}-{time.strftime('%Y%m%dT%H%M%S')}"))
    return records


def _child_main(argv: list[str]) -> int:
    """``python -m lmscale.bench.training POINT_JSON DEVICE RESULT_PATH``: one point, its record to RESULT_PATH."""
    from lmscale.results import write_records

    point = Point(**json.loads(argv[0]))
    write_records([measure_and_record(point, argv[1])], Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
