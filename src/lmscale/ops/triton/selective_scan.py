"""Mamba's selective scan, fused: discretisation, recurrence and readout in one kernel, h never in memory.

    h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) B_tᵀ,   y_t = h_t C_t        h_t ∈ ℝ^{D × N}

with the discretisation of ``lmscale.mixers.mamba`` (zero-order hold for A, Euler for B). The PyTorch
path builds Ā, B̄u and h as [B, T, D, N] tensors, N times the activations; here each program holds
h for one batch row and a block of D channels, [BLOCK_D, N], in registers and walks T, reading
u, Δ [B, T, D] and B, C [B, T, N] and writing y [B, T, D] only.

Backward, per program, from checkpoints: the forward stores h entering every ``checkpoint_every``-th
step ([B, T / K, D, N], K times less than h). The backward walks the chunks from last to first:
it recomputes the chunk's K states from its checkpoint into a per-program scratch slab (K + 1 tiles,
reused chunk after chunk, so it stays in cache), then runs the adjoint recurrence backwards through
it, g_t = ∂L/∂h_t:

    g_t = dy_t C_tᵀ + exp(Δ_{t+1} A) ⊙ g_{t+1}
    du_t = Δ_t Σ_n g_t B_t,   dΔ_t = u_t Σ_n g_t B_t + Σ_n A ⊙ exp(Δ_t A) ⊙ h_{t−1} ⊙ g_t
    dB_t = Σ_d g_t Δ_t u_t,   dC_t = Σ_d dy_t h_t,   dA = Σ_{b,t} Δ_t exp(Δ_t A) ⊙ h_{t−1} ⊙ g_t
    dh_{−1} = exp(Δ_0 A) ⊙ g_0

Sums over D (dB, dC) and over batch rows (dA) are written per program and summed in PyTorch rather
than with atomics, so the gradients are deterministic.

``STATIC_T`` is T as a compile-time constant under Triton's CPU interpreter and None on the GPU:
Triton 3.6's interpreter turns a run-time loop bound into ``int()`` of a one-element array, which
NumPy ≥ 2.4 refuses (triton-lang/triton#9171), while on the GPU a run-time T keeps one compilation
for every sequence length. (The bound is written in the ``range`` call itself: the interpreter turns
every assigned value into a tensor.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lmscale.ops.triton import interpreting

# GPU tuning knobs. H100, d_inner 2048, N = 16, float32, fwd+bwd (do_bench, session 4): BLOCK_D 32 on 4
# warps 2.97 / 9.60 ms at B·T = 4·2K / 1·8K; BLOCK_D 8 on one warp 2.39 / 7.43, the best of 8/16/32 × 1/2/4
# warps at both (a [8, N] state per warp: no cross-warp reduction in the step, more programs)
BLOCK_D = 8
LAUNCH = {"num_warps": 1}
CHECKPOINT_EVERY = 64
STAGES = 4  # time steps of the inputs prefetched ahead of the recurrence that waits on them


@triton.jit
def _selective_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, hT_ptr, ckpt_ptr, T, D, N, STATIC_T: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_CKPT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    """y[b, :, d-block] and h[b, d-block] at the end; h entering every CHUNK-th step if SAVE_CKPT."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < D, offs_n < N
    mask = mask_d[:, None] & mask_n[None, :]
    tile = offs_d[:, None] * N + offs_n[None, :]  # (BLOCK_D, BLOCK_N) offsets into a [D, N] matrix
    A = tl.load(A_ptr + tile, mask=mask, other=0)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * D * N + tile, mask=mask, other=0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=A.dtype)
    n_chunks = tl.cdiv(T, CHUNK)
    for t in tl.range(0, T if STATIC_T is None else STATIC_T, num_stages=STAGES):
        if SAVE_CKPT:  # noqa: SIM102  (a compile-time branch around a run-time one)
            if t % CHUNK == 0:
                tl.store(ckpt_ptr + (pid_b * n_chunks + t // CHUNK) * D * N + tile, h, mask=mask)
        row = pid_b * T + t
        u = tl.load(u_ptr + row * D + offs_d, mask=mask_d, other=0)
        dt = tl.load(dt_ptr + row * D + offs_d, mask=mask_d, other=0)
        b = tl.load(B_ptr + row * N + offs_n, mask=mask_n, other=0)
        c = tl.load(C_ptr + row * N + offs_n, mask=mask_n, other=0)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * b[None, :]
        tl.store(y_ptr + row * D + offs_d, tl.sum(h * c[None, :], axis=1), mask=mask_d)
    tl.store(hT_ptr + pid_b * D * N + tile, h, mask=mask)


@triton.jit
def _selective_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, ckpt_ptr, dy_ptr, dhT_ptr, scratch_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dh0_ptr, T, D, N, STATIC_T: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    """The adjoint sweep for one batch row and D block; dA, dB, dC are this program's partial sums."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < D, offs_n < N
    mask = mask_d[:, None] & mask_n[None, :]
    tile = offs_d[:, None] * N + offs_n[None, :]
    A = tl.load(A_ptr + tile, mask=mask, other=0)
    if HAS_DHT:
        g = tl.load(dhT_ptr + pid_b * D * N + tile, mask=mask, other=0)
    else:
        g = tl.zeros([BLOCK_D, BLOCK_N], dtype=A.dtype)
    dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=A.dtype)
    program = pid_b * tl.num_programs(1) + pid_d  # this program's scratch slab and partial-sum rows
    slab = scratch_ptr + program * (CHUNK + 1) * BLOCK_D * BLOCK_N
    slot = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    n_chunks = tl.cdiv(T, CHUNK)
    for i in range(n_chunks if STATIC_T is None else (STATIC_T + CHUNK - 1) // CHUNK):
        chunk = n_chunks - 1 - i
        t0 = chunk * CHUNK
        # 1. recompute the chunk's states: slot j holds h_{t0 + j − 1}; steps past T leave h as it is
        h = tl.load(ckpt_ptr + (pid_b * n_chunks + chunk) * D * N + tile, mask=mask, other=0)
        tl.store(slab + slot, h)
        for j in tl.range(0, CHUNK, num_stages=STAGES):
            row = pid_b * T + t0 + j
            valid = t0 + j < T
            u = tl.load(u_ptr + row * D + offs_d, mask=mask_d & valid, other=0)
            dt = tl.load(dt_ptr + row * D + offs_d, mask=mask_d & valid, other=0)
            b = tl.load(B_ptr + row * N + offs_n, mask=mask_n & valid, other=0)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * b[None, :]
            tl.store(slab + (j + 1) * BLOCK_D * BLOCK_N + slot, h)
        tl.debug_barrier()
        # 2. the adjoint, backwards through the chunk; h is h_t, h_prev h_{t−1}
        for jj in tl.range(0, CHUNK, num_stages=STAGES):
            j = CHUNK - 1 - jj
            t = t0 + j
            row = pid_b * T + t
            valid = t < T
            h_prev = tl.load(slab + j * BLOCK_D * BLOCK_N + slot)
            u = tl.load(u_ptr + row * D + offs_d, mask=mask_d & valid, other=0)
            dt = tl.load(dt_ptr + row * D + offs_d, mask=mask_d & valid, other=0)
            dy = tl.load(dy_ptr + row * D + offs_d, mask=mask_d & valid, other=0)
            b = tl.load(B_ptr + row * N + offs_n, mask=mask_n & valid, other=0)
            c = tl.load(C_ptr + row * N + offs_n, mask=mask_n & valid, other=0)
            g += dy[:, None] * c[None, :]
            a = tl.exp(dt[:, None] * A)
            gb = tl.sum(g * b[None, :], axis=1)
            gah = g * a * h_prev
            tl.store(du_ptr + row * D + offs_d, dt * gb, mask=mask_d & valid)
            tl.store(ddt_ptr + row * D + offs_d, u * gb + tl.sum(gah * A, axis=1), mask=mask_d & valid)
            partial = (program * T + t) * N + offs_n
            tl.store(dB_ptr + partial, tl.sum(g * (dt * u)[:, None], axis=0), mask=mask_n & valid)
            tl.store(dC_ptr + partial, tl.sum(dy[:, None] * h, axis=0), mask=mask_n & valid)
            dA += gah * dt[:, None]
            g = g * a
            h = h_prev
        tl.debug_barrier()  # the slab is rewritten by the next chunk
    tl.store(dA_ptr + pid_b * D * N + tile, dA, mask=mask)
    if HAS_H0:
        tl.store(dh0_ptr + pid_b * D * N + tile, g, mask=mask)


def _forward(u, dt, A, B, C, h0, chunk, save_checkpoints):
    Bsz, T, D = u.shape
    N = A.shape[1]
    n_chunks = triton.cdiv(T, chunk)
    y, hT = torch.empty_like(u), u.new_empty(Bsz, D, N)
    ckpt = u.new_empty(Bsz, n_chunks, D, N) if save_checkpoints else None
    _selective_fwd_kernel[(Bsz, triton.cdiv(D, BLOCK_D))](
        u, dt, A, B, C, h0, y, hT, ckpt, T, D, N, T if interpreting() else None,
        HAS_H0=h0 is not None, SAVE_CKPT=save_checkpoints, CHUNK=chunk,
        BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(N), STAGES=STAGES, **LAUNCH,
    )
    return y, hT, ckpt


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk):
        y, hT, ckpt = _forward(u, dt, A, B, C, h0, chunk, save_checkpoints=True)
        ctx.save_for_backward(u, dt, A, B, C, ckpt)
        ctx.chunk, ctx.has_h0 = chunk, h0 is not None
        ctx.set_materialize_grads(False)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, dt, A, B, C, ckpt = ctx.saved_tensors
        Bsz, T, D = u.shape
        N, chunk = A.shape[1], ctx.chunk
        grid = (Bsz, triton.cdiv(D, BLOCK_D))
        block_n = triton.next_power_of_2(N)
        dy = torch.zeros_like(u) if dy is None else dy.contiguous()
        scratch = u.new_empty(Bsz * grid[1], chunk + 1, BLOCK_D, block_n)
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dA = u.new_empty(Bsz, D, N)
        dB, dC = u.new_empty(Bsz, grid[1], T, N), u.new_empty(Bsz, grid[1], T, N)
        dh0 = u.new_empty(Bsz, D, N) if ctx.has_h0 else None
        _selective_bwd_kernel[grid](
            u, dt, A, B, C, ckpt, dy, None if dhT is None else dhT.contiguous(), scratch,
            du, ddt, dA, dB, dC, dh0, T, D, N, T if interpreting() else None,
            HAS_H0=ctx.has_h0, HAS_DHT=dhT is not None, CHUNK=chunk, BLOCK_D=BLOCK_D, BLOCK_N=block_n,
            STAGES=STAGES, **LAUNCH,
        )
        return du, ddt, dA.sum(0), dB.sum(1), dC.sum(1), dh0, None


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> tuple[Tensor, Tensor | None]:
    """y_t = h_t C_t for h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) B_tᵀ, without materialising h.

    u, delta (Δ, after softplus): [B, T, D]; A: [D, N] (negative); B, C: [B, T, N]; initial_state
    [B, D, N]. Returns y [B, T, D] and the final state [B, D, N] (if asked), both in the compute dtype
    (the inputs' promoted dtype, at least float32). Differentiable in every input; the backward keeps
    h every ``checkpoint_every`` steps ([B, T / checkpoint_every, D, N]) and recomputes the rest.
    The D skip and the z gate are not part of the scan: the mixer applies them.
    """
    Bsz, T, D = u.shape
    N = A.shape[-1]
    shapes = {"delta": (delta, (Bsz, T, D)), "A": (A, (D, N)), "B": (B, (Bsz, T, N)), "C": (C, (Bsz, T, N))}
    if initial_state is not None:
        shapes["initial_state"] = (initial_state, (Bsz, D, N))
    for name, (tensor, shape) in shapes.items():
        if tensor.shape != shape:
            raise ValueError(f"selective_scan: u is [B, T, D] = {(Bsz, T, D)} and A [D, N] = {tuple(A.shape)}, "
                             f"so {name} must be {shape}, got {tuple(tensor.shape)}")
    if T == 0 or not (isinstance(checkpoint_every, int) and checkpoint_every > 0):
        raise ValueError(f"selective_scan needs T ≥ 1 and a positive checkpoint_every, got T={T}, "
                         f"checkpoint_every={checkpoint_every!r}")
    acc = torch.float32
    for tensor in (u, delta, A, B, C, *([] if initial_state is None else [initial_state])):
        acc = torch.promote_types(acc, tensor.dtype)
    inputs = [t.to(acc).contiguous() for t in (u, delta, A, B, C)]
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *([] if h0 is None else [h0]))):
        y, final_state = _SelectiveScan.apply(*inputs, h0, checkpoint_every)
    else:
        y, final_state, _ = _forward(*inputs, h0, checkpoint_every, save_checkpoints=False)
    return y, final_state if output_final_state else None
