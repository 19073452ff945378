"""The implementations ``lmscale bench kernels`` compares, and the references each must match.

``default_impls()`` is the table: op -> implementation name (ours | fla | torch | sdpa) -> ``Impl``.
Peers are imported only when built, so a missing one (fla not installed) is recorded as skipped.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_SIZE = 64  # of our chunk kernel and fla's, for the analytic counts
LRU_CHUNK_SIZE = 32  # the LRU mixer's default chunk for the PyTorch form
MAMBA_CHUNK_SIZE, MAMBA_STATE = 16, 16  # the Mamba mixer's defaults: PyTorch chunk, N
SOFTMAX_WINDOW = 64  # op windowed_softmax: LEAP's window at layer 4 (k = 4 · 2^l)


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs (as the GPU runs it), float64 for float32, complex128 for complex64."""
    return {torch.float32: torch.float64, torch.complex64: torch.complex128}.get(dtype, torch.float32)


class Unavailable(Exception):
    """An implementation that is not installed, not written yet or cannot run here: recorded as skipped."""


def load(module: str, name: str) -> Any:
    """``module.name``, or Unavailable naming what is missing (fla not installed, a kernel not written)."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise Unavailable(f"{module}.{name} is not importable ({e})") from e
    except AttributeError as e:
        raise Unavailable(f"{module} has no {name}") from e


@dataclass(frozen=True)
class Impl:
    """One implementation of an op. ``build()`` resolves its imports (raising Unavailable) and returns
    the function; ``reference`` names the function it must match (a key of ``REFERENCES``)."""

    build: Callable[[], Callable[..., Any]]
    reference: str


def _bhtd(x: Tensor | None) -> Tensor | None:
    """[B, T, H, D] memory seen as [B, H, T, D] (a strided view, no copy); per-head gates [B, T, H] too."""
    return None if x is None else x.transpose(1, 2)


# --- the chunked ops: every function takes and returns the [B, T, H, D] layout a model's projections give


def _ours_chunk() -> Callable[..., Tensor]:
    kernel = load("lmscale.ops.triton.chunk", "chunk_gated_recurrence")

    def run(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None) -> Tensor:
        o, _ = kernel(_bhtd(q), _bhtd(k), _bhtd(v), _bhtd(log_g), chunk_size=CHUNK_SIZE)
        return o.transpose(1, 2)

    return run


def _torch_chunk(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None) -> Tensor:
    from lmscale.ops.gated_recurrence import chunk_gated_recurrence

    o, _ = chunk_gated_recurrence(_bhtd(q), _bhtd(k), _bhtd(v), _bhtd(log_g), chunk_size=CHUNK_SIZE)
    return o.transpose(1, 2)


def _fla_chunk_gla() -> Callable[..., Tensor]:
    chunk_gla = load("fla.ops.gla", "chunk_gla")
    return lambda q, k, v, log_g: chunk_gla(q, k, v, log_g)[0]


def _fla_chunk_simple_gla() -> Callable[..., Tensor]:
    chunk_simple_gla = load("fla.ops.simple_gla", "chunk_simple_gla")
    return lambda q, k, v, log_g: chunk_simple_gla(q, k, v, g=log_g)[0]


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None) -> Tensor:
    """Softmax attention (FlashAttention) on the same q, k, v; it has no gate. The peer to beat."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(_bhtd(q), _bhtd(k), _bhtd(v), is_causal=True)
    return o.transpose(1, 2)


def _reference_attention(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None) -> Tensor:
    """Causal attention in float32/64: the memory-efficient kernel on CUDA (the math one would hold a
    T × T matrix, 64 GiB at T = 32K), the math one on the CPU (float64)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        o = F.scaled_dot_product_attention(_bhtd(q), _bhtd(k), _bhtd(v), is_causal=True)
    return o.transpose(1, 2)


# --- the delta rule: (q, k, v, beta, log_alpha or None) in [B, T, H, …] -> o [B, T, H, D]


def _ours_delta() -> Callable[..., Tensor]:
    kernel = load("lmscale.ops.triton.delta_rule", "chunk_delta_rule")

    def run(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor | None) -> Tensor:
        o, _ = kernel(_bhtd(q), _bhtd(k), _bhtd(v), _bhtd(beta), _bhtd(log_alpha))
        return o.transpose(1, 2)

    return run


def _torch_delta(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor | None) -> Tensor:
    from lmscale.ops.delta_rule import chunk_delta_rule

    o, _ = chunk_delta_rule(_bhtd(q), _bhtd(k), _bhtd(v), _bhtd(beta), _bhtd(log_alpha), chunk_size=CHUNK_SIZE)
    return o.transpose(1, 2)


def _fla_delta() -> Callable[..., Tensor]:
    """fla's chunk_delta_rule (DeltaNet) or chunk_gated_delta_rule (Gated DeltaNet), natural-log gates."""
    chunk_delta_rule = load("fla.ops.delta_rule", "chunk_delta_rule")
    chunk_gated_delta_rule = load("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")

    def run(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor | None) -> Tensor:
        if log_alpha is None:
            return chunk_delta_rule(q, k, v, beta)[0]
        return chunk_gated_delta_rule(q, k, v, log_alpha, beta)[0]

    return run


