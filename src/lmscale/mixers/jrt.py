"""JRT-RNN's prefix linear attention (Arora et al. 2024, "Just read twice").

Based's Taylor linear attention (``lmscale.mixers.based``) plus an encoder that reads a prefix of
``prefix_len`` = M tokens non-causally: separate projections k^e, v^e write the whole prefix into the
state before any output reads it, so every output, inside the prefix or after it, sees all of it:

    E = Σ_{s<M} φ(k^e_s) [v^e_s, 1]ᵀ,   D_t = Σ_{s≤t} φ(k_s) [v_s, 1]ᵀ,   [o_t | n_t] = φ(q_t)ᵀ (E + D_t),
    y_t = W_o (o_t / n_t)

Outputs at t < M therefore depend on the prefix tokens after t (by design: the prefix is read, not
predicted); from M on the layer is causal. It declares this as ``noncausal_prefix = True`` and
``prefix_len``: causality holds for outputs at positions ≥ prefix_len. A next-token loss at
positions < M − 1 would see its targets; the paper trains the prefix with a masked-language-model
loss instead, and the next-token loss only after it.

Forward, step and the carried state: the state is ``PrefixState(kv, position)``, kv = E + D_t
[B, H, 1 + F + F², d_head + 1] and the number of tokens seen. Each output sees every prefix token that
has arrived by the time it is computed: ``forward`` adds the prefix positions of its block
(absolute positions < M) to the state before running the causal recurrence, so a forward whose block
holds the whole prefix is exactly the equation above; ``step`` at a position p < M adds token p to E
first, so stepping through the prefix sees only the prefix so far, and leaves the same state as a
forward over the whole prefix. Prefill with a forward that covers the first M tokens, then decode.
``prefix_len = 0`` (default) is plain causal Taylor linear attention, trainable with any next-token loss.

JRT-RNN puts this layer in the linear-attention slots of Based's layer mix (the paper: M = 1024 of
2048); since ``based`` picks its kind by layer index, a hybrid config gives it, e.g. five layers
``layers=["based", "jrt", "based", "based", "based"]`` with ``mixer_options={"jrt": {"prefix_len": M}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers.base import Cost, Option, register
from lmscale.mixers.based import LINEAR_ATTENTION_OPTIONS, TaylorLinearAttention


def _is_non_negative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class PrefixState:
    """kv: E + D [B, H, 1 + F + F², Dh + 1] (numerator | normaliser columns); position: tokens seen."""

    kv: Tensor
    position: int


@register("jrt")
class PrefixLinearAttention(TaylorLinearAttention):
    """Taylor linear attention that reads its first ``prefix_len`` tokens non-causally (module docstring)."""

    options: ClassVar[dict[str, Option]] = {
        "prefix_len": Option(0, "a non-negative integer, at most max_seq_len: how many leading tokens are "
                                "read non-causally", _is_non_negative_int),
        **LINEAR_ATTENTION_OPTIONS,
    }
    forms_option = "form"
    family = "linear attention"
    paper = "arora2024jrt"
    noncausal_prefix: ClassVar[bool] = True  # outputs before position prefix_len see the whole prefix

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        opts = self.read_options(cfg)
        if opts["prefix_len"] > cfg.max_seq_len:
            raise ConfigError("mixer_options['prefix_len']", opts["prefix_len"],
                              f"must be at most max_seq_len={cfg.max_seq_len}: the prefix is part of the context")
        super().__init__(cfg, layer_idx, opts["feature_dim"], opts["form"], opts["chunk_size"], opts["impl"])
        self.prefix_len = opts["prefix_len"]
        if self.prefix_len:  # the encoder's own key and value projections
            self.k_enc_proj = nn.Linear(cfg.d_model, cfg.n_heads * self.feature_dim, bias=False)
            self.v_enc_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _encode(self, x: Tensor) -> Tensor:
        """Prefix tokens x [B, M', D] -> their sum Σ φ(k^e) [v^e, 1]ᵀ [B, H, K, Dh + 1], order-free."""
        phi_k, v1 = self._features(x, self.k_enc_proj, self.v_enc_proj)
        return phi_k.transpose(-1, -2) @ v1

    def _with_prefix(self, x: Tensor, state: PrefixState | None) -> Tensor | None:
        """The state entering the block x [B, T, D]: the carried one plus the block's prefix positions."""
        start = 0 if state is None else state.position
        kv = None if state is None else state.kv
        n_prefix = min(max(self.prefix_len - start, 0), x.shape[1])
        if n_prefix:
            encoded = self._encode(x[:, :n_prefix])
            kv = encoded if kv is None else kv + encoded
        return kv

    def forward(
        self, x: Tensor, state: PrefixState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, PrefixState]:
        start = 0 if state is None else state.position
        y, kv = self._run(x, self._with_prefix(x, state), return_state)
        return (y, PrefixState(kv, start + x.shape[1])) if return_state else y

    def step(self, x_t: Tensor, state: PrefixState) -> tuple[Tensor, PrefixState]:
        y_t, kv = super().step(x_t, self._with_prefix(x_t.unsqueeze(1), state))
        return y_t, PrefixState(kv, state.position + 1)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> PrefixState:
        return PrefixState(super().init_state(batch_size, device, dtype), 0)

    def _encoder_flops(self, n_prefix: int) -> int:
        """k^e, v^e projections and φ(k^e)ᵀ [v^e, 1] over n_prefix tokens."""
        d, HF = self.d_model, self.n_heads * self.feature_dim
        K, V = self.expanded_dim, self.head_dim + 1
        return 2 * n_prefix * d * (HF + d) + self.n_heads * 2 * n_prefix * K * V

    def _encoder_weight_bytes(self, dtype: torch.dtype) -> int:
        if not self.prefix_len:
            return 0
        return (self.k_enc_proj.weight.numel() + self.v_enc_proj.weight.numel()) * dtype.itemsize

    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Taylor linear attention's cost (see ``TaylorLinearAttention.cost``) plus the prefix encoder."""
        causal = super().cost(seq_len, dtype)  # its weight bytes already include the encoder's
        M = min(self.prefix_len, seq_len)
        HF, d, H = self.n_heads * self.feature_dim, self.d_model, self.n_heads
        K, V = self.expanded_dim, self.head_dim + 1
        # k^e, v^e out, then in | E written once (it joins the initial state the recurrence reads)
        encoder = 2 * M * (HF + d) + (H * K * V if M else 0)
        flops = causal.flops + self._encoder_flops(M)
        if M and self.form == "parallel":  # every query also reads E (the chunk form reads it per chunk anyway)
            flops += H * 2 * seq_len * K * V
        return Cost(flops=flops, bytes=causal.bytes + encoder * dtype.itemsize)

    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Inside the prefix the token is also encoded; after it the encoder's weights are not read."""
        causal = super().step_cost(context_len, dtype)
        if context_len >= self.prefix_len:
            return Cost(flops=causal.flops, bytes=causal.bytes - self._encoder_weight_bytes(dtype))
        return Cost(flops=causal.flops + self._encoder_flops(1), bytes=causal.bytes)
