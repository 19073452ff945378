"""Based (Arora et al. 2024): Taylor linear attention, sliding-window attention and gated convolutions.

A Based model mixes three kinds of layer, chosen by the layer's index:

- ``"linear"``, Taylor linear attention: q, k are projected to ``feature_dim`` (paper: 16) channels per
  head and lifted by the 2nd-order Taylor feature map φ(x) = [1, x / F^¼, vec(x xᵀ) / (√2 √F)], so that
  φ(q)ᵀφ(k) = 1 + s + s²/2 with s = qᵀk/√F, the Taylor expansion of exp(s), and never negative. Then

      S_t = S_{t−1} + φ(k_t) v_tᵀ,   z_t = z_{t−1} + φ(k_t),   o_t = S_tᵀ φ(q_t) / (z_tᵀ φ(q_t))

  (parallel form: o_t = Σ_{s≤t} (1 + s_ts + s_ts²/2) v_s / Σ_{s≤t} (1 + s_ts + s_ts²/2)). The
  denominator is ≥ (t + 1)/2, so no ε is needed. The state is [H, 1 + F + F², d_head + 1] (z rides
  along as a column of ones appended to v), run by ``lmscale.ops.gated_recurrence`` without decay (on
  CUDA its Triton kernel, option ``impl``; φ and the state in float32, except that a bf16 model feeds
  the kernel bf16 features so its products run on tensor cores).
- ``"sliding"``, softmax attention over a small sliding window (``window``, paper: 64): the
  ``attention`` mixer with ``window`` set, so decoding keeps the last ``window`` keys and values.
- ``"conv"``, BaseConv (Arora et al. 2023, Zoology), a gated short convolution:
  y = W_o (silu(conv₃(W_u x)) ⊙ W_g x), with 2·d_model inner channels and a causal depthwise kernel of 3
  taps; decoding keeps the last 2 inputs of the convolution.

``layer_kind(layer_idx, pattern)`` = ``pattern[layer_idx % len(pattern)]``. The default pattern
(conv, linear, sliding, conv, conv) is the period-5 unit of the released configurations
(HazyResearch/based, ``based-360m.yaml``: linear attention in layers 1, 6, 11, 16, 21, sliding windows
in 2, 7, 12, 17, 22, BaseConv elsewhere): 20 % linear attention, 20 % sliding window, 60 % gated
convolutions. Those configs stop the unit after layer 22 (their last layers are all BaseConv) and
write ``window_size=256``, of which their attention looks back half, 128 tokens; the paper's own
setting is the small window of 64 used here. ``state_bytes`` and ``cost`` are those of the layer's
kind; a model's decoding state is their sum over layers: fixed-size linear-attention states and
convolution windows plus window-bounded KV caches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.config import ModelConfig
from lmscale.mixers.attention import Attention
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.ops.gated_recurrence import (
    FORMS,
    gated_recurrence,
    gated_recurrence_elements_moved,
    gated_recurrence_flops,
    gated_recurrence_step,
)
from lmscale.ops.triton import IMPLS, use_triton

KINDS = ("conv", "linear", "sliding")
PAPER_PATTERN = ("conv", "linear", "sliding", "conv", "conv")
MAX_FEATURE_DIM = 32  # φ has 1 + F + F² channels: 273 at the paper's 16, 1057 at 32
CONV_SIZE = 3  # BaseConv's kernel taps
CONV_EXPAND = 2  # BaseConv's inner channels per model channel


def _is_feature_dim(value: object) -> bool:
    return is_positive_int(value) and value <= MAX_FEATURE_DIM


def _is_pattern(value: object) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(kind in KINDS for kind in value)


LINEAR_ATTENTION_OPTIONS = {  # shared with JRT's prefix linear attention
    "feature_dim": Option(16, f"an integer from 1 to {MAX_FEATURE_DIM}: φ has 1 + F + F² channels per head, "
                              "so the state grows as F² (the paper uses 16)", _is_feature_dim),
    "form": Option.choice("chunk", FORMS),
    "chunk_size": Option(64, "a positive integer", is_positive_int),
    "impl": Option.choice("auto", IMPLS),
}


def layer_kind(layer_idx: int, pattern: tuple[str, ...] | list[str] = PAPER_PATTERN) -> str:
    """The kind of Based layer ``layer_idx`` is: the pattern repeated over the depth."""
    return pattern[layer_idx % len(pattern)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Linear-attention states accumulate in at least float32, as the gated-recurrence op does."""
    return torch.promote_types(dtype, torch.float32)


def taylor_feature_map(x: Tensor) -> Tensor:
    """x [..., F] -> φ(x) [..., 1 + F + F²] with φ(q)ᵀφ(k) = 1 + s + s²/2, s = qᵀk / √F."""
    F_ = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # (..., F²), x_i x_j
    return torch.cat([torch.ones_like(x[..., :1]), x / F_**0.25, outer / (2 * F_) ** 0.5], dim=-1)


