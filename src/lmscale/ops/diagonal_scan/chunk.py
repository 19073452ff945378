"""Chunkwise form: pairwise decays inside chunks, states passed across chunks — linear in T.

Written as numbered steps in the style of Mamba-2's ``ssd_minimal.py``. Unlike the gated recurrence
there is no matmul: each channel has its own decay, so the intra-chunk "attention" is a [C, C]
weighting per channel, applied elementwise and summed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmscale.ops.diagonal_scan.naive import compute_dtype


def chunk_diagonal_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise diagonal scan. a broadcasts to b [B, T, *C]; initial_state [B, *C]; any T ≥ 1.

    The decay from step j to step i of a chunk, a_{j+1} ⋯ a_i, is a cumulative product down column j
    of the matrix M[i, j] = a_i (i > j), 1 (i ≤ j). Products of |a| ≤ 1 can only underflow, so no step
    can overflow, and with no logarithm a may be zero, negative or complex. The log-space alternative,
    exp(Σ log a_i − Σ log a_j), was measured worse: backpropagating through cumulative sums of logs
    cancels terms of the size of the whole chunk's gradient and d log a / da = 1 / a amplifies the rest,
    a 1e-4 … 1e-3 relative error in the float32 gradient w.r.t. a for |a| uniform in (0, 1). Here the
    only loss is cumprod's backward, which divides by M: the gradient w.r.t. a_t degrades where
    a_{j+1} ⋯ a_t falls below the dtype's normal range (1e-38 in float32), i.e. where any gradient
    reaching log a (Mamba's ΔA, LRU's ν) is a · ∂/∂a ≈ 0 anyway.
    Memory: M and the decays are [B, T, chunk_size, *C], so chunk_size trades memory against the
    length of the sequential loop over chunks.
    """
    a, b = torch.broadcast_tensors(a, b)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    acc = compute_dtype(out_dtype)
    a, b = a.to(acc), b.to(acc)
    B, T, *channels = b.shape
    C = chunk_size

    # 0. pad T to a multiple of C with a = 1, b = 0: padded steps leave the state unchanged
    pad = -T % C
    a = torch.cat([a, a.new_ones(B, pad, *channels)], dim=1)
    b = torch.cat([b, b.new_zeros(B, pad, *channels)], dim=1)
    N = (T + pad) // C
    a, b = a.reshape(B, N, C, *channels), b.reshape(B, N, C, *channels)  # (B, N, C, *C)

    # 1. pairwise decays inside each chunk: decay[i, j] = a_{j+1} ⋯ a_i for j ≤ i, else 0
    ones = torch.ones(C, C, dtype=torch.bool, device=b.device)
    extra = (1,) * len(channels)  # broadcast the [C, C] masks over the channel dims
    below, causal = ones.tril(-1).view(C, C, *extra), ones.tril().view(C, C, *extra)  # i > j, i ≥ j
    M = torch.where(below, a.unsqueeze(3), 1)  # (B, N, C_i, C_j, *C)
    decay = M.cumprod(dim=2).masked_fill(~causal, 0)

    # 2. intra-chunk states: h_i = Σ_{j≤i} decay[i, j] b_j, from a zero state at the chunk start
    h_intra = (decay * b.unsqueeze(2)).sum(dim=3)  # (B, N, C, *C)

    # 3. state passing across chunks: h entering chunk n + 1 = (a_0 ⋯ a_{C−1}) h entering n + h_intra_{C−1}
    P = a.cumprod(dim=2)  # a_0 ⋯ a_i, the decay from the state entering the chunk to position i
    state = b.new_zeros(B, *channels) if initial_state is None else initial_state.to(acc)
    entering = []
    for n in range(N):
        entering.append(state)
        state = P[:, n, -1] * state + h_intra[:, n, -1]
    states = torch.stack(entering, dim=1)  # state entering each chunk  (B, N, *C)

    # 4. state → outputs: position i adds the entering state, decayed from the chunk start to i
    h = h_intra + P * states.unsqueeze(2)  # (B, N, C, *C)
    h = h.reshape(B, N * C, *channels)[:, :T]
    return h.to(out_dtype), state if output_final_state else None
