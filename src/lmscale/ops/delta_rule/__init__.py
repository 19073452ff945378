"""Delta rule S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,  o_t = scale · S_tᵀ q_t.

The write replaces what the state recalled for k_t by v_t instead of adding to it: with
S' = α_t S_{t−1}, the update is S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ, one step of online regression of v on k.
α_t = 1 is DeltaNet (Yang et al. 2024); a per-head scalar decay α_t = exp(log_α_t) is Gated DeltaNet
(Yang, Kautz & Hatamizadeh 2024). Two forms with the flash-linear-attention signature
``(q, k, v, beta, log_alpha=None, scale=None, initial_state=None, output_final_state=False)
-> (o, final_state)``:

- ``naive``: token by token, the reference (and ``delta_rule_step`` for decoding);
- ``chunk``: the WY / UT-transform form, matmuls inside chunks and state passing across them.

Layout ``[B, H, T, D]``: q, k have D_k channels, v has D_v; beta and log_alpha are ``[B, H, T]``;
states are ``[B, H, D_k, D_v]``. The recurrence is stable when ‖k_t‖ = 1 and 0 ≤ β_t ≤ 2 (then
I − β_t k_t k_tᵀ has eigenvalues in [−1, 1]); the mixers L2-normalise k and take β = sigmoid(·).
"""

from lmscale.ops.delta_rule.chunk import chunk_delta_rule
from lmscale.ops.delta_rule.naive import delta_rule_step, naive_delta_rule

__all__ = ["chunk_delta_rule", "delta_rule_step", "naive_delta_rule"]
