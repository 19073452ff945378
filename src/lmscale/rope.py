"""Rotary position embedding (Su et al. 2021), the position signal of softmax attention."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_rope(x: Tensor, start: int | Tensor, theta: float) -> Tensor:
    """Rotate x [B, H, T, Dh] so that q·k depends on positions only through their difference.

    Channel pairs (i, i + Dh/2) (the Llama/NeoX layout) at position p = start + t turn by p·θ^(−2i/Dh).
    Angles are computed on the fly in at least float32: no table bounds the position, and bf16 models
    keep exact angles. ``start`` may also be a tensor on x's device, one position per sequence ([B]) or
    one for all (0-d): a decoding state's positions, which a CUDA graph of the step then reads on the
    device rather than replaying the value it was captured with.
    """
    T, Dh = x.shape[-2], x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, Dh, 2, device=x.device, dtype=acc) / Dh)  # (Dh/2,)
    positions = torch.arange(T, device=x.device, dtype=acc)
    positions = positions + (start.to(acc)[..., None] if isinstance(start, Tensor) else start)  # ([B,] T)
    angles = positions[..., None] * inv_freq  # ([B,] T, Dh/2)
    if angles.ndim == 3:  # one start per sequence: broadcast over the heads of x [B, H, T, Dh]
        angles = angles[:, None]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
