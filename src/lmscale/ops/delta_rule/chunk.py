"""Chunkwise form (Yang et al. 2024, §3): the WY / UT transform inside chunks, state passing across them.

Inside a chunk that starts from state S, write γ_i = α_1⋯α_i (decay from the chunk start) and
Γ_ij = γ_i / γ_j for j ≤ i. Unrolling the recurrence, every position writes k_i u_iᵀ, where the
pseudo-values u_i = β_i (v_i − α_i S_{i−1}ᵀ k_i) satisfy a unit lower-triangular system

    (I + A) U' = diag(β) V − diag(β γ) K S,     A = tril(diag(β) (K Kᵀ ⊙ Γ), −1),

so with T = (I + A)⁻¹, W = T diag(β γ) K and U = T diag(β) V, the pseudo-values are U' = U − W S, and

    O = diag(γ) Q S + (tril(Q Kᵀ ⊙ Γ)) U',        S_next = γ_C S + (diag(Γ_{C,·}) K)ᵀ U'.

Written as numbered steps in the style of Mamba-2's ``ssd_minimal.py``; every decay is exp of a
cumulative-log difference ≤ 0, so strong gates underflow to 0 instead of overflowing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscale.ops.gated_recurrence.naive import compute_dtype


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise delta rule. q, k: [B, H, T, D_k]; v: [B, H, T, D_v]; beta, log_alpha: [B, H, T]; any T ≥ 1.

    Work per chunk is matmuls of C × C and C × D plus one C × C triangular solve; the loop across chunks
    carries only the [D_k, D_v] state, so chunk_size trades parallel work against loop length.
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    out_dtype, acc = q.dtype, compute_dtype(q.dtype)
    q, k, v, beta = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    log_alpha = torch.zeros_like(beta) if log_alpha is None else log_alpha.to(acc)

    # 0. pad T to a multiple of C with k = v = β = 0 and log α = 0: padded steps leave the state unchanged
    pad = -T % C
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, log_alpha = (F.pad(x, (0, pad)) for x in (beta, log_alpha))
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, -1) for x in (q, k, v))  # (B, H, N, C, D)
    beta, log_alpha = beta.reshape(B, H, N, C), log_alpha.reshape(B, H, N, C)

    # 1. decays inside each chunk, in log space: b_i = log γ_i, Γ_ij = exp(b_i − b_j) for j ≤ i, else 0
    b = log_alpha.cumsum(dim=-1)  # (B, H, N, C), ≤ 0
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    log_decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf"))  # mask before exp
    decay = log_decay.exp()  # Γ  (B, H, N, C, C)

    # 2. UT transform: T = (I + A)⁻¹ by forward substitution (a unit lower-triangular solve), then W, U
    A = (beta.unsqueeze(-1) * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # (B, H, N, C, C)
    eye = torch.eye(C, dtype=acc, device=q.device)
    T_inv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    W = T_inv @ ((beta * b.exp()).unsqueeze(-1) * k)  # (B, H, N, C, D_k)
    U = T_inv @ (beta.unsqueeze(-1) * v)  # (B, H, N, C, D_v)

    # 3. state passing: pseudo-values U' = U − W S of each chunk, then S ← γ_C S + (Γ_{C,·} K)ᵀ U'
    k_to_end = k * (b[..., -1:] - b).exp().unsqueeze(-1)  # k_i decayed from i to the chunk end
    chunk_decay = b[..., -1].exp()[..., None, None]  # γ_C  (B, H, N, 1, 1)
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    entering, pseudo_values = [], []
    for n in range(N):
        u = U[:, :, n] - W[:, :, n] @ state  # (B, H, C, D_v)
        entering.append(state)
        pseudo_values.append(u)
        state = chunk_decay[:, :, n] * state + k_to_end[:, :, n].transpose(-1, -2) @ u
    states = torch.stack(entering, dim=2)  # state entering each chunk  (B, H, N, D_k, D_v)
    u = torch.stack(pseudo_values, dim=2)  # (B, H, N, C, D_v)

    # 4. outputs: the entering state read at decay γ_i, plus causal decayed attention over pseudo-values
    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, N, C, C), zero above the diagonal
    o = (q * b.exp().unsqueeze(-1)) @ states + scores @ u  # (B, H, N, C, D_v)

    o = scale * o.reshape(B, H, N * C, V)[:, :, :T]
    return o.to(out_dtype), state if output_final_state else None
