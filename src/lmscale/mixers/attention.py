"""Causal softmax attention, Llama style ("Transformer++"): bias-free projections, RoPE, a KV cache.

    o_t = Σ_{s ∈ W(t)} softmax_s(q_tᵀ k_s / √d_h) v_s,   W(t) = {s ≤ t}, or {t − window ≤ s ≤ t} if windowed

Two options shrink the decoding state. ``n_kv_heads`` (grouped-query attention, Ainslie et al. 2023):
each key/value head serves n_heads / n_kv_heads query heads, so the KV cache is that many times
smaller (n_kv_heads = 1 is multi-query attention). ``window`` (sliding-window attention, as in
Longformer and Mistral): each query sees itself and the ``window`` positions before it, flash-attention's
``window_size=(window, 0)``, so decoding keeps only the last ``window`` keys and values — a state
bounded in the context length. RoPE positions stay absolute, so a windowed cache remembers where it
starts. ``impl="sdpa"`` runs the fused kernel, ``impl="math"`` the readable reference.

``kv_cache`` chooses how decoding keeps keys and values. ``"dynamic"`` (the default) appends each
token's key and value to a cache that grows by concatenation: simple, and what ``forward`` needs for
training-time prefixes. ``"static"`` preallocates the whole cache once (``max_seq_len`` slots, or
``window + 1`` for a sliding window, used as a ring) and writes each token's key and value into its slot
in place, with the position held in a device tensor, as gpt-fast and Hugging Face's ``StaticCache`` do.
Its layout never changes, so the whole model step can be captured in a CUDA graph
(``lmscale.decode.GraphedStep``): the fair Transformer baseline for the recurrent models' graphed
decoding. Each step attends over every slot with a mask, so size ``max_seq_len`` to the context decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.rope import apply_rope, check_head_dim


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


@dataclass(frozen=True)
class StaticKVCache:
    """A preallocated cache of one layer, updated in place: keys (after RoPE) and values [B, H_kv, C, Dh],
    the absolute position each of the C slots holds, ``slots`` [C] int64 (−1: empty), and the next
    position, ``position`` (a 0-d int64 tensor, so a CUDA graph reads it rather than a captured constant).

    Position p lives in slot p mod C: with C = max_seq_len nothing wraps, with C = window + 1 the slots
    form a ring that always holds the window the next query sees.
    """

    k: Tensor
    v: Tensor
    slots: Tensor
    position: Tensor


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
        "kv_cache": Option.choice("dynamic", ("dynamic", "static")),
    }
    forms_option = "impl"
    family = "softmax attention"
    paper = "vaswani2017attention"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        check_head_dim(cfg)
        n_kv_heads = cfg.n_heads if opts["n_kv_heads"] is None else opts["n_kv_heads"]
        if cfg.n_heads % n_kv_heads:
            raise ConfigError("mixer_options['n_kv_heads']", n_kv_heads,
                              f"must divide n_heads={cfg.n_heads}: each key/value head serves a whole "
                              "group of query heads")
        self.impl, self.window, self.kv_cache = opts["impl"], opts["window"], opts["kv_cache"]
        self.layer_idx = layer_idx
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.n_kv_heads, self.kv_dim = n_kv_heads, n_kv_heads * cfg.head_dim
        self.max_seq_len, self.rope_theta = cfg.max_seq_len, cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    @property
    def capacity(self) -> int:
        """Slots of a static cache: every position up to max_seq_len, or the window plus the new token."""
        return self.max_seq_len if self.window is None else min(self.max_seq_len, self.window + 1)

    def forward(
        self, x: Tensor, state: KVCache | StaticKVCache | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, KVCache | StaticKVCache]:
        if isinstance(state, StaticKVCache):
            return self._forward_static(x, state, return_state)
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
        if self.kv_cache == "static":  # a prefill: its keys and values go into a fresh preallocated cache
            cache, kept = self.init_state(B, x.device, k.dtype), min(k.shape[2], self.capacity)
            self._write(cache, k[:, :, -kept:], v[:, :, -kept:], torch.arange(start + T - kept, start + T, device=x.device))
            cache.position.fill_(start + T)
            return y, cache
        if self.window is not None and k.shape[2] > self.window:
            # the next query (at start + T) reaches back to start + T − window: drop everything older;
            # clone so the dropped positions' memory is freed, not kept alive under a view
            k, v = k[:, :, -self.window:].clone(), v[:, :, -self.window:].clone()
            offset = start + T - self.window
        return y, KVCache(k, v, offset)

    def _forward_static(self, x: Tensor, cache: StaticKVCache, return_state: bool) -> Tensor | tuple[Tensor, StaticKVCache]:
        """T tokens after a static cache: write their keys and values into their slots, then attend over
        all slots with a mask built from the positions the slots hold. No host sync (the position stays
        on the device) and no shape change, so a CUDA graph can replay it; the cache is updated in place.
        More tokens than a window-sized ring can take beside its window attend over the old slots and the
        new keys together (a copy of the cache: chunked prefill, not decoding).

        Positions past max_seq_len are not checked here (that would read the device position on the host);
        ``GraphedStep``'s callers decode within the context the cache was sized for.
        """
        B, T, _ = x.shape

        def heads(t: Tensor, n: int) -> Tensor:
            return t.view(B, T, n, self.head_dim).transpose(1, 2)

        start = cache.position  # 0-d device tensor
        q = apply_rope(heads(self.q_proj(x), self.n_heads), start, self.rope_theta)
        k = apply_rope(heads(self.k_proj(x), self.n_kv_heads), start, self.rope_theta).to(cache.k.dtype)
        v = heads(self.v_proj(x), self.n_kv_heads).to(cache.v.dtype)
        positions = start + torch.arange(T, device=x.device)  # (T,) absolute positions of the new tokens
        if T + (self.window or 0) <= self.capacity:  # decoding: the ring has room for the window and the new keys
            self._write(cache, k, v, positions)
            keys, values, held = cache.k, cache.v, cache.slots
        else:  # several tokens into a window-sized ring: attend over the old slots and the new keys, then write
            keys, values = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            held = torch.cat([cache.slots, positions])
            self._write(cache, k[:, :, -self.capacity:], v[:, :, -self.capacity:], positions[-self.capacity:])
        back = positions[:, None] - held[None, :]  # (T, S): how far each held key lies behind each query
        visible = (held >= 0)[None, :] & (back >= 0)
        if self.window is not None:
            visible = visible & (back <= self.window)
        y = self._attend_masked(q, keys.to(q.dtype), values.to(q.dtype), visible)
        cache.position.add_(T)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, self.d_model))
        return (y, cache) if return_state else y

    def _write(self, cache: StaticKVCache, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Keys and values [B, H_kv, T, Dh] of absolute ``positions`` [T] into their slots (p mod C), in place."""
        index = positions % self.capacity
        cache.k.index_copy_(2, index, k)
        cache.v.index_copy_(2, index, v)
        cache.slots.index_copy_(0, index, positions)

    def _attend_masked(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
        """q [B, H, T, Dh] over k, v [B, H_kv, S, Dh] where ``visible`` [T, S] allows."""
        grouped = self.n_kv_heads != self.n_heads
        if self.impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=grouped)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, position: int) -> Tensor:
        """q [B, H, T, Dh] at positions position − T …; k, v [B, H_kv, S, Dh] ending at position − 1."""
        T, S = q.shape[2], k.shape[2]
        if self.impl == "sdpa" and T == S and self.window is None:
            grouped = self.n_kv_heads != self.n_heads
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        # is_causal aligns the mask top-left; with a cache the queries sit at the bottom right
        return self._attend_masked(q, k, v, attention_mask(T, S, position, self.window, q.device))

    def step(self, x_t: Tensor, state: KVCache | StaticKVCache) -> tuple[Tensor, KVCache | StaticKVCache]:
        """One token; a static cache is updated in place and returned (see the module docstring)."""
        y, state = self.forward(x_t.unsqueeze(1), state, return_state=True)
        return y.squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> KVCache | StaticKVCache:
        if self.kv_cache == "static":
            buffer = torch.zeros(batch_size, self.n_kv_heads, self.capacity, self.head_dim, device=device, dtype=dtype)
            return StaticKVCache(buffer, buffer.clone(), torch.full((self.capacity,), -1, device=device),
                                 torch.zeros((), dtype=torch.long, device=device))
        empty = torch.empty(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Keys and values of the cached positions: 2 · min(L, window) · n_kv_heads · head_dim elements.

        What decoding needs; a static cache preallocates ``capacity`` slots whatever L is."""
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
