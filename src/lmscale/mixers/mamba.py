"""Mamba (Gu & Dao 2023): a selective state space model — a diagonal SSM whose Δ, B, C depend on the input.

    [x̃, z] = W_in x                                  x̃, z ∈ ℝ^{d_inner}, d_inner = expand · d_model
    u = SiLU(causal depthwise conv_K(x̃))
    Δ = softplus(W_Δ W_r u + b_Δ),   [·, B_t, C_t] = W_r u   (W_r: d_inner -> dt_rank + 2N)
    h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) B_tᵀ       h_t ∈ ℝ^{d_inner × N},  A = −exp(A_log)
    y_t = W_o [(h_t C_t + D ⊙ u_t) ⊙ SiLU(z_t)]

Unrolled, h_t = Σ_{s≤t} exp(A Σ_{r=s+1..t} Δ_r) ⊙ Δ_s u_s B_sᵀ: selective because Δ_t decides per
token how much of the past to keep (large Δ: reset and read the input; small Δ: ignore it).
Discretisation as in the reference implementation (``selective_scan_ref``): zero-order hold for the
state matrix, Ā = exp(ΔA), and the simplified Euler step B̄ = ΔB for the input (ZOH would give
(ΔA)⁻¹(exp(ΔA) − 1) ΔB). The scan runs in at least float32, in the PyTorch form ``scan`` names
or, under ``impl`` (see ``lmscale.ops.triton.use_triton``), fused in one Triton kernel that never
writes the [B, T, d_inner, N] states to memory (``lmscale.ops.triton.selective_scan``).

Initialisation follows the paper: A_n = −(n + 1) (S4D-real) in every channel, D = 1, Δ's bias the
inverse softplus of Δ ~ log-uniform[0.001, 0.1], W_Δ uniform ±dt_rank^−½, dt_rank = ⌈d_model / 16⌉.
The bias is a parameter of its own (``dt_bias``) so that zeroing Linear biases leaves it alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.ops.diagonal_scan import SCANS, diagonal_scan_step, scan_form
from lmscale.ops.triton import IMPLS, use_triton

DT_MIN, DT_MAX, DT_FLOOR = 0.001, 0.1, 1e-4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scan's dtype: at least float32, as in the reference kernel."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class MambaState:
    """What decoding carries: the last conv_size − 1 conv inputs [B, d_inner, K − 1] and h [B, d_inner, N]."""

    conv: Tensor
    ssm: Tensor


@register("mamba")
class Mamba(Mixer):
    """Mamba (S6) layer; ``scan`` picks the diagonal-scan form ``forward`` runs, ``step`` is recurrent.

    ``impl`` chooses the fused Triton scan over the PyTorch ``scan`` form, in ``forward`` and in
    ``step`` (where one launch replaces the discretisation's, update's and readout's half dozen).

    Options: ``d_state`` N per channel (paper: 16); ``expand`` d_inner / d_model (paper: 2);
    ``conv_size`` K, the causal conv's width (paper: 4); ``chunk_size`` for ``scan="chunk"``, small
    because the chunk form holds [B, T, chunk_size, d_inner, N] pairwise decays.
    """

    options: ClassVar[dict[str, Option]] = {
        "scan": Option.choice("chunk", SCANS),
        "impl": Option.choice("auto", IMPLS),
        "d_state": Option(16, "a positive integer", is_positive_int),
        "expand": Option(2, "a positive integer", is_positive_int),
        "conv_size": Option(4, "a positive integer", is_positive_int),
        "chunk_size": Option(16, "a positive integer", is_positive_int),
    }
    forms_option = "scan"
    family = "selective state space"
    paper = "gu2023mamba"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        self.layer_idx = layer_idx
        self.scan, self.impl, self.chunk_size = opts["scan"], opts["impl"], opts["chunk_size"]
        self.d_model = d = cfg.d_model
        self.d_inner = di = opts["expand"] * d
        self.d_state = N = opts["d_state"]
        self.conv_size = K = opts["conv_size"]
        self.dt_rank = R = math.ceil(d / 16)

        self.in_proj = nn.Linear(d, 2 * di, bias=False)  # [x̃, z]
        self.conv1d = nn.Conv1d(di, di, K, groups=di)  # depthwise; causality by left padding
        self.x_proj = nn.Linear(di, R + 2 * N, bias=False)  # [Δ (low rank), B, C]
        self.dt_proj = nn.Linear(R, di, bias=False)
        nn.init.uniform_(self.dt_proj.weight, -(R**-0.5), R**-0.5)
        self.dt_proj.weight._no_reinit = True  # the model keeps the paper's init (see LanguageModel)
        dt = torch.exp(torch.rand(di) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp_min(DT_FLOOR)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.o_proj = nn.Linear(di, d, bias=False)

    def _conv(self, x: Tensor, window: Tensor) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv + SiLU: x [B, T, d_inner], window [B, d_inner, K − 1] -> u [B, T, d_inner], new window."""
        xw = torch.cat([window, x.transpose(1, 2)], dim=2)  # (B, d_inner, K − 1 + T)
        u = F.silu(self.conv1d(xw)).transpose(1, 2)  # (B, T, d_inner)
        return u, xw[:, :, xw.shape[2] - (self.conv_size - 1) :]

    def _selective_inputs(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """u [B, T, d_inner] -> u, Δ [B, T, d_inner], A [d_inner, N], B, C [B, T, N], in the compute dtype."""
        acc = compute_dtype(u.dtype)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt).to(acc) + self.dt_bias.to(acc))  # Δ > 0  (B, T, d_inner)
        A = -self.A_log.to(acc).exp()  # (d_inner, N)
        return u.to(acc), dt, A, B.to(acc), C.to(acc)

    @staticmethod
    def _discretise(u: Tensor, dt: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """Ā, B̄u [B, T, d_inner, N]: what the PyTorch scans take (the fused kernel does this inside)."""
        a = torch.exp(dt.unsqueeze(-1) * A)  # zero-order hold: Ā = exp(ΔA)
        b = (dt * u).unsqueeze(-1) * B.unsqueeze(-2)  # Euler: B̄u = Δ u Bᵀ
        return a, b

    def _readout(self, y: Tensor, u: Tensor, z: Tensor) -> Tensor:
        """W_o[(y + D ⊙ u) ⊙ SiLU(z)]: y = h C, u, z [B, T, d_inner] -> [B, T, D]."""
        y = y + self.D.to(y.dtype) * u.to(y.dtype)  # (B, T, d_inner)
        return self.o_proj(y.to(z.dtype) * F.silu(z))

    def _fused_scan(self, u: Tensor, ssm: Tensor, return_state: bool) -> tuple[Tensor, Tensor | None]:
        """y = h C [B, T, d_inner] and the final h by the Triton kernel, h never in memory."""
        from lmscale.ops.triton.selective_scan import selective_scan

        return selective_scan(*self._selective_inputs(u), initial_state=ssm, output_final_state=return_state)

    def forward(
        self, x: Tensor, state: MambaState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, MambaState]:
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, d_inner) each
        u, window = self._conv(x, state.conv.to(x.dtype))
        if use_triton(self.impl, u):
            y, ssm = self._fused_scan(u, state.ssm, return_state)
        else:
            op = scan_form(self.scan, self.chunk_size)
            u_acc, dt, A, B, C = self._selective_inputs(u)
            a, b = self._discretise(u_acc, dt, A, B)
            h, ssm = op(a, b, initial_state=state.ssm, output_final_state=return_state)  # (B, T, d_inner, N)
            y = (h * C.unsqueeze(-2)).sum(-1)  # (B, T, d_inner)
        y = self._readout(y, u, z)
        return (y, MambaState(window, ssm)) if return_state else y

    def step(self, x_t: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        x, z = self.in_proj(x_t.unsqueeze(1)).chunk(2, dim=-1)  # (B, 1, d_inner) each
        u, window = self._conv(x, state.conv.to(x.dtype))
        if use_triton(self.impl, u):
            y, ssm = self._fused_scan(u, state.ssm, return_state=True)  # a new state: the given one is kept
        else:
            u_acc, dt, A, B, C = self._selective_inputs(u)
            a, b = self._discretise(u_acc, dt, A, B)
            _, ssm = diagonal_scan_step(a[:, 0], b[:, 0], state.ssm)  # (B, d_inner, N)
            y = (ssm * C[:, 0].unsqueeze(-2)).sum(-1).unsqueeze(1)  # (B, 1, d_inner)
        return self._readout(y, u, z).squeeze(1), MambaState(window, ssm)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> MambaState:
        conv = torch.zeros(batch_size, self.d_inner, self.conv_size - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=compute_dtype(dtype))
        return MambaState(conv, ssm)

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """The conv window (activation dtype) and h (at least float32), whatever the context length."""
        conv = self.d_inner * (self.conv_size - 1) * dtype.itemsize
        return conv + self.d_inner * self.d_state * compute_dtype(dtype).itemsize

    def _projection_flops(self, T: int) -> int:
        d, di, N, R, K = self.d_model, self.d_inner, self.d_state, self.dt_rank, self.conv_size
        # in_proj, depthwise conv (K taps per channel), x_proj, dt_proj, o_proj
        return 2 * T * (d * 2 * di + K * di + di * (R + 2 * N) + R * di + di * d)

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Projections and the depthwise conv: the same in every ``scan`` form.

        Not counted, here or by FlopCounterMode: the selective SSM itself, ≈ 7 FLOPs and one exp per
        token and state element (Ā = exp(ΔA), B̄u = Δ u Bᵀ, the scan's multiply-add, the readout h C),
        the scan's share growing log₂ T times in the parallel form and ≈ chunk_size times in the chunk
        form — elementwise work on [T, d_inner, N] with no weight matrix, which a fused kernel keeps
        in registers. It is lower order: ≈ 1.2 N / d_model of the projections (2.4 % at d_model = 768).
        """
        T, d, di, N, R = seq_len, self.d_model, self.d_inner, self.d_state, self.dt_rank
        # x in, x̃ z out | x̃ in, u out | u in, Δ B C out | Δ in, Δ out |
        # scan as one fused kernel: u Δ B C z in, y out | y in, out
        activations = ((T * d + 2 * T * di) + (2 * T * di) + (T * di + T * (R + 2 * N)) + (T * R + T * di)
                       + (3 * T * di + 2 * T * N + T * di) + (T * di + T * d))
        return Cost(flops=self._projection_flops(T), bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        d = self.d_model
        # weights, the state read and written, x in, y out; independent of context_len
        traffic = self.weight_bytes(dtype) + 2 * self.state_bytes(context_len, dtype) + 2 * d * dtype.itemsize
        return Cost(flops=self._projection_flops(1), bytes=traffic)
