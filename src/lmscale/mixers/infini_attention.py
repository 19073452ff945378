"""Infini-attention (Munkhdalai et al. 2024): softmax attention inside segments, linear attention across them.

The sequence is cut into segments of ``segment_len`` tokens from position 0. Within a segment each query
attends causally to the segment's keys (with RoPE), as in local attention. Across segments a
compressive memory per head, M ∈ ℝ^{d_k×d_v} and a normaliser z ∈ ℝ^{d_k}, holds everything before the
segment and is read by linear attention with σ = ELU + 1:

    A_mem = σ(q)ᵀ M_{s−1} / (σ(q)ᵀ z_{s−1} + ε),      A = g ⊙ A_mem + (1 − g) ⊙ A_local,   g = sigmoid(β_h)

with β a learned scalar per head. When segment s completes, its keys and values are folded in:

    linear:  M_s = M_{s−1} + σ(K_s)ᵀ V_s
    delta:   M_s = M_{s−1} + σ(K_s)ᵀ (V_s − σ(K_s) M_{s−1} / (σ(K_s) z_{s−1} + ε))
    z_s = z_{s−1} + Σ_t σ(k_t)

(the delta rule writes only what the memory does not already return). The memory reads keys and queries
before RoPE: it has no positions. Decoding keeps M, z and the current segment's keys and values, so the
state is bounded by the segment length whatever the context: a KV cache of at most ``segment_len − 1``
tokens beside a linear-attention state.

``forward`` runs segment by segment (the segment-parallel form: one SDPA call and two matmuls per
segment) from any state, including one that stops mid-segment; ``step`` is the token-by-token
reference. They agree (``tests/test_infini_attention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.ops.gated_recurrence.naive import compute_dtype
from lmscale.rope import apply_rope, check_head_dim

EPS = 1e-6
UPDATES = ("linear", "delta")


@dataclass(frozen=True)
class InfiniState:
    """Per head: the memory ``memory`` [B, H, Dk, Dv] and normaliser ``norm`` [B, H, Dk] of every completed
    segment (at least float32), and the current segment's keys (after RoPE), ``k``, pre-RoPE keys ``k_mem`` and
    values ``v`` [B, H, c, Dh], c < segment_len; ``position`` is the number of tokens seen."""

    memory: Tensor
    norm: Tensor
    k: Tensor
    k_mem: Tensor
    v: Tensor
    position: int


def _sigma(x: Tensor) -> Tensor:
    return F.elu(x) + 1


@register("infini_attention")
class InfiniAttention(Mixer):
    """Local softmax attention within segments plus a compressive linear-attention memory across them."""

    options: ClassVar[dict[str, Option]] = {
        "segment_len": Option(256, "a positive integer", is_positive_int),
        "update": Option.choice("delta", UPDATES),
    }
    family = "softmax attention + compressive memory"
    paper = "munkhdalai2024infini"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        check_head_dim(cfg)
        self.layer_idx = layer_idx
        self.segment_len, self.update = opts["segment_len"], opts["update"]
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.gate = nn.Parameter(torch.zeros(cfg.n_heads))  # β: sigmoid(0) mixes memory and local halves

    # ------------------------------------------------------------------------------------------ forms
    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def _read_memory(self, q: Tensor, memory: Tensor, norm: Tensor) -> Tensor:
        """σ(q) M / (σ(q)·z + ε) for q [B, H, T, Dh], in the memory's dtype (float32 or wider)."""
        sq = _sigma(q.to(memory.dtype))
        return (sq @ memory) / ((sq @ norm.unsqueeze(-1)) + EPS)

    def _fold(self, memory: Tensor, norm: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The memory after a completed segment's pre-RoPE keys k and values v [B, H, N, Dh]."""
        sk = _sigma(k.to(memory.dtype))
        v = v.to(memory.dtype)
        if self.update == "delta":
            v = v - (sk @ memory) / ((sk @ norm.unsqueeze(-1)) + EPS)
        return memory + sk.transpose(-1, -2) @ v, norm + sk.sum(dim=2)

    def _mix(self, local: Tensor, from_memory: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).view(1, -1, 1, 1)
        return (g * from_memory + (1 - g) * local.to(from_memory.dtype)).to(local.dtype)

    def _readout(self, o: Tensor) -> Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.d_model))

    def forward(
        self, x: Tensor, state: InfiniState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, InfiniState]:
        B, T, _ = x.shape
        state = state if state is not None else self.init_state(B, x.device, x.dtype)
        start = state.position
        q_mem, k_mem, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        q, k = apply_rope(q_mem, start, self.rope_theta), apply_rope(k_mem, start, self.rope_theta)
        memory, norm = state.memory, state.norm
        cache_k, cache_km, cache_v = state.k, state.k_mem, state.v
        outputs, a = [], 0
        while a < T:
            cached = cache_k.shape[2]  # tokens of this segment seen before this slice
            b = min(T, a + self.segment_len - cached)
            keys = torch.cat([cache_k, k[:, :, a:b]], dim=2)
            values = torch.cat([cache_v, v[:, :, a:b]], dim=2)
            if cached:  # queries a..b−1 sit at offsets cached..cached+(b−a)−1 of the segment
                rows = torch.arange(cached, cached + b - a, device=x.device)[:, None]
                mask = torch.arange(keys.shape[2], device=x.device)[None, :] <= rows
                local = F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=mask)
            else:
                local = F.scaled_dot_product_attention(q[:, :, a:b], keys, values, is_causal=True)
            outputs.append(self._mix(local, self._read_memory(q_mem[:, :, a:b], memory, norm)))
            seg_km = torch.cat([cache_km, k_mem[:, :, a:b]], dim=2)
            if keys.shape[2] == self.segment_len:  # the segment is complete: fold it into the memory
                memory, norm = self._fold(memory, norm, seg_km, values)
                cache_k, cache_km, cache_v = (t[:, :, :0] for t in (keys, seg_km, values))
            else:
                cache_k, cache_km, cache_v = keys, seg_km, values
            a = b
        y = self._readout(torch.cat(outputs, dim=2))
        if not return_state:
            return y
        return y, InfiniState(memory, norm, cache_k, cache_km, cache_v, start + T)

    def step(self, x_t: Tensor, state: InfiniState) -> tuple[Tensor, InfiniState]:
        """One token: append it to the segment, attend over the segment, read the memory, fold if full."""
        x = x_t.unsqueeze(1)
        q_mem, k_mem, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        q = apply_rope(q_mem, state.position, self.rope_theta)
        k = apply_rope(k_mem, state.position, self.rope_theta)
        keys, values = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        seg_km = torch.cat([state.k_mem, k_mem], dim=2)
        scores = (q @ keys.transpose(-1, -2)) * self.head_dim**-0.5  # the token sees its whole segment so far
        local = torch.softmax(scores.to(compute_dtype(scores.dtype)), dim=-1).to(values.dtype) @ values
        o = self._mix(local, self._read_memory(q_mem, state.memory, state.norm))
        memory, norm = state.memory, state.norm
        if keys.shape[2] == self.segment_len:
            memory, norm = self._fold(memory, norm, seg_km, values)
            keys, seg_km, values = (t[:, :, :0] for t in (keys, seg_km, values))
        new_state = InfiniState(memory, norm, keys, seg_km, values, state.position + 1)
        return self._readout(o).squeeze(1), new_state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> InfiniState:
        H, D = self.n_heads, self.head_dim
        empty = torch.zeros(batch_size, H, 0, D, device=device, dtype=dtype)
        wide = compute_dtype(dtype)
        return InfiniState(torch.zeros(batch_size, H, D, D, device=device, dtype=wide),
                           torch.zeros(batch_size, H, D, device=device, dtype=wide),
                           empty, empty.clone(), empty.clone(), 0)

    # ------------------------------------------------------------------------------------------ costs
    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """The memory and normaliser (at least float32) plus the current segment's keys (two copies: with and
        without RoPE) and values: at most segment_len − 1 tokens, whatever the context."""
        H, D = self.n_heads, self.head_dim
        cached = context_len % self.segment_len
        return H * (D * D + D) * compute_dtype(dtype).itemsize + 3 * H * cached * D * dtype.itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Projections; causal attention within segments (q·k and p·v over the pairs a segment holds); the
        memory read (σ(q) M and the normaliser) per token; the fold per completed segment (σ(K)ᵀ V, and for
        the delta rule σ(K) M first). Bytes: weights, x, q k v, y, and per segment the memory read and written."""
        T, d, H, D, N = seq_len, self.d_model, self.n_heads, self.head_dim, self.segment_len
        full, rest = divmod(T, N)
        pairs = full * N * (N + 1) // 2 + rest * (rest + 1) // 2
        local = 2 * 2 * pairs * H * D
        read = 2 * T * H * D * (D + 1)
        fold = full * N * H * 2 * D * D * (2 if self.update == "delta" else 1)
        activations = 5 * T * d + 2 * (full + 1) * H * D * (D + 1)
        return Cost(flops=4 * 2 * T * d * d + local + read + fold,
                    bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """One token: projections, attention over the segment so far (context_len mod N + 1 keys), the memory
        read, and the fold when this token completes a segment."""
        H, D, d, N = self.n_heads, self.head_dim, self.d_model, self.segment_len
        seen = context_len % N + 1
        fold = N * H * 2 * D * D * (2 if self.update == "delta" else 1) if seen == N else 0
        flops = 4 * 2 * d * d + 2 * 2 * seen * H * D + 2 * H * D * (D + 1) + fold
        traffic = self.weight_bytes(dtype) + self.state_bytes(context_len, dtype) + 2 * d * dtype.itemsize
        traffic += 2 * H * (D * D + D) * compute_dtype(dtype).itemsize if seen == N else 0  # the memory rewritten
        return Cost(flops=flops, bytes=traffic)