def _delta_attention(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor | None) -> Tensor:
    return _causal_attention(q, k, v, None)


def _reference_delta_attention(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor | None) -> Tensor:
    return _reference_attention(q, k, v, None)


# --- LEAP's global cumulative softmax: (logits [B, T, H], v [B, T, H, D]) -> o [B, T, H, D]


def _ours_cumulative_softmax() -> Callable[..., Tensor]:
    kernel = load("lmscale.ops.triton.cumulative_softmax", "cumulative_softmax")
    return lambda logits, v: kernel(_bhtd(logits), _bhtd(v))[0].transpose(1, 2)


def _torch_cumulative_softmax(logits: Tensor, v: Tensor) -> Tensor:
    from lmscale.ops.cumulative_softmax import chunk_cumulative_softmax

    return chunk_cumulative_softmax(_bhtd(logits), _bhtd(v), chunk_size=CHUNK_SIZE)[0].transpose(1, 2)


def _ours_windowed_softmax() -> Callable[..., Tensor]:
    kernel = load("lmscale.ops.triton.cumulative_softmax_window", "windowed_cumulative_softmax")
    return lambda logits, v: kernel(_bhtd(logits), _bhtd(v), SOFTMAX_WINDOW).transpose(1, 2)


def _torch_windowed_softmax(logits: Tensor, v: Tensor) -> Tensor:
    from lmscale.ops.cumulative_softmax import chunk_cumulative_softmax

    o, _ = chunk_cumulative_softmax(_bhtd(logits), _bhtd(v), window=SOFTMAX_WINDOW, chunk_size=CHUNK_SIZE)
    return o.transpose(1, 2)


# --- decoding: recurrent steps take (q_t, k_t, v_t, log_g_t [B, H, D], state [B, H, D, D]) -> (o_t, state)


def _ours_step() -> Callable[..., tuple[Tensor, Tensor]]:
    return load("lmscale.ops.triton.step", "gated_recurrence_step")


def _torch_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, log_g_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    from lmscale.ops.gated_recurrence import gated_recurrence_step

    return gated_recurrence_step(q_t, k_t, v_t, log_g_t, state)


def _fla_step() -> Callable[..., tuple[Tensor, Tensor]]:
    fused_recurrent_gla = load("fla.ops.gla", "fused_recurrent_gla")

    def run(q_t: Tensor, k_t: Tensor, v_t: Tensor, log_g_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        o, new_state = fused_recurrent_gla(q_t.unsqueeze(1), k_t.unsqueeze(1), v_t.unsqueeze(1),
                                           gk=log_g_t.unsqueeze(1), initial_state=state, output_final_state=True)
        return o.squeeze(1), new_state

    return run


def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """One query per sequence over its whole cache (FlashAttention): q [B, 1, H, D], caches [B, L, H, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(_bhtd(q), _bhtd(k_cache), _bhtd(v_cache))
    return o.transpose(1, 2)


def _reference_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """The same in float32 (float64 for float32 inputs), one sequence at a time: upcast caches of 64
    sequences would not fit beside the originals."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hi = reference_dtype(q.dtype)
    outputs = []
    with sdpa_kernel(SDPBackend.MATH):
        for b in range(q.shape[0]):
            one = (x[b : b + 1].to(hi) for x in (q, k_cache, v_cache))
            outputs.append(F.scaled_dot_product_attention(*(_bhtd(x) for x in one)))
    return torch.cat(outputs).transpose(1, 2)


# --- the LRU scan: (λ [N] complex, b [B, T, N] complex) -> h [B, T, N]


def _ours_lru_scan() -> Callable[..., Tensor]:
    scan = load("lmscale.ops.triton.scan_complex", "complex_diagonal_scan")
    return lambda lam, b: scan(lam, b)[0]


def _torch_lru_scan(lam: Tensor, b: Tensor) -> Tensor:
    from lmscale.ops.diagonal_scan import chunk_diagonal_scan

    return chunk_diagonal_scan(lam, b, chunk_size=LRU_CHUNK_SIZE)[0]


def _reference_lru_scan(lam: Tensor, b: Tensor) -> Tensor:
    """The Hillis–Steele form: the chunk form's pairwise [T, C, N] decays do not fit at 32K tokens in complex128."""
    from lmscale.ops.diagonal_scan import parallel_diagonal_scan

    return parallel_diagonal_scan(lam, b)[0]


def _ours_selective_scan() -> Callable[..., Tensor]:
    scan = load("lmscale.ops.triton.selective_scan", "selective_scan")
    return lambda u, delta, A, B, C: scan(u, delta, A, B, C)[0]


def _mamba_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, scan: Callable) -> Tensor:
    """The Mamba mixer's PyTorch path: Ā = exp(ΔA), B̄u = Δ u Bᵀ as [B, T, D, N] tensors, the diagonal scan,
    y = h C. u, delta [B, T, D]; A [D, N]; B, C [B, T, N] -> y [B, T, D]."""
    a = torch.exp(delta.unsqueeze(-1) * A)
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(-2)
    h, _ = scan(a, b)
    return (h * C.unsqueeze(-2)).sum(-1)


