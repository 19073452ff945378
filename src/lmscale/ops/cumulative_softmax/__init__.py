"""Causal cumulative softmax-weighted sums (LEAP's "focus"): a softmax over the past, in O(T).

For logits l_s (one per token and head) and values v_s [D],

    o_t = Σ_{s ∈ W_t} exp(l_s) v_s / Σ_{s ∈ W_t} exp(l_s),   W_t = {s ≤ t}  or  {t−k < s ≤ t} (window k).

Global: two cumulative sums, s_t = s_{t−1} + e^{l_t} v_t and z_t = z_{t−1} + e^{l_t}, o_t = s_t / z_t
(LEAP README eqs. 5–8). Window k: LEAP subtracts the sums at t−k (eqs. 9–15), O(T) independent of k.

Raw exp-cumsums overflow (e^{89} is inf in float32), so every form carries a running maximum m_t and
sums rescaled by exp(m_old − m_new); the difference of cumulative sums is replaced by a combination of
a block suffix and a block prefix, which needs no subtraction (see ``chunk``). Forms, one signature
``(logits, v, window=None, initial_state=None, output_final_state=False) -> (o, final_state)``:

- ``naive``: token by token, the reference (and ``cumulative_softmax_step`` for decoding);
- ``parallel``: the quadratic masked softmax over each window, attention-like;
- ``chunk``: within-chunk softmax matmuls plus running maxima across chunks; windows from block
  prefix and suffix passes, O(T) whatever k.

Layout: logits ``[B, H, T]``, v ``[B, H, T, D]``; outputs in v's dtype, computed in ≥ float32.
The state (``CumulativeSoftmaxState``) is constant-size for the global op and O(k·D) for a window.
"""

from lmscale.ops.cumulative_softmax.chunk import chunk_cumulative_softmax
from lmscale.ops.cumulative_softmax.forms import FORMS, cumulative_softmax, cumulative_softmax_flops
from lmscale.ops.cumulative_softmax.naive import (
    CumulativeSoftmaxState,
    cumulative_softmax_step,
    naive_cumulative_softmax,
)
from lmscale.ops.cumulative_softmax.parallel import parallel_cumulative_softmax

__all__ = [
    "FORMS",
    "CumulativeSoftmaxState",
    "chunk_cumulative_softmax",
    "cumulative_softmax",
    "cumulative_softmax_flops",
    "cumulative_softmax_step",
    "naive_cumulative_softmax",
    "parallel_cumulative_softmax",
]
