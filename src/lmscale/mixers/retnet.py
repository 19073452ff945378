"""Multi-scale retention, RetNet's mixer (Sun et al. 2023): linear attention with a fixed decay per head.

    S_t = γ_h S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_k,   γ_h = 1 − 2^(−5−h),  h = 0 … H−1
    q_t = R_t W_Q x_t,  k_t = R_t W_K x_t       (R_t: rotation by position t)
    y_t = W_O (swish(W_G x_t) ⊙ GroupNorm_h(o_t))
Parallel form: O = (Q Kᵀ ⊙ D) V with D_ts = γ^(t−s) for s ≤ t, else 0. The heads' decays span
timescales 1/(1 − γ_h) = 32 … 32·2^(H−1) tokens: the "multi-scale" of the name.

Where this follows the paper and where not:
- Q ⊙ Θ, K ⊙ Θ̄ with Θ_t = e^{itθ} (the paper's parallel form, which it relates to xPos with xPos's
  decay folded into γ) is a rotary embedding; we use the repository's RoPE (channel pairs (i, i + d/2),
  θ_i = rope_theta^(−2i/d_k)) and no extra xPos scale: γ_h already damps distant positions.
- Values are d_model wide, not the paper's 2·d_model (it then shrinks the FFN to compensate): with
  d_model the layer has 5·d_model² weights (q, k, v, gate, out), near attention's 4 and GLA's, so
  comparisons hold the MLP fixed.
- The paper also rescales D by 1/√(Σ_s D_ts) and the scores by 1/max(|Σ_s …|, 1) for numerical range;
  both are per (token, head) factors that GroupNorm cancels (up to its ε), and every form here runs in
  at least float32 with decays ≤ 1, so they are left out.
The decoding state carries the position for the rotation next to S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.ops.gated_recurrence import (
    FORMS,
    gated_recurrence,
    gated_recurrence_elements_moved,
    gated_recurrence_flops,
    recurrent_step,
)
from lmscale.ops.gated_recurrence.naive import compute_dtype
from lmscale.ops.triton import IMPLS
from lmscale.rope import apply_rope, check_head_dim


@dataclass(frozen=True)
class RetentionState:
    """S [B, H, Dk, Dv] and the number of tokens each sequence has seen (its next token's rotary position),
    int64 [B] on S's device: a CUDA graph of the step then reads and advances it on the device."""

    S: Tensor
    position: Tensor


@register("retnet")
class Retention(Mixer):
    """Multi-scale retention; ``form`` picks the gated-recurrence form ``forward`` runs, ``step`` is recurrent."""

    options: ClassVar[dict[str, Option]] = {
        "form": Option.choice("chunk", FORMS),
        "chunk_size": Option(64, "a positive integer", is_positive_int),
        "impl": Option.choice("auto", IMPLS),
    }
    forms_option = "form"
    family = "retention"
    paper = "sun2023retnet"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        check_head_dim(cfg)
        self.layer_idx = layer_idx
        self.form, self.chunk_size, self.impl = opts["form"], opts["chunk_size"], opts["impl"]
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.group_norm = nn.GroupNorm(cfg.n_heads, cfg.d_model, eps=cfg.norm_eps)  # one group per head
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def log_gamma(self, like: Tensor) -> Tensor:
        """log γ_h for h = 0 … H−1, [H], computed in at least float32: a constant, not a buffer that a
        bf16 model would round (log γ_h by up to 0.4%; γ_h itself rounds to 1 from h = 4 on)."""
        h = torch.arange(self.n_heads, device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
        return torch.log1p(-(2.0 ** (-5.0 - h)))

    def _project(self, x: Tensor, start: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, D] at positions start … start+T−1 -> q, k, v [B, H, T, Dh] and log_g [B, H, T]."""
        B, T, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x)), start, self.rope_theta)
        k = apply_rope(heads(self.k_proj(x)), start, self.rope_theta)
        log_g = self.log_gamma(x)[None, :, None].expand(B, self.n_heads, T)
        return q, k, heads(self.v_proj(x)), log_g

    def _readout(self, o: Tensor, x: Tensor) -> Tensor:
        """GroupNorm per head, swish gate, output projection: o [B, H, T, Dh], x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        o = o.transpose(1, 2).reshape(B * T, self.d_model).to(self.group_norm.weight.dtype)
        o = self.group_norm(o).view(B, T, self.d_model)  # heads are contiguous channel groups
        return self.o_proj(F.silu(self.gate_proj(x)) * o)

    def forward(
        self, x: Tensor, state: RetentionState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, RetentionState]:
        B = x.shape[0]
        start, S = (x.new_zeros(B, dtype=torch.long), None) if state is None else (state.position, state.S)
        q, k, v, log_g = self._project(x, start)
        o, final_S = gated_recurrence(q, k, v, log_g, form=self.form, chunk_size=self.chunk_size,
                                      initial_state=S, output_final_state=return_state, impl=self.impl)
        y = self._readout(o, x)
        return (y, RetentionState(final_S, start + x.shape[1])) if return_state else y

    def step(self, x_t: Tensor, state: RetentionState) -> tuple[Tensor, RetentionState]:
        q, k, v, log_g = (t[:, :, 0] for t in self._project(x_t.unsqueeze(1), state.position))  # (B, H[, Dh])
        o_t, S = recurrent_step(q, k, v, log_g, state.S, impl=self.impl)
        y_t = self._readout(o_t.unsqueeze(2), x_t.unsqueeze(1)).squeeze(1)
        return y_t, RetentionState(S, state.position + 1)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> RetentionState:
        S = torch.zeros(batch_size, self.n_heads, self.head_dim, self.head_dim, device=device,
                        dtype=compute_dtype(dtype))
        return RetentionState(S, torch.zeros(batch_size, dtype=torch.long, device=device))

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """One [H, Dh, Dh] matrix whatever the context length, kept in at least float32, and the position
        (one int64)."""
        return self.n_heads * self.head_dim * self.head_dim * compute_dtype(dtype).itemsize + 8

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Matmul FLOPs of the q, k, v, gate, o projections and the op's form (``gated_recurrence_flops``:
        causal pairs only; the dense PyTorch chunk form also multiplies the masked upper triangles).
        Bytes: weights, x, the projections' outputs, the op's traffic (the decays are constants), the
        readout's inputs, y. Not counted: RoPE, GroupNorm, swish, the decays' exp — elementwise."""
        T, d, H, dh = seq_len, self.d_model, self.n_heads, self.head_dim
        core = gated_recurrence_flops(T, H, dh, dh, self.form, self.chunk_size)
        # x in, q k v gate written | the op's traffic | o and gate read back, y out
        activations = 5 * T * d + 3 * T * d
        activations += gated_recurrence_elements_moved(T, H, dh, dh, self.form, self.chunk_size, gate_width=0)
        return Cost(flops=5 * 2 * T * d * d + core, bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        H, dh, d = self.n_heads, self.head_dim, self.d_model
        core = gated_recurrence_flops(1, H, dh, dh, "naive")  # decay-and-add k vᵀ, read Sᵀq: O(1) in context
        # weights, the state read and written, x in, y out
        traffic = self.weight_bytes(dtype) + 2 * self.state_bytes(context_len, dtype) + 2 * d * dtype.itemsize
        return Cost(flops=5 * 2 * d * d + core, bytes=traffic)
