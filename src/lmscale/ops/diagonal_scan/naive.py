"""Token-by-token form: the definition itself, against which every faster form is tested."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The inputs' promoted dtype, at least float32 (complex64): products compound over thousands of steps."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def diagonal_scan_step(a_t: Tensor, b_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token: h_t = a_t ⊙ h_{t−1} + b_t. a_t broadcasts to b_t [B, *C]; state [B, *C].

    Returns h_t in the inputs' promoted dtype and the new state in the compute dtype (never in place).
    """
    out_dtype = torch.promote_types(a_t.dtype, b_t.dtype)
    acc = compute_dtype(out_dtype, state.dtype)
    state = a_t.to(acc) * state.to(acc) + b_t.to(acc)
    return state.to(out_dtype), state


def naive_diagonal_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Loop ``diagonal_scan_step`` over T. a broadcasts to b [B, T, *C]; initial_state [B, *C]."""
    a, b = torch.broadcast_tensors(a, b)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    acc = compute_dtype(out_dtype)
    shape = (b.shape[0], *b.shape[2:])
    state = b.new_zeros(shape, dtype=acc) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(b.shape[1]):
        _, state = diagonal_scan_step(a[:, t], b[:, t], state)
        outputs.append(state)
    h = torch.stack(outputs, dim=1).to(out_dtype)  # (B, T, *C)
    return h, state if output_final_state else None
