"""``lmscale bench kernels``: our GPU kernels against PyTorch and the peers, each checked before it is timed.

What is measured (the full suite; ``--quick`` shrinks every size so that the CPU can run it through
Triton's interpreter):

- ``ceiling``: an 8192³ bf16 matmul and a large device copy, the two rates every floor is computed from;
- ``gla`` (gate per key channel), ``simple_gla`` (one gate per head) and ``linear_attention`` (no
  gate): H = 16, D = 128, 32K tokens per batch at T = 2K, 8K, 32K, forward and forward+backward, for
  our chunk kernel, flash-linear-attention's, the PyTorch chunk form and causal SDPA (FlashAttention);
- ``delta_rule``, ``gated_delta_rule``: the chunked delta rule (DeltaNet, Gated DeltaNet) at the same
  sizes, ours vs fla's ``chunk_delta_rule`` / ``chunk_gated_delta_rule``, the PyTorch chunk form and SDPA;
- ``cumulative_softmax``, ``windowed_softmax``: LEAP's cumulative softmax, global and over a window of
  ``SOFTMAX_WINDOW`` tokens, at the same sizes, ours vs the PyTorch chunk form;
- ``lru_scan``: the LRU's complex scan at a 350M layer's width (N = d_model = 1024), and
  ``selective_scan``: Mamba's fused scan (d_inner = 2048, N = 16, 8K tokens per batch), ours vs the
  PyTorch chunk form, at T = 2K and 8K;
- ``step``: one layer's decoding step at batch 1 and 64, eager and in a CUDA graph, against SDPA of one
  query over KV caches of 1K … 256K tokens (sizes over ``memory_limit`` are skipped and say so);
- ``model_step``: one decoding step of a 24-layer GLA model (preset 1.3B, bf16, batch 1), eager
  ``LanguageModel.step`` against ``lmscale.decode.GraphedStep``.
- ``mixer_layer``: every registered mixer's layer at the 350M width (16K tokens per batch, T = 2K),
  forward and forward+backward, as a model runs it and, for mixers with kernels, on PyTorch; each of
  its records also names the call's most expensive kernels (``top_kernels``): where the next kernel
  should go.

The correctness gate. Before an implementation is timed at a shape, it runs once on fresh random
inputs at that full size and its outputs — and for forward+backward every input gradient, for the
same random upstream gradient — are compared with a higher-precision PyTorch reference on the same
inputs upcast (float32 for 16-bit inputs, float64 for float32 and complex128 for complex64; the chunk
form for the recurrences, float32 SDPA for attention), as ‖x − ref‖ / ‖ref‖, the maximum over tensors. NaN never passes. Above
``TOLERANCES[dtype]`` the implementation is refused: no timing, status "wrong", the error recorded.
bf16's 2e-2: a bf16 number carries 8 significant bits (rounding error 2⁻⁹ ≈ 2e-3); a kernel that
feeds bf16 operands to its matrix units (q·kᵀ, the decayed keys, the chunk states) lands between 1e-3
and 1e-2 against a float32 reference, the gradients of the gates (reverse cumulative sums over a
chunk, with cancellation) at the top of that range; 2e-2 leaves that headroom while a wrong kernel —
a skipped chunk, a misplaced decay, a wrong scale — is off by 1e-1 or more. Peers face the same gate.

Records: one per measurement, all of one invocation in one ``.jsonl`` file (the GPU machine returns
few files), experiment "kernels", kind "kernel-bench" ("kernel-check" under ``--check-only``), status
"ok" | "wrong" | "refused" (the implementation raised, e.g. fla's deliberate refusal of its scalar-gate
backward on Hopper with Triton < 3.7.1, fla issue #640) | "skipped" (not importable, no CUDA for a
graph, or too large), with the reason in ``error``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscale.bench import KERNEL_OPS
from lmscale.bench.implementations import (
    CHUNK_SIZE,
    MAMBA_STATE,
    REFERENCES,
    SOFTMAX_WINDOW,
    Impl,
    Unavailable,
    default_impls,
    load,
    reference_dtype,
)
from lmscale.bench.kernel_costs import attention_counts, delta_counts, recurrence_counts
from lmscale.bench.timing import (
    Budget,
    Timing,
    capture_graphs,
    rotation_sets,
    tensor_bytes,
    time_calls,
    top_kernels,
)
from lmscale.paths import results_dir
from lmscale.results import make_record, write_records

EXPERIMENT = "kernels"
# relative error allowed against the upcast reference, by input dtype (the module docstring says why)
TOLERANCES = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-3, torch.complex64: 1e-3}
# The element-wise check: the largest error of any element, relative to the reference's RMS, may be this
# many times the norm-wise tolerance. Rounding spreads over every element (its largest is ≈ 5× its RMS
# over millions of elements); one wrong block is local, and a norm over the whole tensor dilutes it: a
# wrong 64-token chunk of one head among B16·H16·T2K moves the norm by 1.6 % but an element by ≈ 100 %.
LOCAL_FACTOR = 10.0
LOCAL = "@max"  # suffix of the element-wise errors' names
GATES = {"gla": "channel", "simple_gla": "head", "linear_attention": "none"}  # the chunked ops
# mixer_layer's reference, where a mixer's default PyTorch form would not fit in float32: Mamba's chunk
# scan holds [B, T, chunk, d_inner, N] decays (32 GiB at the 350M width, 16K tokens); its sequential
# scan holds the states alone
LAYER_REFERENCE_OPTIONS = {"mamba": {"scan": "sequential"}}
# graphed decode steps: one graph runs this many steps over distinct input sets (a 24-layer model's
# layers), and the time per step is the replay's over this: the graph's one launch spread as in a model
STEPS_PER_GRAPH = 24
# how a record skipped unmeasured (the run's --time-limit reached) begins its error: it says nothing about
# its configuration, so the chapter never lets it stand in for an earlier measurement
OUT_OF_TIME = "the run's time limit"


@dataclass(frozen=True)
class Suite:
    """Every size the suite measures; ``FULL`` is the issue's, ``QUICK`` a CPU-sized copy for tests."""

    dtype: torch.dtype
    heads: int
    head_dim: int
    tokens: int  # per batch: B = tokens // T
    seq_lens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    contexts: tuple[int, ...]  # KV-cache lengths for attention decoding
    model_preset: str
    matmul_size: int
    copy_bytes: int
    scan_width: int  # the LRU's N (= d_model of a 350M model)
    scan_seq_lens: tuple[int, ...]
    mamba_width: int  # d_inner = 2 · d_model of a 350M model, N = 16 per channel
    mamba_tokens: int  # per batch: its PyTorch form holds [B, T, chunk, d_inner, N] decays
    mixer_preset: str = "350M"  # the width at which each mixer's layer is profiled (op mixer_layer)
    mixer_seq_len: int = 2048
    mixer_tokens: int = 16384
    mixer_names: tuple[str, ...] | None = None  # None: every registered mixer
    layer_impls: tuple[str, ...] = ("ours", "torch")  # op mixer_layer: the variants timed
    budget: Budget = field(default_factory=Budget)
    max_sets: int = 256  # input sets rotated through (fewer under the interpreter: each call is slow)
    memory_limit: int = 70 * 2**30  # decode sizes needing more are skipped


