"""Causal softmax attention, Llama style ("Transformer++"): bias-free projections, RoPE, a KV cache.

    o_t = Σ_{s ∈ W(t)} softmax_s(q_tᵀ k_s / √d_h) v_s,   W(t) = {s ≤ t}, or {t − window ≤ s ≤ t} if windowed

Two options shrink the decoding state. ``n_kv_heads`` (grouped-query attention, Ainslie et al. 2023):
each key/value head serves n_heads / n_kv_heads query heads, so the KV cache is that many times
smaller (n_kv_heads = 1 is multi-query attention). ``window`` (sliding-window attention, as in
Longformer and Mistral): each query sees itself and the ``window`` positions before it, flash-attention's
``window_size=(window, 0)``, so decoding keeps only the last ``window`` keys and values — a state
bounded in the context length. RoPE positions stay absolute, so a windowed cache remembers where it
starts. ``impl="sdpa"`` runs the fused kernel, ``impl="math"`` the readable reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.rope import apply_rope


def _is_none_or_positive_int(value: object) -> bool:
    return value is None or is_positive_int(value)


@dataclass(frozen=True)
class KVCache:
    """Keys (after RoPE) and values of the cached positions of one layer, each [B, H_kv, S, Dh].

    ``offset`` is the absolute position of the first cached key: 0, unless a sliding window has
    dropped the older ones.
    """

    k: Tensor
    v: Tensor
    offset: int = 0

    @property
    def position(self) -> int:
        """Number of tokens seen, i.e. the position of the next token."""
        return self.offset + self.k.shape[2]


def attention_mask(
    T: int, S: int, position: int, window: int | None, device: torch.device | str
) -> Tensor:
    """[T, S] bool, True where query t may see key s: the T queries sit at positions position − T … position − 1,
    the S keys at position − S … position − 1; causal, and at most ``window`` positions back."""
    back = torch.arange(position - T, position, device=device).unsqueeze(1) - torch.arange(
        position - S, position, device=device
    )  # (T, S): how far key s lies behind query t
    visible = back >= 0
    return visible if window is None else visible & (back <= window)


def attended_pairs(T: int, window: int | None) -> int:
    """Number of (query, key) pairs a length-T sequence attends: Σ_t (min(t, window) + 1)."""
    if window is None or window >= T - 1:
        return T * (T + 1) // 2
    return (window + 1) * (window + 2) // 2 + (T - 1 - window) * (window + 1)


@register("attention")
class Attention(Mixer):
    """Softmax attention with optional grouped-query heads and a sliding window; see the module docstring."""

    options: ClassVar[dict[str, Option]] = {
        "impl": Option.choice("sdpa", ("sdpa", "math")),
        "n_kv_heads": Option(None, "None (one key/value head per query head) or a positive integer "
                                   "dividing n_heads", _is_none_or_positive_int),
        "window": Option(None, "None (full causal attention) or a positive integer: how many past "
                               "positions each query sees", _is_none_or_positive_int),
    }
    forms_option = "impl"
    family = "softmax attention"
    paper = "vaswani2017attention"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        if cfg.head_dim % 2:
            raise ConfigError("d_model", cfg.d_model,
                              f"d_model / n_heads = {cfg.head_dim} must be even: RoPE rotates channel pairs")
        n_kv_heads = cfg.n_heads if opts["n_kv_heads"] is None else opts["n_kv_heads"]
        if cfg.n_heads % n_kv_heads:
            raise ConfigError("mixer_options['n_kv_heads']", n_kv_heads,
                              f"must divide n_heads={cfg.n_heads}: each key/value head serves a whole "
                              "group of query heads")
        self.impl, self.window = opts["impl"], opts["window"]
        self.layer_idx = layer_idx
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.n_kv_heads, self.kv_dim = n_kv_heads, n_kv_heads * cfg.head_dim
        self.max_seq_len, self.rope_theta = cfg.max_seq_len, cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.kv_dim, bias=False)
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

        def heads(t: Tensor, n: int) -> Tensor:
            return t.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, Dh)

        q = apply_rope(heads(self.q_proj(x), self.n_heads), start, self.rope_theta)  # (B, H, T, Dh)
        k = apply_rope(heads(self.k_proj(x), self.n_kv_heads), start, self.rope_theta)  # (B, H_kv, T, Dh)
        v = heads(self.v_proj(x), self.n_kv_heads)
        offset = start
        if state is not None:
            k = torch.cat([state.k, k], dim=2)  # (B, H_kv, S, Dh), S = cached + T
            v = torch.cat([state.v, v], dim=2)
            offset = state.offset

        y = self._attend(q, k, v, start + T)  # (B, H, T, Dh)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, self.d_model))
        if not return_state:
            return y
        if self.window is not None and k.shape[2] > self.window:
            # the next query (at start + T) reaches back to start + T − window: drop everything older;
            # clone so the dropped positions' memory is freed, not kept alive under a view
            k, v = k[:, :, -self.window:].clone(), v[:, :, -self.window:].clone()
            offset = start + T - self.window
        return y, KVCache(k, v, offset)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, position: int) -> Tensor:
        """q [B, H, T, Dh] at positions position − T …; k, v [B, H_kv, S, Dh] ending at position − 1."""
        T, S = q.shape[2], k.shape[2]
        grouped = self.n_kv_heads != self.n_heads
        if self.impl == "sdpa":
            if T == S and self.window is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
            # is_causal aligns the mask top-left; with a cache the queries sit at the bottom right
            mask = attention_mask(T, S, position, self.window, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, Dh)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, H, T, S)
        scores = scores.masked_fill(~attention_mask(T, S, position, self.window, q.device), float("-inf"))
        return scores.softmax(dim=-1) @ v

    def step(self, x_t: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        y, state = self.forward(x_t.unsqueeze(1), state, return_state=True)
        return y.squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        empty = torch.empty(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Keys and values of the cached positions: 2 · min(L, window) · n_kv_heads · head_dim elements."""
        cached = context_len if self.window is None else min(context_len, self.window)
        return 2 * cached * self.kv_dim * dtype.itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Projections plus QKᵀ and AV over the attended (causal, windowed) pairs only.

        A dense kernel (``impl="math"``, or what FlopCounterMode assumes for SDPA) computes the whole
        T×T square and masks it afterwards; that masked part is not counted here.
        """
        T, d, d_kv = seq_len, self.d_model, self.kv_dim
        projections = 2 * T * d * (2 * d + 2 * d_kv)  # q, o: d -> d; k, v: d -> d_kv
        core = 2 * 2 * attended_pairs(T, self.window) * d  # QKᵀ and AV, summed over the H heads
        # x in, q k v out | q k v in, attention out | attention in, y out
        activations = (T * d + T * (d + 2 * d_kv)) + (T * (d + 2 * d_kv) + T * d) + (T * d + T * d)
        return Cost(flops=projections + core, bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        cached = context_len if self.window is None else min(context_len, self.window)
        L, d, d_kv = cached + 1, self.d_model, self.kv_dim  # the new token attends to the cache and itself
        flops = 2 * d * (2 * d + 2 * d_kv) + 2 * 2 * L * d  # projections; q·K and p·V over L positions
        # weights, the attended keys and values read, the new k, v written, x in, y out
        traffic = self.weight_bytes(dtype) + (2 * L * d_kv + 2 * d_kv + 2 * d) * dtype.itemsize
        return Cost(flops=flops, bytes=traffic)
