"""Choosing a form by name, and what each form costs: the two things every mixer around this op needs."""

from __future__ import annotations

from torch import Tensor

from lmscale.ops.cumulative_softmax.chunk import chunk_cumulative_softmax
from lmscale.ops.cumulative_softmax.naive import CumulativeSoftmaxState, naive_cumulative_softmax
from lmscale.ops.cumulative_softmax.parallel import parallel_cumulative_softmax
from lmscale.ops.triton import use_triton

FORMS = ("chunk", "parallel", "naive")


def cumulative_softmax(
    logits: Tensor,
    v: Tensor,
    window: int | None = None,
    form: str = "chunk",
    initial_state: CumulativeSoftmaxState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    impl: str = "torch",
) -> tuple[Tensor, CumulativeSoftmaxState | None]:
    """The op in the named form (one of ``FORMS``); every form returns the same (o, final_state).

    ``impl`` (see ``lmscale.ops.triton``): when it resolves to Triton, the Triton kernels run whatever
    ``form`` says: the global op always, a window from an empty state without a final state (training;
    a windowed decoding state is built by the PyTorch forms).
    """
    windowed_kernel = window is not None and initial_state is None and not output_final_state
    if (window is None or windowed_kernel) and use_triton(impl, v, (v.shape[-1],)):
        if window is None:
            from lmscale.ops.triton.cumulative_softmax import cumulative_softmax as triton_global

            return triton_global(logits, v, initial_state, output_final_state)
        from lmscale.ops.triton.cumulative_softmax_window import windowed_cumulative_softmax

        return windowed_cumulative_softmax(logits, v, window), None
    kwargs = {"window": window, "initial_state": initial_state, "output_final_state": output_final_state}
    if form == "chunk":
        return chunk_cumulative_softmax(logits, v, chunk_size=chunk_size, **kwargs)
    if form == "parallel":
        return parallel_cumulative_softmax(logits, v, **kwargs)
    if form == "naive":
        return naive_cumulative_softmax(logits, v, **kwargs)
    raise ValueError(f"form must be one of {', '.join(FORMS)}, not {form!r}")


def cumulative_softmax_flops(
    seq_len: int, n_heads: int, dim: int, window: int | None, form: str, chunk_size: int = 64
) -> int:
    """FLOPs of the weighted sums of one fresh sequence: 2 per multiply-add of a D + 1 wide [v, 1].

    parallel: one product per (query, key) pair in the window — T(T+1)/2 pairs, or Σ_t min(t+1, k).
    chunk: the causal pairs inside each padded chunk, once (global) or twice (window: prefix and
    suffix passes over blocks of k, chunks of min(C, k)); it runs them as dense C×C matmuls, so a
    FLOP counter sees C² per chunk instead of C(C+1)/2. naive: each token is added once into the
    running sum (window: also into its block's suffixes, and the suffix ⊕ prefix combine once more).
    Rescalings by exp(m_old − m_new), maxima and divisions are elementwise and left out, as in ``Cost``.
    """
    T, H, width = seq_len, n_heads, 2 * (dim + 1)
    if form == "naive":
        return H * T * width * (1 if window is None else 3)
    if form == "parallel":
        k = T if window is None else min(window, T)
        pairs = k * (k + 1) // 2 + (T - k) * k
        return H * pairs * width
    if window is None:
        C = chunk_size
        return H * -(-T // C) * (C * (C + 1) // 2) * width
    C = min(chunk_size, window)
    chunks = -(-T // window) * -(-window // C)
    return 2 * H * chunks * (C * (C + 1) // 2) * width
