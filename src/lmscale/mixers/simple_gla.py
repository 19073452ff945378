"""Gated linear attention with one data-dependent decay per head: Mamba-2's scalar gate (Dao & Gu 2024).

    S_t = α_t S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_k,   log α_t = −exp(A_log_h) · softplus(w_hᵀ x_t + dt_bias_h)
    y_t = W_o (RMSNorm_head(o_t) ⊙ swish(W_r x_t))
Parallel form: O = (Q Kᵀ ⊙ L) V with L_ts = α_{s+1} ⋯ α_t for s ≤ t — the 1-semiseparable mask of
Mamba-2's state-space duality; the decay is a [T, T] matrix per head, not GLA's [T, T, D_k].

The gate is Mamba-2's: a data-dependent step Δ_t = softplus(w_hᵀ x_t + dt_bias_h) times a learned
per-head rate A_h = exp(A_log_h), log α_t = −A_h Δ_t. Initialised as Mamba-2 does — A_h uniform in
[1, 16], softplus(dt_bias_h) log-uniform in [0.001, 0.1] — the heads start with decays from about 0.2
to 0.999 per token: a spread of memory lengths like RetNet's fixed γ_h, but learnable and
input-dependent. GLA's logsigmoid(W x)/16 instead starts every head near 0.96. A_log and dt_bias are
plain parameters, so the model's Linear initialisation (which zeroes biases) keeps this spread.
Mamba-2 also scales its input by Δ_t (B̄ = Δ B); that coupling is left out, so this layer differs from
``gla`` in the gate alone (one decay per head instead of per key channel, keys d_model wide instead of
d_model/2), with the same norm and output gate.
Options: ``form`` and ``chunk_size`` pick the gated-recurrence form, which all compute the same function.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ModelConfig
from lmscale.mixers.base import Cost, Option, is_positive_int, register
from lmscale.mixers.gated_linear import GatedLinearMixer
from lmscale.ops.gated_recurrence import FORMS, gated_recurrence_elements_moved, gated_recurrence_flops
from lmscale.ops.triton import IMPLS

A_INIT_RANGE = (1.0, 16.0)  # Mamba-2's defaults
DT_INIT_RANGE = (1e-3, 1e-1)
DT_INIT_FLOOR = 1e-4


@register("simple_gla")
class SimpleGatedLinearAttention(GatedLinearMixer):
    """GLA with a scalar gate per head; ``form`` picks the op's form ``forward`` runs, ``step`` is recurrent."""

    options: ClassVar[dict[str, Option]] = {
        "form": Option.choice("chunk", FORMS),
        "chunk_size": Option(64, "a positive integer", is_positive_int),
        "impl": Option.choice("auto", IMPLS),
    }
    forms_option = "form"
    family = "gated linear recurrence (scalar)"
    paper = "dao2024mamba2"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        self.layer_idx = layer_idx
        self.form, self.chunk_size, self.impl = opts["form"], opts["chunk_size"], opts["impl"]
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.head_k_dim = self.head_v_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dt_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)
        lo, hi = math.log(DT_INIT_RANGE[0]), math.log(DT_INIT_RANGE[1])
        dt = torch.exp(torch.rand(cfg.n_heads) * (hi - lo) + lo).clamp(min=DT_INIT_FLOOR)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.A_log = nn.Parameter(torch.empty(cfg.n_heads).uniform_(*A_INIT_RANGE).log())
        self.out_gate_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, D] -> q, k, v [B, H, T, Dh] and the per-head log decay log_g [B, H, T]."""
        B, T, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        dt = F.softplus(self.dt_proj(x) + self.dt_bias)  # Δ_t  (B, T, H)
        log_g = -self.A_log.exp() * dt
        return heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), log_g.transpose(1, 2)

    def _readout(self, o: Tensor, x: Tensor) -> Tensor:
        """Per-head norm, swish output gate, output projection: o [B, H, T, Dh], x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        gate = F.silu(self.out_gate_proj(x)).view(B, T, self.n_heads, self.head_dim)
        o = o.transpose(1, 2).to(self.o_norm.weight.dtype)  # norm at weight precision, also under autocast
        return self.o_proj((self.o_norm(o) * gate).reshape(B, T, self.d_model))

    def _projection_flops(self, T: int) -> int:
        """q, k, v, output gate, o (d -> d) and the step sizes (d -> H)."""
        return 2 * T * (5 * self.d_model * self.d_model + self.d_model * self.n_heads)

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Matmul FLOPs of the projections and the op's form (``gated_recurrence_flops``: causal pairs only;
        the dense PyTorch chunk form also multiplies the masked upper triangles). Bytes: weights, x, the
        projections' outputs, the op's traffic (one log decay per head and token), the readout's
        inputs, y. Not counted: softplus, RMSNorm, swish, the decays' exp — elementwise."""
        T, d, H, dh = seq_len, self.d_model, self.n_heads, self.head_dim
        core = gated_recurrence_flops(T, H, dh, dh, self.form, self.chunk_size)
        # x in, q k v gate and log_g written | the op's traffic | o and gate read back, y out
        activations = (5 * T * d + T * H) + 3 * T * d
        activations += gated_recurrence_elements_moved(T, H, dh, dh, self.form, self.chunk_size, gate_width=1)
        return Cost(flops=self._projection_flops(T) + core,
                    bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        H, dh, d = self.n_heads, self.head_dim, self.d_model
        core = gated_recurrence_flops(1, H, dh, dh, "naive")  # decay-and-add k vᵀ, read Sᵀq: O(1) in context
        # weights, the state read and written, x in, y out
        traffic = self.weight_bytes(dtype) + 2 * self.state_bytes(context_len, dtype) + 2 * d * dtype.itemsize
        return Cost(flops=self._projection_flops(1) + core, bytes=traffic)
