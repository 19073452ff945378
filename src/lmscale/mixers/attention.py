"""Causal multi-head softmax attention, Llama style: bias-free projections, RoPE, a KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, register
from lmscale.rope import apply_rope


@dataclass(frozen=True)
class KVCache:
    """Keys (after RoPE) and values of every past position of one layer, each [B, H, T_cache, Dh]."""

    k: Tensor
    v: Tensor

    @property
    def position(self) -> int:
        """Number of cached tokens, i.e. the position of the next token."""
        return self.k.shape[2]


def causal_mask(T: int, S: int, device: torch.device) -> Tensor:
    """[T, S] bool, True where query t (at absolute position S − T + t) may see key s."""
    return torch.arange(S, device=device) <= torch.arange(S - T, S, device=device).unsqueeze(1)


@register("attention")
class Attention(Mixer):
    """Softmax attention; ``impl="sdpa"`` uses the fused kernel, ``impl="math"`` the readable reference."""

    options: ClassVar[dict[str, Option]] = {
        "impl": Option.choice("sdpa", ("sdpa", "math")),
    }
    forms_option = "impl"
    family = "softmax attention"
    paper = "vaswani2017attention"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.impl = self.read_options(cfg)["impl"]
        if cfg.head_dim % 2:
            raise ConfigError("d_model", cfg.d_model,
                              f"d_model / n_heads = {cfg.head_dim} must be even: RoPE rotates channel pairs")
        self.layer_idx = layer_idx
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.max_seq_len, self.rope_theta = cfg.max_seq_len, cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self, x: Tensor, state: KVCache | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, KVCache]:
        B, T, _ = x.shape
        start = 0 if state is None else state.position
        if start + T > self.max_seq_len:
            raise ConfigError("max_seq_len", self.max_seq_len,
                              f"attention was given position {start + T - 1}; raise max_seq_len to "
                              f"at least {start + T} (the context the model is trained for)")

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

        q = apply_rope(heads(self.q_proj(x)), start, self.rope_theta)
        k = apply_rope(heads(self.k_proj(x)), start, self.rope_theta)
        v = heads(self.v_proj(x))
        if state is not None:
            k = torch.cat([state.k, k], dim=2)  # (B, H, start + T, Dh)
            v = torch.cat([state.v, v], dim=2)

        y = self._attend(q, k, v)  # (B, H, T, Dh)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, self.d_model))
        return (y, KVCache(k, v)) if return_state else y

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T, S = q.shape[2], k.shape[2]
        if self.impl == "sdpa":
            if T == S:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            # is_causal aligns the mask top-left; with a cache the queries sit at the bottom right
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device))
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, H, T, S)
        scores = scores.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
        return scores.softmax(dim=-1) @ v

    def step(self, x_t: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        y, state = self.forward(x_t.unsqueeze(1), state, return_state=True)
        return y.squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        empty = torch.empty(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Keys and values of every past token: 2 · L · d_model elements."""
        return 2 * context_len * self.d_model * dtype.itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        T, d = seq_len, self.d_model
        pairs = T * (T + 1) // 2  # causal (query, key) pairs
        flops = 4 * 2 * T * d * d + 2 * 2 * pairs * d  # q, k, v, o projections; QKᵀ and AV
        # x in, q k v out | q k v in, attention out | attention in, y out
        activations = (T * d + 3 * T * d) + (3 * T * d + T * d) + (T * d + T * d)
        return Cost(flops=flops, bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        L, d = context_len + 1, self.d_model  # the new token attends to the cache and itself
        flops = 4 * 2 * d * d + 2 * 2 * L * d  # projections; q·K and p·V over L positions
        # weights, the whole KV cache read, the new k, v written, x in, y out
        traffic = self.weight_bytes(dtype) + (2 * L * d + 2 * d + 2 * d) * dtype.itemsize
        return Cost(flops=flops, bytes=traffic)