def _torch_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    from lmscale.ops.diagonal_scan import chunk_diagonal_scan

    return _mamba_scan(u, delta, A, B, C, partial(chunk_diagonal_scan, chunk_size=MAMBA_CHUNK_SIZE))


def _reference_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Token by token: the chunk form's pairwise decays would need 16× h's memory, in float64."""
    from lmscale.ops.diagonal_scan import naive_diagonal_scan

    return _mamba_scan(u, delta, A, B, C, naive_diagonal_scan)


# what each implementation is checked against, called on its inputs upcast (see ``_reference_dtype``)
REFERENCES: dict[str, Callable[..., Any]] = {
    "recurrence": _torch_chunk,
    "attention": _reference_attention,
    "delta_rule": _torch_delta,
    "delta_attention": _reference_delta_attention,
    "cumulative_softmax": _torch_cumulative_softmax,
    "windowed_softmax": _torch_windowed_softmax,
    "recurrence_step": _torch_step,
    "attention_decode": _reference_decode_attention,
    "lru_scan": _reference_lru_scan,
    "selective_scan": _reference_selective_scan,
}


def default_impls() -> dict[str, dict[str, Impl]]:
    """Op -> implementation name -> Impl. ``run_suite(impls=...)`` takes a different table (the tests
    inject a deliberately wrong kernel to see it refused)."""
    attention = Impl(lambda: _causal_attention, "attention")
    torch_chunk = Impl(lambda: _torch_chunk, "recurrence")
    ours_chunk = Impl(_ours_chunk, "recurrence")
    delta = {"ours": Impl(_ours_delta, "delta_rule"), "fla": Impl(_fla_delta, "delta_rule"),
             "torch": Impl(lambda: _torch_delta, "delta_rule"), "sdpa": Impl(lambda: _delta_attention, "delta_attention")}
    return {
        "gla": {"ours": ours_chunk, "fla": Impl(_fla_chunk_gla, "recurrence"), "torch": torch_chunk,
                "sdpa": attention},
        "simple_gla": {"ours": ours_chunk, "fla": Impl(_fla_chunk_simple_gla, "recurrence"),
                       "torch": torch_chunk, "sdpa": attention},
        "linear_attention": {"ours": ours_chunk, "torch": torch_chunk, "sdpa": attention},
        "delta_rule": delta, "gated_delta_rule": delta,
        "cumulative_softmax": {"ours": Impl(_ours_cumulative_softmax, "cumulative_softmax"),
                               "torch": Impl(lambda: _torch_cumulative_softmax, "cumulative_softmax")},
        "windowed_softmax": {"ours": Impl(_ours_windowed_softmax, "windowed_softmax"),
                             "torch": Impl(lambda: _torch_windowed_softmax, "windowed_softmax")},
        "lru_scan": {"ours": Impl(_ours_lru_scan, "lru_scan"), "torch": Impl(lambda: _torch_lru_scan, "lru_scan")},
        "selective_scan": {"ours": Impl(_ours_selective_scan, "selective_scan"),
                           "torch": Impl(lambda: _torch_selective_scan, "selective_scan")},
        "step": {"ours": Impl(_ours_step, "recurrence_step"), "fla": Impl(_fla_step, "recurrence_step"),
                 "torch": Impl(lambda: _torch_step, "recurrence_step"),
                 "sdpa": Impl(lambda: _decode_attention, "attention_decode")},
    }
