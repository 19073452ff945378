"""DeltaNet (Yang et al. 2024) and Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024): linear attention
whose write corrects what the state recalls for a key instead of adding to it.

    q_t, k_t, v_t = SiLU(causal depthwise conv_{conv_size}(W_q x, W_k x, W_v x))_t
    q_t ← q_t / ‖q_t‖,   k_t ← k_t / ‖k_t‖,   β_t = sigmoid(W_β x_t)                  (β, α per head)
    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_k
    y_t = W_o (RMSNorm_head(o_t) ⊙ swish(W_g x_t))

DeltaNet has α_t = 1. Gated DeltaNet decays with a per-head, data-dependent scalar in Mamba-2's
parametrisation, log α_t = −exp(A_log) · softplus(W_a x_t + dt_bias): a learned rate A > 0 times a
positive step Δ_t, so α_t ∈ (0, 1] by construction, the gate can shut (Δ large) or hold (Δ → 0) per token,
and the initialisation (A ~ U(1, 16) as in Mamba-2, Δ ~ log-uniform on [10⁻³, 10⁻¹]) spreads the heads
over time scales 1 / (A·Δ) from under a token to a thousand.
Parallel form: the chunkwise WY form of ``lmscale.ops.delta_rule`` (one chunk of length T is the
quadratic form; its T × T system is triangular, solved by forward substitution).

Options: ``form`` ("chunk" or the token loop "naive"), ``chunk_size`` of the chunk form,
``conv_size``, the short convolution's kernel (1 = no mixing across tokens, a per-channel scale; the
convolution needs the last conv_size − 1 projected inputs, so decoding carries them in the state), and
``impl`` (see ``lmscale.ops.triton.use_triton``): on CUDA the chunked Triton kernels
(``lmscale.ops.triton.delta_rule``, chunks of 64, head dims ≤ 128) run whatever ``form`` says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.ops.delta_rule import chunk_delta_rule, delta_rule_step, naive_delta_rule
from lmscale.ops.gated_recurrence.naive import compute_dtype
from lmscale.ops.triton import DELTA_RULE_MAX_HEAD_DIM, IMPLS, use_triton

FORMS = ("chunk", "naive")
L2_NORM_EPS = 1e-6
DECAY_RATE_INIT = (1.0, 16.0)  # A ~ U(1, 16), Mamba-2's range (a lower bound of 0 could draw log 0)
STEP_INIT = (1e-3, 1e-1)  # Δ ~ log-uniform; floored at 1e-4


@dataclass(frozen=True)
class DeltaNetState:
    """Decoding state of one layer: the fast-weight memory and the short convolution's input window."""

    memory: Tensor  # [B, H, D_k, D_v], at ≥ float32 (the op accumulates there)
    conv: Tensor  # [B, 3 · d_model, conv_size − 1]: the latest projected q, k, v inputs, oldest first


