"""Gated linear recurrence S_t = diag(g_t) S_{t-1} + k_t v_tᵀ,  o_t = scale · S_tᵀ q_t.

One recurrence, three forms with the flash-linear-attention signature
``(q, k, v, log_g, scale=None, initial_state=None, output_final_state=False) -> (o, final_state)``:

- ``naive``: token by token, the reference (and ``gated_recurrence_step`` for decoding);
- ``parallel``: the quadratic masked form, attention-like;
- ``chunk``: intra-chunk parallel plus inter-chunk state passing, linear in T.

Layout ``[B, H, T, D]``: q, k, log_g have D_k channels, v has D_v; states are ``[B, H, D_k, D_v]``.
``log_g`` (≤ 0) is the per-key-channel log decay; ``None`` means no decay (plain linear attention).
With a decay shared by all channels this covers RetNet and Mamba-2-style scalar gates.
"""

from lmscale.ops.gated_recurrence.chunk import chunk_gated_recurrence
from lmscale.ops.gated_recurrence.naive import gated_recurrence_step, naive_gated_recurrence
from lmscale.ops.gated_recurrence.parallel import parallel_gated_recurrence

__all__ = [
    "chunk_gated_recurrence",
    "gated_recurrence_step",
    "naive_gated_recurrence",
    "parallel_gated_recurrence",
]