class TaylorLinearAttention(Mixer):
    """Based's linear-attention layer (see the module docstring); ``form`` picks the op's form."""

    family = "linear attention"
    paper = "arora2024based"

    def __init__(self, cfg: ModelConfig, layer_idx: int, feature_dim: int = 16, form: str = "chunk",
                 chunk_size: int = 64, impl: str = "auto"):
        super().__init__()
        self.layer_idx = layer_idx
        self.form, self.chunk_size, self.impl = form, chunk_size, impl
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.feature_dim = feature_dim
        self.expanded_dim = 1 + feature_dim + feature_dim**2  # K of the recurrence
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, ·)

    def _features(self, x: Tensor, k_proj: nn.Linear, v_proj: nn.Linear) -> tuple[Tensor, Tensor]:
        """x [B, T, D] -> φ(k) [B, H, T, K] and [v, 1] [B, H, T, Dh + 1], in the accumulation dtype."""
        acc = compute_dtype(x.dtype)
        phi_k = taylor_feature_map(self._heads(k_proj(x)).to(acc))
        v = self._heads(v_proj(x)).to(acc)
        return phi_k, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)

    def _queries(self, x: Tensor) -> Tensor:
        return taylor_feature_map(self._heads(self.q_proj(x)).to(compute_dtype(x.dtype)))  # (B, H, T, K)

    def _readout(self, o: Tensor, dtype: torch.dtype) -> Tensor:
        """o [B, H, T, Dh + 1] (numerator | denominator) -> y [B, T, D]."""
        B, _, T, _ = o.shape
        o = o.to(compute_dtype(dtype))
        o = o[..., :-1] / o[..., -1:]  # (B, H, T, Dh); the denominator is ≥ 1/2
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.d_model).to(dtype))

    def _run(self, x: Tensor, initial_state: Tensor | None, return_state: bool) -> tuple[Tensor, Tensor | None]:
        """The causal recurrence over x [B, T, D] from ``initial_state`` [B, H, K, Dh + 1] (None: zeros)."""
        phi_q, (phi_k, v1) = self._queries(x), self._features(x, self.k_proj, self.v_proj)
        if x.dtype == torch.bfloat16 and use_triton(self.impl, phi_q, (phi_q.shape[-1], v1.shape[-1])):
            # the kernel's products on tensor cores: float32 operands would take IEEE float32 dots (H100,
            # JRT's layer: 26.2 ms on the kernel, 27.0 on PyTorch); it still sums and carries its state
            # in float32
            phi_q, phi_k, v1 = phi_q.to(x.dtype), phi_k.to(x.dtype), v1.to(x.dtype)
        o, final_state = gated_recurrence(phi_q, phi_k, v1, None, form=self.form, scale=1.0,
                                          initial_state=initial_state, output_final_state=return_state,
                                          chunk_size=self.chunk_size, impl=self.impl)
        return self._readout(o, x.dtype), final_state

    def forward(
        self, x: Tensor, state: Tensor | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        y, final_state = self._run(x, state, return_state)
        return (y, final_state) if return_state else y

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        x = x_t.unsqueeze(1)
        phi_k, v1 = self._features(x, self.k_proj, self.v_proj)
        o_t, state = gated_recurrence_step(self._queries(x)[:, :, 0], phi_k[:, :, 0], v1[:, :, 0], None,
                                           state, scale=1.0)
        return self._readout(o_t.unsqueeze(2), x_t.dtype).squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        shape = (batch_size, self.n_heads, self.expanded_dim, self.head_dim + 1)
        return torch.zeros(shape, device=device, dtype=compute_dtype(dtype))

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """One [H, 1 + F + F², Dh + 1] matrix (S and z), kept in at least float32, whatever the context."""
        return self.n_heads * self.expanded_dim * (self.head_dim + 1) * compute_dtype(dtype).itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Projections and the recurrence's matmuls.

        Not counted: the feature map (an elementwise outer product, T·H·F² multiplies), the division by
        the normaliser, and in the naive form's count the state write, an outer product that a
        FlopCounter does not see either. A dense implementation of the parallel and chunk forms also
        computes the masked half of each square; that is not counted here.
        """
        T, d, HF = seq_len, self.d_model, self.n_heads * self.feature_dim
        op = (T, self.n_heads, self.expanded_dim, self.head_dim + 1, self.form, self.chunk_size)
        projections = 2 * T * d * (2 * HF + 2 * d)  # q, k: d -> H·F; v, o: d -> d
        # x in, q k v out | the op: φ(q) φ(k) [v,1] in, o out (+ chunk states) | o in, y out
        activations = (T * d + 2 * T * HF + T * d) + gated_recurrence_elements_moved(*op, gate_width=0) + 2 * T * d
        return Cost(flops=projections + gated_recurrence_flops(*op),
                    bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        d, HF = self.d_model, self.n_heads * self.feature_dim
        H, K, V = self.n_heads, self.expanded_dim, self.head_dim + 1
        flops = 2 * d * (2 * HF + 2 * d) + H * 4 * K * V  # projections; write and read the state
        # weights, the state read and written (at accumulation precision), x in, y out
        traffic = (self.weight_bytes(dtype) + 2 * H * K * V * compute_dtype(dtype).itemsize
                   + 2 * d * dtype.itemsize)
        return Cost(flops=flops, bytes=traffic)


class GatedConv(Mixer):
    """BaseConv: y = W_o (silu(conv₃(W_u x)) ⊙ W_g x); its state is the convolution's last 2 inputs."""

    family = "gated convolution"
    paper = "arora2023zoology"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model, self.inner = cfg.d_model, CONV_EXPAND * cfg.d_model
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.inner, bias=True)  # W_u | W_g
        # one kernel per channel, tap j reading position t − (CONV_SIZE − 1) + j; Conv1d's default init
        bound = CONV_SIZE**-0.5
        self.conv_weight = nn.Parameter(torch.empty(self.inner, CONV_SIZE).uniform_(-bound, bound))
        self.o_proj = nn.Linear(self.inner, cfg.d_model, bias=True)

    def forward(
        self, x: Tensor, state: Tensor | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        u, gate = self.in_proj(x).chunk(2, dim=-1)  # (B, T, inner) each
        past = u.new_zeros(x.shape[0], CONV_SIZE - 1, self.inner) if state is None else state
        window = torch.cat([past, u], dim=1)  # (B, CONV_SIZE − 1 + T, inner)
        # the depthwise convolution as one contraction over sliding windows: (B, T, inner, CONV_SIZE) · (inner, CONV_SIZE)
        conv = torch.einsum("btck,ck->btc", window.unfold(1, CONV_SIZE, 1), self.conv_weight)
        y = self.o_proj(F.silu(conv) * gate)
        return (y, window[:, -(CONV_SIZE - 1):].clone()) if return_state else y

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        y, state = self.forward(x_t.unsqueeze(1), state, return_state=True)
        return y.squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, CONV_SIZE - 1, self.inner, device=device, dtype=dtype)

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """The last CONV_SIZE − 1 convolution inputs: (CONV_SIZE − 1) · 2 · d_model elements."""
        return (CONV_SIZE - 1) * self.inner * dtype.itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Projections and the depthwise convolution (2 FLOPs per tap); the gate and silu are not counted."""
        T, d, n = seq_len, self.d_model, self.inner
        flops = 2 * T * (d * 2 * n + n * d) + 2 * T * n * CONV_SIZE
        # x in, u gate out | u in, conv out | conv gate in, y out
        activations = (T * d + 2 * T * n) + (T * n + T * n) + (2 * T * n + T * d)
        return Cost(flops=flops, bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        d, n = self.d_model, self.inner
        flops = 2 * (d * 2 * n + n * d) + 2 * n * CONV_SIZE
        # weights, the window read and written, x in, y out
        traffic = self.weight_bytes(dtype) + (2 * (CONV_SIZE - 1) * n + 2 * d) * dtype.itemsize
        return Cost(flops=flops, bytes=traffic)


@register("based")
class Based(Mixer):
    """One Based layer: the kind ``layer_kind(layer_idx, pattern)`` names, built and run as that mixer.

    Options: ``pattern`` (kinds repeated over the depth; default the paper's unit), ``feature_dim`` (F of
    the linear layers, 1 … 32), ``window`` (the sliding layers' look-back), ``form`` and ``chunk_size``
    (the linear layers' recurrence form; the other kinds have one form) and ``impl`` (the linear layers'
    kernels: ``lmscale.ops.triton.use_triton``; on CUDA the chunked Triton kernel without gates).
    """

    options: ClassVar[dict[str, Option]] = {
        "pattern": Option(PAPER_PATTERN, "a non-empty list of layer kinds, each one of 'conv', 'linear', "
                                         "'sliding', repeated over the depth", _is_pattern),
        "window": Option(64, "a positive integer: how many past positions a sliding-window layer sees",
                         is_positive_int),
        **LINEAR_ATTENTION_OPTIONS,
    }
    forms_option = "form"
    family = "hybrid: Taylor linear attention, sliding-window attention, gated convolution"
    paper = "arora2024based"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        self.layer_idx = layer_idx
        self.kind = layer_kind(layer_idx, opts["pattern"])
        self.layer: Mixer
        if self.kind == "linear":
            self.layer = TaylorLinearAttention(cfg, layer_idx, opts["feature_dim"], opts["form"], opts["chunk_size"],
                                               opts["impl"])
        elif self.kind == "sliding":
            window_cfg = dataclasses.replace(cfg, mixer="attention", mixer_options={"window": opts["window"]})
            self.layer = Attention(window_cfg, layer_idx)
        else:
            self.layer = GatedConv(cfg, layer_idx)

    def forward(self, x: Tensor, state: Any = None, return_state: bool = False) -> Tensor | tuple[Tensor, Any]:
        return self.layer(x, state, return_state)

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self.layer.step(x_t, state)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Any:
        return self.layer.init_state(batch_size, device, dtype)

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """The state of this layer's kind: fixed for ``linear`` and ``conv``, ≤ window positions for ``sliding``."""
        return self.layer.state_bytes(context_len, dtype)

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """The cost of this layer's kind (see ``TaylorLinearAttention.cost``, ``GatedConv.cost``, ``Attention.cost``)."""
        return self.layer.cost(seq_len, dtype)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        return self.layer.step_cost(context_len, dtype)