@register("deltanet")
class DeltaNet(Mixer):
    """DeltaNet layer; ``form`` picks which delta-rule form ``forward`` runs, ``step`` is recurrent."""

    options: ClassVar[dict[str, Option]] = {
        "form": Option.choice("chunk", FORMS),
        "chunk_size": Option(64, "a positive integer", is_positive_int),
        "conv_size": Option(4, "a positive integer", is_positive_int),
        "impl": Option.choice("auto", IMPLS),
    }
    forms_option = "form"
    family = "delta rule"
    paper = "yang2024deltanet"
    gated: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        self.layer_idx = layer_idx
        self.form, self.chunk_size, self.conv_size = opts["form"], opts["chunk_size"], opts["conv_size"]
        self.impl = opts["impl"]
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        d, H = cfg.d_model, cfg.n_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        # one depthwise convolution over the q, k, v channels: three independent short filters
        self.conv = nn.Conv1d(3 * d, 3 * d, self.conv_size, groups=3 * d, bias=False)
        self.beta_proj = nn.Linear(d, H, bias=False)
        if self.gated:
            self.a_proj = nn.Linear(d, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H).uniform_(*DECAY_RATE_INIT).log())
            lo, hi = (math.log(x) for x in STEP_INIT)
            step = torch.exp(torch.rand(H) * (hi - lo) + lo).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(step + torch.log(-torch.expm1(-step)))  # softplus⁻¹(Δ)
        self.out_gate_proj = nn.Linear(d, d, bias=False)
        self.o_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _project(
        self, x: Tensor, conv_window: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
        """x [B, T, D] -> q, k, v [B, H, T, Dh], beta, log_alpha [B, H, T] and the next conv window."""
        B, T, d = x.shape
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = qkv.transpose(1, 2)  # (B, 3d, T)
        if conv_window is None:
            conv_window = qkv.new_zeros(B, 3 * d, self.conv_size - 1)
        qkv = torch.cat([conv_window, qkv], dim=-1)  # (B, 3d, conv_size − 1 + T)
        next_window = qkv[..., qkv.shape[-1] - (self.conv_size - 1):]
        qkv = F.silu(self.conv(qkv))  # (B, 3d, T)
        q, k, v = qkv.view(B, 3, self.n_heads, self.head_dim, T).permute(1, 0, 2, 4, 3)  # (B, H, T, Dh) each
        q = F.normalize(q, dim=-1, eps=L2_NORM_EPS)
        k = F.normalize(k, dim=-1, eps=L2_NORM_EPS)
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)  # (B, H, T)
        log_alpha = None
        if self.gated:
            log_alpha = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)  # (B, T, H), < 0
            log_alpha = log_alpha.transpose(1, 2)
        return q, k, v, beta, log_alpha, next_window

    def _readout(self, o: Tensor, x: Tensor) -> Tensor:
        """Per-head norm, swish output gate, output projection: o [B, H, T, Dh], x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        gate = F.silu(self.out_gate_proj(x)).view(B, T, self.n_heads, self.head_dim)
        o = o.transpose(1, 2).to(self.o_norm.weight.dtype)  # norm at weight precision, also under autocast
        o = self.o_norm(o) * gate  # (B, T, H, Dh)
        return self.o_proj(o.reshape(B, T, self.d_model))

    def forward(
        self, x: Tensor, state: DeltaNetState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, DeltaNetState]:
        memory, window = (None, None) if state is None else (state.memory, state.conv)
        q, k, v, beta, log_alpha, window = self._project(x, window)
        if use_triton(self.impl, q, (self.head_dim,), DELTA_RULE_MAX_HEAD_DIM):
            from lmscale.ops.triton.delta_rule import chunk_delta_rule as op

            q, k = q.to(v.dtype), k.to(v.dtype)  # autocast's L2 norm returns float32; the kernel takes one dtype
        else:
            op = {"chunk": partial(chunk_delta_rule, chunk_size=self.chunk_size), "naive": naive_delta_rule}[self.form]
        o, memory = op(q, k, v, beta, log_alpha, initial_state=memory, output_final_state=return_state)
        y = self._readout(o, x)
        return (y, DeltaNetState(memory, window)) if return_state else y

    def step(self, x_t: Tensor, state: DeltaNetState) -> tuple[Tensor, DeltaNetState]:
        q, k, v, beta, log_alpha, window = self._project(x_t.unsqueeze(1), state.conv)
        log_alpha_t = None if log_alpha is None else log_alpha[:, :, 0]
        q, k, v, beta = q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0]  # (B, H, Dh), beta (B, H)
        o_t, memory = delta_rule_step(q, k, v, beta, log_alpha_t, state.memory)
        y_t = self._readout(o_t.unsqueeze(2), x_t.unsqueeze(1)).squeeze(1)
        return y_t, DeltaNetState(memory, window)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> DeltaNetState:
        memory = torch.zeros(batch_size, self.n_heads, self.head_dim, self.head_dim, device=device,
                             dtype=compute_dtype(dtype))
        conv = torch.zeros(batch_size, 3 * self.d_model, self.conv_size - 1, device=device, dtype=dtype)
        return DeltaNetState(memory, conv)

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """An [H, Dh, Dh] memory (kept at ≥ float32) and conv_size − 1 inputs of 3 · d_model channels."""
        memory = self.n_heads * self.head_dim**2 * compute_dtype(dtype).itemsize
        return memory + 3 * self.d_model * (self.conv_size - 1) * dtype.itemsize

    def _projection_flops(self) -> int:
        """Per token: q, k, v, output gate, o (d -> d); β and, gated, Δ (d -> H); the depthwise conv."""
        d, H = self.d_model, self.n_heads
        gates = (2 if self.gated else 1) * d * H
        return 2 * (5 * d * d + gates) + 2 * 3 * d * self.conv_size

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Matmul and convolution FLOPs (see Cost). Naive: per token the recall kᵀS, the rank-1 write
        k uᵀ and the read Sᵀq, 2·Dh² each. Chunk, per (padded) chunk and head: K Kᵀ, Q Kᵀ, W = T·(βγK),
        U = T·(βV), attention over pseudo-values (2·C²·Dh each); W S, the chunk's write Kᵀ U', the state
        read Q S (2·C·Dh² each); and the C × C unit-triangular solve for T, C²·(C − 1). FlopCounterMode
        sees all of it except the triangular solve and the naive form's rank-1 write (elementwise
        broadcasts); neither counts norms, gates, decays or the SiLU."""
        T, d, H, Dh, C = seq_len, self.d_model, self.n_heads, self.head_dim, self.chunk_size
        if self.form == "naive":
            core = H * T * 3 * 2 * Dh * Dh
        else:
            n_chunks = -(-T // C)
            core = H * n_chunks * (5 * 2 * C * C * Dh + 3 * 2 * C * Dh * Dh + C * C * (C - 1))
        gates = (2 if self.gated else 1) * T * H
        # x in, q k v β (Δ) gate out | q k v in and out of the conv | q k v β (α) in, o out | o gate in, y out
        activations = (T * d + 4 * T * d + gates) + 6 * T * d + (3 * T * d + gates + T * d) + 3 * T * d
        if self.form == "chunk":  # the state entering each chunk written, then read back
            activations += 2 * -(-T // C) * H * Dh * Dh
        return Cost(flops=T * self._projection_flops() + core,
                    bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Recall, write and read on the [Dh, Dh] memories, whatever ``context_len``."""
        core = self.n_heads * 3 * 2 * self.head_dim**2
        # weights, the state read and written, x in, y out
        traffic = (self.weight_bytes(dtype) + 2 * self.state_bytes(context_len, dtype)
                   + 2 * self.d_model * dtype.itemsize)
        return Cost(flops=self._projection_flops() + core, bytes=traffic)


@register("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet layer: DeltaNet with a per-head data-dependent decay α_t (see the module docstring)."""

    paper = "yang2024gateddeltanet"
    gated = True
