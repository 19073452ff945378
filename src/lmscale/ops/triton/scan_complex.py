"""The LRU's scan h_t = λ ⊙ h_{t−1} + b_t (complex, λ time-invariant) as Triton kernels, with autograd.

Kernels see complex tensors through ``torch.view_as_real``: interleaved (re, im) pairs. Each program
owns one batch row and a block of channels and walks T sequentially, h in registers: the scan is
elementwise, so there is nothing to gain from a parallel form once B × N fills the GPU.

Gradients follow PyTorch's convention for complex tensors (the conjugate Wirtinger derivative
∂L/∂z̄ scaled so that a real loss gets ∂L/∂Re z + i ∂L/∂Im z). With g_t = ∂L/∂h̄_t the adjoint runs
backwards with conj(λ):

    g_t = dh_t + conj(λ) g_{t+1},   db_t = g_t,   dλ = Σ_{b,t} g_t conj(h_{t−1}),   dh_{−1} = conj(λ) g_0

(the final state's cotangent enters as g_T's contribution to g_{T−1}). The forward's output h is
saved for the backward: it is the h_{t−1} that dλ needs, and it exists anyway.

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

BLOCK_N = 64  # channels per program, one complex number per thread of 2 warps
STAGES = 8  # time steps of b (and dh) prefetched ahead of the recurrence that waits on them


@triton.jit
def _pair_or_zeros(ptr, at, mask, PRESENT: tl.constexpr, like):
    """The complex numbers (re, im) at ptr + at over the block, or zeros like ``like`` where the
    tensor is absent (no initial state, no final-state gradient)."""
    if PRESENT:
        re = tl.load(ptr + at, mask=mask, other=0)
        im = tl.load(ptr + at + 1, mask=mask, other=0)
    else:
        re = tl.zeros_like(like)
        im = tl.zeros_like(like)
    return re, im


@triton.jit
def _scan_fwd_kernel(lam_ptr, b_ptr, h0_ptr, h_ptr, hT_ptr, T, N, STATIC_T: tl.constexpr,
                     HAS_H0: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """h[b, t, n] for one batch row b and channels n in one block; pointers are to (re, im) pairs."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    lr, li = _pair_or_zeros(lam_ptr, 2 * offs, mask, True, offs)
    state = 2 * (pid_b * N + offs)
    hr, hi = _pair_or_zeros(h0_ptr, state, mask, HAS_H0, lr)
    row = 2 * (pid_b * T * N + offs)
    for t in tl.range(0, T if STATIC_T is None else STATIC_T, num_stages=STAGES):
        at = row + 2 * t * N
        br = tl.load(b_ptr + at, mask=mask, other=0)
        bi = tl.load(b_ptr + at + 1, mask=mask, other=0)
        hr, hi = lr * hr - li * hi + br, lr * hi + li * hr + bi
        tl.store(h_ptr + at, hr, mask=mask)
        tl.store(h_ptr + at + 1, hi, mask=mask)
    tl.store(hT_ptr + state, hr, mask=mask)
    tl.store(hT_ptr + state + 1, hi, mask=mask)


