"""The cost models behind ``lmscale bench kernels``' rates: what each op must compute and move (for its
TFLOP/s and GB/s), and where attention's decode time crosses a recurrent step's. Kept apart from the
runner, so the chapter reads them without the machinery that measures."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from lmscale.bench.implementations import CHUNK_SIZE


def recurrence_counts(B: int, T: int, H: int, D: int, gate: str, mode: str, itemsize: int) -> tuple[int, int]:
    """(FLOPs, bytes) of the chunked recurrence: ``gated_recurrence_flops`` / ``_elements_moved`` (chunk
    form, each tensor once). Forward+backward: 3× the forward's FLOPs (the backward's products are twice
    the forward's), and the backward reads q, k, v, g, dO, writes dq, dk, dv, dg and rereads the chunk states."""
    from lmscale.ops.gated_recurrence import gated_recurrence_elements_moved, gated_recurrence_flops

    width = {"channel": D, "head": 1, "none": 0}[gate]
    flops = B * gated_recurrence_flops(T, H, D, D, "chunk", CHUNK_SIZE)
    elements = B * gated_recurrence_elements_moved(T, H, D, D, "chunk", CHUNK_SIZE, gate_width=width)
    if mode == "fwdbwd":
        flops *= 3
        states = 2 * -(-T // CHUNK_SIZE) * H * D * D
        elements += B * (H * T * (7 * D + 2 * width) + states)
    return flops, elements * itemsize


def delta_counts(B: int, T: int, H: int, D: int, mode: str, itemsize: int) -> tuple[int, int]:
    """(FLOPs, bytes) of the chunked delta rule, D_k = D_v = D, per chunk of C and head: the C × C
    products K Kᵀ, Q Kᵀ, T·(βγK), T·(βV) and the causal read of the pseudo-values (2·C²·D each), W S, the
    write Kᵀ U' and the read Q S (2·C·D² each) and the blocked triangular inverse (≈ C³/3). Bytes: q, k, v
    in, o out, the chunk states written and read back once. Forward+backward: 3× the FLOPs; the backward
    reads q, k, v, dO, the states and W, U' and writes dq, dk, dv and the state gradients."""
    C, N = CHUNK_SIZE, -(-T // CHUNK_SIZE)
    flops = B * H * N * (5 * 2 * C * C * D + 3 * 2 * C * D * D + C**3 // 3)
    states = 2 * N * H * D * D
    elements = B * (H * T * 4 * D + states)
    if mode == "fwdbwd":
        flops *= 3
        elements += B * (H * T * 9 * D + 2 * states)
    return flops, elements * itemsize


def attention_counts(B: int, T: int, H: int, D: int, mode: str, itemsize: int) -> tuple[int, int]:
    """Causal attention: 2 products of T²/2 pairs × D, forward; the backward has 5 such products (2.5×).
    Bytes: q, k, v in, o out; the backward reads q, k, v, o, dO and writes dq, dk, dv."""
    flops = B * H * 2 * T * T * D
    elements = B * T * H * 4 * D
    if mode == "fwdbwd":
        flops = flops * 7 // 2
        elements += B * T * H * 8 * D
    return flops, elements * itemsize



@dataclass(frozen=True)
class Crossover:
    """The context from which attention decoding is slower than a recurrent step: ``context`` where the
    measured contexts bracket it, else only a bound (``high``: faster already at the smallest context;
    ``low``: still slower at the largest)."""

    context: float | None
    low: int | None = None
    high: int | None = None

    def __str__(self) -> str:
        if self.context is not None:
            return f"{self.context / 1024:.3g}K"
        return f"below {int(self.high) // 1024}K" if self.high is not None else f"above {int(self.low) // 1024}K"


def crossover_context(contexts: list[int], attention_ms: list[float], recurrent_ms: float) -> Crossover:
    """Where attention's decode time, measured at increasing ``contexts``, reaches ``recurrent_ms``:
    interpolated linearly on log-log axes (attention's time is a power law in the context, O(L) once
    memory-bound) between the two measured contexts around it."""
    points = sorted(zip(contexts, attention_ms))
    if points[0][1] >= recurrent_ms:
        return Crossover(None, high=points[0][0])
    for (l0, t0), (l1, t1) in itertools.pairwise(points):
        if t1 >= recurrent_ms:
            share = (math.log(recurrent_ms) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return Crossover(math.exp(math.log(l0) + share * (math.log(l1) - math.log(l0))))
    return Crossover(None, low=points[-1][0])
