"""The chunked delta rule on the GPU: the PyTorch chunk form's signature, Triton's kernels.

``chunk_delta_rule`` here is a drop-in for ``lmscale.ops.delta_rule.chunk_delta_rule`` (same arguments,
same results up to rounding) with a hand-written backward:

forward   T = (I + A)⁻¹ (``delta_rule_fwd.delta_inverse_kernel``) → W, U (``delta_wu_kernel``) → states
          and pseudo-values U' (``delta_states_kernel``, sequential) → outputs (the gated recurrence's
          ``chunk_output_kernel`` with U' as the values);
backward  scale · Pᵀ dO (``delta_rule_bwd.delta_intra_grads_kernel``) → state gradients and dU'
          (``delta_state_grads_kernel``, sequential) → dq, dk, dv, dβ, d log α (``delta_grads_kernel``).

Kept for the backward: q, k, v, β, log α, T (float32 [B·H, N, 64, 64]), W, the states entering each
chunk and U' (input dtype). The chunk is 64 positions whatever ``chunk_size`` says: it changes
rounding, not the function. Layouts as in ``chunk``: strided [B, H, T, D] views with unit stride along
D, and β, log α any strided [B, H, T]; nothing is copied. Inputs float32 (IEEE float32 dots) or bfloat16
(bf16 tensor-core operands, float32 accumulation and recurrences). Head dims ≤ ``MAX_HEAD_DIM``: the
sequential passes hold every key channel of a state block in registers.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from lmscale.ops.triton import DELTA_RULE_MAX_HEAD_DIM as MAX_HEAD_DIM
from lmscale.ops.triton import interpreting
from lmscale.ops.triton.chunk import (
    LAUNCH,
    _block,
    _on_device_of,
    _or,
    _sequential_blocks,
    _strides,
    _unit_last_stride,
    check_heads,
)
from lmscale.ops.triton.chunk_fwd import GATE_NONE, GATE_SCALAR, chunk_output_kernel
from lmscale.ops.triton.delta_rule_bwd import (
    delta_grads_kernel,
    delta_intra_grads_kernel,
    delta_state_grads_kernel,
)
from lmscale.ops.triton.delta_rule_fwd import delta_inverse_kernel, delta_states_kernel, delta_wu_kernel

CHUNK = 64
# V-block of the sequential passes, which hold a [D_k, BV] float32 state block in registers (halved when
# few programs for the multiprocessors: ``_sequential_blocks``), and of the gradient kernel's loop over
# value channels. A GPU tuning knob (tests lower it to reach several blocks).
SEQUENTIAL_BLOCK_V = 64
# 2 warps: H100, gated fwd+bwd at T = 2K 4.97 → 4.72 ms (4 warps → 2; 8 took 5.59)
INVERSE_LAUNCH = {"num_warps": 2, "num_stages": 2}


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK,
) -> tuple[Tensor, Tensor | None]:
    """S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t, in Triton kernels.

    q, k: [B, H, T, D_k]; v: [B, H, T, D_v] (D ≤ 128, any T ≥ 1); beta, log_alpha (≤ 0, or None):
    [B, H, T]; initial_state: [B, H, D_k, D_v]. Returns o [B, H, T, D_v] in q's dtype and, if
    ``output_final_state``, the final state [B, H, D_k, D_v] in float32.
    """
    del chunk_size  # the kernels' chunk is CHUNK (see the module docstring)
    _check_inputs(q, k, v, beta, log_alpha, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    with _on_device_of(q):
        o, final_state = ChunkDeltaRule.apply(q, k, v, beta, log_alpha, scale, initial_state)
    return o, final_state if output_final_state else None


class ChunkDeltaRule(torch.autograd.Function):
    """Autograd for the kernels: gradients for q, k, v, β, log α and the initial state, honouring the
    gradient that flows into the final state."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, scale, initial_state):
        t_inv = _inverse(k, beta, log_alpha)
        w, u = _w_u(k, v, beta, log_alpha, t_inv)
        states, pseudo, final_state = _states(k, w, u, log_alpha, initial_state)
        del u
        o = _output(q, k, v, pseudo, log_alpha, states, scale)
        ctx.save_for_backward(q, k, v, beta, log_alpha, initial_state, t_inv, w, states, pseudo)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, final_state.unflatten(0, q.shape[:2])

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, beta, log_alpha, initial_state, t_inv, w, states, pseudo = ctx.saved_tensors
        if do is None:  # only the final state reached the loss
            do = torch.zeros_like(v, dtype=q.dtype)
        do = _unit_last_stride(do.to(q.dtype))
        with _on_device_of(q):
            d_states, d_pseudo, d_initial = _state_grads(q, k, w, do, log_alpha, d_final_state, ctx.scale)
            need_da = log_alpha is not None and ctx.needs_input_grad[4]
            dq, dk, dv, dbeta, dlog_alpha = _grads(q, k, v, beta, log_alpha, t_inv, states, d_states, pseudo,
                                                   d_pseudo, do, ctx.scale, need_da)
        d_initial_state = None
        if initial_state is not None and ctx.needs_input_grad[6]:
            d_initial_state = d_initial.view_as(initial_state).to(initial_state.dtype)
        return dq, dk, dv, dbeta, dlog_alpha, None, d_initial_state


