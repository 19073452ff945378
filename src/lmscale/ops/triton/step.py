"""One decoding step of the gated recurrence in one launch: S ← diag(g) S + k vᵀ, o = scale · Sᵀ q.

At T = 1 the op is pure memory traffic (the float32 state, 1 MiB at B = 1, H = 16, D = 128, is read
and written once: ≈ 0.7 µs on an H100), so the cost that matters is launches. The PyTorch step
(``lmscale.ops.gated_recurrence.naive.gated_recurrence_step``) takes five or six kernels and allocates
a new state; this one is a single kernel over every batch row, head and D_v block, updates the state
in place (a static buffer, so decoding can be captured in a CUDA graph) and does no host
synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# what log_g_t holds; constexpr so the kernel can read them and compile one variant per kind
NO_GATE, HEAD_GATE, CHANNEL_GATE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, s_ptr, o_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_gb, stride_gh,
    H, scale,
    K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program (b·H + h, j): columns j·BLOCK_V … of S[b, h] [K, V], read once, decayed, written back.

    The head dims are constexpr: one compilation per model, a K loop of known trip count (and Triton
    3.6's interpreter cannot take a run-time loop bound under NumPy ≥ 2.4, triton-lang/triton#9171).
    """
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_v, mask=mask_v, other=0).to(tl.float32)
    s_base = s_ptr + bh.to(tl.int64) * K * V
    if GATE == HEAD_GATE:
        head_decay = tl.exp(tl.load(g_ptr + b * stride_gb + h * stride_gh).to(tl.float32))
    o = tl.zeros([BLOCK_V], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_k, mask=mask_k, other=0).to(tl.float32)
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_k, mask=mask_k, other=0).to(tl.float32)
        ptrs = s_base + offs_k[:, None] * V + offs_v[None, :]
        mask = mask_k[:, None] & mask_v[None, :]
        s = tl.load(ptrs, mask=mask, other=0)  # (BLOCK_K, BLOCK_V)
        if GATE == CHANNEL_GATE:
            log_g = tl.load(g_ptr + b * stride_gb + h * stride_gh + offs_k, mask=mask_k, other=0)
            s = s * tl.exp(log_g.to(tl.float32))[:, None]
        if GATE == HEAD_GATE:
            s = s * head_decay
        s = s + k[:, None] * v[None, :]
        tl.store(ptrs, s, mask=mask)
        o += tl.sum(q[:, None] * s, axis=0)
    tl.store(o_ptr + bh * V + offs_v, (o * scale).to(o_ptr.dtype.element_ty), mask=mask_v)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def gated_recurrence_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    log_g_t: Tensor | None,
    state: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One token, the naive step's contract except that ``state`` is updated in place and returned.

    q_t, k_t: [B, H, D_k]; v_t: [B, H, D_v]; log_g_t: [B, H, D_k] (per key channel), [B, H] (per head)
    or None; state: float32, contiguous [B, H, D_k, D_v]. Returns o_t [B, H, D_v] in q_t's dtype and
    ``state`` itself. Arithmetic is float32 whatever the inputs' dtype.
    """
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor (it is updated in place), got "
                         f"{state.dtype}{'' if state.is_contiguous() else ' non-contiguous'}; "
                         "allocate it with torch.zeros(B, H, D_k, D_v, dtype=torch.float32)")
    B, H, K = q_t.shape
    V = v_t.shape[-1]
    if state.shape != (B, H, K, V) or k_t.shape != (B, H, K) or v_t.shape[:2] != (B, H):
        raise ValueError(f"shapes disagree: q_t {tuple(q_t.shape)}, k_t {tuple(k_t.shape)}, v_t "
                         f"{tuple(v_t.shape)} need state [B, H, D_k, D_v] = {(B, H, K, V)}, got "
                         f"{tuple(state.shape)}")
    q_t, k_t, v_t = _last_dim_contiguous(q_t), _last_dim_contiguous(k_t), _last_dim_contiguous(v_t)
    if log_g_t is None:
        gate, g, g_strides = NO_GATE, state, (0, 0)
    elif log_g_t.shape in ((B, H), (B, H, K)):
        gate = HEAD_GATE if log_g_t.ndim == 2 else CHANNEL_GATE
        g = _last_dim_contiguous(log_g_t)
        g_strides = (g.stride(0), g.stride(1))
    else:
        raise ValueError(f"log_g_t must be [B, H, D_k] = {(B, H, K)}, [B, H] = {(B, H)} or None, got "
                         f"{tuple(log_g_t.shape)}")
    o_t = torch.empty(B, H, V, device=q_t.device, dtype=q_t.dtype)
    # at least ≈ 128 programs when B·H is small (decoding one sequence), so every SM has a share
    block_v = min(triton.next_power_of_2(V), 16 if B * H <= 32 else 32)
    block_k = min(triton.next_power_of_2(K), 128)
    _step_kernel[(B * H, triton.cdiv(V, block_v))](
        q_t, k_t, v_t, g, state, o_t,
        q_t.stride(0), q_t.stride(1), k_t.stride(0), k_t.stride(1), v_t.stride(0), v_t.stride(1), *g_strides,
        H, K**-0.5 if scale is None else scale,
        K=K, V=V, GATE=gate.value, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return o_t, state
