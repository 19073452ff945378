"""Quadratic masked form: the recurrence unrolled into attention with a decay-weighted causal mask."""

from __future__ import annotations

import torch
from torch import Tensor

from lmscale.ops.gated_recurrence.naive import channel_log_gate, compute_dtype


def parallel_gated_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor | None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Unrolled recurrence: for checking the chunk form and for short sequences.

    With b_t = Σ_{s≤t} log g_s, the decay from step s to step t is exp(b_t − b_s), so
        o_t = scale · [ Σ_{s≤t} (q_t ⊙ exp(b_t − b_s))ᵀ k_s · v_s  +  (q_t ⊙ exp(b_t))ᵀ S_0 ].
    q, k: [B, H, T, D_k]; v: [B, H, T, D_v]; states: [B, H, D_k, D_v]; log_g: [B, H, T, D_k]
    (memory O(T² D_k)) or [B, H, T] (per-head scalar: a [T, T] decay matrix, memory O(T²)) or None.
    b runs from the sequence start, so b_t − b_s cancels large numbers: with strong gates over thousands
    of tokens float32 loses digits here (ulp(|b|) ≈ 6e-8·|b|), where the chunk form restarts b per chunk.
    """
    T = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype, acc = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)

    # 1. cumulative log gates: b_t = Σ_{s≤t} log g_s ≤ 0
    b = channel_log_gate(log_g, q).cumsum(dim=2)  # (B, H, T, G), G = D_k or 1 (per head)

    # 2. pairwise log decays b_t − b_s, masked *before* exp (above the diagonal they are > 0 and may
    #    overflow), weighting the scores q_t·k_s
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if b.shape[-1] == 1:  # one decay per head: scores are q·k times a [T, T] decay matrix
        log_decay = (b - b.transpose(-1, -2)).masked_fill(~causal, float("-inf"))  # (B, H, T, T), [t, s]
        scores = (q @ k.transpose(-1, -2)) * log_decay.exp()
    else:
        log_decay = b.unsqueeze(3) - b.unsqueeze(2)  # (B, H, T, T, D_k), [t, s]
        log_decay = log_decay.masked_fill(~causal.unsqueeze(-1), float("-inf"))
        scores = torch.einsum("bhtk,bhtsk,bhsk->bhts", q, log_decay.exp(), k)  # (B, H, T, T)

    # 3. values
    o = scores @ v  # (B, H, T, D_v)

    # 4. the initial state, decayed from the start to each step
    if initial_state is not None:
        initial_state = initial_state.to(acc)
        o = o + (q * b.exp()) @ initial_state

    final_state = None
    if output_final_state:
        k_to_end = k * (b[:, :, -1:] - b).exp()  # k_s decayed from s to T
        final_state = k_to_end.transpose(-1, -2) @ v  # (B, H, D_k, D_v)
        if initial_state is not None:
            final_state = final_state + b[:, :, -1].exp().unsqueeze(-1) * initial_state
    return (scale * o).to(out_dtype), final_state
