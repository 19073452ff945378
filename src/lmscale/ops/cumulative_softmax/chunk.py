"""Chunkwise form: O(T) work whatever the window, matmul-shaped, and nothing ever subtracted.

LEAP writes a window's sum as the difference of two cumulative sums, Σ_{s≤t} − Σ_{s≤t−k}. Exact in
real numbers, that loses everything in floating point once the prefix holds a term much larger than
the window (relative error ε·e^{l_max − l_window}), and a running maximum cannot shrink when its token
leaves. Instead the sequence is cut into blocks of k tokens, and a window of k tokens is a suffix of
the previous block combined with a prefix of the current one (van Herk / Gil-Werman's sliding
maximum): two within-block cumulative passes and one combine per position, O(T) independent of k.
Each pass is the global algorithm below, written as numbered steps in the style of ``ssd_minimal.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def prefix_aggregates(
    logits: Tensor, values: Tensor, init_max: Tensor, init_sum: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Aggregate of init ⊕ tokens 0..t for every t of independent rows.

    logits [..., L], values [..., L, D + 1] with L a multiple of ``chunk_size``; init [...], [..., D + 1]
    -> max [..., L], sum [..., L, D + 1].
    """
    *R, L = logits.shape
    C, N = chunk_size, L // chunk_size
    l, a = logits.reshape(*R, N, C), values.reshape(*R, N, C, -1)  # (..., N, C), (..., N, C, D + 1)

    # 1. inside each chunk: row i is referred to its own running max, weights exp(l_j − m_i) for j ≤ i
    m_in = l.detach().cummax(dim=-1).values  # (..., N, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=l.device).tril()
    w = (l.unsqueeze(-2) - m_in.unsqueeze(-1)).masked_fill(~causal, float("-inf")).exp()  # (..., N, C, C)
    a_in = w @ a  # (..., N, C, D + 1)

    # 2. each chunk's total is its last row; 3. fold totals left to right: the aggregate entering chunk n
    m, s = init_max, init_sum
    entering_m, entering_a = [], []
    for n in range(N):
        entering_m.append(m)
        entering_a.append(s)
        m, s = combine(m, s, m_in[..., n, -1], a_in[..., n, -1, :])
    entering_m = torch.stack(entering_m, dim=-1).unsqueeze(-1)  # (..., N, 1)
    entering_a = torch.stack(entering_a, dim=-2).unsqueeze(-2)  # (..., N, 1, D + 1)

    # 4. every position: what entered its chunk ⊕ its own chunk up to it
    m_out, a_out = combine(entering_m, entering_a, m_in, a_in)
    return m_out.reshape(*R, L), a_out.reshape(*R, L, -1)


