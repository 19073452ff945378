"""Additive attention made causal: Fastformer (Wu et al. 2021) with LEAP's cumulative softmax sums (Hu 2022).

Fastformer condenses a sequence into one global query and one global key, each a softmax-weighted sum
over tokens, and mixes them into every token elementwise. LEAP makes those sums causal: position t
summarises only W_t, its past (global) or its last k tokens (window). Per head (D_h = d_model / H):

    q_t, k_t, v_t = W_q x_t, W_k x_t, W_v x_t
    q̄_t = Σ_{s∈W_t} softmax_s(w_qᵀ q_s / √D_h) · q_s          the global query up to t
    p_t = q̄_t ⊙ k_t
    k̄_t = Σ_{s∈W_t} softmax_s(w_kᵀ p_s / √D_h) · p_s          the global key up to t
    y_t = W_o (W_r (k̄_t ⊙ v_t) + q_t)                           Fastformer's transform and query residual

W_t = {s ≤ t} or {t−k < s ≤ t}. Each sum is a ratio of running sums, Σ e^{l_s} x_s / Σ e^{l_s}
(``lmscale.ops.cumulative_softmax``), so decoding carries, per head, a running maximum, the sum and
its normaliser — plus, in a windowed layer, O(k) block aggregates instead of a subtraction that
would cancel catastrophically (see that op). The parallel form is the masked softmax over W_t.

Options:
    window: "auto" — LEAP's heuristic k_l = 4·2^l for layer l, the last layer global; an auto window
        that reaches max_seq_len is global (it could only differ beyond the trained context);
        an integer k ≥ 1 (at most max_seq_len) for every layer; "global" for every layer.
    form: "chunk" (O(T) in T and independent of k), "parallel" (quadratic reference), "naive"
        (token by token); they agree.
    chunk_size: the chunk of the chunk form (a window k uses chunks of min(chunk_size, k)).
    impl: "auto" | "triton" | "torch" (``lmscale.ops.triton.use_triton``): on CUDA the Triton cumulative
        softmax (``lmscale.ops.triton.cumulative_softmax``, ``…_window``): global layers always, windowed
        ones in training (a windowed decoding state comes from the PyTorch forms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers.base import Cost, Mixer, Option, is_positive_int, register
from lmscale.ops.cumulative_softmax import (
    FORMS,
    CumulativeSoftmaxState,
    cumulative_softmax,
    cumulative_softmax_flops,
    cumulative_softmax_step,
)
from lmscale.ops.triton import IMPLS

BASE_WINDOW = 4  # LEAP's heuristic: layer l sees the last 4·2^l tokens


def _is_window(value: object) -> bool:
    if isinstance(value, str):
        return value in ("auto", "global")
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def layer_window(window: str | int, layer_idx: int, n_layers: int, max_seq_len: int) -> int | None:
    """The window of layer ``layer_idx`` (None: global) for the option value ``window``."""
    if window == "global":
        return None
    if window != "auto":
        return int(window)
    k = BASE_WINDOW * 2**layer_idx
    return None if layer_idx == n_layers - 1 or k >= max_seq_len else k


@dataclass(frozen=True)
class LeapState:
    """The two cumulative softmax sums' states: the global query's and the global key's."""

    query: CumulativeSoftmaxState
    key: CumulativeSoftmaxState


