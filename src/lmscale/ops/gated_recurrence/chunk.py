"""Chunkwise form: parallel inside chunks, recurrent across them — linear in T, matmul-shaped.

Written as numbered steps in the style of Mamba-2's ``ssd_minimal.py``; it is the reference the
GPU kernels are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscale.ops.gated_recurrence.naive import channel_log_gate, compute_dtype


def chunk_gated_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor | None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    sub_chunk_size: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise gated recurrence. q, k: [B, H, T, D_k]; v: [B, H, T, D_v]; any T ≥ 1.

    log_g: [B, H, T, D_k] (per key channel, GLA), [B, H, T] (per head, RetNet / Mamba-2) or None;
    finite and ≤ 0. Every decay is exp of a difference b_t − b_s ≤ 0 of cumulative log gates measured
    from the chunk start, so strong gates underflow to 0 instead of overflowing, in any input dtype.
    Per-channel gates split each chunk into sub-chunks of c = gcd(chunk_size, sub_chunk_size) positions
    (see ``_intra_chunk_per_channel``), so the exact pairwise decays take T·c·D_k memory, not T·C·D_k.
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    out_dtype, acc = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    log_g = channel_log_gate(log_g, q)  # (B, H, T, G), G = D_k or 1 (per head)

    # 0. pad T to a multiple of C with k = v = 0 and log g = 0: padded steps leave the state unchanged
    pad = -T % C
    q, k, v, log_g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, log_g))
    N = (T + pad) // C
    q, k, v, log_g = (x.reshape(B, H, N, C, -1) for x in (q, k, v, log_g))  # (B, H, N, C, D)
    b = log_g.cumsum(dim=3)  # log decay from the chunk start to each position, ≤ 0  (B, H, N, C, G)

    # 1. intra-chunk outputs (diagonal blocks): the parallel form inside each chunk
    if b.shape[-1] == 1:
        o_intra = _intra_chunk_per_head(q, k, v, b)
    else:
        o_intra = _intra_chunk_per_channel(q, k, v, b, math.gcd(C, sub_chunk_size))  # (B, H, N, C, D_v)

    # 2. chunk states: what each chunk alone writes into the state by its last position
    b_last = b[:, :, :, -1:]  # (B, H, N, 1, G)
    k_to_end = k * (b_last - b).exp()
    chunk_states = k_to_end.transpose(-1, -2) @ v  # (B, H, N, D_k, D_v)

    # 3. state passing across chunks: S_{n+1} = diag(exp(b_last_n)) S_n + chunk_states_n
    chunk_decay = b_last.squeeze(3).exp().unsqueeze(-1)  # (B, H, N, G, 1)
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


def _intra_chunk_per_head(q: Tensor, k: Tensor, v: Tensor, b: Tensor) -> Tensor:
    """One decay per head: q·k times a C×C decay matrix (Mamba-2's segment sum). b: [B, H, N, C, 1]."""
    C = q.shape[3]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    log_decay = (b - b.transpose(-1, -2)).masked_fill(~causal, float("-inf"))  # (B, H, N, C, C), [t, s]
    return ((q @ k.transpose(-1, -2)) * log_decay.exp()) @ v


def _intra_chunk_per_channel(q: Tensor, k: Tensor, v: Tensor, b: Tensor, c: int) -> Tensor:
    """Per-channel decays through sub-chunks of c positions: flash-linear-attention's chunk_gla in log space.

    The exact form needs a C×C×D_k tensor of decays. Instead, a query t in sub-chunk m and a key s in
    an earlier sub-chunk meet at the boundary r_m, the cumulative log decay at the end of sub-chunk m − 1:
        exp(b_t − b_s) = exp(b_t − r_m) · exp(r_m − b_s),
    a matmul of decayed queries with decayed keys whose exponents are both ≤ 0 (b only decreases), so no
    factor overflows and one underflows only where the true decay is smaller still. (One global
    reference, q·exp(b_t) with k·exp(−b_s), overflows after a few strong gates, in float32 too.)
    Pairs inside one sub-chunk take the exact form, exp of b_t − b_s masked before exp.
    q, k, b: [B, H, N, C, D_k]; v: [B, H, N, C, D_v] -> [B, H, N, C, D_v].
    """
    B, H, N, C, _ = q.shape
    M = C // c  # sub-chunks per chunk
    qs, ks, vs, bs = (x.reshape(B, H, N, M, c, -1) for x in (q, k, v, b))  # (B, H, N, M, c, D)

    # 1a. pairs inside a sub-chunk: exact log-space decays, masked before exp
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    log_decay = bs.unsqueeze(-2) - bs.unsqueeze(-3)  # (B, H, N, M, c, c, D_k), [t, s]
    log_decay = log_decay.masked_fill(~causal.unsqueeze(-1), float("-inf"))
    scores = torch.einsum("...tk,...tsk,...sk->...ts", qs, log_decay.exp(), ks)  # (B, H, N, M, c, c)
    o = scores @ vs  # (B, H, N, M, c, D_v)

    # 1b. queries of sub-chunk m against all keys before it, through the boundary r_m
    outputs = [o[:, :, :, 0]]
    for m in range(1, M):
        start = m * c  # keys 0 … start − 1 precede sub-chunk m
        r = b[:, :, :, start - 1 : start]  # (B, H, N, 1, D_k)
        q_from_ref = qs[:, :, :, m] * (bs[:, :, :, m] - r).exp()  # q_t ⊙ exp(b_t − r_m)  (B, H, N, c, D_k)
        k_to_ref = k[:, :, :, :start] * (r - b[:, :, :, :start]).exp()  # k_s ⊙ exp(r_m − b_s)
        outputs.append(o[:, :, :, m] + (q_from_ref @ k_to_ref.transpose(-1, -2)) @ v[:, :, :, :start])
    return torch.stack(outputs, dim=3).reshape(B, H, N, C, -1)
