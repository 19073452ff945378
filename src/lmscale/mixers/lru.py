"""Linear Recurrent Unit (Orvieto et al. 2023): a complex diagonal recurrence with a stable parametrisation.

    λ = exp(−exp(ν) + i·exp(θ)),   γ = √(1 − |λ|²)
    h_t = λ ⊙ h_{t−1} + γ ⊙ (B x_t),   y_t = Re(C h_t) + D ⊙ x_t        h_t ∈ ℂᴺ, x_t, y_t ∈ ℝᵈ

Unrolled, h_t = Σ_{s≤t} λ^{t−s} γ B x_s (+ λ^{t+1} h_{−1}): a convolution with a decaying, rotating
kernel, computed by the diagonal scan in the form ``scan`` names. |λ| = exp(−exp(ν)) < 1 for every ν,
so training cannot make the recurrence unstable; γ keeps ‖h‖ of the order of ‖B x‖ as |λ| → 1.

Initialisation (the paper's appendix code): λ uniform on the ring r_min ≤ |λ| ≤ r_max of the complex
plane (|λ|² uniform in [r_min², r_max²]), phase uniform in [0, max_phase]; B, C Glorot-like complex
Gaussians, D standard normal. The paper uses r_min = 0.9, r_max = 0.999 on long-range tasks, the full
phase range 2π by default and max_phase = π/10 on the longest ones. The paper wraps the LRU in a
norm → LRU → GLU block; our block already has the norm and a gated MLP, so this mixer is the bare
LRU, d_model → d_model. γ is computed from λ (the paper's text) rather than trained as a separate
parameter (its appendix code), so the normalisation stays exact as λ moves.

B is ``in_proj`` (d → 2N real: the real and imaginary parts of B x) and C is ``o_proj`` (2N → d on
[Re h, Im h]: Re(C h) = C_re Re h − C_im Im h, the sign absorbed into the learned weight).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.ops.diagonal_scan import SCANS, diagonal_scan_step, scan_form
from lmscale.ops.triton import IMPLS, use_triton


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype the recurrence runs in: complex128 for float64, else complex64."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@register("lru")
class LinearRecurrentUnit(Mixer):
    """LRU layer; ``scan`` picks the diagonal-scan form ``forward`` runs, ``step`` is recurrent.

    ``impl`` chooses the Triton scan (``lmscale.ops.triton``) over the PyTorch form ``scan`` names
    (see ``use_triton``). ``step`` stays in PyTorch under every ``impl``: one complex multiply-add on
    [B, N], two small launches, where a kernel would save one launch and add Triton's launch overhead.

    Options: ``d_state`` N complex state channels (None: d_model); ``r_min``, ``r_max`` the ring of
    initial |λ|; ``max_phase`` the largest initial arg λ; ``chunk_size`` for ``scan="chunk"``.
    """

    options: ClassVar[dict[str, Option]] = {
        "scan": Option.choice("chunk", SCANS),
        "impl": Option.choice("auto", IMPLS),
        "d_state": Option(None, "a positive integer, or None for d_model",
                          lambda value: value is None or is_positive_int(value)),
        "r_min": Option(0.9, "a number in [0, 1)", lambda value: _is_real(value) and 0 <= value < 1),
        "r_max": Option(0.999, "a number in [0, 1)", lambda value: _is_real(value) and 0 <= value < 1),
        "max_phase": Option(2 * math.pi, "a number in (0, 2π]",
                            lambda value: _is_real(value) and 0 < value <= 2 * math.pi),
        "chunk_size": Option(32, "a positive integer", is_positive_int),
    }
    forms_option = "scan"
    family = "linear recurrent unit (diagonal, complex)"
    paper = "orvieto2023lru"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        if opts["r_min"] > opts["r_max"]:
            raise ConfigError("mixer_options['r_min']", opts["r_min"],
                              f"must not exceed r_max={opts['r_max']}: |λ| is drawn from [r_min, r_max]")
        self.layer_idx = layer_idx
        self.scan, self.impl, self.chunk_size = opts["scan"], opts["impl"], opts["chunk_size"]
        self.d_model = d = cfg.d_model
        self.d_state = N = d if opts["d_state"] is None else opts["d_state"]

        # λ: |λ|² uniform in [r_min², r_max²] (uniform on the ring), phase uniform in [0, max_phase]
        r_min, r_max = opts["r_min"], opts["r_max"]
        u1, u2 = torch.rand(N), torch.rand(N)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)))
        self.theta_log = nn.Parameter(torch.log(opts["max_phase"] * u2))
        self.in_proj = nn.Linear(d, 2 * N, bias=False)  # B: [Re B; Im B]
        self.o_proj = nn.Linear(2 * N, d, bias=False)  # C on [Re h, Im h]
        nn.init.normal_(self.in_proj.weight, std=(2 * d) ** -0.5)
        nn.init.normal_(self.o_proj.weight, std=N**-0.5)
        for weight in (self.in_proj.weight, self.o_proj.weight):
            weight._no_reinit = True  # the model keeps the paper's init (see LanguageModel)
        self.D = nn.Parameter(torch.randn(d))

    def _lambda_gamma(self, acc: torch.dtype) -> tuple[Tensor, Tensor]:
        """λ [N] complex and γ = √(1 − |λ|²) [N] real, in the compute dtype ``acc``."""
        nu, theta = self.nu_log.to(acc).exp(), self.theta_log.to(acc).exp()
        lam = torch.polar(torch.exp(-nu), theta)
        gamma = torch.sqrt(-torch.expm1(-2 * nu))  # 1 − |λ|² = 1 − exp(−2 exp ν), exact near |λ| = 1
        return lam, gamma

    def _drive(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, D] -> (λ [N], γ ⊙ B x [B, T, N]) in the complex compute dtype."""
        acc = torch.promote_types(x.dtype, torch.float32)
        lam, gamma = self._lambda_gamma(acc)
        bx = self.in_proj(x).to(acc)  # (B, T, 2N)
        return lam, gamma * torch.complex(bx[..., : self.d_state], bx[..., self.d_state :])

    def _readout(self, h: Tensor, x: Tensor) -> Tensor:
        """y = Re(C h) + D ⊙ x: h [B, T, N] complex, x [B, T, D] -> [B, T, D]."""
        h = torch.cat([h.real, h.imag], dim=-1).to(self.o_proj.weight.dtype)  # (B, T, 2N)
        return self.o_proj(h) + self.D * x

    def forward(
        self, x: Tensor, state: Tensor | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        if use_triton(self.impl, x):
            from lmscale.ops.triton.scan_complex import complex_diagonal_scan as op
        else:
            op = scan_form(self.scan, self.chunk_size)
        lam, u = self._drive(x)
        h, final_state = op(lam, u, initial_state=state, output_final_state=return_state)  # (B, T, N)
        y = self._readout(h, x)
        return (y, final_state) if return_state else y

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        lam, u = self._drive(x_t.unsqueeze(1))
        h_t, state = diagonal_scan_step(lam, u[:, 0], state)  # (B, N)
        return self._readout(h_t.unsqueeze(1), x_t.unsqueeze(1)).squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, self.d_state, device=device, dtype=complex_dtype(dtype))

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """N complex numbers, at least complex64 whatever the activations' dtype."""
        return self.d_state * complex_dtype(dtype).itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """B (d -> 2N) and C (2N -> d) only: the same in every ``scan`` form.

        Not counted, here or by FlopCounterMode: the scan (≈ 8 real FLOPs per complex state channel and
        token in the sequential form, log₂ T times that in the parallel one, ≈ chunk_size times in the
        chunk one), γ, λ and the D skip, all elementwise.
        """
        T, d, N = seq_len, self.d_model, self.d_state
        flops = 2 * T * d * 2 * N + 2 * T * 2 * N * d
        # x in, B x out | B x in, h out (complex: 2 reals) | h in, x in (D skip), y out
        activations = (T * d + 2 * T * N) + (2 * T * N + 2 * T * N) + (2 * T * N + 2 * T * d)
        return Cost(flops=flops, bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        d, N = self.d_model, self.d_state
        flops = 2 * d * 2 * N + 2 * 2 * N * d  # independent of context_len
        # weights, the complex state read and written, x in, y out
        state = 2 * N * complex_dtype(dtype).itemsize
        traffic = self.weight_bytes(dtype) + 2 * d * dtype.itemsize + state
        return Cost(flops=flops, bytes=traffic)
