"""Gated Linear Attention (Yang et al. 2024): linear attention with a data-dependent per-channel decay.

    S_t = diag(g_t) S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_k,   log g_t = logsigmoid(W₂ W₁ x_t + b) / 16
    y_t = W_o (RMSNorm_head(o_t) ⊙ swish(W_r x_t))

The low-rank decay projection (rank 16) and the temperature 16 that keeps decays near 1 at
initialisation follow the paper; keys are ``expand_k`` · d_model wide (paper: 0.5), values d_model.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, register
from lmscale.ops import (
    chunk_gated_recurrence,
    gated_recurrence_step,
    naive_gated_recurrence,
    parallel_gated_recurrence,
)

DECAY_LOW_RANK = 16
DECAY_TEMPERATURE = 16.0
FORMS = ("chunk", "parallel", "naive")


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@register("gla")
class GatedLinearAttention(Mixer):
    """GLA layer; ``form`` picks which gated-recurrence form ``forward`` runs, ``step`` is recurrent."""

    options: ClassVar[dict[str, Option]] = {
        "form": Option.choice("chunk", FORMS),
        "expand_k": Option(0.5, "a positive number", _is_positive_number),
        "chunk_size": Option(64, "a positive integer", _is_positive_int),
    }
    forms_option = "form"
    family = "gated linear recurrence"
    paper = "yang2024gla"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        key_dim = cfg.d_model * opts["expand_k"]
        if key_dim != int(key_dim) or int(key_dim) % cfg.n_heads:
            raise ConfigError("mixer_options['expand_k']", opts["expand_k"],
                              f"d_model · expand_k = {key_dim} must be a whole multiple of "
                              f"n_heads={cfg.n_heads}")
        key_dim = int(key_dim)
        self.layer_idx = layer_idx
        self.form, self.chunk_size = opts["form"], opts["chunk_size"]
        self.d_model, self.n_heads, self.key_dim = cfg.d_model, cfg.n_heads, key_dim
        self.head_k_dim, self.head_v_dim = key_dim // cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.decay_proj = nn.Sequential(
            nn.Linear(cfg.d_model, DECAY_LOW_RANK, bias=False), nn.Linear(DECAY_LOW_RANK, key_dim, bias=True)
        )
        self.out_gate_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_norm = nn.RMSNorm(self.head_v_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, D] -> q, k, log_g [B, H, T, Dk] and v [B, H, T, Dv]."""
        B, T, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, -1).transpose(1, 2)

        log_g = F.logsigmoid(self.decay_proj(x)) / DECAY_TEMPERATURE
        return heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), heads(log_g)

    def _readout(self, o: Tensor, x: Tensor) -> Tensor:
        """Per-head norm, swish output gate, output projection: o [B, H, T, Dv], x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        gate = F.silu(self.out_gate_proj(x)).view(B, T, self.n_heads, self.head_v_dim)
        o = o.transpose(1, 2).to(self.o_norm.weight.dtype)  # norm at weight precision, also under autocast
        o = self.o_norm(o) * gate  # (B, T, H, Dv)
        return self.o_proj(o.reshape(B, T, self.d_model))

    def forward(
        self, x: Tensor, state: Tensor | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        op = {
            "chunk": partial(chunk_gated_recurrence, chunk_size=self.chunk_size),
            "parallel": parallel_gated_recurrence,
            "naive": naive_gated_recurrence,
        }[self.form]
        q, k, v, log_g = self._project(x)
        o, final_state = op(q, k, v, log_g, initial_state=state, output_final_state=return_state)
        y = self._readout(o, x)
        return (y, final_state) if return_state else y

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v, log_g = (t[:, :, 0] for t in self._project(x_t.unsqueeze(1)))  # (B, H, D)
        o_t, state = gated_recurrence_step(q, k, v, log_g, state)
        return self._readout(o_t.unsqueeze(2), x_t.unsqueeze(1)).squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        shape = (batch_size, self.n_heads, self.head_k_dim, self.head_v_dim)
        return torch.zeros(shape, device=device, dtype=dtype)

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """One [H, Dk, Dv] matrix whatever the context length."""
        return self.n_heads * self.head_k_dim * self.head_v_dim * dtype.itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        T, d, dk_all, r = seq_len, self.d_model, self.key_dim, DECAY_LOW_RANK
        H, dk, dv, C = self.n_heads, self.head_k_dim, self.head_v_dim, self.chunk_size
        # q, k (d -> dk_all); v, output gate, o (d -> d); low-rank decay (d -> r -> dk_all)
        projections = 2 * T * (2 * d * dk_all + 3 * d * d + d * r + r * dk_all)
        if self.form == "naive":  # per token: write k vᵀ and read Sᵀq, 2·dk·dv each
            core = H * T * 4 * dk * dv
        elif self.form == "parallel":  # causal pairs: q·k and score·v
            core = H * (T * (T + 1) // 2) * 2 * (dk + dv)
        else:  # per (padded) chunk: intra-chunk pairs, chunk state, state readout
            n_chunks = -(-T // C)
            core = H * n_chunks * ((C * (C + 1) // 2) * 2 * (dk + dv) + 2 * 2 * C * dk * dv)
        # x in, q k log_g v gate out | q k log_g v in, o out | o gate in, y out
        activations = (T * d + 3 * T * dk_all + 2 * T * d) + (3 * T * dk_all + 2 * T * d) + 3 * T * d
        if self.form == "chunk":  # chunk states written, then read back
            activations += 2 * -(-T // C) * H * dk * dv
        return Cost(flops=projections + core, bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        d, dk_all, r = self.d_model, self.key_dim, DECAY_LOW_RANK
        H, dk, dv = self.n_heads, self.head_k_dim, self.head_v_dim
        projections = 2 * (2 * d * dk_all + 3 * d * d + d * r + r * dk_all)
        core = H * 4 * dk * dv  # decay-and-add k vᵀ, then read Sᵀq: independent of context_len
        # weights, the state read and written, x in, y out
        traffic = self.weight_bytes(dtype) + (2 * H * dk * dv + 2 * d) * dtype.itemsize
        return Cost(flops=projections + core, bytes=traffic)
