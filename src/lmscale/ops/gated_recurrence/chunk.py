"""Chunkwise form: parallel inside chunks, recurrent across them — linear in T, matmul-shaped.

Written as numbered steps in the style of Mamba-2's ``ssd_minimal.py``; it is the reference the
GPU kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscale.ops.gated_recurrence.naive import compute_dtype


def chunk_gated_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor | None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise gated recurrence. q, k, log_g: [B, H, T, D_k]; v: [B, H, T, D_v]; any T ≥ 1.

    Every decay is exp of a difference b_i − b_j ≤ 0 of cumulative log gates measured from the chunk
    start, so strong gates underflow to 0 instead of overflowing. Memory: the intra-chunk decays are
    [B, H, T, chunk_size, D_k], so chunk_size trades memory against the length of the sequential loop.
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    out_dtype, acc = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    log_g = torch.zeros_like(k) if log_g is None else log_g.to(acc)

    # 0. pad T to a multiple of C with k = v = 0 and log g = 0: padded steps leave the state unchanged
    pad = -T % C
    q, k, v, log_g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, log_g))
    N = (T + pad) // C
    q, k, v, log_g = (x.reshape(B, H, N, C, -1) for x in (q, k, v, log_g))  # (B, H, N, C, D)
    b = log_g.cumsum(dim=3)  # log decay from the chunk start to each position, ≤ 0  (B, H, N, C, D_k)

    # 1. intra-chunk outputs (diagonal blocks): the parallel form inside each chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    log_decay = b.unsqueeze(4) - b.unsqueeze(3)  # (B, H, N, C, C, D_k), [i, j]
    log_decay = log_decay.masked_fill(~causal.unsqueeze(-1), float("-inf"))  # mask before exp
    scores = torch.einsum("bhnik,bhnijk,bhnjk->bhnij", q, log_decay.exp(), k)  # (B, H, N, C, C)
    o_intra = scores @ v  # (B, H, N, C, D_v)

    # 2. chunk states: what each chunk alone writes into the state by its last position
    b_last = b[:, :, :, -1:]  # (B, H, N, 1, D_k)
    k_to_end = k * (b_last - b).exp()
    chunk_states = k_to_end.transpose(-1, -2) @ v  # (B, H, N, D_k, D_v)

    # 3. state passing across chunks: S_{n+1} = diag(exp(b_last_n)) S_n + chunk_states_n
    chunk_decay = b_last.squeeze(3).exp().unsqueeze(-1)  # (B, H, N, D_k, 1)
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    entering = []
    for n in range(N):
        entering.append(state)
        state = chunk_decay[:, :, n] * state + chunk_states[:, :, n]
    states = torch.stack(entering, dim=2)  # state entering each chunk  (B, H, N, D_k, D_v)

    # 4. state -> output: position i reads the entering state, decayed from the chunk start to i
    o_inter = (q * b.exp()) @ states  # (B, H, N, C, D_v)

    o = scale * (o_intra + o_inter).reshape(B, H, N * C, V)[:, :, :T]
    return o.to(out_dtype), state if output_final_state else None