def _inverse(k, beta, log_alpha) -> Tensor:
    """Pass 1: T = (I + A)⁻¹ per chunk, float32 [B·H, N, C, C]."""
    B, H, T, K = k.shape
    N = triton.cdiv(T, CHUNK)
    t_inv = k.new_empty(B * H, N, CHUNK, CHUNK, dtype=torch.float32)
    delta_inverse_kernel[(N, B * H)](
        k, beta, _or(log_alpha, beta), t_inv, T, N, H, *_strides(k), *_strides(beta), *_strides(log_alpha),
        K=K, GATED=log_alpha is not None, C=CHUNK, BK=_block(K, 256), **INVERSE_LAUNCH,
    )
    return t_inv


def _w_u(k, v, beta, log_alpha, t_inv) -> tuple[Tensor, Tensor]:
    """Pass 2: W = T diag(βγ) K and U = T diag(β) V, [B, H, T, D] contiguous in the input dtype."""
    B, H, T, K = k.shape
    V, N = v.shape[-1], t_inv.shape[1]
    w, u = k.new_empty(B, H, T, K), k.new_empty(B, H, T, V)
    delta_wu_kernel[(N, B * H)](
        k, v, beta, _or(log_alpha, beta), t_inv, w, u, T, N, H,
        *_strides(k), *_strides(v), *_strides(beta), *_strides(log_alpha), *_strides(w), *_strides(u),
        K=K, V=V, GATED=log_alpha is not None, C=CHUNK, BK=_block(K), BV=_block(V), **LAUNCH,
    )
    return w, u


def _states(k, w, u, log_alpha, initial_state) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 3: states entering each chunk (and the last), [B·H, N+1, D_k, D_v] in the input dtype, the
    pseudo-values U' [B, H, T, D_v] and the final state, float32 [B·H, D_k, D_v]."""
    B, H, T, K = k.shape
    V, N = u.shape[-1], triton.cdiv(T, CHUNK)
    states = k.new_empty(B * H, N + 1, K, V)
    pseudo = torch.empty_like(u)
    final_state = k.new_empty(B * H, K, V, dtype=torch.float32)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    (BV,) = _sequential_blocks(k, B * H, V, cap=SEQUENTIAL_BLOCK_V)
    delta_states_kernel[(B * H, triton.cdiv(V, BV))](
        k, w, u, _or(log_alpha, k), _or(h0, states), states, pseudo, final_state, T, N, H,
        *_strides(k), *_strides(w), *_strides(u), *_strides(log_alpha), *_strides(pseudo),
        K=K, V=V, GATED=log_alpha is not None, HAS_H0=h0 is not None, C=CHUNK, BK=_block(K, 256), BV=BV,
        INTERPRET=interpreting(), **LAUNCH,
    )
    return states, pseudo, final_state


def _output(q, k, v, pseudo, log_alpha, states, scale) -> Tensor:
    """Pass 4: o = scale · [(Q ⊙ γ) S_n + tril(Q Kᵀ ⊙ Γ) U'], the gated recurrence's output kernel; o in
    q's dtype and v's memory layout."""
    B, H, T, K = q.shape
    V, N = pseudo.shape[-1], states.shape[1] - 1
    o = torch.empty_like(v, dtype=q.dtype)
    BK, BV = _block(K), _block(V, 128)
    gate = (GATE_NONE if log_alpha is None else GATE_SCALAR).value
    chunk_output_kernel[(N, B * H, triton.cdiv(V, BV))](
        q, k, pseudo, _or(log_alpha, q), states, states, o, scale, T, N, H,
        *_strides(q), *_strides(k), *_strides(pseudo), *_strides(log_alpha), *_strides(o),
        K=K, V=V, GATE=gate, C=CHUNK, BK=BK, BV=BV, **LAUNCH,
    )
    return o


