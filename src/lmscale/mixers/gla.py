"""Gated Linear Attention (Yang et al. 2024): linear attention with a data-dependent per-channel decay.

    S_t = diag(g_t) S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_k,   log g_t = logsigmoid(W₂ W₁ x_t + b) / τ
    y_t = W_o (RMSNorm_head(o_t) ⊙ swish(W_r x_t))
Parallel form: o_t = Σ_{s≤t} (q_t ⊙ exp(b_t − b_s))ᵀ k_s v_s / √d_k with b_t = Σ_{u≤t} log g_u.

Options (defaults follow the paper): ``gate_low_rank`` r = 16 is the rank of the decay projection
W₂ W₁; ``gate_temperature`` τ = 16 keeps decays near 1 at initialisation (g ≈ 2^(−1/16) ≈ 0.96), so
the state remembers tens of tokens before training; ``output_gate`` the swish gate W_r (off:
y = W_o RMSNorm_head(o)); ``expand_k`` keys are expand_k · d_model wide (paper: 0.5), values d_model;
``form`` and ``chunk_size`` pick the gated-recurrence form, which all compute the same function.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers.base import Cost, Option, is_positive_int, register
from lmscale.mixers.gated_linear import GatedLinearMixer
from lmscale.ops.gated_recurrence import FORMS, gated_recurrence_elements_moved, gated_recurrence_flops
from lmscale.ops.triton import IMPLS


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@register("gla")
class GatedLinearAttention(GatedLinearMixer):
    """GLA layer; ``form`` picks which gated-recurrence form ``forward`` runs, ``step`` is recurrent."""

    options: ClassVar[dict[str, Option]] = {
        "form": Option.choice("chunk", FORMS),
        "expand_k": Option(0.5, "a positive number", _is_positive_number),
        "chunk_size": Option(64, "a positive integer", is_positive_int),
        "gate_temperature": Option(16.0, "a positive number", _is_positive_number),
        "gate_low_rank": Option(16, "a positive integer", is_positive_int),
        "output_gate": Option(True, "True or False", lambda value: isinstance(value, bool)),
        "impl": Option.choice("auto", IMPLS),
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
        self.form, self.chunk_size, self.impl = opts["form"], opts["chunk_size"], opts["impl"]
        self.gate_temperature, self.gate_low_rank = float(opts["gate_temperature"]), opts["gate_low_rank"]
        self.d_model, self.n_heads, self.key_dim = cfg.d_model, cfg.n_heads, key_dim
        self.head_k_dim, self.head_v_dim = key_dim // cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.decay_proj = nn.Sequential(
            nn.Linear(cfg.d_model, self.gate_low_rank, bias=False),
            nn.Linear(self.gate_low_rank, key_dim, bias=True),
        )
        self.out_gate_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if opts["output_gate"] else None
        self.o_norm = nn.RMSNorm(self.head_v_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, D] -> q, k, log_g [B, H, T, Dk] and v [B, H, T, Dv]."""
        B, T, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, -1).transpose(1, 2)

        log_g = F.logsigmoid(self.decay_proj(x)) / self.gate_temperature
        return heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), heads(log_g)

    def _readout(self, o: Tensor, x: Tensor) -> Tensor:
        """Per-head norm, swish output gate, output projection: o [B, H, T, Dv], x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        o = o.transpose(1, 2).to(self.o_norm.weight.dtype)  # norm at weight precision, also under autocast
        o = self.o_norm(o)  # (B, T, H, Dv)
        if self.out_gate_proj is not None:
            o = o * F.silu(self.out_gate_proj(x)).view(B, T, self.n_heads, self.head_v_dim)
        return self.o_proj(o.reshape(B, T, self.d_model))

    def _projection_flops(self, T: int) -> int:
        """q, k (d -> dk_all); v, o and the output gate (d -> d); the low-rank decay (d -> r -> dk_all)."""
        d, dk_all, r = self.d_model, self.key_dim, self.gate_low_rank
        n_square = 3 if self.out_gate_proj is not None else 2
        return 2 * T * (2 * d * dk_all + n_square * d * d + d * r + r * dk_all)

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Matmul FLOPs of the projections and the op's form (``gated_recurrence_flops``: causal pairs only;
        the dense PyTorch chunk form also multiplies the masked upper triangles). Bytes: weights, x and y,
        the projections' outputs written once and the op's inputs and output (``gated_recurrence_elements_moved``).
        Not counted: logsigmoid, RMSNorm, swish and the decays' exp — elementwise."""
        T, d, H, dk, dv = seq_len, self.d_model, self.n_heads, self.head_k_dim, self.head_v_dim
        core = gated_recurrence_flops(T, H, dk, dv, self.form, self.chunk_size)
        gate = T * d if self.out_gate_proj is not None else 0
        # x in, q k log_g v (and gate) written | the op's traffic | o (and gate) read back, y out
        activations = (T * d + 3 * T * self.key_dim + T * d + gate) + (T * d + gate + T * d)
        activations += gated_recurrence_elements_moved(T, H, dk, dv, self.form, self.chunk_size)
        return Cost(flops=self._projection_flops(T) + core,
                    bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        H, dk, dv, d = self.n_heads, self.head_k_dim, self.head_v_dim, self.d_model
        core = gated_recurrence_flops(1, H, dk, dv, "naive")  # decay-and-add k vᵀ, read Sᵀq: O(1) in context
        # weights, the state read and written, x in, y out
        traffic = self.weight_bytes(dtype) + 2 * self.state_bytes(context_len, dtype) + 2 * d * dtype.itemsize
        return Cost(flops=self._projection_flops(1) + core, bytes=traffic)
