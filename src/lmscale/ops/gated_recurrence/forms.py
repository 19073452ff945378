"""Choosing an implementation and a form by name, and what each form costs: what every mixer around
this op needs."""

from __future__ import annotations

from torch import Tensor

from lmscale.ops.gated_recurrence.chunk import chunk_gated_recurrence
from lmscale.ops.gated_recurrence.naive import gated_recurrence_step, naive_gated_recurrence
from lmscale.ops.gated_recurrence.parallel import parallel_gated_recurrence
from lmscale.ops.triton import use_triton

FORMS = ("chunk", "parallel", "naive")


def gated_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor | None,
    form: str = "chunk",
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    impl: str = "torch",
) -> tuple[Tensor, Tensor | None]:
    """The recurrence in the named form (one of ``FORMS``); every form returns the same (o, final_state).

    ``impl`` (see ``lmscale.ops.triton``): when it resolves to Triton, the chunked Triton kernel runs
    whatever ``form`` says; ``form`` picks among the PyTorch forms.
    """
    kwargs = {"scale": scale, "initial_state": initial_state, "output_final_state": output_final_state}
    if use_triton(impl, q, (q.shape[-1], v.shape[-1])):
        from lmscale.ops.triton.chunk import CHUNK_SIZES
        from lmscale.ops.triton.chunk import chunk_gated_recurrence as triton_chunk

        # the chunk size changes rounding, not the function: the kernel takes its own where it must
        return triton_chunk(q, k, v, log_g, chunk_size=chunk_size if chunk_size in CHUNK_SIZES else 64, **kwargs)
    if form == "chunk":
        return chunk_gated_recurrence(q, k, v, log_g, chunk_size=chunk_size, **kwargs)
    if form == "parallel":
        return parallel_gated_recurrence(q, k, v, log_g, **kwargs)
    if form == "naive":
        return naive_gated_recurrence(q, k, v, log_g, **kwargs)
    raise ValueError(f"form must be one of {', '.join(FORMS)}, not {form!r}")


def recurrent_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    log_g_t: Tensor | None,
    state: Tensor,
    scale: float | None = None,
    impl: str = "torch",
) -> tuple[Tensor, Tensor]:
    """One decoding step (``gated_recurrence_step``'s signature). The Triton kernel updates a float32
    ``state`` in place and returns it (one launch, capturable in a CUDA graph); PyTorch returns a new one.
    Callers use the returned state either way."""
    if use_triton(impl, q_t, (q_t.shape[-1], v_t.shape[-1])):
        from lmscale.ops.triton.step import gated_recurrence_step as triton_step

        return triton_step(q_t, k_t, v_t, log_g_t, state, scale)
    return gated_recurrence_step(q_t, k_t, v_t, log_g_t, state, scale)


def gated_recurrence_flops(seq_len: int, n_heads: int, d_k: int, d_v: int, form: str, chunk_size: int = 64) -> int:
    """Matmul FLOPs of one sequence through the op (2·m·n·k per product, causal pairs only).

    naive: per token, write k vᵀ and read Sᵀq (2·d_k·d_v each). parallel: per causal pair, q·k and
    score·v. chunk: per padded chunk, the causal pairs inside it, its state (Kᵀ V) and the readout of
    the entering state (Q S). Decays are elementwise and left out, as in ``Cost``.
    """
    T, H, C = seq_len, n_heads, chunk_size
    if form == "naive":
        return H * T * 4 * d_k * d_v
    if form == "parallel":
        return H * (T * (T + 1) // 2) * 2 * (d_k + d_v)
    n_chunks = -(-T // C)
    return H * n_chunks * ((C * (C + 1) // 2) * 2 * (d_k + d_v) + 2 * 2 * C * d_k * d_v)


def gated_recurrence_elements_moved(seq_len: int, n_heads: int, d_k: int, d_v: int, form: str,
                                    chunk_size: int = 64, gate_width: int | None = None) -> int:
    """Elements the op reads and writes once, as a fused kernel would: q, k, v, the log gates, o, and for
    the chunk form the chunk states written and read back. ``gate_width``: log gates per head and token
    (d_k per channel, the default; 1 per head; 0 for none or a constant). Times the dtype size: bytes."""
    T, H = seq_len, n_heads
    gate_width = d_k if gate_width is None else gate_width
    elements = H * T * (2 * d_k + 2 * d_v + gate_width)
    if form == "chunk":
        elements += 2 * -(-T // chunk_size) * H * d_k * d_v
    return elements
