"""Quadratic masked form: each output is a softmax over its window, written out as attention would be."""

from __future__ import annotations

import torch
from torch import Tensor

from lmscale.ops.cumulative_softmax.naive import (
    CumulativeSoftmaxState,
    assemble_window_state,
    combine,
    compute_dtype,
    empty_max,
    readout,
    with_ones,
)


def masked_aggregate(logits: Tensor, values: Tensor, see: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax-weighted sums of the tokens each row sees, as aggregates.

    logits [B, H, S], values [B, H, S, D + 1], see [R, S] bool (every row sees at least one token)
    -> max [B, H, R], sum [B, H, R, D + 1].
    """
    scores = logits.unsqueeze(-2).masked_fill(~see, float("-inf"))  # (B, H, R, S), masked before exp
    m = scores.amax(dim=-1).detach()
    return m, (scores - m.unsqueeze(-1)).exp() @ values


def parallel_cumulative_softmax(
    logits: Tensor,
    v: Tensor,
    window: int | None = None,
    initial_state: CumulativeSoftmaxState | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, CumulativeSoftmaxState | None]:
    """o_t = Σ_{s ∈ W_t} softmax_s(l) v_s over W_t = {s ≤ t} or the last ``window`` tokens {t−k < s ≤ t}.

    O(T²) time and memory: for checking the chunk form and for short sequences. A state's tokens enter
    the way decoding sees them: the current block's first r tokens through the state's running
    aggregate (for queries still in that block; later windows see them one by one), the previous
    block's tokens through its suffix aggregates. logits [B, H, T], v [B, H, T, D] -> o [B, H, T, D].
    """
    B, H, T, D = v.shape
    out_dtype, acc = v.dtype, compute_dtype(v.dtype)
    logits, v = logits.to(acc), v.to(acc)
    state = initial_state
    if state is None:
        state = CumulativeSoftmaxState.empty(B, H, D, window, v.device, acc)
    big = T + 1 if window is None else window  # a window nothing reaches past
    r = 0 if window is None else state.block_logits.shape[-1]
    keys_l = logits if window is None else torch.cat([state.block_logits, logits], dim=-1)  # (B, H, S)
    keys_v = v if window is None else torch.cat([state.block_values, v], dim=-2)  # (B, H, S, D)
    S = r + T

    # 1. the raw tokens each query sees: positions from the current block's start
    u = torch.arange(r, S, device=v.device).unsqueeze(1)  # query positions (T, 1)
    s = torch.arange(S, device=v.device)  # key positions (S,)
    see = (s <= u) & (s > u - big) & ((s >= r) | (u >= big))  # block 0's old tokens: via the state
    m, a = masked_aggregate(keys_l, with_ones(keys_v), see)  # (B, H, T), (B, H, T, D + 1)

    # 2. plus the state's aggregates: the running one (global: every query; window: queries in block 0)
    in_block0 = (u < big).squeeze(1)  # (T,)
    empty = empty_max(acc)
    run_m = torch.where(in_block0, state.max.unsqueeze(-1), empty)  # (B, H, T)
    run_a = torch.where(in_block0.unsqueeze(-1), state.sum.unsqueeze(-2), 0.0)  # (B, H, T, D + 1)
    m, a = combine(run_m, run_a, m, a)
    n = 0 if window is None else state.suffix_max.shape[-1]
    if n:  # and the previous block's suffix from offset u + 1: the state's entry t = u − r, while t < n
        t = torch.arange(T, device=v.device)
        has, idx = t < n, t.clamp(max=n - 1)
        suf_m = torch.where(has, state.suffix_max[..., idx], empty)  # (B, H, T)
        suf_a = torch.where(has.unsqueeze(-1), state.suffix_sum[..., idx, :], 0.0)  # (B, H, T, D + 1)
        m, a = combine(suf_m, suf_a, m, a)
    o = readout(a).to(out_dtype)
    if not output_final_state:
        return o, None

    # 3. final state, from its definition
    if window is None:
        m_all, a_all = masked_aggregate(logits, with_ones(v), torch.ones(1, T, dtype=torch.bool, device=v.device))
        return o, CumulativeSoftmaxState(*combine(state.max, state.sum, m_all[..., 0], a_all[..., 0, :]))
    k, r_end, n_blocks = window, S % window, S // window
    prefix = suffixes = None
    if r_end:  # the incomplete last block; in block 0 its old tokens are the state's running aggregate
        lo = r if n_blocks == 0 else S - r_end
        pm, pa = masked_aggregate(keys_l[..., lo:], with_ones(keys_v[..., lo:, :]),
                                  torch.ones(1, S - lo, dtype=torch.bool, device=v.device))
        prefix = pm[..., 0], pa[..., 0, :]
        if n_blocks == 0:
            prefix = combine(state.max, state.sum, *prefix)
    if n_blocks:  # the last complete block's suffixes j … k−1, j = 1 … k−1
        start = (n_blocks - 1) * k
        j = torch.arange(1, k, device=v.device).unsqueeze(1)
        suffixes = masked_aggregate(keys_l[..., start:start + k], with_ones(keys_v[..., start:start + k, :]),
                                    torch.arange(k, device=v.device) >= j)
    return o, assemble_window_state(keys_l, keys_v, state, window, prefix, suffixes)