def _state_grads(q, k, w, do, log_alpha, d_final_state, scale) -> tuple[Tensor, Tensor, Tensor]:
    """Backward pass 1 (a: the intra-chunk part of dU', b: sequential): G_n, the gradient w.r.t. the
    state leaving chunk n, [B·H, N, D_k, D_v] (input dtype), dU' [B, H, T, D_v] (input dtype) and the
    initial state's gradient, float32 [B·H, D_k, D_v]."""
    B, H, T, K = q.shape
    V, N = do.shape[-1], triton.cdiv(T, CHUNK)
    d_states = q.new_empty(B * H, N, K, V)
    d_pseudo = q.new_empty(B, H, T, V)
    d_initial = q.new_empty(B * H, K, V, dtype=torch.float32)
    if d_final_state is not None:
        d_final_state = d_final_state.float().contiguous()
    if log_alpha is not None:  # see ``delta_state_grad_step`` for why only gated
        delta_intra_grads_kernel[(N, B * H)](
            q, k, do, log_alpha, d_pseudo, scale, T, N, H,
            *_strides(q), *_strides(k), *_strides(do), *_strides(log_alpha), *_strides(d_pseudo),
            K=K, V=V, C=CHUNK, BK=_block(K, 256), BV=_block(V, 128), **LAUNCH,
        )
    (BV,) = _sequential_blocks(q, B * H, V, cap=SEQUENTIAL_BLOCK_V)
    delta_state_grads_kernel[(B * H, triton.cdiv(V, BV))](
        q, k, w, do, _or(log_alpha, q), _or(d_final_state, d_initial), d_states, d_pseudo, d_initial, scale,
        T, N, H, *_strides(q), *_strides(k), *_strides(w), *_strides(do), *_strides(log_alpha),
        *_strides(d_pseudo),
        K=K, V=V, GATED=log_alpha is not None, HAS_DHT=d_final_state is not None, C=CHUNK, BK=_block(K, 256),
        BV=BV, INTERPRET=interpreting(), **LAUNCH,
    )
    return d_states, d_pseudo, d_initial


def _grads(q, k, v, beta, log_alpha, t_inv, states, d_states, pseudo, d_pseudo, do, scale, need_da):
    """Backward pass 2: dq, dk, dv (layouts of q, k, v), dβ and d log α (None unless ``need_da``)."""
    B, H, T, K = q.shape
    V, N = v.shape[-1], t_inv.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dlog_alpha = torch.empty_like(log_alpha) if need_da else None
    delta_grads_kernel[(N, B * H)](
        q, k, v, beta, _or(log_alpha, beta), t_inv, states, d_states, pseudo, d_pseudo, do, dq, dk, dv, dbeta,
        _or(dlog_alpha, dbeta), scale, T, N, H,
        *_strides(q), *_strides(k), *_strides(v), *_strides(beta), *_strides(log_alpha), *_strides(pseudo),
        *_strides(d_pseudo), *_strides(do), *_strides(dq), *_strides(dk), *_strides(dv), *_strides(dbeta),
        *_strides(dlog_alpha),
        K=K, V=V, GATED=log_alpha is not None, NEED_DA=need_da, C=CHUNK, BK=_block(K, 256),
        BV=_block(V, SEQUENTIAL_BLOCK_V), **LAUNCH,
    )
    return dq, dk, dv, dbeta, dlog_alpha


def _check_inputs(q, k, v, beta, log_alpha, initial_state) -> None:
    check_heads(q, k, v, initial_state, MAX_HEAD_DIM)
    B, H, T, _ = q.shape
    for name, x in (("beta", beta), ("log_alpha", log_alpha)):
        if x is not None and (tuple(x.shape) != (B, H, T) or not x.is_floating_point()):
            raise ValueError(f"{name} must be a float tensor [B, H, T] = {(B, H, T)}, "
                             f"got {tuple(x.shape)} {x.dtype}")
