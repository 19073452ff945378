"""Transformer-XL's segment-level recurrence (Dai et al. 2019): attention over this segment and a cached one.

The sequence is cut into segments of ``segment_len`` tokens from position 0. A query in segment s attends
causally within s and to every position of segment s − 1, whose keys and values are cached and, in
training, detached: gradients stop at the segment boundary, so a long sequence trains at the cost of
segments of two, yet information flows forward through the layers, one segment per layer. Decoding keeps
the previous segment and the current one, at most 2·segment_len − 1 positions, whatever the context.

Positions are relative, as in the paper, but through RoPE (a query–key score depends only on their
distance) rather than Transformer-XL's sinusoid embeddings with the u and v bias vectors: the same
property with the report's one positional scheme.

``forward`` runs segment by segment from any state (including one that stops mid-segment); ``step``
decodes one token; they agree, and at a segment boundary the memory turns over (tests in
``tests/test_transformer_xl.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.rope import apply_rope, check_head_dim


@dataclass(frozen=True)
class SegmentCache:
    """Keys (after RoPE) and values [B, H, L, Dh] of the previous segment (its last ``segment_len``
    positions, detached) followed by the current one's; ``position`` counts the tokens seen."""

    k: Tensor
    v: Tensor
    position: int


@register("transformer_xl")
class TransformerXL(Mixer):
    """Softmax attention over the current segment and the cached previous one, with relative (RoPE) positions."""

    options: ClassVar[dict[str, Option]] = {
        "segment_len": Option(256, "a positive integer", is_positive_int),
    }
    family = "softmax attention (segment recurrence)"
    paper = "dai2019transformerxl"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        check_head_dim(cfg)
        self.layer_idx = layer_idx
        self.segment_len = self.read_options(cfg)["segment_len"]
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def _readout(self, o: Tensor) -> Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.d_model))

    def _turn_over(self, k: Tensor, v: Tensor, position: int) -> tuple[Tensor, Tensor]:
        """At a segment boundary only the segment just completed stays, detached: it becomes the memory."""
        if position % self.segment_len == 0 and k.shape[2] > self.segment_len:
            k, v = k[:, :, -self.segment_len:], v[:, :, -self.segment_len:]
        if position % self.segment_len == 0:
            k, v = k.detach(), v.detach()
        return k, v

    def forward(
        self, x: Tensor, state: SegmentCache | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, SegmentCache]:
        B, T, _ = x.shape
        state = state if state is not None else self.init_state(B, x.device, x.dtype)
        start, N = state.position, self.segment_len
        q = apply_rope(self._heads(self.q_proj(x)), start, self.rope_theta)
        k = apply_rope(self._heads(self.k_proj(x)), start, self.rope_theta)
        v = self._heads(self.v_proj(x))
        cache_k, cache_v, position = state.k, state.v, start
        outputs, a = [], 0
        while a < T:
            b = min(T, a + N - position % N)  # up to the end of the current segment
            keys = torch.cat([cache_k, k[:, :, a:b]], dim=2)
            values = torch.cat([cache_v, v[:, :, a:b]], dim=2)
            before = cache_k.shape[2]  # cached positions: the memory, then this segment's earlier tokens
            rows = torch.arange(before, before + b - a, device=x.device)[:, None]
            mask = torch.arange(keys.shape[2], device=x.device)[None, :] <= rows
            outputs.append(F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=mask))
            position += b - a
            cache_k, cache_v = self._turn_over(keys, values, position)
            a = b
        y = self._readout(torch.cat(outputs, dim=2))
        return (y, SegmentCache(cache_k, cache_v, position)) if return_state else y

    def step(self, x_t: Tensor, state: SegmentCache) -> tuple[Tensor, SegmentCache]:
        x = x_t.unsqueeze(1)
        q = apply_rope(self._heads(self.q_proj(x)), state.position, self.rope_theta)
        k = apply_rope(self._heads(self.k_proj(x)), state.position, self.rope_theta)
        keys, values = torch.cat([state.k, k], dim=2), torch.cat([state.v, self._heads(self.v_proj(x))], dim=2)
        o = F.scaled_dot_product_attention(q, keys, values)  # the memory and the whole segment so far
        keys, values = self._turn_over(keys, values, state.position + 1)
        return self._readout(o).squeeze(1), SegmentCache(keys, values, state.position + 1)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> SegmentCache:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return SegmentCache(empty, empty.clone(), 0)

    def _cached(self, context_len: int) -> int:
        """Positions held after ``context_len`` tokens: the previous segment (once there is one) and the
        current segment's tokens."""
        N = self.segment_len
        return min(context_len, N) + (context_len % N if context_len >= N else 0)

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Keys and values of at most 2·segment_len − 1 positions, whatever the context."""
        return 2 * self._cached(context_len) * self.n_heads * self.head_dim * dtype.itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Projections, and per query q·k and p·v over the keys it sees: the previous segment (none in the
        first) and its own segment up to itself. Bytes: weights, x, q k v, y and each segment's keys and
        values read again by the next."""
        T, d, H, D, N = seq_len, self.d_model, self.n_heads, self.head_dim, self.segment_len
        full, rest = divmod(T, N)
        seen = full * N * (N + 1) // 2 + rest * (rest + 1) // 2 + N * max(T - N, 0)  # own segment + the memory
        activations = 5 * T * d + 2 * max(T - N, 0) * d
        return Cost(flops=4 * 2 * T * d * d + 2 * 2 * seen * H * D,
                    bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        d, H, D = self.d_model, self.n_heads, self.head_dim
        seen = self._cached(context_len) + 1
        flops = 4 * 2 * d * d + 2 * 2 * seen * H * D
        traffic = self.weight_bytes(dtype) + (2 * seen * H * D + 2 * d) * dtype.itemsize
        return Cost(flops=flops, bytes=traffic)
