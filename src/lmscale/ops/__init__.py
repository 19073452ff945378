"""The math every mixer shares, each op in several forms that must agree (naive, parallel, chunk).

- ``gated_recurrence``: S_t = diag(g_t) S_{t−1} + k_t v_tᵀ (linear attention, RetNet, GLA, Mamba-2-style gates);
- ``delta_rule``: S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ (DeltaNet, Gated DeltaNet);
- ``cumulative_softmax``: running softmax-weighted sums, global or windowed (LEAP / Fastformer);
- ``diagonal_scan``: h_t = a_t ⊙ h_{t−1} + b_t, real or complex (Mamba/S6, LRU).

Import from the subpackage (``from lmscale.ops.delta_rule import chunk_delta_rule``); the gated
recurrence, the most widely used, is also re-exported here.
"""

from lmscale.ops.gated_recurrence import (
    chunk_gated_recurrence,
    gated_recurrence_step,
    naive_gated_recurrence,
    parallel_gated_recurrence,
)

__all__ = [
    "chunk_gated_recurrence",
    "gated_recurrence_step",
    "naive_gated_recurrence",
    "parallel_gated_recurrence",
]
