"""Rotary position embedding (Su et al. 2021), the position signal of softmax attention."""

from __future__ import annotations

import torch
from torch import Tensor

from lmscale.config import ConfigError, ModelConfig


def check_head_dim(cfg: ModelConfig) -> None:
    """RoPE rotates channel pairs, so a mixer that uses it needs an even head width."""
    if cfg.head_dim % 2:
        raise ConfigError("d_model", cfg.d_model,
                          f"d_model / n_heads = {cfg.head_dim} must be even: RoPE rotates channel pairs")


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
    positions = torch.arange(T, device=x.device, dtype=acc)
    positions = positions + (start.to(acc)[..., None] if isinstance(start, Tensor) else start)  # ([B,] T)
    cos, sin = rotary_phases(positions, Dh, theta)  # ([B,] T, Dh/2)
    if cos.ndim == 3:  # one start per sequence: broadcast over the heads of x [B, H, T, Dh]
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@torch.library.custom_op("lmscale::rotary_phases", mutates_args=())
def rotary_phases(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of positions [..., T] times θ^(−2i/Dh), i < Dh/2: [..., T, Dh/2] each.

    An opaque op on purpose: inside a compiled block, the compiler would otherwise fuse the power, sine
    and cosine into the kernel that rotates q and k, and evaluate them once per element of [B, H, T, Dh]
    instead of once per (position, frequency) — on an H100 that took 57 ms of a 320 ms training step of
    the 350M attention model (issue 13's first profile).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=positions.dtype) / head_dim)
    angles = positions[..., None] * inv_freq
    return angles.cos(), angles.sin()


@rotary_phases.register_fake
def _(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    shape = (*positions.shape, head_dim // 2)
    return positions.new_empty(shape), positions.new_empty(shape)
