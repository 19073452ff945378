"""The math every mixer shares, each op in several forms that must agree (naive, parallel, chunk)."""

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
