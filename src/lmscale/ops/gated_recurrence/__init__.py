"""Gated linear recurrence S_t = diag(g_t) S_{t-1} + k_t v_tᵀ,  o_t = scale · S_tᵀ q_t.

One recurrence, three forms with the flash-linear-attention signature
``(q, k, v, log_g, scale=None, initial_state=None, output_final_state=False) -> (o, final_state)``:

- ``naive``: token by token, the reference (and ``gated_recurrence_step`` for decoding);
- ``parallel``: the quadratic masked form, attention-like;
- ``chunk``: intra-chunk parallel plus inter-chunk state passing, linear in T.

``gated_recurrence(..., form=..., impl=...)`` picks one by name (``impl`` may send it to the Triton
kernel, ``recurrent_step`` likewise for decoding); ``gated_recurrence_flops`` and
``gated_recurrence_elements_moved`` are what each costs.

Layout ``[B, H, T, D]``: q, k have D_k channels, v has D_v; states are ``[B, H, D_k, D_v]``.
``log_g`` (≤ 0) is the log decay, either per key channel ``[B, H, T, D_k]`` (GLA) or one per head
``[B, H, T]``, broadcast over the key channels (RetNet's fixed γ_h, Mamba-2-style data-dependent
scalar gates); ``None`` means no decay (plain linear attention).
"""

from lmscale.ops.gated_recurrence.chunk import chunk_gated_recurrence
from lmscale.ops.gated_recurrence.forms import (
    FORMS,
    gated_recurrence,
    gated_recurrence_elements_moved,
    gated_recurrence_flops,
    recurrent_step,
)
from lmscale.ops.gated_recurrence.naive import gated_recurrence_step, naive_gated_recurrence
from lmscale.ops.gated_recurrence.parallel import parallel_gated_recurrence

__all__ = [
    "FORMS",
    "chunk_gated_recurrence",
    "gated_recurrence",
    "gated_recurrence_elements_moved",
    "gated_recurrence_flops",
    "gated_recurrence_step",
    "naive_gated_recurrence",
    "parallel_gated_recurrence",
    "recurrent_step",
]