FULL = Suite(
    dtype=torch.bfloat16, heads=16, head_dim=128, tokens=32768, seq_lens=(2048, 8192, 32768),
    decode_batches=(1, 64), contexts=tuple(1024 * 2**i for i in range(9)), model_preset="1.3B",
    matmul_size=8192, copy_bytes=2**31, scan_width=1024, scan_seq_lens=(2048, 8192), mamba_width=2048,
    mamba_tokens=8192,
)
QUICK = Suite(
    dtype=torch.bfloat16, heads=2, head_dim=16, tokens=32, seq_lens=(32,), decode_batches=(1, 2),
    contexts=(64, 256), model_preset="tiny", matmul_size=64, copy_bytes=2**20, scan_width=16,
    scan_seq_lens=(16, 32), mamba_width=32, mamba_tokens=32, max_sets=2, mixer_preset="tiny",
    mixer_seq_len=32, mixer_tokens=32, mixer_names=("attention", "gla"),
    budget=Budget(warmup_ms=0, rep_ms=0, min_warmup=1, min_reps=2, max_reps=2),
)


def make_suite(quick: bool, device: torch.device, dtype: torch.dtype | None = None) -> Suite:
    """FULL or QUICK, in ``dtype``; by default bf16 on CUDA and float32 on the CPU, because Triton's
    interpreter cannot do bf16 arithmetic (numpy has no bf16)."""
    suite = QUICK if quick else FULL
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in TOLERANCES or dtype.is_complex:
        raise ValueError(f"dtype must be one of bfloat16, float16, float32, got {dtype}")
    return replace(suite, dtype=dtype)


# --- checking


def relative_errors(outputs: dict[str, Tensor | None], references: dict[str, Tensor | None]) -> dict[str, float]:
    """Per tensor named in ``references``: ‖x − ref‖ / ‖ref‖ under its name, and max |x − ref| over the
    reference's RMS under ``name + LOCAL`` (both NaN where x has a NaN/inf or is missing)."""
    errors = {}
    for name, ref in references.items():
        if ref is None:
            continue
        x = outputs.get(name)
        if x is None or x.shape != ref.shape or not torch.isfinite(x).all():
            errors[name] = errors[name + LOCAL] = math.nan
            continue
        delta = x.to(ref.dtype) - ref
        scale = torch.linalg.vector_norm(ref, dtype=_norm_dtype(ref)).clamp_min(1e-30)
        errors[name] = (torch.linalg.vector_norm(delta, dtype=_norm_dtype(ref)) / scale).item()
        rms = scale / math.sqrt(max(ref.numel(), 1))
        errors[name + LOCAL] = (delta.abs().max().to(rms.dtype) / rms).item() if ref.numel() else 0.0
    return errors


def _norm_dtype(ref: Tensor) -> torch.dtype:
    return torch.complex128 if ref.is_complex() else torch.float64


def judge(errors: dict[str, float], tolerance: float) -> str | None:
    """None when every error is finite and within tolerance (``LOCAL_FACTOR`` times it for the
    element-wise errors), else what is wrong."""
    bad = [name for name, e in errors.items() if not math.isfinite(e) and not name.endswith(LOCAL)]
    if bad:
        return f"NaN/inf or missing values in {', '.join(bad)}"
    for name, e in sorted(errors.items(), key=lambda item: -item[1]):
        if name.endswith(LOCAL) and e > LOCAL_FACTOR * tolerance:
            return (f"element-wise error {e:.3g} (largest |x − ref| over the reference's RMS) in "
                    f"{name.removesuffix(LOCAL)} exceeds {LOCAL_FACTOR:g} × the tolerance {tolerance:g}: a local error "
                    "that the norm-wise error dilutes")
        if not name.endswith(LOCAL) and e > tolerance:
            return f"relative error {e:.3g} in {name} exceeds the tolerance {tolerance:g}"
    return None


def _gradients(fn: Callable[..., Tensor], inputs: list[Tensor | None], upstream: Tensor) -> dict[str, Tensor | None]:
    """Output and the gradient of <output, upstream> w.r.t. every input (None where it does not depend on one)."""
    leaves = [x for x in inputs if x is not None]
    o = fn(*inputs)
    grads = iter(torch.autograd.grad(o, leaves, upstream, allow_unused=True))
    return {"o": o, **{f"d{i}": (next(grads) if x is not None else None) for i, x in enumerate(inputs)}}


def _reference_outputs(name: str, inputs: list[Tensor | None], upstream: Tensor) -> dict[str, Tensor | None]:
    """``REFERENCES[name]`` on the inputs upcast (``reference_dtype``): output and input gradients, detached."""
    return _reference_outputs_of(REFERENCES[name], inputs, upstream)


def _reference_outputs_of(fn: Callable[..., Tensor], inputs: list[Tensor | None],
                          upstream: Tensor) -> dict[str, Tensor | None]:
    """``fn`` on the inputs upcast (``reference_dtype``): output and input gradients, detached."""
    hi = [None if x is None else x.detach().to(reference_dtype(x.dtype)).requires_grad_() for x in inputs]
    out = _gradients(fn, hi, upstream.to(reference_dtype(upstream.dtype)))
    return {k: None if x is None else x.detach() for k, x in out.items()}


