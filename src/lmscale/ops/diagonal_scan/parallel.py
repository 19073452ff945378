"""Associative-scan form: log₂ T elementwise passes instead of T sequential steps.

The pairs (a, b) compose as affine maps h ↦ a h + b; composing "first (a₁, b₁), then (a₂, b₂)" gives
(a₂ a₁, a₂ b₁ + b₂), which is associative, so every prefix can be built by doubling (Hillis & Steele
1986): after the pass with offset d, element t holds the composition of elements t − 2d + 1 … t.
O(T log T) work and, for autograd, log₂ T saved copies of the input: the price of depth log₂ T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmscale.ops.diagonal_scan.naive import compute_dtype


def parallel_diagonal_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Hillis–Steele inclusive scan. a broadcasts to b [B, T, *C]; initial_state [B, *C].

    Products of a only shrink when |a| ≤ 1 (they underflow to 0, never overflow), so the form is
    stable for every decaying recurrence; no division, no logarithm.
    """
    a, b = torch.broadcast_tensors(a, b)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    acc = compute_dtype(out_dtype)
    a, b = a.to(acc), b.to(acc)
    T = b.shape[1]

    # 1. fold the initial state into the first input: h_0 = a_0 h_{−1} + b_0
    if initial_state is not None:
        b = torch.cat([a[:, :1] * initial_state.to(acc).unsqueeze(1) + b[:, :1], b[:, 1:]], dim=1)

    # 2. doubling passes: (A_t, B_t) ← (A_t A_{t−d}, A_t B_{t−d} + B_t) for t ≥ d; new tensors, no in-place
    A, h = a, b  # (B, T, *C)
    d = 1
    while d < T:
        h = torch.cat([h[:, :d], A[:, d:] * h[:, :-d] + h[:, d:]], dim=1)
        A = torch.cat([A[:, :d], A[:, d:] * A[:, :-d]], dim=1)
        d *= 2

    # 3. after the last pass B_t is the composition of all of 0 … t applied to h_{−1}: it is h_t
    return h.to(out_dtype), h[:, -1] if output_final_state else None