def chunk_cumulative_softmax(
    logits: Tensor,
    v: Tensor,
    window: int | None = None,
    initial_state: CumulativeSoftmaxState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, CumulativeSoftmaxState | None]:
    """Chunkwise cumulative softmax-weighted sums. logits [B, H, T], v [B, H, T, D] -> o [B, H, T, D].

    Global: one prefix pass over chunks of ``chunk_size``. Window k: a prefix and a suffix pass inside
    blocks of k (chunks of min(chunk_size, k)), then one combine. Memory: the [C, C] chunk weights.
    """
    B, H, T, D = v.shape
    out_dtype, acc = v.dtype, compute_dtype(v.dtype)
    logits, v = logits.to(acc), v.to(acc)
    state = initial_state
    if state is None:
        state = CumulativeSoftmaxState.empty(B, H, D, window, v.device, acc)
    empty = empty_max(acc)
    if window is None:
        # 0. pad T to whole chunks with tokens of weight 0 (logit "−∞", value and normaliser 0)
        pad = -T % chunk_size
        m, a = prefix_aggregates(F.pad(logits, (0, pad), value=empty), F.pad(with_ones(v), (0, 0, 0, pad)),
                                 state.max, state.sum, chunk_size)
        o = readout(a[:, :, :T]).to(out_dtype)
        final = CumulativeSoftmaxState(m[:, :, T - 1], a[:, :, T - 1]) if output_final_state else None
        return o, final

    # 0. lay the tokens out from the start of the state's block, in whole blocks of k (padding: weight 0),
    #    each block padded to whole chunks of C
    k, r = window, state.block_logits.shape[-1]
    S = r + T
    n_blocks = -(-S // k)
    C = min(chunk_size, k)
    pad_block = -k % C

    def blocks(x: Tensor, lead: Tensor, fill: float) -> Tensor:
        """[B, H, T(, D+1)] after ``lead`` -> [B, H, n_blocks, k + pad_block(, D+1)]."""
        x = torch.cat([lead, x], dim=2)
        tail = (0, 0) if x.dim() == 4 else ()
        x = F.pad(x, (*tail, 0, n_blocks * k - S), value=fill)
        x = x.reshape(B, H, n_blocks, k, *x.shape[3:])
        return F.pad(x, (*tail, 0, pad_block), value=fill)

    a_new = with_ones(v)  # (B, H, T, D + 1)
    raw_l = blocks(logits, state.block_logits, empty)  # the state's block tokens themselves
    raw_a = blocks(a_new, with_ones(state.block_values), 0.0)
    pre_l = blocks(logits, torch.full_like(state.block_logits, empty), empty)  # ... or left out
    pre_a = blocks(a_new, torch.zeros_like(with_ones(state.block_values)), 0.0)

    # 1. prefixes inside each block; block 0 starts from the state's running aggregate, which stands
    #    for the r tokens left out of pre_l
    init_m = torch.cat([state.max.unsqueeze(-1), state.max.new_full((B, H, n_blocks - 1), empty)], dim=-1)
    init_a = torch.cat([state.sum.unsqueeze(-2), state.sum.new_zeros(B, H, n_blocks - 1, D + 1)], dim=-2)
    P_m, P_a = prefix_aggregates(pre_l, pre_a, init_m, init_a, C)
    P_m, P_a = P_m[..., :k], P_a[..., :k, :]  # (B, H, n_blocks, k), (B, H, n_blocks, k, D + 1)

    # 2. suffixes inside each block (tokens j..k−1): prefixes of the reversed blocks, padding moved last
    rev_l = torch.cat([raw_l[..., :k].flip(-1), raw_l[..., k:]], dim=-1)
    rev_a = torch.cat([raw_a[..., :k, :].flip(-2), raw_a[..., k:, :]], dim=-2)
    no_m, no_a = raw_l.new_full((B, H, n_blocks), empty), raw_a.new_zeros(B, H, n_blocks, D + 1)
    S_m, S_a = prefix_aggregates(rev_l, rev_a, no_m, no_a, C)
    S_m, S_a = S_m[..., :k].flip(-1), S_a[..., :k, :].flip(-2)  # (B, H, n_blocks, k), (…, D + 1)

    # 3. for offset p of block b, the suffix of block b − 1 from offset p + 1 (offset k: none);
    #    block 0 takes the state's suffixes, which hold offsets r+1 … k−1 (or none at all yet)
    n = state.suffix_max.shape[-1]
    first_m = torch.cat([raw_l.new_full((B, H, r), empty), state.suffix_max,
                         raw_l.new_full((B, H, k - r - n), empty)], dim=-1)  # (B, H, k)
    first_a = torch.cat([raw_a.new_zeros(B, H, r, D + 1), state.suffix_sum,
                         raw_a.new_zeros(B, H, k - r - n, D + 1)], dim=-2)
    next_m = torch.cat([S_m[..., 1:], raw_l.new_full((B, H, n_blocks, 1), empty)], dim=-1)
    next_a = torch.cat([S_a[..., 1:, :], raw_a.new_zeros(B, H, n_blocks, 1, D + 1)], dim=-2)
    prev_m = torch.cat([first_m.unsqueeze(2), next_m[:, :, :-1]], dim=2)  # (B, H, n_blocks, k)
    prev_a = torch.cat([first_a.unsqueeze(2), next_a[:, :, :-1]], dim=2)

    # 4. window = previous block's suffix ⊕ current block's prefix
    _, W_a = combine(prev_m, prev_a, P_m, P_a)
    o = readout(W_a.reshape(B, H, n_blocks * k, D + 1)[:, :, r:S]).to(out_dtype)
    if not output_final_state:
        return o, None
    r_end, b_end = S % k, S // k
    prefix = (P_m[:, :, b_end, r_end - 1], P_a[:, :, b_end, r_end - 1]) if r_end else None
    suffixes = (S_m[:, :, b_end - 1, 1:], S_a[:, :, b_end - 1, 1:]) if b_end else None
    keys_l = torch.cat([state.block_logits, logits], dim=-1)
    keys_v = torch.cat([state.block_values, v], dim=-2)
    return o, assemble_window_state(keys_l, keys_v, state, window, prefix, suffixes)