def _forward(fn: Callable[..., Tensor], inputs: list[Tensor | None]) -> dict[str, Tensor]:
    with torch.no_grad():
        return {"o": fn(*inputs)}


def _named(outputs: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Rename the positional gradients d0, d1, … to dq, dk, … for the records."""
    return {("d" + names[int(k[1:])] if k[0] == "d" and k[1:].isdigit() else k): v for k, v in outputs.items()}


# --- the run


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 600 else text[:600] + " …"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Run:
    """One invocation: the suite, where to run, the records so far, and how each op is measured.

    The record file is rewritten (atomically) after every record, so a run killed at the device's time
    limit still returns everything it measured."""

    def __init__(self, suite: Suite, device: torch.device, seed: int, check_only: bool,
                 impls: dict[str, dict[str, Impl]], log: Callable[[str], None], stamp: str, path: Path,
                 time_limit_s: float | None):
        self.suite, self.device, self.seed, self.check_only = suite, device, seed, check_only
        self.impls, self.log, self.stamp, self.path = impls, log, stamp, path
        self.records: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.time_limit_s = time_limit_s

    # records

    def record(self, config: dict[str, Any], status: str, metrics: dict[str, Any] | None = None,
               error: str | None = None) -> dict[str, Any]:
        config = {"H": None, "D": None, "graphed": False, **config}
        parts = [config["op"], config["impl"], config["mode"]] + [
            f"{k}{config[k]}" for k in ("B", "T", "context") if config.get(k) is not None]
        if config["graphed"]:
            parts.append("graphed")
        record = make_record(
            EXPERIMENT, kind="kernel-check" if self.check_only else "kernel-bench", config=config,
            seed=config["seed"], metrics=metrics or {}, device=str(self.device), status=status,
            run_id=f"{self.stamp}-{len(self.records):03d}-" + "-".join(map(str, parts)),
            extra={"error": error} if error else None,
        )
        self.records.append(record)
        write_records(self.records, self.path)
        self._progress(record)
        return record

    def _progress(self, record: dict[str, Any]) -> None:
        c, m = record["config"], record["metrics"]
        what = " ".join(f"{k}={c[k]}" for k in ("B", "T", "context") if c.get(k) is not None)
        timing = f"{m['ms_median']:.4g} ms" if "ms_median" in m else ""
        err = f"err {m['max_rel_err']:.2g}" if m.get("max_rel_err") is not None else ""
        line = (f"[{time.perf_counter() - self.started:6.1f}s] {record['status']:8s} {c['op']} {c['mode']} "
                f"{c['impl']}{' graphed' if c['graphed'] else ''} {what} {timing} {err}")
        self.log(line.rstrip())
        if record["status"] == "wrong":
            self.log(f"!!! REFUSED TO TIME {c['op']} {c['impl']} {c['mode']} {what}: {record['error']}")
        elif record["status"] in ("refused", "skipped"):
            self.log(f"    {record['error']}")

    def measure(self, config: dict[str, Any], prepare: Callable[[], tuple[dict[str, float], Callable]],
                counts: tuple[int | None, int | None] = (None, None), profile: bool = False) -> dict[str, Any]:
        """Check, then time. ``prepare()`` runs the implementation once at full size and returns the
        relative errors against the reference and a function making the timed calls (one per input set).
        ``config["seed"]`` is the seed its inputs were drawn with. ``profile`` adds the call's most
        expensive kernels (``top_kernels``) to the metrics."""
        tolerance = TOLERANCES[getattr(torch, config["dtype"])]
        if self.out_of_time():
            return self.skip_out_of_time(config)
        try:
            errors, make_calls = prepare()
            norm_wise = [e for name, e in errors.items() if not name.endswith(LOCAL)]
            local = [e for name, e in errors.items() if name.endswith(LOCAL)]
            finite = all(math.isfinite(e) for e in errors.values())
            metrics = {"max_rel_err": max(norm_wise) if finite else math.nan,
                       "max_local_err": max(local) if finite and local else math.nan, "tolerance": tolerance,
                       "local_tolerance": LOCAL_FACTOR * tolerance,
                       **{f"rel_err_{name}": e for name, e in errors.items() if not name.endswith(LOCAL)},
                       **{f"local_err_{name.removesuffix(LOCAL)}": e for name, e in errors.items() if name.endswith(LOCAL)}}
            problem = judge(errors, tolerance)
            if problem:
                return self.record(config, "wrong", metrics, problem)
            if self.check_only:
                return self.record(config, "ok", metrics)
            calls = make_calls()
            timing = time_calls(calls, self.device, self.suite.budget)
        except Unavailable as e:
            return self.record(config, "skipped", error=str(e))
        except torch.OutOfMemoryError as e:  # too large for this GPU: not a fault of the implementation
            return self.record(config, "skipped", error=_describe(e))
        except Exception as e:  # noqa: BLE001 — whatever an implementation raises is its record's error
            return self.record(config, "refused", error=_describe(e))
        finally:
            _free(self.device)
        if profile:
            try:
                metrics["top_kernels"] = top_kernels(calls[0], self.device)
            except Exception as e:  # noqa: BLE001 — a profiler that cannot run costs the breakdown, not the timing
                metrics["top_kernels_error"] = _describe(e)
        steps = config.get("steps_per_graph") or 1
        if steps > 1:  # one replay ran that many steps
            timing = Timing(timing.ms_median / steps, timing.ms_p10 / steps, timing.ms_p90 / steps, timing.repeats)
        flops, nbytes = counts
        seconds = timing.ms_median / 1e3
        metrics.update(timing.metrics(), input_sets=len(calls))
        if flops:
            metrics.update(flops=flops, tflops=flops / seconds / 1e12)
        if nbytes:
            metrics.update(bytes=nbytes, gbps=nbytes / seconds / 1e9)
        return self.record(config, "ok", metrics)

    def out_of_time(self) -> bool:
        return self.time_limit_s is not None and time.perf_counter() - self.started > self.time_limit_s

    def skip(self, config: dict[str, Any], why: str) -> dict[str, Any]:
        return self.record(config, "skipped", error=why)

    def skip_out_of_time(self, config: dict[str, Any]) -> dict[str, Any]:
        return self.skip(config, f"{OUT_OF_TIME} of {self.time_limit_s:.0f} s was spent")

    def case_seed(self, *key: Any) -> int:
        """A seed per case, so every case draws fresh inputs and any one can be redrawn alone."""
        return (self.seed * 1_000_003 + zlib.crc32(repr(key).encode())) % 2**31

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def randn(self, gen: torch.Generator, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.randn(*shape, generator=gen, device=self.device, dtype=dtype or torch.float32)

    def sets(self, make: Callable[[], Any], first: Any, bytes_per_set: int) -> list[Any]:
        """``first`` and enough fresh sets from ``make`` to rotate past the L2 cache."""
        n = rotation_sets(bytes_per_set, self.device, self.suite.max_sets)
        return [first] + [make() for _ in range(n - 1)]

    # ops

    def ceiling(self) -> None:
        """The two rates every floor is computed from: a large bf16 matmul and a large device copy."""
        s, dtype = self.suite, self.suite.dtype
        seed = self.case_seed("ceiling")
        n, gen = s.matmul_size, self.generator(seed)
        config = {"op": "ceiling", "impl": "torch", "mode": "matmul", "B": None, "T": None, "n": n,
                  "dtype": str(dtype).removeprefix("torch."), "seed": seed}

        def matmul_set() -> tuple[Tensor, Tensor, Tensor]:
            a, b = self.randn(gen, n, n, dtype=dtype), self.randn(gen, n, n, dtype=dtype)
            return a, b, torch.empty_like(a)

        def prepare_matmul():
            first = matmul_set()
            a, b, c = first
            torch.mm(a, b, out=c)
            ref = a.to(reference_dtype(dtype)) @ b.to(reference_dtype(dtype))
            errors = relative_errors({"o": c}, {"o": ref})
            return errors, lambda: [partial(torch.mm, *x[:2], out=x[2]) for x in
                                    self.sets(matmul_set, first, tensor_bytes(*first))]

        self.measure(config, prepare_matmul, (2 * n**3, 3 * n * n * dtype.itemsize))
        size = s.copy_bytes // dtype.itemsize
        config = {**config, "mode": "copy", "n": size}

        def copy_set() -> tuple[Tensor, Tensor]:
            return self.randn(gen, size, dtype=dtype), torch.empty(size, dtype=dtype, device=self.device)

        def prepare_copy():
            first = copy_set()
            first[1].copy_(first[0])
            errors = {"o": 0.0 if torch.equal(first[0], first[1]) else math.inf}
            return errors, lambda: [partial(dst.copy_, src) for src, dst in
                                    self.sets(copy_set, first, tensor_bytes(*first))]

        self.measure(config, prepare_copy, (None, 2 * size * dtype.itemsize))

    def chunked(self, op: str) -> None:
        """A chunked recurrence (GLA, simple GLA or linear attention) against softmax attention."""
        s, dtype, gate = self.suite, self.suite.dtype, GATES[op]
        H, D = s.heads, s.head_dim

        def draw(B: int, T: int, gen: torch.Generator) -> list[Tensor | None]:
            # q, k ~ N(0, 1/√D): q·k ~ N(0, 1), no bf16 overflow; gates as the mixers make them
            q = self.randn(gen, B, T, H, D) * D**-0.25
            k = self.randn(gen, B, T, H, D) * D**-0.25
            v = self.randn(gen, B, T, H, D)
            if gate == "channel":  # GLA: logsigmoid(x) / 16 (gate_temperature)
                log_g = F.logsigmoid(self.randn(gen, B, T, H, D)) / 16
            elif gate == "head":  # RetNet / Mamba-2-style: per head, in [−0.1, −0.001]
                log_g = -0.001 - 0.099 * torch.rand(B, T, H, generator=gen, device=self.device)
            else:
                log_g = None
            do = self.randn(gen, B, T, H, D)
            return [None if x is None else x.to(dtype).requires_grad_() for x in (q, k, v, log_g)] + [do.to(dtype)]

        def counts(B: int, T: int, mode: str, reference: str) -> tuple[int, int]:
            if reference == "attention":
                return attention_counts(B, T, H, D, mode, dtype.itemsize)
            return recurrence_counts(B, T, H, D, gate, mode, dtype.itemsize)

        shape = {"H": H, "D": D, "dtype": str(dtype).removeprefix("torch."), "gate": gate}
        self._sequences(op, ("q", "k", "v", "g"), draw, s.seq_lens, s.tokens, counts, shape)

    def delta(self, op: str) -> None:
        """The delta rule (DeltaNet; Gated DeltaNet with ``op`` gated_delta_rule) against softmax attention,
        on inputs as the mixers make them: q, k L2-normalised, β = sigmoid(·), per-head log α ≤ 0."""
        s, dtype, gated = self.suite, self.suite.dtype, op == "gated_delta_rule"
        H, D = s.heads, s.head_dim

        def draw(B: int, T: int, gen: torch.Generator) -> list[Tensor | None]:
            q = F.normalize(self.randn(gen, B, T, H, D), dim=-1)
            k = F.normalize(self.randn(gen, B, T, H, D), dim=-1)
            v = self.randn(gen, B, T, H, D)
            beta = torch.sigmoid(self.randn(gen, B, T, H))
            # Gated DeltaNet's initialisation spans log α from −1e-3 to about −1.6 (A ∈ [1, 16], Δ ∈ [1e-3, 0.1])
            log_alpha = -torch.exp(math.log(1e-3) + math.log(1.6e3) * torch.rand(B, T, H, generator=gen,
                                                                                   device=self.device)) if gated else None
            do = self.randn(gen, B, T, H, D)
            inputs = (q, k, v, beta, log_alpha)
            return [None if x is None else x.to(dtype).requires_grad_() for x in inputs] + [do.to(dtype)]

        def counts(B: int, T: int, mode: str, reference: str) -> tuple[int, int]:
            if reference == "delta_attention":
                return attention_counts(B, T, H, D, mode, dtype.itemsize)
            return delta_counts(B, T, H, D, mode, dtype.itemsize)

        shape = {"H": H, "D": D, "dtype": str(dtype).removeprefix("torch."), "gate": "head" if gated else "none"}
        self._sequences(op, ("q", "k", "v", "beta", "a"), draw, s.seq_lens, s.tokens, counts, shape)

    def cumulative_softmax(self, op: str) -> None:
        """LEAP's cumulative softmax (op cumulative_softmax: global; windowed_softmax: window
        ``SOFTMAX_WINDOW``) at the suite's H and D: logits as LEAP's focus makes them (a dot of unit-variance
        channels over √D, so N(0, 1)), values N(0, 1)."""
        s, dtype, H, D = self.suite, self.suite.dtype, self.suite.heads, self.suite.head_dim
        window = SOFTMAX_WINDOW if op == "windowed_softmax" else None

        def draw(B: int, T: int, gen: torch.Generator) -> list[Tensor]:
            logits, v = self.randn(gen, B, T, H).to(dtype), self.randn(gen, B, T, H, D).to(dtype)
            return [logits.requires_grad_(), v.requires_grad_(), self.randn(gen, B, T, H, D).to(dtype)]

        def counts(B: int, T: int, mode: str, reference: str) -> tuple[int, int]:
            # per chunk and head the causal [C, C] weights times [v, 1]; logits and v in, o out (and each
            # row's m, z in float32); the backward reads logits, v, o, dO, m, z and writes dlogits, dv
            C, N, size = CHUNK_SIZE, -(-T // CHUNK_SIZE), dtype.itemsize
            pairs = C * (C + 1) // 2 if window is None else C * window  # per chunk: causal pairs or the band
            flops = B * H * N * pairs * 2 * (D + 1) * (1 if mode == "fwd" else 3)
            per_row = size + 8 + 2 * D * size if mode == "fwd" else 2 * size + 8 + 6 * D * size
            return flops, B * H * T * per_row

        shape = {"H": H, "D": D, "dtype": str(dtype).removeprefix("torch."), "window": window}
        self._sequences(op, ("logits", "v"), draw, s.seq_lens, s.tokens, counts, shape)

    def lru_scan(self) -> None:
        """The LRU's complex scan at a 350M layer: N = d_model complex channels, |λ| in [0.9, 0.999]."""
        s, N = self.suite, self.suite.scan_width

        def draw(B: int, T: int, gen: torch.Generator) -> list[Tensor]:
            radius = torch.sqrt(0.9**2 + (0.999**2 - 0.9**2) * torch.rand(N, generator=gen, device=self.device))
            lam = torch.polar(radius, 2 * math.pi * torch.rand(N, generator=gen, device=self.device))
            b = torch.complex(self.randn(gen, B, T, N), self.randn(gen, B, T, N))
            dh = torch.complex(self.randn(gen, B, T, N), self.randn(gen, B, T, N))
            return [lam.requires_grad_(), b.requires_grad_(), dh]

        def counts(B: int, T: int, mode: str, reference: str) -> tuple[None, int]:
            # b in, h out; the backward reads h and dh and writes db (complex64, 8 bytes)
            return None, B * T * N * 8 * (2 if mode == "fwd" else 5)

        self._sequences("lru_scan", ("lam", "b"), draw, s.scan_seq_lens, s.tokens, counts,
                        {"N": N, "dtype": "complex64"})

    def selective_scan(self) -> None:
        """Mamba's scan at a 350M layer (d_inner = 2048, N = 16), float32 as the mixer computes it, at
        ``mamba_tokens`` per batch: the PyTorch form's [B, T, chunk, d_inner, N] decays are 16 GiB each at 8K."""
        s, D, N = self.suite, self.suite.mamba_width, MAMBA_STATE

        def draw(B: int, T: int, gen: torch.Generator) -> list[Tensor]:
            dt = torch.exp(math.log(1e-3) + math.log(100) * torch.rand(D, generator=gen, device=self.device))
            dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus: Δ ≈ dt, as the mixer initialises
            delta = F.softplus(0.5 * self.randn(gen, B, T, D) + dt_bias)
            A = -torch.arange(1, N + 1, device=self.device, dtype=torch.float32).expand(D, N).clone()
            u, Bm, C = self.randn(gen, B, T, D), self.randn(gen, B, T, N), self.randn(gen, B, T, N)
            return [x.requires_grad_() for x in (u, delta, A, Bm, C)] + [self.randn(gen, B, T, D)]

        def counts(B: int, T: int, mode: str, reference: str) -> tuple[None, int]:
            # fused: u, Δ, B, C in, y out; the backward reads them and dy and writes their gradients
            return None, B * T * (3 * D + 2 * N if mode == "fwd" else 8 * D + 6 * N) * 4

        self._sequences("selective_scan", ("u", "delta", "A", "B", "C"), draw, s.scan_seq_lens, s.mamba_tokens,
                        counts, {"D": D, "N": N, "dtype": "float32"})

    def _sequences(self, op: str, names: tuple[str, ...], draw: Callable, seq_lens: tuple[int, ...], tokens: int,
                   counts: Callable, shape: dict[str, Any]) -> None:
        """An op on whole sequences at every T (B = tokens // T): one input set drawn per T and shared by
        every implementation, each reference computed once on first use; forward, then forward+backward.
        ``draw(B, T, gen)`` returns the inputs (``names``) and the upstream gradient last."""
        for T in seq_lens:
            B, seed = tokens // T, self.case_seed(op, T)
            draw_set = partial(draw, B, T, self.generator(seed))
            first = draw_set()
            references: dict[str, dict[str, Tensor | None]] = {}
            for mode in ("fwd", "fwdbwd"):
                for name, impl in self.impls.get(op, {}).items():
                    config = {"op": op, "impl": name, "mode": mode, "B": B, "T": T, **shape, "seed": seed}
                    prepare = partial(self._prepare_sequences, impl, mode, names, first, draw_set, references)
                    self.measure(config, prepare, counts(B, T, mode, impl.reference))
            del first, references
            _free(self.device)

    def _prepare_sequences(self, impl: Impl, mode: str, names: tuple[str, ...], first: list, draw: Callable,
                           references: dict[str, dict[str, Tensor | None]]):
        fn, n = impl.build(), len(names)
        if impl.reference not in references:
            references[impl.reference] = _reference_outputs(impl.reference, first[:n], first[n])
        ref = references[impl.reference]
        if mode == "fwd":
            out, ref = _forward(fn, first[:n]), {"o": ref["o"]}
        else:
            out = _gradients(fn, first[:n], first[n])
        errors = relative_errors(_named(out, names), _named(ref, names))
        del out
        run = _forward if mode == "fwd" else (lambda f, x: _gradients(f, x[:n], x[n]))
        return errors, lambda: [partial(run, fn, x if mode == "fwdbwd" else x[:n])
                                for x in self.sets(draw, first, tensor_bytes(*first))]

    def mixer_layer(self) -> None:
        """Each registered mixer's layer at one width, forward and forward+backward: where a model's time
        goes, measured before deciding which op deserves a kernel next. ``ours`` is the layer as a model
        runs it (``impl="auto"``: our kernels where it has them); ``torch`` the same weights on the PyTorch
        path, for mixers that have kernels. Checked against the layer in higher precision on PyTorch."""
        from lmscale.mixers import MIXERS, available, build_mixer
        from lmscale.presets import preset

        s, dtype = self.suite, self.suite.dtype
        T, B = s.mixer_seq_len, s.mixer_tokens // s.mixer_seq_len
        for name in s.mixer_names or tuple(available()):
            impl_option = MIXERS[name].options.get("impl")
            has_kernels = impl_option is not None and "triton" in impl_option.choices
            # ours: as a model runs it on CUDA; on the CPU (tests) "auto" would mean PyTorch, so insist
            variants = {"ours": {"impl": "triton"} if has_kernels and self.device.type != "cuda" else {}}
            if has_kernels:
                variants["torch"] = {"impl": "torch"}
            seed = self.case_seed("mixer_layer", name)
            # the reference runs on PyTorch; for mixers without kernels that is their only path
            options = {**variants, "reference": {**variants.get("torch", {}), **LAYER_REFERENCE_OPTIONS.get(name, {})}}
            try:
                torch.manual_seed(seed)
                cfgs = {impl: preset(s.mixer_preset, name, mixer_options=opts) for impl, opts in options.items()}
                with torch.device(self.device):
                    layers = {impl: build_mixer(cfg, 0) for impl, cfg in cfgs.items()}
                weights = layers["ours"].state_dict()
                for layer in layers.values():
                    layer.load_state_dict(weights)
                # the reference holds the weights the timed layers hold (rounded to the suite's dtype),
                # upcast: the check measures the computation, not the rounding of the parameters (an
                # LRU's rotation frequencies rounded to bf16 alone move its output by ≈ 20 %)
                reference = layers.pop("reference").to(dtype).to(reference_dtype(dtype))
                d_model = cfgs["ours"].d_model
                draw = partial(self._layer_inputs, self.generator(seed), B, T, d_model)
                first = draw()
                expected = _reference_outputs_of(reference, first[:1], first[1])
            except Exception as e:  # noqa: BLE001 — a mixer that cannot be built or checked here says why
                status = "skipped" if isinstance(e, torch.OutOfMemoryError) else "refused"
                for impl in variants:
                    for mode in ("fwd", "fwdbwd"):
                        self.record({"op": "mixer_layer", "impl": impl, "mode": mode, "mixer": name, "B": B, "T": T,
                                     "dtype": str(dtype).removeprefix("torch."), "seed": seed}, status,
                                    error=_describe(e))
                layers = reference = first = expected = None
                _free(self.device)
                continue
            for mode in ("fwd", "fwdbwd"):
                for impl, layer in layers.items():
                    if impl not in s.layer_impls:
                        continue
                    layer = layer.to(dtype)
                    config = {"op": "mixer_layer", "impl": impl, "mode": mode, "mixer": name, "B": B, "T": T,
                              "d_model": d_model, "preset": s.mixer_preset,
                              "dtype": str(dtype).removeprefix("torch."), "seed": seed}
                    prepare = partial(self._prepare_layer, layer, mode, first, draw, expected)
                    self.measure(config, prepare, profile=True)
            del layers, reference, first, expected
            _free(self.device)

    def _layer_inputs(self, gen: torch.Generator, B: int, T: int, d_model: int) -> list[Tensor]:
        """x [B, T, d_model] (requiring grad) and the upstream gradient, in the suite dtype."""
        dtype = self.suite.dtype
        return [self.randn(gen, B, T, d_model).to(dtype).requires_grad_(), self.randn(gen, B, T, d_model).to(dtype)]

    def _prepare_layer(self, layer: Callable, mode: str, first: list, draw: Callable,
                       expected: dict[str, Tensor | None]):
        if mode == "fwd":
            out, ref = _forward(layer, first[:1]), {"o": expected["o"]}
        else:
            out, ref = _gradients(layer, first[:1], first[1]), expected
        errors = relative_errors(_named(out, ("x",)), _named(ref, ("x",)))
        del out
        run = _forward if mode == "fwd" else (lambda f, x: _gradients(f, x[:1], x[1]))
        return errors, lambda: [partial(run, layer, x if mode == "fwdbwd" else x[:1])
                                for x in self.sets(draw, first, tensor_bytes(*first))]

    def step(self) -> None:
        """One layer's decoding step: recurrent (state [B, H, D, D] float32) vs attention over a KV cache."""
        s, dtype, H, D = self.suite, self.suite.dtype, self.suite.heads, self.suite.head_dim
        dname = str(dtype).removeprefix("torch.")
        for B in s.decode_batches:
            for name, impl in self.impls.get("step", {}).items():
                contexts = s.contexts if impl.reference == "attention_decode" else (None,)
                for L in contexts:
                    seed = self.case_seed("step", B) if L is None else self.case_seed("decode", B, L)
                    for graphed in (False, True):
                        config = {"op": "step", "impl": name, "mode": "step", "B": B, "T": 1, "H": H, "D": D,
                                  "dtype": dname, "graphed": graphed, "context": L, "gate": "channel", "seed": seed,
                                  "steps_per_graph": STEPS_PER_GRAPH if graphed else None}
                        if graphed and self.device.type != "cuda":
                            self.skip(config, "CUDA graphs need a CUDA device")
                            continue
                        if L is None:
                            state_bytes = B * H * D * D * 4
                            counts = (B * H * 4 * D * D, 2 * state_bytes + B * H * 5 * D * dtype.itemsize)
                            self.measure(config, partial(self._prepare_recurrent_step, impl, B, graphed, seed), counts)
                            continue
                        cache_bytes = 2 * B * L * H * D * dtype.itemsize
                        need = (cache_bytes * rotation_sets(cache_bytes, self.device, s.max_sets)
                                + cache_bytes // B * 4 // dtype.itemsize + 2**30)  # + one upcast sequence
                        if need > s.memory_limit:
                            self.skip(config, f"a {L}-token KV cache at batch {B} needs {need / 2**30:.1f} GiB "
                                              f"with its rotation sets and reference > {s.memory_limit / 2**30:.0f} GiB")
                            continue
                        counts = (B * H * 4 * L * D, cache_bytes + B * H * 2 * D * dtype.itemsize)
                        self.measure(config, partial(self._prepare_decode_attention, impl, B, L, graphed, seed),
                                     counts)

    def _prepare_recurrent_step(self, impl: Impl, B: int, graphed: bool, seed: int):
        dtype, H, D = self.suite.dtype, self.suite.heads, self.suite.head_dim
        fn = impl.build()
        gen = self.generator(seed)

        def draw() -> tuple[Tensor, ...]:
            q, k = (self.randn(gen, B, H, D) * D**-0.25 for _ in range(2))
            v, log_g = self.randn(gen, B, H, D), F.logsigmoid(self.randn(gen, B, H, D)) / 16
            return (q.to(dtype), k.to(dtype), v.to(dtype), log_g.to(dtype), self.randn(gen, B, H, D, D))

        first = draw()
        state_before = first[4].clone()  # the kernel may update it in place
        with torch.no_grad():
            o, state = fn(*first)  # checked eagerly: a multi-step graph ends on another input set
        hi = reference_dtype(dtype)
        ref_o, ref_state = REFERENCES[impl.reference](*(x.to(hi) for x in (*first[:4], state_before)))
        errors = relative_errors({"o": o, "state": state}, {"o": ref_o, "state": ref_state})
        return errors, lambda: self._calls(fn, self.sets(draw, first, tensor_bytes(*first)), graphed)

    def _prepare_decode_attention(self, impl: Impl, B: int, L: int, graphed: bool, seed: int):
        dtype, H, D = self.suite.dtype, self.suite.heads, self.suite.head_dim
        fn = impl.build()
        gen = self.generator(seed)

        def draw() -> tuple[Tensor, ...]:
            return (self.randn(gen, B, 1, H, D, dtype=dtype), self.randn(gen, B, L, H, D, dtype=dtype),
                    self.randn(gen, B, L, H, D, dtype=dtype))

        first = draw()
        with torch.no_grad():
            errors = relative_errors({"o": fn(*first)}, {"o": REFERENCES[impl.reference](*first)})
        return errors, lambda: self._calls(fn, self.sets(draw, first, tensor_bytes(*first)), graphed)

    def _calls(self, fn: Callable, sets: list, graphed: bool) -> list[Callable[[], Any]]:
        """One eager call per input set, or each captured in its own CUDA graph (graphs fix addresses)."""
        with torch.no_grad():
            calls = [partial(fn, *x) for x in sets]
            return capture_graphs(calls, self.device, steps=STEPS_PER_GRAPH) if graphed else calls

    def model_step(self) -> None:
        """One decoding step of a whole GLA model at batch 1: ``LanguageModel.step`` eager vs GraphedStep."""
        s, dtype = self.suite, self.suite.dtype
        seed = self.case_seed("model_step")
        configs = [{"op": "model_step", "impl": "ours", "mode": "step", "B": 1, "T": 1, "H": None, "D": None,
                    "dtype": str(dtype).removeprefix("torch."), "graphed": graphed, "preset": s.model_preset,
                    "mixer": "gla", "seed": seed} for graphed in (False, True)]
        if self.out_of_time():
            for config in configs:
                self.skip_out_of_time(config)
            return
        try:
            graphed_step = load("lmscale.decode", "GraphedStep")
            model, check_models = self._models(seed)
        except Unavailable as e:
            for config in configs:
                self.skip(config, str(e))
            return
        except Exception as e:  # noqa: BLE001 — e.g. out of memory: both measurements say so
            for config in configs:
                self.record(config, "refused", error=_describe(e))
            return
        cfg = model.cfg
        for config in configs:
            config.update(n_layers=cfg.n_layers, d_model=cfg.d_model, H=cfg.n_heads, D=cfg.d_model // cfg.n_heads)
        params = model.num_params()
        counts = (2 * params, params * dtype.itemsize)  # every weight read once per token (batch 1)
        with torch.no_grad():
            for config in configs:
                if config["graphed"] and self.device.type != "cuda":
                    self.skip(config, "CUDA graphs need a CUDA device")
                    continue
                prepare = partial(self._prepare_model_step, model, check_models, graphed_step, config["graphed"], seed)
                self.measure(config, prepare, counts)
        del model, check_models
        _free(self.device)

    def _models(self, seed: int):
        """The preset's GLA model in the suite dtype, timed (its mixers pick our kernels, ``impl="auto"``),
        and for the check two float32 copies of its weights: one on our kernels, one on the PyTorch path
        (``impl="torch"``). The check runs in float32 because it is of the kernels and the graph, not of
        bf16: through 24 layers of a random 1.3B model, bf16 rounding alone moves the logits by 9–25 %
        (H100, 2026-11-27: bf16 ours vs bf16 PyTorch 8.6 %, vs a float32 reference 25 %), so no bf16
        tolerance could tell a wrong kernel from rounding; in float32 the two paths agree to ≈1e-5."""
        from lmscale.model import LanguageModel
        from lmscale.presets import preset

        torch.manual_seed(seed)
        with torch.device(self.device):
            model = LanguageModel(preset(self.suite.model_preset, "gla")).to(self.suite.dtype).eval()
            ours32 = LanguageModel(preset(self.suite.model_preset, "gla")).eval()
            reference = LanguageModel(preset(self.suite.model_preset, "gla", mixer_options={"impl": "torch"})).eval()
        ours32.load_state_dict(model.state_dict())
        reference.load_state_dict(model.state_dict())
        return model, (ours32, reference)

    def _prepare_model_step(self, model, check_models, graphed_step, graphed: bool, seed: int, steps: int = 4):
        gen = self.generator(seed)
        tokens = torch.randint(model.cfg.vocab_size, (steps, 1), generator=gen, device=self.device)
        ours32, reference = check_models

        def make_call(net, dtype, graph: bool):
            if graph:
                return graphed_step(net, 1, self.device, dtype, graph=True)
            state = [net.init_state(1, self.device, dtype)]

            def call(idx: Tensor) -> Tensor:
                logits, state[0] = net.step(idx, state[0])
                return logits

            return call

        check = make_call(ours32, torch.float32, graphed)  # the reference runs eagerly in either mode
        ref_call = make_call(reference, torch.float32, False)
        out = torch.stack([check(token).clone() for token in tokens])
        ref = torch.stack([ref_call(token).clone() for token in tokens])
        errors = relative_errors({"logits": out}, {"logits": ref})
        del check
        call = make_call(model, self.suite.dtype, graphed)
        return errors, lambda: [partial(call, tokens[0])]


def run_suite(
    device: str | torch.device | None = None,
    quick: bool = False,
    ops: Iterable[str] | None = None,
    out: Path | str | None = None,
    check_only: bool = False,
    seed: int = 0,
    impls: dict[str, dict[str, Impl]] | None = None,
    dtype: torch.dtype | None = None,
    model_preset: str | None = None,
    mixers: Iterable[str] | None = None,
    time_limit_s: float | None = None,
    log: Callable[[str], None] | None = None,
    impl_names: Iterable[str] | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Run the suite's ``ops`` (all of ``KERNEL_OPS`` by default) and write every record to one file
    ``<out>/<date>-<device>[-quick][-check].jsonl`` (``out`` defaults to ``data/results/kernels``).
    Past ``time_limit_s`` seconds every measurement not yet started is recorded as skipped, so a run
    that must fit a time slot still ends with its table. ``mixers``: op mixer_layer's mixers (default: the
    suite's). ``impl_names`` times only those implementations (e.g. ours, fla, sdpa: without the PyTorch
    forms, which take 30–460 ms a call at the full sizes, the whole suite fits one device command); the
    correctness references are computed either way. Returns the records and the file."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device; use --device cpu (with --quick)")
    ops = list(KERNEL_OPS if ops is None else ops)
    unknown = [op for op in ops if op not in KERNEL_OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; the suite has {', '.join(KERNEL_OPS)}")
    if device.type == "cpu" and not quick:
        raise ValueError("the full kernel suite on the CPU would take hours (the kernels run in Triton's "
                         "interpreter); add --quick, or run it on a GPU")
    suite = make_suite(quick, device, dtype)
    if model_preset:
        suite = replace(suite, model_preset=model_preset)
    if mixers:
        from lmscale.mixers import available

        unknown = sorted(set(mixers) - set(available()))
        if unknown:
            raise ValueError(f"unknown mixer(s) {unknown}; registered: {', '.join(available())}")
        suite = replace(suite, mixer_names=tuple(mixers))
    stamp = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}"
    name = f"{stamp}-{device.type}{'-quick' if quick else ''}{'-check' if check_only else ''}.jsonl"
    path = Path(out or results_dir() / EXPERIMENT) / name
    impls = default_impls() if impls is None else impls
    if impl_names is not None:
        impl_names = set(impl_names)
        known = {name for table in impls.values() for name in table} | {"ours", "torch"}
        if impl_names - known:
            raise ValueError(f"unknown implementation(s) {sorted(impl_names - known)}; the suite has "
                             f"{', '.join(sorted(known))}")
        impls = {op: {name: impl for name, impl in table.items() if name in impl_names} for op, table in impls.items()}
        suite = replace(suite, layer_impls=tuple(sorted(impl_names & {"ours", "torch"})))
    run = _Run(suite, device, seed, check_only, impls,
               log or (lambda line: print(line, file=sys.stderr, flush=True)), stamp, path, time_limit_s)
    run.log(f"lmscale bench kernels: {', '.join(ops)} on {_device_name(device)}, {suite.dtype}, "
            f"{'quick' if quick else 'full'}{', check only' if check_only else ''} -> {path}")
    for op in dict.fromkeys(ops):  # in the order asked: a run that meets its time limit skips the last
        try:
            {"ceiling": run.ceiling, "lru_scan": run.lru_scan, "selective_scan": run.selective_scan,
             "step": run.step, "model_step": run.model_step,
             "mixer_layer": run.mixer_layer, "delta_rule": partial(run.delta, op),
             "gated_delta_rule": partial(run.delta, op),
             "cumulative_softmax": partial(run.cumulative_softmax, op),
             "windowed_softmax": partial(run.cumulative_softmax, op)}.get(op, partial(run.chunked, op))()
        except Exception as e:  # noqa: BLE001 — outside any measurement (drawing inputs): go on to the next op
            run.log(f"!!! op {op} aborted: {_describe(e)}")
            _free(device)
    write_records(run.records, path)  # also when nothing was recorded: the file says the run happened
    return run.records, path


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def format_table(records: list[dict[str, Any]]) -> str:
    """One line per op, mode and shape; per implementation the median ms (or its status): the device
    returns only the end of the output, so the table is the last thing printed and stays compact."""
    rows: dict[tuple, list[str]] = {}
    for r in records:
        c, m = r["config"], r["metrics"]
        op = c["op"] if c.get("mixer") is None else f"{c['op']}:{c['mixer']}"
        key = (op, c["mode"], c.get("B"), f"T={c.get('T')}" if c.get("context") is None else f"L={c['context']}")
        name = c["impl"] + ("/g" if c.get("graphed") else "")
        if r["status"] == "ok" and "ms_median" in m:
            cell = f"{name} {m['ms_median']:.4g}"
        elif r["status"] == "ok":
            cell = f"{name} ok({m['max_rel_err']:.1e})"
        elif r["status"] == "wrong":
            cell = f"{name} WRONG({m.get('max_rel_err') or float('nan'):.1e})"
        else:
            cell = f"{name} {r['status']}"
        rows.setdefault(key, []).append(cell)
    lines = ["op mode B T (L: KV-cache length): impl median ms (/g: in a CUDA graph)"]
    for (op, mode, B, length), cells in rows.items():
        lines.append(f"{op} {mode} B={B} {length}: " + "  ".join(cells))
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "wrong", "refused", "skipped")}
    lines.append("records: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
