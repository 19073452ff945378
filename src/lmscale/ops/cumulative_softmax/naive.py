"""Token-by-token form, the state every form shares, and the one combine rule they are all built from.

A softmax-weighted sum over a set of tokens is carried as an *aggregate* (m, a): a reference maximum m
and the rescaled sums a = Σ exp(l_s − m) [v_s, 1] — the weighted values in the first D channels, the
normaliser z in the last. The pair stands for e^m · a, so any m gives the same output a[:D] / a[D];
choosing m = the largest logit keeps every exponent ≤ 0 (no overflow) and z ≥ 1 (no 0/0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in at least float32: the normaliser sums up to T terms."""
    return torch.promote_types(dtype, torch.float32)


def empty_max(dtype: torch.dtype) -> float:
    """Reference max of an empty aggregate: the most negative finite number, so exp(it − m) = 0 exactly
    for any real m, and two empty aggregates combine to an empty one without ever computing −∞ − (−∞)."""
    return torch.finfo(dtype).min


def with_ones(v: Tensor) -> Tensor:
    """[..., D] -> [..., D + 1]: the value with a trailing 1, whose weighted sum is the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def combine(m_a: Tensor, a_a: Tensor, m_b: Tensor, a_b: Tensor) -> tuple[Tensor, Tensor]:
    """The aggregate of two disjoint token sets: m [...], a [..., D + 1] -> (m, a).

    The new reference max is detached: outputs do not depend on it, so no gradient has to flow through
    it, and every factor exp(m_x − m) ≤ 1.
    """
    m = torch.maximum(m_a, m_b).detach()
    return m, a_a * (m_a - m).exp().unsqueeze(-1) + a_b * (m_b - m).exp().unsqueeze(-1)


def readout(a: Tensor) -> Tensor:
    """[..., D + 1] -> [..., D]: weighted sum over normaliser, i.e. the softmax-weighted mean."""
    return a[..., :-1] / a[..., -1:]


@dataclass(frozen=True)
class CumulativeSoftmaxState:
    """What decoding carries, per batch row and head; every tensor is in the compute dtype.

    Global (window None): only the aggregate of every token so far, ``max`` [B, H] and ``sum``
    [B, H, D + 1] — constant size.

    Window k: the sequence is cut into blocks of k tokens from position 0; a window of k tokens always
    covers a suffix of the previous block and a prefix of the current one (van Herk / Gil-Werman).
    So the state holds ``max``, ``sum``: the aggregate of the current block's r = L mod k tokens;
    ``block_logits`` [B, H, r], ``block_values`` [B, H, r, D]: those tokens themselves, from which the
    block's suffix aggregates are built when it completes; ``suffix_max`` [B, H, n], ``suffix_sum``
    [B, H, n, D + 1]: the aggregates of the previous block's tokens j..k−1 for j = r+1 … k−1 (those the
    coming windows still need), n = k−1−r — or n = 0 while no block has completed. About 2k(D + 1)
    numbers: the state grows with the window, never with the context.
    """

    max: Tensor
    sum: Tensor
    block_logits: Tensor | None = None
    block_values: Tensor | None = None
    suffix_max: Tensor | None = None
    suffix_sum: Tensor | None = None

    @classmethod
    def empty(
        cls, batch_size: int, n_heads: int, dim: int, window: int | None,
        device: torch.device | str, dtype: torch.dtype,
    ) -> CumulativeSoftmaxState:
        """The state before any token (``dtype``: the inputs' dtype; stored in the compute dtype)."""
        acc = compute_dtype(dtype)
        m = torch.full((batch_size, n_heads), empty_max(acc), device=device, dtype=acc)
        a = torch.zeros(batch_size, n_heads, dim + 1, device=device, dtype=acc)
        if window is None:
            return cls(m, a)
        return cls(m, a, m.new_zeros(batch_size, n_heads, 0), m.new_zeros(batch_size, n_heads, 0, dim),
                   m.new_zeros(batch_size, n_heads, 0), m.new_zeros(batch_size, n_heads, 0, dim + 1))


def block_suffixes(logits: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Aggregates of tokens j..k−1 for j = 1 … k−1 of one complete block, by a backward running combine.

    logits [B, H, k], values [B, H, k, D] -> max [B, H, k−1], sum [B, H, k−1, D + 1].
    """
    k = logits.shape[-1]
    m = torch.full_like(logits[..., 0], empty_max(logits.dtype))
    a = torch.zeros_like(with_ones(values[..., 0, :]))
    ms, sums = [], []
    for j in range(k - 1, 0, -1):
        m, a = combine(m, a, logits[..., j], with_ones(values[..., j, :]))
        ms.append(m)
        sums.append(a)
    if not ms:  # k = 1: a window is the token alone
        return logits[..., :0], with_ones(values)[..., :0, :]
    return torch.stack(ms[::-1], dim=-1), torch.stack(sums[::-1], dim=-2)


def cumulative_softmax_step(
    logit_t: Tensor, v_t: Tensor, state: CumulativeSoftmaxState, window: int | None = None
) -> tuple[Tensor, CumulativeSoftmaxState]:
    """One token: logit_t [B, H], v_t [B, H, D] -> (o_t [B, H, D] in v_t's dtype, new state).

    Global: fold the token into the running aggregate, O(D). Window k: also fold in the previous
    block's suffix that the window still covers; when the block completes, build its k−1 suffix
    aggregates (O(kD) once per k tokens, O(D) amortised). Nothing is ever subtracted, so a large logit
    leaving the window cannot leave behind cancellation error or a stale maximum.
    """
    out_dtype, acc = v_t.dtype, compute_dtype(v_t.dtype)
    logit_t, v_t = logit_t.to(acc), v_t.to(acc)
    m, a = combine(state.max, state.sum, logit_t, with_ones(v_t))  # the current block (or all) up to t
    if window is None:
        return readout(a).to(out_dtype), CumulativeSoftmaxState(m, a)

    suffix_max, suffix_sum = state.suffix_max, state.suffix_sum
    window_a = a
    if suffix_max.shape[-1] > 0:  # the window also covers the previous block's tokens r+1 … k−1
        _, window_a = combine(suffix_max[..., 0], suffix_sum[..., 0, :], m, a)
        suffix_max, suffix_sum = suffix_max[..., 1:], suffix_sum[..., 1:, :]
    block_logits = torch.cat([state.block_logits, logit_t.unsqueeze(-1)], dim=-1)  # (B, H, r + 1)
    block_values = torch.cat([state.block_values, v_t.unsqueeze(-2)], dim=-2)  # (B, H, r + 1, D)
    if block_logits.shape[-1] == window:  # block complete: its suffixes serve the next block's windows
        suffix_max, suffix_sum = block_suffixes(block_logits, block_values)
        block_logits, block_values = block_logits[..., :0], block_values[..., :0, :]
        m, a = torch.full_like(m, empty_max(acc)), torch.zeros_like(a)
    new_state = CumulativeSoftmaxState(m, a, block_logits, block_values, suffix_max, suffix_sum)
    return readout(window_a).to(out_dtype), new_state


def naive_cumulative_softmax(
    logits: Tensor,
    v: Tensor,
    window: int | None = None,
    initial_state: CumulativeSoftmaxState | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, CumulativeSoftmaxState | None]:
    """Loop ``cumulative_softmax_step`` over T. logits [B, H, T], v [B, H, T, D] -> o [B, H, T, D]."""
    B, H, T, D = v.shape
    state = initial_state
    if state is None:
        state = CumulativeSoftmaxState.empty(B, H, D, window, v.device, v.dtype)
    outputs = []
    for t in range(T):
        o_t, state = cumulative_softmax_step(logits[:, :, t], v[:, :, t], state, window)
        outputs.append(o_t)
    return torch.stack(outputs, dim=2), state if output_final_state else None


def assemble_window_state(
    logits: Tensor,
    values: Tensor,
    state: CumulativeSoftmaxState,
    window: int,
    prefix: tuple[Tensor, Tensor] | None,
    suffixes: tuple[Tensor, Tensor] | None,
) -> CumulativeSoftmaxState:
    """The windowed state after the tokens laid out from the start of ``state``'s block.

    logits [B, H, S], values [B, H, S, D]: the state's block tokens followed by the new ones.
    prefix: aggregate of the last, incomplete block (None when S is a whole number of blocks);
    suffixes: aggregates of tokens j..k−1, j = 1 … k−1, of the last complete block (None when no
    block completed in this call: the state's own suffixes are then still the ones that apply).
    """
    S, k, r = logits.shape[-1], window, state.block_logits.shape[-1]
    r_end = S % k  # tokens in the incomplete last block
    if prefix is None:
        prefix = torch.full_like(state.max, empty_max(state.max.dtype)), torch.zeros_like(state.sum)
    if suffixes is None:  # still in the state's block: its suffix list just moved on by S − r offsets
        suffix_max, suffix_sum = state.suffix_max[..., r_end - r:], state.suffix_sum[..., r_end - r:, :]
    else:
        suffix_max, suffix_sum = suffixes[0][..., r_end:], suffixes[1][..., r_end:, :]
    return CumulativeSoftmaxState(prefix[0], prefix[1], logits[..., S - r_end:], values[..., S - r_end:, :],
                                  suffix_max, suffix_sum)
