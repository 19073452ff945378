"""The chunked gated linear recurrence on the GPU: the PyTorch chunk form's signature, Triton's kernels.

``chunk_gated_recurrence`` here is a drop-in for ``lmscale.ops.gated_recurrence.chunk_gated_recurrence``
(same arguments, same results up to float32 rounding) with a hand-written backward:

forward   states (``chunk_fwd.chunk_states_kernel``) → outputs (``chunk_output_kernel``);
backward  states again → state gradients (``chunk_bwd.chunk_state_grads_kernel``) → dv
          (``chunk_dv_kernel``) → dq, dk, d log g (``chunk_dqkg_kernel``).
Per-channel gates first write their in-chunk cumulative sums (``chunk_cumsum_kernel``, float32, read by
every later kernel instead of log g) and add the intra-chunk score matrix A (``chunk_scores_kernel``,
before the outputs, kept for dv) and its gradient's intra-chunk dq, dk parts
(``chunk_dscores_kernel`` → ``chunk_intra_grads_kernel``, before dq, dk; float32 [B·H, N·C, D_k], alive
for one pass). Sub-chunks whose decay is too steep for the tensor-core form of those two are flagged
and redone by a second launch of the same kernels (``EXACT=True``).

Kept for the backward: q, k, v, the cumulative gates (or log g), the initial state, A and the steep
flags. The chunk states (N+1 [D_k, D_v] per head, stored in the input dtype: ≈2× the size of q at
D = 128, C = 64, bf16) are recomputed, one pass over k and v.

Tensors may be any strided [B, H, T, D] views with unit stride along D — in particular
``x.view(B, T, H, D).transpose(1, 2)`` — and nothing is copied; o, dq, dk, dv are allocated with the
memory layout of v, q, k, v so the caller's transpose back is free. Inputs are float32 (dot products in
IEEE float32) or bfloat16 (bf16 tensor-core dot operands, float32 accumulation and recurrences; the
stored chunk states and their gradients are bf16 then, as they are only read as dot operands).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
from torch import Tensor

from lmscale.ops.triton import MAX_HEAD_DIM, interpreting
from lmscale.ops.triton.chunk_bwd import (
    chunk_dqkg_kernel,
    chunk_dscores_kernel,
    chunk_dv_kernel,
    chunk_intra_grads_kernel,
    chunk_state_grads_kernel,
)
from lmscale.ops.triton.chunk_fwd import (
    GATE_CHANNEL,
    GATE_NONE,
    GATE_SCALAR,
    SUB,
    chunk_cumsum_kernel,
    chunk_output_kernel,
    chunk_scores_kernel,
    chunk_states_kernel,
)

CHUNK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16)
# Tile caps, powers of two. Head dims are cut into blocks of ≤ BLOCK; the kernels that form a C×C score
# matrix over all of D_k for each V block (output, dv) take D_v ≤ SCORES_BLOCK_V in one block so they
# form it once. The tuning knobs for the GPU (tests lower them to reach several blocks at small dims).
BLOCK = 64
SCORES_BLOCK_V = 128
# 8 warps, 2 pipeline stages: at D = 128 (bf16) every kernel then compiles for sm_90 without register
# spills (4 warps spill in the per-channel kernels; 3 stages double the shared memory of the output and
# dv kernels to 128 KiB, one program per SM). Not yet timed against other settings.
LAUNCH = {"num_warps": 8, "num_stages": 2}
# The per-channel sub-chunk kernels (16-row tiles) use tensor cores for every pair; their exact launch,
# for sub-chunks too steep for that, forms the diagonal block as a [16, 16, channels] cube, DIAG_BLOCK
# channels at a time. MIN_SEQUENTIAL_BLOCK: see ``_sequential_blocks``.
DIAG_BLOCK = 32
SUB_LAUNCH = {"num_warps": 4, "num_stages": 2}
MIN_SEQUENTIAL_BLOCK = 32
EXACT_LAUNCH = {"num_warps": 4, "num_stages": 2}


def chunk_gated_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor | None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """S_t = diag(g_t) S_{t−1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t, in Triton kernels.

    q, k: [B, H, T, D_k]; v: [B, H, T, D_v] (D ≤ MAX_HEAD_DIM, any T ≥ 1); log_g ≤ 0: [B, H, T, D_k] (per key
    channel), [B, H, T] (per head) or None; initial_state: [B, H, D_k, D_v]. Returns o [B, H, T, D_v] in
    q's dtype and, if ``output_final_state``, the final state [B, H, D_k, D_v] in float32.
    chunk_size: 16, 32, 64 or 128.
    """
    _check_inputs(q, k, v, log_g, initial_state, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    log_g = None if log_g is None else _unit_last_stride(log_g)
    with _on_device_of(q):
        o, final_state = ChunkGatedRecurrence.apply(q, k, v, log_g, scale, initial_state, chunk_size)
    return o, final_state if output_final_state else None


class ChunkGatedRecurrence(torch.autograd.Function):
    """Autograd for the kernels: gradients for q, k, v, log g and the initial state, honouring the
    gradient that flows into the final state."""

    @staticmethod
    def forward(ctx, q, k, v, log_g, scale, initial_state, chunk_size):
        gate = _gate_mode(log_g)
        ctx.log_g_layout = None
        if gate == GATE_CHANNEL.value:  # the kernels read in-chunk cumulative sums in place of log g
            ctx.log_g_layout = log_g.shape, log_g.stride(), log_g.dtype
            log_g = _chunk_cumulative(log_g, chunk_size)
        states, final_state = _chunk_states(k, v, log_g, initial_state, gate, chunk_size)
        scores, steep = _chunk_scores(q, k, log_g, gate, chunk_size)
        o = _chunk_output(q, k, v, log_g, scores, states, scale, gate, chunk_size)
        ctx.save_for_backward(q, k, v, log_g, initial_state, scores, steep)
        ctx.scale, ctx.chunk_size, ctx.gate = scale, chunk_size, gate
        ctx.set_materialize_grads(False)
        return o, final_state.unflatten(0, q.shape[:2])

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, log_g, initial_state, scores, steep = ctx.saved_tensors
        scale, C, gate = ctx.scale, ctx.chunk_size, ctx.gate
        if do is None:  # only the final state reached the loss
            do = torch.zeros_like(v, dtype=q.dtype)
        do = _unit_last_stride(do.to(q.dtype))
        need_dg = gate != GATE_NONE.value and ctx.needs_input_grad[3]
        with _on_device_of(q):
            states, _ = _chunk_states(k, v, log_g, initial_state, gate, C)
            d_states, d_initial = _chunk_state_grads(q, do, log_g, d_final_state, scale, gate, C)
            dv = _chunk_dv(q, k, v, log_g, scores, do, d_states, scale, gate, C)
            intra = _chunk_intra_grads(q, k, v, log_g, steep, do, scale, gate, C)
            dq, dk, d_log_g = _chunk_dqkg(q, k, v, log_g, do, states, d_states, intra, scale, gate, C, need_dg,
                                          ctx.log_g_layout)
        d_initial_state = None
        if initial_state is not None and ctx.needs_input_grad[5]:
            d_initial_state = d_initial.view_as(initial_state).to(initial_state.dtype)
        return dq, dk, dv, d_log_g, None, d_initial_state, None


def _chunk_cumulative(log_g, C) -> Tensor:
    """Per-channel gates, pass 0: in-chunk cumulative log decays b, float32 [B, H, N·C, D_k]."""
    B, H, T, K = log_g.shape
    N = triton.cdiv(T, C)
    b = log_g.new_empty(B, H, N * C, K, dtype=torch.float32)
    BK = _block(K)
    chunk_cumsum_kernel[(N, B * H, triton.cdiv(K, BK))](
        log_g, b, T, N, H, *_strides(log_g), K=K, C=C, BK=BK, **LAUNCH,
    )
    return b


def _chunk_states(k, v, log_g, initial_state, gate, C) -> tuple[Tensor, Tensor]:
    """Pass 1: states entering each chunk plus the final one, [B·H, N+1, D_k, D_v] in the input dtype,
    and the final state in float32, [B·H, D_k, D_v]."""
    B, H, T, K = k.shape
    V, N = v.shape[-1], triton.cdiv(T, C)
    states = k.new_empty(B * H, N + 1, K, V)
    final_state = k.new_empty(B * H, K, V, dtype=torch.float32)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    BK, BV = _sequential_blocks(k, B * H, K, V)
    chunk_states_kernel[(B * H, triton.cdiv(K, BK), triton.cdiv(V, BV))](
        k, v, _or(log_g, k), _or(h0, states), states, final_state, T, N, H,
        *_strides(k), *_strides(v), *_strides(log_g),
        K=K, V=V, GATE=gate, HAS_H0=h0 is not None, C=C, BK=BK, BV=BV, INTERPRET=interpreting(), **LAUNCH,
    )
    return states, final_state


def _chunk_scores(q, k, log_g, gate, C) -> tuple[Tensor | None, Tensor | None]:
    """Per-channel gates: the intra-chunk scores A, [B·H, N, C, C] in q's dtype, and the flags of the
    sub-chunks too steep for the tensor-core form, int8 [B·H, N, C/SUB] (None, None for other gates)."""
    if gate != GATE_CHANNEL.value:
        return None, None
    B, H, T, K = q.shape
    N = triton.cdiv(T, C)
    scores = q.new_empty(B * H, N, C, C)
    steep = q.new_empty(B * H, N, C // SUB.value, dtype=torch.int8)
    args = (q, k, log_g, scores, steep, T, N, H, *_strides(q), *_strides(k), *_strides(log_g))
    grid = (C // SUB.value, N, B * H)  # a chunk's sub-chunks side by side: they share its keys in L2
    constants = {"K": K, "C": C, "BK": _block(K), "DK": _block(K, DIAG_BLOCK)}
    chunk_scores_kernel[grid](*args, **constants, EXACT=False, **SUB_LAUNCH)
    chunk_scores_kernel[grid](*args, **constants, EXACT=True, **EXACT_LAUNCH)  # the steep sub-chunks
    return scores, steep


def _chunk_output(q, k, v, log_g, scores, states, scale, gate, C) -> Tensor:
    """Pass 2: o [B, H, T, D_v] in q's dtype and v's memory layout."""
    B, H, T, K = q.shape
    V, N = v.shape[-1], states.shape[1] - 1
    o = torch.empty_like(v, dtype=q.dtype)
    BK, BV = _block(K), _block(V, SCORES_BLOCK_V)
    chunk_output_kernel[(N, B * H, triton.cdiv(V, BV))](
        q, k, v, _or(log_g, q), _or(scores, states), states, o, scale, T, N, H,
        *_strides(q), *_strides(k), *_strides(v), *_strides(log_g), *_strides(o),
        K=K, V=V, GATE=gate, C=C, BK=BK, BV=BV, **LAUNCH,
    )
    return o


def _chunk_state_grads(q, do, log_g, d_final_state, scale, gate, C) -> tuple[Tensor, Tensor]:
    """Pass 3: dS_n, the gradient w.r.t. the state leaving chunk n, [B·H, N, D_k, D_v] in the input
    dtype (read as dot operands, like the states), and the initial state's gradient, float32
    [B·H, D_k, D_v]."""
    B, H, T, K = q.shape
    V, N = do.shape[-1], triton.cdiv(T, C)
    d_states = q.new_empty(B * H, N, K, V)
    d_initial = q.new_empty(B * H, K, V, dtype=torch.float32)
    if d_final_state is not None:
        d_final_state = d_final_state.float().contiguous()
    BK, BV = _sequential_blocks(q, B * H, K, V)
    chunk_state_grads_kernel[(B * H, triton.cdiv(K, BK), triton.cdiv(V, BV))](
        q, do, _or(log_g, q), _or(d_final_state, d_initial), d_states, d_initial, scale, T, N, H,
        *_strides(q), *_strides(do), *_strides(log_g),
        K=K, V=V, GATE=gate, HAS_DHT=d_final_state is not None, C=C, BK=BK, BV=BV,
        INTERPRET=interpreting(), **LAUNCH,
    )
    return d_states, d_initial


def _chunk_dv(q, k, v, log_g, scores, do, d_states, scale, gate, C) -> Tensor:
    """Pass 4: dv in v's dtype and memory layout."""
    B, H, T, K = q.shape
    V, N = v.shape[-1], d_states.shape[1]
    dv = torch.empty_like(v)
    BK, BV = _block(K), _block(V, SCORES_BLOCK_V)
    chunk_dv_kernel[(N, B * H, triton.cdiv(V, BV))](
        q, k, _or(log_g, q), _or(scores, d_states), do, d_states, dv, scale, T, N, H,
        *_strides(q), *_strides(k), *_strides(log_g), *_strides(do), *_strides(dv),
        K=K, V=V, GATE=gate, C=C, BK=BK, BV=BV, **LAUNCH,
    )
    return dv


def _chunk_intra_grads(q, k, v, log_g, steep, do, scale, gate, C) -> tuple[Tensor, Tensor] | None:
    """Per-channel gates, pass 5a–b: the intra-chunk parts of dq and dk, float32 [B·H, N·C, D_k] each
    (None for other gates)."""
    if gate != GATE_CHANNEL.value:
        return None
    B, H, T, K = q.shape
    V, N = v.shape[-1], triton.cdiv(T, C)
    d_scores = q.new_empty(B * H, N, C, C, dtype=torch.float32)
    chunk_dscores_kernel[(N, B * H)](
        v, do, d_scores, scale, T, N, H, *_strides(v), *_strides(do), V=V, C=C, BV=_block(V), **LAUNCH,
    )
    dq, dk = (q.new_empty(B * H, N * C, K, dtype=torch.float32) for _ in range(2))
    args = (q, k, log_g, d_scores, steep, dq, dk, T, N, H, *_strides(q), *_strides(k), *_strides(log_g))
    BK = _block(K)
    chunk_intra_grads_kernel[(C // SUB.value * triton.cdiv(K, BK), N, B * H)](
        *args, K=K, C=C, BK=BK, EXACT=False, **SUB_LAUNCH)
    chunk_intra_grads_kernel[(C // SUB.value, N, B * H)](  # the steep sub-chunks
        *args, K=K, C=C, BK=_block(K, DIAG_BLOCK), EXACT=True, **EXACT_LAUNCH)
    return dq, dk


def _chunk_dqkg(q, k, v, log_g, do, states, d_states, intra, scale, gate, C, need_dg, log_g_layout):
    """Pass 5: dq, dk (layouts of q, k) and d log g (None unless ``need_dg``). For per-channel gates
    log_g holds the cumulative sums and ``log_g_layout`` log g's shape, strides and dtype."""
    B, H, T, K = q.shape
    V, N = v.shape[-1], d_states.shape[1]
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    BK, BV = _block(K), _block(V)
    channel = gate == GATE_CHANNEL.value
    dg = None
    if need_dg and channel:
        shape, strides, dtype = log_g_layout
        dg = torch.empty_strided(shape, strides, dtype=dtype, device=q.device)
    elif need_dg:  # per head: one partial sum per K block, added up below
        dg = q.new_empty(triton.cdiv(K, BK), B * H, T, dtype=torch.float32)
    dqi, dki = (states, states) if intra is None else intra
    chunk_dqkg_kernel[(N, B * H, triton.cdiv(K, BK))](
        q, k, v, _or(log_g, q), do, states, d_states, dqi, dki, dq, dk, _or(dg, dq), scale, T, N, H,
        *_strides(q), *_strides(k), *_strides(v), *_strides(log_g), *_strides(do), *_strides(dq),
        *_strides(dk), *_strides(dg if channel else None),
        K=K, V=V, GATE=gate, NEED_DG=need_dg, C=C, BK=BK, BV=BV, **LAUNCH,
    )
    if dg is not None and not channel:
        dg = dg.sum(0).view(B, H, T).to(log_g.dtype)
    return dq, dk, dg


def _on_device_of(x: Tensor):
    """Triton launches on the current CUDA device; make it x's (a process may drive several GPUs)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _gate_mode(log_g: Tensor | None) -> int:
    if log_g is None:
        return GATE_NONE.value
    return (GATE_SCALAR if log_g.ndim == 3 else GATE_CHANNEL).value


def _block(dim: int, cap: int | None = None) -> int:
    """Tile width for a head dimension: a power of two ≥ 16 (tl.dot's minimum), at most ``cap``."""
    return min(cap or BLOCK, max(16, triton.next_power_of_2(dim)))


def _sequential_blocks(x: Tensor, heads: int, *dims: int, cap: int | None = None) -> tuple[int, ...]:
    """Tile widths for the passes that run along time, one program per head and tile of ``dims``:
    ``_block(dim, cap)``, all halved (down to MIN_SEQUENTIAL_BLOCK) while that leaves fewer than one
    program per two multiprocessors (long sequences in small batches). H100, fwd+bwd, 32K tokens per batch:
    GLA (tiles [BK, BV]) at T = 32K (16 heads, 64 programs) 64 → 32 took 6.86 → 6.14 ms and 16 took 10.3;
    at T = 8K (256 programs) 32 cost 5.10 → 6.48. The delta rule (tiles [D_k, BV]) at T = 32K (32
    programs) BV 64 → 32 took 4.71 → 4.44 ms (gated 6.72 → 6.10); at T = 8K (128 programs) 3.0 → 3.3
    (gated 4.0 → 4.7)."""
    if not x.is_cuda:
        return tuple(_block(d, cap) for d in dims)
    sms = _multiprocessors(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return _blocks_filling(sms, heads, dims, cap)


def _blocks_filling(sms: int, heads: int, dims: tuple[int, ...], cap: int | None) -> tuple[int, ...]:
    """``_sequential_blocks``' rule for a GPU of ``sms`` multiprocessors."""
    blocks = [_block(d, cap) for d in dims]
    while 2 * heads * math.prod(map(triton.cdiv, dims, blocks)) < sms and min(blocks) > MIN_SEQUENTIAL_BLOCK:
        blocks = [b // 2 for b in blocks]
    return tuple(blocks)


@functools.cache
def _multiprocessors(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _strides(x: Tensor | None) -> tuple[int, int, int]:
    """Batch, head and time strides of a [B, H, T, …] tensor (zeros for an absent one)."""
    return (0, 0, 0) if x is None else (x.stride(0), x.stride(1), x.stride(2))


def _or(x: Tensor | None, placeholder: Tensor) -> Tensor:
    """A kernel's pointer argument: the tensor, or any tensor the kernel never reads in its place."""
    return placeholder if x is None else x


def _unit_last_stride(x: Tensor) -> Tensor:
    """The kernels index the head dimension with stride 1; other layouts are copied (rare: e.g. expanded
    gradients)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def check_heads(q, k, v, initial_state, max_head_dim: int = MAX_HEAD_DIM) -> None:
    """What every chunked kernel asks of q, k, v and the initial state (each op adds its gates' checks)."""
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError("q, k must be [B, H, T, D_k] and v [B, H, T, D_v]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        raise ValueError(f"q, k, v must share one dtype, float32 or bfloat16; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}: cast them, or use the PyTorch form (impl='torch') for other dtypes")
    B, H, _, K = q.shape
    V = v.shape[-1]
    if max(K, V) > max_head_dim:
        raise ValueError(f"head dims up to {max_head_dim} are supported, got D_k={K}, D_v={V}: split heads "
                         "or use the PyTorch form (impl='torch')")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"initial_state must be [B, H, D_k, D_v] = {(B, H, K, V)}, "
                         f"got {tuple(initial_state.shape)}")
    require_device(q)


def require_device(x: Tensor) -> None:
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {x.device.type}; set TRITON_INTERPRET=1 "
                           "before importing lmscale to interpret them on the CPU, or use the PyTorch form")


def _check_inputs(q, k, v, log_g, initial_state, chunk_size) -> None:
    check_heads(q, k, v, initial_state)
    B, H, T, K = q.shape
    if log_g is not None and (tuple(log_g.shape) not in ((B, H, T, K), (B, H, T))
                              or not log_g.is_floating_point()):
        raise ValueError(f"log_g must be a float tensor [B, H, T, D_k] = {(B, H, T, K)} (per channel) or "
                         f"[B, H, T] = {(B, H, T)} (per head), or None; "
                         f"got {tuple(log_g.shape)} {log_g.dtype}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES} for the Triton kernels, "
                         f"got {chunk_size}")
