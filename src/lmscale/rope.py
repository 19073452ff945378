"""Rotary position embedding (Su et al. 2021), the position signal of softmax attention."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_rope(x: Tensor, start: int, theta: float) -> Tensor:
    """Rotate x [B, H, T, Dh] so that q·k depends on positions only through their difference.

    Channel pairs (i, i + Dh/2) (the Llama/NeoX layout) at position p = start + t turn by p·θ^(−2i/Dh).
    Angles are computed on the fly in at least float32: no table bounds the position, and bf16 models
    keep exact angles.
    """
    T, Dh = x.shape[-2], x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, Dh, 2, device=x.device, dtype=acc) / Dh)  # (Dh/2,)
    positions = torch.arange(start, start + T, device=x.device, dtype=acc)
    angles = torch.outer(positions, inv_freq)  # (T, Dh/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