@triton.jit
def _scan_bwd_kernel(lam_ptr, h_ptr, h0_ptr, dh_ptr, dhT_ptr, db_ptr, dlam_ptr, dh0_ptr, T, N, STATIC_T: tl.constexpr,
                     HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """The adjoint scan for one batch row: db [B, T, N], this row's share of dλ [B, N], dh0 [B, N]."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    lr, li = _pair_or_zeros(lam_ptr, 2 * offs, mask, True, offs)
    state = 2 * (pid_b * N + offs)
    gr, gi = _pair_or_zeros(dhT_ptr, state, mask, HAS_DHT, lr)
    h0r, h0i = _pair_or_zeros(h0_ptr, state, mask, HAS_H0, lr)
    dlr = tl.zeros([BLOCK], dtype=lr.dtype)
    dli = tl.zeros([BLOCK], dtype=lr.dtype)
    row = 2 * (pid_b * T * N + offs)
    for i in tl.range(0, T if STATIC_T is None else STATIC_T, num_stages=STAGES):
        t = T - 1 - i
        at = row + 2 * t * N
        gr += tl.load(dh_ptr + at, mask=mask, other=0)
        gi += tl.load(dh_ptr + at + 1, mask=mask, other=0)
        tl.store(db_ptr + at, gr, mask=mask)
        tl.store(db_ptr + at + 1, gi, mask=mask)
        has_prev = mask & (t > 0)  # h_{t−1}; at t = 0 it is the initial state
        pr = tl.load(h_ptr + at - 2 * N, mask=has_prev, other=0)
        pi = tl.load(h_ptr + at - 2 * N + 1, mask=has_prev, other=0)
        if HAS_H0:
            pr += tl.where(t == 0, h0r, 0)
            pi += tl.where(t == 0, h0i, 0)
        dlr += gr * pr + gi * pi  # g · conj(h_{t−1})
        dli += gi * pr - gr * pi
        gr, gi = lr * gr + li * gi, lr * gi - li * gr  # conj(λ) · g
    tl.store(dlam_ptr + state, dlr, mask=mask)
    tl.store(dlam_ptr + state + 1, dli, mask=mask)
    if HAS_H0:
        tl.store(dh0_ptr + state, gr, mask=mask)
        tl.store(dh0_ptr + state + 1, gi, mask=mask)


def _grid(B: int, N: int) -> tuple[int, int]:
    return (B, triton.cdiv(N, BLOCK_N))


def _real(x: Tensor | None) -> Tensor | None:
    return None if x is None else torch.view_as_real(x)


def _forward(lam: Tensor, b: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    B, T, N = b.shape
    h, hT = torch.empty_like(b), b.new_empty(B, N)
    _scan_fwd_kernel[_grid(B, N)](
        _real(lam), _real(b), _real(h0), _real(h), _real(hT), T, N, T if interpreting() else None,
        HAS_H0=h0 is not None, BLOCK=BLOCK_N, STAGES=STAGES, num_warps=2,
    )
    return h, hT


class _ComplexScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lam: Tensor, b: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        h, hT = _forward(lam, b, h0)
        ctx.save_for_backward(lam, h, h0)
        ctx.set_materialize_grads(False)
        return h, hT

    @staticmethod
    def backward(ctx, dh: Tensor | None, dhT: Tensor | None):
        lam, h, h0 = ctx.saved_tensors
        B, T, N = h.shape
        dh = torch.zeros_like(h) if dh is None else dh.resolve_conj().contiguous()
        db, dlam = torch.empty_like(h), h.new_empty(B, N)
        dh0 = None if h0 is None else torch.empty_like(h0)
        _scan_bwd_kernel[_grid(B, N)](
            _real(lam), _real(h), _real(h0), _real(dh), _real(None if dhT is None else dhT.resolve_conj().contiguous()),
            _real(db), _real(dlam), _real(dh0), T, N, T if interpreting() else None,
            HAS_H0=h0 is not None, HAS_DHT=dhT is not None, BLOCK=BLOCK_N, STAGES=STAGES, num_warps=2,
        )
        return dlam.sum(0), db, dh0


def complex_diagonal_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """h_t = a ⊙ h_{t−1} + b_t with a time-invariant complex ``a`` [N] and complex b [B, T, N].

    The diagonal-scan forms' signature and results (``lmscale.ops.diagonal_scan``) for this case:
    initial_state [B, N]; h [B, T, N] and the final state [B, N] in the compute dtype (complex64, or
    complex128 for complex128 inputs). Differentiable in a, b and initial_state.
    """
    if not (a.is_complex() and b.is_complex()) or a.ndim != 1 or b.ndim != 3 or a.shape[0] != b.shape[-1]:
        raise ValueError(f"complex_diagonal_scan takes a complex a [N] and a complex b [B, T, N], got a "
                         f"{a.dtype} {tuple(a.shape)} and b {b.dtype} {tuple(b.shape)}; use the PyTorch forms "
                         "in lmscale.ops.diagonal_scan for real or time-varying a")
    acc = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.complex64)
    a, b = a.to(acc).resolve_conj().contiguous(), b.to(acc).resolve_conj().contiguous()
    if initial_state is not None:
        if initial_state.shape != (b.shape[0], b.shape[2]):
            raise ValueError(f"initial_state must be [B, N] = {(b.shape[0], b.shape[2])}, got "
                             f"{tuple(initial_state.shape)}")
        initial_state = initial_state.to(acc).resolve_conj().contiguous()
    h, final_state = _ComplexScan.apply(a, b, initial_state)
    return h, final_state if output_final_state else None