@register("leap")
class Leap(Mixer):
    """Causal Fastformer / LEAP layer; ``window`` fixes this layer's k, ``form`` the op's implementation."""

    options: ClassVar[dict[str, Option]] = {
        "window": Option("auto", "'auto', 'global' or an integer ≥ 1", _is_window),
        "form": Option.choice("chunk", FORMS),
        "chunk_size": Option(64, "a positive integer", is_positive_int),
        "impl": Option.choice("auto", IMPLS),
    }
    forms_option = "form"
    family = "additive attention (LEAP)"
    paper = "wu2021fastformer"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        opts = self.read_options(cfg)
        if isinstance(opts["window"], int) and opts["window"] > cfg.max_seq_len:
            raise ConfigError("mixer_options['window']", opts["window"],
                              f"a window longer than max_seq_len={cfg.max_seq_len} is never filled in "
                              "training; use 'global' or a window ≤ max_seq_len")
        self.layer_idx = layer_idx
        self.window = layer_window(opts["window"], layer_idx, cfg.n_layers, cfg.max_seq_len)
        self.form, self.chunk_size, self.impl = opts["form"], opts["chunk_size"], opts["impl"]
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # per-head focus vectors w_q, w_k: one logit per token and head
        bound = self.head_dim**-0.5
        self.query_focus = nn.Parameter(torch.empty(cfg.n_heads, self.head_dim, 1).uniform_(-bound, bound))
        self.key_focus = nn.Parameter(torch.empty(cfg.n_heads, self.head_dim, 1).uniform_(-bound, bound))
        self.r_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def _focus(self, x: Tensor, w: Tensor) -> Tensor:
        """Focus logits x·w / √D_h: x [B, H, T, Dh], w [H, Dh, 1] -> [B, H, T]."""
        return (x @ w).squeeze(-1) * self.head_dim**-0.5

    def _readout(self, key_mix: Tensor, v: Tensor, q: Tensor) -> Tensor:
        """W_o (W_r (k̄ ⊙ v) + q): [B, H, T, Dh] each -> [B, T, D]."""
        B, _, T, _ = q.shape

        def merge(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(B, T, self.d_model)

        return self.o_proj(self.r_proj(merge(key_mix * v)) + merge(q))

    def forward(
        self, x: Tensor, state: LeapState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, LeapState]:
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        kwargs = {"window": self.window, "form": self.form, "chunk_size": self.chunk_size,
                  "output_final_state": return_state, "impl": self.impl}
        q_mix, q_state = cumulative_softmax(self._focus(q, self.query_focus), q,
                                            initial_state=None if state is None else state.query, **kwargs)
        p = q_mix * k  # (B, H, T, Dh)
        k_mix, k_state = cumulative_softmax(self._focus(p, self.key_focus), p,
                                            initial_state=None if state is None else state.key, **kwargs)
        y = self._readout(k_mix, v, q)
        return (y, LeapState(q_state, k_state)) if return_state else y

    def step(self, x_t: Tensor, state: LeapState) -> tuple[Tensor, LeapState]:
        q, k, v = (self._heads(proj(x_t.unsqueeze(1))) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q_mix, q_state = cumulative_softmax_step(self._focus(q, self.query_focus)[:, :, 0], q[:, :, 0],
                                                 state.query, self.window)
        p = q_mix * k[:, :, 0]  # (B, H, Dh)
        k_mix, k_state = cumulative_softmax_step(self._focus(p.unsqueeze(2), self.key_focus)[:, :, 0], p,
                                                 state.key, self.window)
        y = self._readout(k_mix.unsqueeze(2), v, q)
        return y.squeeze(1), LeapState(q_state, k_state)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> LeapState:
        def empty() -> CumulativeSoftmaxState:
            return CumulativeSoftmaxState.empty(batch_size, self.n_heads, self.head_dim, self.window, device, dtype)

        return LeapState(empty(), empty())

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Two op states, kept in at least float32. Global: per head a max and D_h + 1 sums.

        Window k, after L tokens (r = L mod k): per head the current block's aggregate (D_h + 2), its r
        tokens (logit and value, D_h + 1 each) and the previous block's k − 1 − r suffix aggregates
        (none before the first block completes): at most about 2k(D_h + 1), whatever L.
        """
        itemsize = torch.promote_types(dtype, torch.float32).itemsize
        H, Dh, k, L = self.n_heads, self.head_dim, self.window, context_len
        numbers = Dh + 2
        if k is not None:
            r = L % k
            n_suffixes = 0 if L < k else k - 1 - r
            numbers += r * (Dh + 1) + n_suffixes * (Dh + 2)
        return 2 * H * numbers * itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Matmuls: q, k, v, r, o projections, the two focus logits per token and head, and the op's
        weighted sums (``cumulative_softmax_flops``: causal pairs only, while the chunk form runs dense
        C×C chunk products, which a FLOP counter sees in full). Not counted: the elementwise products
        q̄ ⊙ k and k̄ ⊙ v, the exponentials, maxima, rescalings and divisions of the op.
        """
        T, d, H, Dh = seq_len, self.d_model, self.n_heads, self.head_dim
        projections = 5 * 2 * T * d * d
        focus = 2 * 2 * T * d
        op = cumulative_softmax_flops(T, H, Dh, self.window, self.form, self.chunk_size)
        # x in, q k v out | q in, q̄ out | q̄ k in, k̄ out | k̄ v in, u out | u q in, W_r u + q out | y out
        activations = (T * d + 3 * T * d) + 2 * T * d + 3 * T * d + 3 * T * d + 3 * T * d + 2 * T * d
        return Cost(flops=projections + focus + 2 * op,
                    bytes=self.weight_bytes(dtype) + activations * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """One token: the projections and one fold of each op's running sums (window: amortised)."""
        d = self.d_model
        flops = 5 * 2 * d * d + 2 * 2 * d + 2 * cumulative_softmax_flops(1, self.n_heads, self.head_dim,
                                                                           self.window, "naive")
        # weights, both states read and written, x in, y out
        traffic = self.weight_bytes(dtype) + 2 * self.state_bytes(context_len, dtype) + 2 * d * dtype.itemsize
        return Cost(flops=flops, bytes=traffic)
