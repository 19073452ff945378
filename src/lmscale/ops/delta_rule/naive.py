"""Token-by-token form: the definition itself, against which the chunk form is tested."""

from __future__ import annotations

import torch
from torch import Tensor

from lmscale.ops.gated_recurrence.naive import compute_dtype


def delta_rule_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    beta_t: Tensor,
    log_alpha_t: Tensor | None,
    state: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One token: decay the state, correct what it recalls for k_t towards v_t, read with q_t.

    q_t, k_t: [B, H, D_k]; v_t: [B, H, D_v]; beta_t, log_alpha_t: [B, H]; state: [B, H, D_k, D_v].
    Returns o_t [B, H, D_v] in q_t's dtype and the new state (never updated in place).
    """
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    out_dtype, acc = q_t.dtype, compute_dtype(q_t.dtype)
    q_t, k_t, v_t, beta_t, state = (x.to(acc) for x in (q_t, k_t, v_t, beta_t, state))
    if log_alpha_t is not None:
        state = state * log_alpha_t.to(acc).exp()[..., None, None]  # α_t S_{t−1}
    recalled = torch.einsum("bhk,bhkv->bhv", k_t, state)  # what the state holds for k_t  (B, H, D_v)
    correction = beta_t.unsqueeze(-1) * (v_t - recalled)  # (B, H, D_v)
    state = state + k_t.unsqueeze(-1) * correction.unsqueeze(-2)  # + β k (v − Sᵀk)ᵀ  (B, H, D_k, D_v)
    o_t = scale * torch.einsum("bhk,bhkv->bhv", q_t, state)
    return o_t.to(out_dtype), state


def naive_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Loop ``delta_rule_step`` over T.

    q, k: [B, H, T, D_k]; v: [B, H, T, D_v]; beta, log_alpha: [B, H, T]; initial_state: [B, H, D_k, D_v].
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    acc = compute_dtype(q.dtype)
    state = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):
        log_alpha_t = None if log_alpha is None else log_alpha[:, :, t]
        q_t, k_t, v_t, beta_t = q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t]
        o_t, state = delta_rule_step(q_t, k_t, v_t, beta_t, log_alpha_t, state, scale)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=2)  # (B, H, T, D_v)
    return o, state if output_final_state else None
