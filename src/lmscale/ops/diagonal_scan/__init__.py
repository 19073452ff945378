"""Diagonal linear recurrence h_t = a_t ⊙ h_{t−1} + b_t, elementwise, real or complex.

The scan behind the LRU (complex, time-invariant ``a = λ``) and Mamba/S6 (real, input-dependent
``a = exp(Δ_t A)``). Three forms with one signature
``(a, b, initial_state=None, output_final_state=False) -> (h, final_state)``:

- ``naive``: token by token, the reference (and ``diagonal_scan_step`` for decoding);
- ``parallel``: Hillis–Steele associative scan, log₂ T elementwise passes;
- ``chunk``: pairwise decays inside chunks by cumulative products, states passed across chunks.

Layout ``[B, T, *C]``: time is dim 1, any channel dims follow (LRU ``[B, T, N]``, Mamba
``[B, T, D_inner, N]``); ``a`` only has to broadcast to ``b`` (LRU's λ is ``[N]``). States are
``[B, *C]``. Every form returns ``h`` in the inputs' promoted dtype and the final state in the compute
dtype (at least float32 / complex64). No form contains a matmul: the scan is elementwise work.
"""

from collections.abc import Callable
from functools import partial

from lmscale.ops.diagonal_scan.chunk import chunk_diagonal_scan
from lmscale.ops.diagonal_scan.naive import diagonal_scan_step, naive_diagonal_scan
from lmscale.ops.diagonal_scan.parallel import parallel_diagonal_scan

SCANS = ("chunk", "parallel", "sequential")


def scan_form(name: str, chunk_size: int) -> Callable:
    """The PyTorch form ``name`` (one of ``SCANS``), the chunk form with its chunk size bound."""
    forms = {"chunk": partial(chunk_diagonal_scan, chunk_size=chunk_size),
             "parallel": parallel_diagonal_scan, "sequential": naive_diagonal_scan}
    if name not in forms:
        raise ValueError(f"scan form must be one of {', '.join(SCANS)}, not {name!r}")
    return forms[name]


__all__ = ["SCANS", "chunk_diagonal_scan", "diagonal_scan_step", "naive_diagonal_scan", "parallel_diagonal_scan",
           "scan_form"]
