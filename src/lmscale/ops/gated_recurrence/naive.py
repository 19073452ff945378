"""Token-by-token form: the definition itself, against which every faster form is tested."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in at least float32: decays compound over thousands of steps."""
    return torch.promote_types(dtype, torch.float32)


def channel_log_gate(log_g: Tensor | None, q: Tensor) -> Tensor:
    """log_g as [B, H, T, G] in the compute dtype: G = D_k per-channel, G = 1 per-head (also for None).

    A trailing singleton lets every form broadcast one decay over the key channels; the forms read
    G = 1 as "scalar gate" and take the cheaper [T, T] decay-matrix path.
    """
    acc = compute_dtype(q.dtype)
    if log_g is None:
        return q.new_zeros(q.shape[:-1], dtype=acc).unsqueeze(-1)
    log_g = log_g.to(acc)
    return log_g.unsqueeze(-1) if log_g.ndim == q.ndim - 1 else log_g


def gated_recurrence_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    log_g_t: Tensor | None,
    state: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One token: decay the state, write k_t v_tᵀ, read with q_t.

    q_t, k_t: [B, H, D_k]; v_t: [B, H, D_v]; state: [B, H, D_k, D_v]; log_g_t: [B, H, D_k] (one decay
    per key channel) or [B, H] (one per head), or None (no decay).
    Returns o_t [B, H, D_v] in q_t's dtype and the new state (never updated in place).
    """
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    out_dtype, acc = q_t.dtype, compute_dtype(q_t.dtype)
    q_t, k_t, v_t, state = q_t.to(acc), k_t.to(acc), v_t.to(acc), state.to(acc)
    if log_g_t is not None:
        g_t = log_g_t.to(acc).exp()
        g_t = g_t[..., None, None] if g_t.ndim == q_t.ndim - 1 else g_t.unsqueeze(-1)
        state = state * g_t  # diag(g_t) S_{t-1}
    state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # + k_t v_tᵀ   (B, H, D_k, D_v)
    o_t = scale * torch.einsum("bhk,bhkv->bhv", q_t, state)
    return o_t.to(out_dtype), state


def naive_gated_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor | None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Loop ``gated_recurrence_step`` over T. q, k: [B, H, T, D_k]; v: [B, H, T, D_v];
    log_g: [B, H, T, D_k] or [B, H, T] (per-head scalar) or None."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    acc = compute_dtype(q.dtype)
    state = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):
        log_g_t = None if log_g is None else log_g[:, :, t]
        o_t, state = gated_recurrence_step(q[:, :, t], k[:, :, t], v[:, :, t], log_g_t, state, scale)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=2).to(q.dtype)  # (B, H, T, D_v)
    return o, state if output_final_state else None
