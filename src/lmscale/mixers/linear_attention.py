"""Linear attention (Katharopoulos et al. 2020): softmax(q·k) replaced by φ(q)·φ(k), so attention is an RNN.

    S_t = S_{t−1} + φ(k_t) v_tᵀ,   z_t = z_{t−1} + φ(k_t),   o_t = S_tᵀ φ(q_t) / (φ(q_t)·z_t + ε)
    y_t = W_o o_t
Parallel form: o_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / (Σ_{s≤t} φ(q_t)·φ(k_s) + ε).

The normaliser is the same ungated recurrence run on a column of ones appended to v: the last column
of S_t is z_t, so the state is one [H, D_k, D_v + 1] matrix and every form of the op computes it.
ε = 1e-6, as in the authors' fast-transformers code, guards tokens whose features are all tiny.

Options: ``feature_map`` φ is "elu+1" (the paper's; positive, so the normaliser is > 0) or "identity";
``normalize`` False drops the division and scales by 1/√D_k instead — the output is then a sum that
grows with t, the variant later work pairs with an output norm, kept for comparison (identity features
need it: their normaliser changes sign). ``form`` and ``chunk_size`` pick the recurrence's form.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig
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

EPS = 1e-6
FEATURE_MAPS = {"elu+1": lambda x: F.elu(x) + 1, "identity": lambda x: x}


@register("linear_attention")
class LinearAttention(Mixer):
    """Kernelised causal attention as a recurrence; ``form`` picks the op's form, ``step`` is recurrent."""

    options: ClassVar[dict[str, Option]] = {
        "feature_map": Option.choice("elu+1", tuple(FEATURE_MAPS)),
        "normalize": Option(True, "True or False", lambda value: isinstance(value, bool)),
        "form": Option.choice("chunk", FORMS),
        "chunk_size": Option(64, "a positive integer", is_positive_int),
        "impl": Option.choice("auto", IMPLS),
    }
    forms_option = "form"
    family = "linear attention"
    paper = "katharopoulos2020transformers"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        if opts["normalize"] and opts["feature_map"] == "identity":
            raise ConfigError("mixer_options['normalize']", True,
                              "dividing by φ(q)·Σφ(k) needs positive features (feature_map='elu+1'); "
                              "with feature_map='identity' the normaliser changes sign and can vanish, "
                              "so set normalize=False")
        self.layer_idx = layer_idx
        self.feature_map, self.normalize = FEATURE_MAPS[opts["feature_map"]], opts["normalize"]
        self.form, self.chunk_size, self.impl = opts["form"], opts["chunk_size"], opts["impl"]
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.state_v_dim = self.head_dim + self.normalize  # the ones column carries the normaliser
        # normalised, a scale cancels in the ratio (and would only shift ε); unnormalised, 1/√D_k as attention
        self.scale = 1.0 if self.normalize else self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> φ(q), φ(k) [B, H, T, Dh] and v [B, H, T, Dh (+ 1 ones column if normalising)]."""
        B, T, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        v = heads(self.v_proj(x))
        if self.normalize:
            v = F.pad(v, (0, 1), value=1.0)
        return self.feature_map(heads(self.q_proj(x))), self.feature_map(heads(self.k_proj(x))), v

    def _readout(self, o: Tensor) -> Tensor:
        """Divide by the normaliser (the last column), merge heads, project: o [B, H, T, Dv'] -> [B, T, D]."""
        B, _, T, _ = o.shape
        if self.normalize:
            o = o[..., :-1] / (o[..., -1:] + EPS)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.d_model))

    def forward(
        self, x: Tensor, state: Tensor | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        q, k, v = self._project(x)
        o, final_state = gated_recurrence(q, k, v, None, form=self.form, scale=self.scale,
                                          chunk_size=self.chunk_size, initial_state=state,
                                          output_final_state=return_state, impl=self.impl)
        y = self._readout(o)
        return (y, final_state) if return_state else y

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v = (t[:, :, 0] for t in self._project(x_t.unsqueeze(1)))  # (B, H, D)
        o_t, state = recurrent_step(q, k, v, None, state, scale=self.scale, impl=self.impl)
        return self._readout(o_t.unsqueeze(2)).squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        shape = (batch_size, self.n_heads, self.head_dim, self.state_v_dim)
        return torch.zeros(shape, device=device, dtype=compute_dtype(dtype))

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """One [H, Dh, Dh + 1] matrix (S and z side by side; Dh without normalising), whatever the context,
        kept in at least float32."""
        return self.n_heads * self.head_dim * self.state_v_dim * compute_dtype(dtype).itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Matmul FLOPs of the q, k, v, o projections and the op's form on values one column wider when
        normalising (``gated_recurrence_flops``: causal pairs only; the dense PyTorch chunk form also
        multiplies the masked upper triangles). Bytes: weights, x, the projections' outputs, the op's
        traffic, y. Not counted: the feature map and the division — elementwise."""
        T, d, H, dk = seq_len, self.d_model, self.n_heads, self.head_dim
        core = gated_recurrence_flops(T, H, dk, self.state_v_dim, self.form, self.chunk_size)
        # x in, q k v written | the op's traffic (no gates) | o read back, y out
        activations = 4 * T * d + 2 * T * d
        activations += gated_recurrence_elements_moved(T, H, dk, self.state_v_dim, self.form, self.chunk_size,
                                                       gate_width=0)
        return Cost(flops=4 * 2 * T * d * d + core, bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        H, dk, d = self.n_heads, self.head_dim, self.d_model
        core = gated_recurrence_flops(1, H, dk, self.state_v_dim, "naive")  # add φ(k) vᵀ, read Sᵀφ(q): O(1)
        # weights, the state read and written, x in, y out
        traffic = self.weight_bytes(dtype) + 2 * self.state_bytes(context_len, dtype) + 2 * d * dtype.itemsize
        return Cost(flops=4 * 2 * d * d + core, bytes=traffic)
