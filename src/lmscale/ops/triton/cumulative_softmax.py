"""LEAP's global cumulative softmax on the GPU: o_t = Σ_{s≤t} e^{l_s} v_s / Σ_{s≤t} e^{l_s}.

``cumulative_softmax`` here is a drop-in for the PyTorch forms of ``lmscale.ops.cumulative_softmax``
with ``window=None`` (same arguments and state, same results up to float32 rounding). One program per
batch·head and block of value channels walks the sequence in chunks of C, carrying the aggregate
(m, s, z) of every token so far: a reference maximum m, s = Σ e^{l − m} v and z = Σ e^{l − m}. Inside a
chunk each row t is referred to its own running maximum m_t (a scan over the chunk's logits), so every
weight W_tj = e^{l_j − m_t} ≤ 1 and z_t ≥ 1: one [C, C] × [C, BD] product per chunk, nothing subtracted.
The products take their operands in v's dtype (bf16: tensor cores; W's rounding is then that of the
bf16 output), the sums z and the carried aggregate are float32.

Backward, with G_t = dO_t / z_t and h_t = (o_t · dO_t) / z_t (the stored m_t, z_t; o · dO from ``row_dot_kernel``):
    dv_j = Σ_{t≥j} e^{l_j − m_t} G_t,   dl_j = v_j · dv_j − Σ_{t≥j} e^{l_j − m_t} h_t
a reverse pass over chunks carrying R = Σ e^{μ − m_t} G_t and r = Σ e^{μ − m_t} h_t over the rows after
the chunk, referred to μ = m at the chunk's last row (m never decreases, so every exponent is ≤ 0). The
final state's gradient enters as one more row (G = d s, h = −d z at m_T); the initial state's is what
R and −r hold at the start. The reference maxima are constants to autograd, as in the PyTorch forms.
v · dv sums over all value channels, so each V block writes its part of dl and PyTorch adds them up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lmscale.ops.cumulative_softmax.naive import CumulativeSoftmaxState, compute_dtype, empty_max
from lmscale.ops.triton import interpreting
from lmscale.ops.triton.chunk import (
    DTYPES,
    _block,
    _on_device_of,
    _sequential_blocks,
    _strides,
    _unit_last_stride,
    require_device,
)
from lmscale.ops.triton.chunk_fwd import load_tile, store_tile

CHUNK = 64
# value channels per program, halved when few programs for the multiprocessors (``_sequential_blocks``);
# a GPU tuning knob (tests lower it to reach several blocks)
BLOCK_D = 64
# 8 warps: an offline sm_90 compile (bf16, D = 64) puts both kernels at 255 registers on 4 warps, the
# backward spilling, and neither spills on 8. H100 (do_bench, session 4), fwd+bwd: 4 warps 1.04 ms
# against 8 warps' 1.32 at B = 16, T = 2K (512 programs), 4.67 against 4.11 at B = 1, T = 32K (64
# programs); 4 warps has not run the GPU tests, so it is not used yet
LAUNCH = {"num_warps": 8, "num_stages": 2}
EMPTY = tl.constexpr(empty_max(torch.float32))  # an empty aggregate's maximum: exp(EMPTY − m) = 0


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _chunk_weights(logits, stride_l_t, t0, T, m, C: tl.constexpr):
    """Logits of rows t0 … t0+C−1 (EMPTY past T), their running maxima m_t including the carried m, and
    W_tj = e^{l_j − m_t} for j ≤ t (0 above the diagonal): every exponent ≤ 0."""
    rows = tl.arange(0, C)
    l = tl.load(logits + (t0 + rows).to(tl.int64) * stride_l_t, mask=t0 + rows < T, other=EMPTY).to(tl.float32)
    m_t = tl.maximum(tl.associative_scan(l, 0, _max), m)
    w = tl.exp(tl.where(rows[:, None] >= rows[None, :], l[None, :] - m_t[:, None], float("-inf")))
    return l, m_t, w


@triton.jit
def _fwd_chunk(logits, v, o, m_out, z_out, stride_l_t, stride_v_t, stride_o_t, t0, T, D, d0, first, m, z, s,
               C: tl.constexpr, BD: tl.constexpr):
    """Rows t0 … t0+C−1: store o (and m_t, z_t from the first V block); return the aggregate after them."""
    rows = tl.arange(0, C)
    l, m_t, w = _chunk_weights(logits, stride_l_t, t0, T, m, C)
    v_n = load_tile(v, stride_v_t, t0, T, d0, D, C, BD)
    carried = tl.exp(m - m_t)  # ≤ 1
    z_t = carried * z + tl.sum(w, 1)
    s_t = carried[:, None] * s[None, :] + tl.dot(w.to(v_n.dtype), v_n, input_precision="ieee")
    store_tile(o, stride_o_t, t0, T, d0, D, s_t / z_t[:, None], C, BD)
    valid = (t0 + rows < T) & first
    tl.store(m_out + t0 + rows, m_t, mask=valid)
    tl.store(z_out + t0 + rows, z_t, mask=valid)
    m_last = tl.maximum(tl.max(l, 0), m)  # the aggregate after the chunk's last row
    w_last = tl.exp(l - m_last)
    s = tl.exp(m - m_last) * s + tl.sum(w_last[:, None] * v_n.to(tl.float32), 0)
    return m_last, tl.exp(m - m_last) * z + tl.sum(w_last, 0), s


@triton.jit
def cumulative_softmax_fwd_kernel(
    logits, v, o, m_out, z_out, init_max, init_sum, final_max, final_sum, T, N, H, D,
    stride_l_b, stride_l_h, stride_l_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_o_b, stride_o_h, stride_o_t,
    HAS_INIT: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """o, and each row's m_t and z_t (float32 [B·H, T], written by the first V block) for the backward."""
    i_bh, i_d = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    logits += i_b * stride_l_b + i_h * stride_l_h
    v += i_b * stride_v_b + i_h * stride_v_h
    o += i_b * stride_o_b + i_h * stride_o_h
    m_out += i_bh.to(tl.int64) * T
    z_out += i_bh.to(tl.int64) * T
    d0 = i_d * BD
    cols = d0 + tl.arange(0, BD)
    first = i_d == 0

    m = tl.full((), EMPTY, tl.float32)
    z = tl.zeros((), dtype=tl.float32)
    s = tl.zeros([BD], dtype=tl.float32)
    if HAS_INIT:
        m = tl.load(init_max + i_bh).to(tl.float32)
        z = tl.load(init_sum + i_bh.to(tl.int64) * (D + 1) + D).to(tl.float32)
        s = tl.load(init_sum + i_bh.to(tl.int64) * (D + 1) + cols, mask=cols < D, other=0.0).to(tl.float32)
    if INTERPRET:  # see chunk_fwd's ``INTERPRET_LOOP_NOTE``
        n = 0
        while n < N:
            m, z, s = _fwd_chunk(logits, v, o, m_out, z_out, stride_l_t, stride_v_t, stride_o_t, n * C, T, D, d0,
                                 first, m, z, s, C, BD)
            n += 1
    else:
        for n in range(N):
            m, z, s = _fwd_chunk(logits, v, o, m_out, z_out, stride_l_t, stride_v_t, stride_o_t, n * C, T, D, d0,
                                 first, m, z, s, C, BD)
    tl.store(final_sum + i_bh.to(tl.int64) * (D + 1) + cols, s, mask=cols < D)
    if first:
        tl.store(final_max + i_bh, m)
        tl.store(final_sum + i_bh.to(tl.int64) * (D + 1) + D, z)


@triton.jit
def _bwd_chunk(logits, v, do, m_in, z_in, g_in, dv, dl_part, stride_l_t, stride_v_t, stride_do_t, stride_dv_t,
               n, T, D, d0, first, m0, mu, R, r, C: tl.constexpr, BD: tl.constexpr):
    """Chunk n backwards: store dv and this block's dl; return (μ, R, r) referred to the previous chunk."""
    rows = tl.arange(0, C)
    t0 = n * C
    valid = t0 + rows < T
    l = tl.load(logits + (t0 + rows).to(tl.int64) * stride_l_t, mask=valid, other=EMPTY).to(tl.float32)
    m_t = tl.load(m_in + t0 + rows, mask=valid, other=float("inf"))  # padded rows weigh e^{−∞} = 0
    z_t = tl.load(z_in + t0 + rows, mask=valid, other=1.0)
    h_t = tl.load(g_in + t0 + rows, mask=valid, other=0.0) / z_t
    g_n = load_tile(do, stride_do_t, t0, T, d0, D, C, BD).to(tl.float32) / z_t[:, None]
    # rows j of this chunk: later rows of the chunk through Wᵀ, rows after it through R, r at μ
    w_t = tl.exp(tl.where(rows[:, None] <= rows[None, :], l[:, None] - m_t[None, :], float("-inf")))  # [j, t]
    to_mu = tl.exp(l - mu)
    dt = v.dtype.element_ty
    dv_n = tl.dot(w_t.to(dt), g_n.to(dt), input_precision="ieee") + to_mu[:, None] * R[None, :]
    store_tile(dv, stride_dv_t, t0, T, d0, D, dv_n, C, BD)
    v_n = load_tile(v, stride_v_t, t0, T, d0, D, C, BD).to(tl.float32)
    dl = tl.sum(v_n * dv_n, 1) - first * (tl.sum(w_t * h_t[None, :], 1) + to_mu * r)
    tl.store(dl_part + t0 + rows, dl, mask=valid)
    # carry to the previous chunk, referred to m at its last row (m0 before the first chunk)
    mu_prev = tl.where(n > 0, tl.load(m_in + tl.maximum(t0 - 1, 0)), m0)
    back = tl.exp(mu_prev - m_t)
    decay = tl.exp(mu_prev - mu)
    return mu_prev, decay * R + tl.sum(back[:, None] * g_n, 0), decay * r + tl.sum(back * h_t, 0)


@triton.jit
def row_dot_kernel(o, do, g, T, H,
                   stride_o_b, stride_o_h, stride_o_t,
                   stride_do_b, stride_do_h, stride_do_t,
                   D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr):
    """g[bh, t] = o_t · dO_t in float32 for C rows: the backward's h_t needs it over all value channels
    before its reverse pass, and forming it here reads o and dO once in their own dtype (PyTorch's
    float32 product would write and reread three float32 copies)."""
    i_bh, i_n = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o += i_b * stride_o_b + i_h * stride_o_h
    do += i_b * stride_do_b + i_h * stride_do_h
    t0 = i_n * C
    acc = tl.zeros([C], dtype=tl.float32)
    for d0 in range(0, D, BD):
        acc += tl.sum(load_tile(o, stride_o_t, t0, T, d0, D, C, BD).to(tl.float32)
                      * load_tile(do, stride_do_t, t0, T, d0, D, C, BD).to(tl.float32), 1)
    rows = t0 + tl.arange(0, C)
    tl.store(g + i_bh.to(tl.int64) * T + rows, acc, mask=rows < T)


@triton.jit
def cumulative_softmax_bwd_kernel(
    logits, v, do, m_in, z_in, g_in, init_max, d_final_sum, dv, dl_part, d_init_sum, T, N, H, D,
    stride_l_b, stride_l_h, stride_l_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_dv_b, stride_dv_h, stride_dv_t,
    HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dv, this V block's part of dl (float32 [⌈D/BD⌉, B·H, T]; the h terms in block 0's) and the
    initial aggregate's gradient (float32 [B·H, D + 1])."""
    i_bh, i_d = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    logits += i_b * stride_l_b + i_h * stride_l_h
    v += i_b * stride_v_b + i_h * stride_v_h
    do += i_b * stride_do_b + i_h * stride_do_h
    dv += i_b * stride_dv_b + i_h * stride_dv_h
    m_in += i_bh.to(tl.int64) * T
    z_in += i_bh.to(tl.int64) * T
    g_in += i_bh.to(tl.int64) * T
    dl_part += (i_d.to(tl.int64) * tl.num_programs(0) + i_bh) * T
    d0 = i_d * BD
    cols = d0 + tl.arange(0, BD)
    first = (i_d == 0).to(tl.float32)  # the h terms are counted once, by the first V block

    mu = tl.load(m_in + T - 1)  # the final aggregate's maximum m_T
    R = tl.zeros([BD], dtype=tl.float32)
    r = 0.0
    if HAS_DFINAL:  # the final state as one more row: G = d s, h = −d z, at m_T
        R = tl.load(d_final_sum + i_bh.to(tl.int64) * (D + 1) + cols, mask=cols < D, other=0.0)
        r = -tl.load(d_final_sum + i_bh.to(tl.int64) * (D + 1) + D)
    m0 = tl.full((), EMPTY, tl.float32)
    if HAS_INIT:
        m0 = tl.load(init_max + i_bh).to(tl.float32)
    if INTERPRET:  # see chunk_fwd's ``INTERPRET_LOOP_NOTE``
        n = N - 1
        while n >= 0:
            mu, R, r = _bwd_chunk(logits, v, do, m_in, z_in, g_in, dv, dl_part, stride_l_t, stride_v_t, stride_do_t,
                                  stride_dv_t, n, T, D, d0, first, m0, mu, R, r, C, BD)
            n -= 1
    else:
        for k in range(N):
            mu, R, r = _bwd_chunk(logits, v, do, m_in, z_in, g_in, dv, dl_part, stride_l_t, stride_v_t, stride_do_t,
                                  stride_dv_t, N - 1 - k, T, D, d0, first, m0, mu, R, r, C, BD)
    tl.store(d_init_sum + i_bh.to(tl.int64) * (D + 1) + cols, R, mask=cols < D)
    if i_d == 0:
        tl.store(d_init_sum + i_bh.to(tl.int64) * (D + 1) + D, -r)


def cumulative_softmax(
    logits: Tensor,
    v: Tensor,
    initial_state: CumulativeSoftmaxState | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, CumulativeSoftmaxState | None]:
    """Global cumulative softmax-weighted sums in Triton: logits [B, H, T] (any strides), v [B, H, T, D]
    -> o [B, H, T, D] in v's dtype and, if asked, the final state (float32), as the PyTorch forms."""
    check_inputs(logits, v)
    if initial_state is not None and initial_state.block_logits is not None:
        raise ValueError("the Triton cumulative softmax is the global one; a windowed state runs the PyTorch forms")
    init_max = init_sum = None
    if initial_state is not None:
        init_max, init_sum = initial_state.max, initial_state.sum
    with _on_device_of(v):
        o, final_max, final_sum = CumulativeSoftmax.apply(logits, _unit_last_stride(v), init_max, init_sum)
    return o, CumulativeSoftmaxState(final_max, final_sum) if output_final_state else None


def check_inputs(logits: Tensor, v: Tensor) -> None:
    """What both cumulative-softmax kernels ask of their inputs."""
    B, H, T, _ = v.shape
    if tuple(logits.shape) != (B, H, T) or v.dtype not in DTYPES or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [B, H, T] = {(B, H, T)} and v float32 or bfloat16 "
                         f"[B, H, T, D]; got logits {tuple(logits.shape)} {logits.dtype}, v {v.dtype}: "
                         "use the PyTorch forms (impl='torch') for other dtypes")
    require_device(v)


def row_dots(o: Tensor, do: Tensor) -> Tensor:
    """o_t · dO_t for o, dO [B, H, T, D] (unit last stride), float32 [B·H, T]: both backwards' h_t."""
    B, H, T, D = o.shape
    g = o.new_empty(B * H, T, dtype=torch.float32)
    row_dot_kernel[(B * H, triton.cdiv(T, CHUNK))](o, do, g, T, H, *_strides(o), *_strides(do),
                                                  D=D, C=CHUNK, BD=_block(D, BLOCK_D))
    return g


class CumulativeSoftmax(torch.autograd.Function):
    """Gradients for the logits, v and the initial aggregate's sums (its maximum is a constant)."""

    @staticmethod
    def forward(ctx, logits, v, init_max, init_sum):
        B, H, T, D = v.shape
        acc = compute_dtype(v.dtype)
        N = triton.cdiv(T, CHUNK)
        o = torch.empty_like(v)
        m_t, z_t = (v.new_empty(B * H, T, dtype=torch.float32) for _ in range(2))
        final_max = v.new_empty(B, H, dtype=torch.float32)
        final_sum = v.new_empty(B, H, D + 1, dtype=torch.float32)
        has_init = init_max is not None
        if has_init:
            init_max, init_sum = init_max.float().contiguous(), init_sum.float().contiguous()
        (BD,) = _sequential_blocks(v, B * H, D, cap=BLOCK_D)
        cumulative_softmax_fwd_kernel[(B * H, triton.cdiv(D, BD))](
            logits, v, o, m_t, z_t, init_max if has_init else m_t, init_sum if has_init else m_t,
            final_max, final_sum, T, N, H, D, *_strides(logits), *_strides(v), *_strides(o),
            HAS_INIT=has_init, C=CHUNK, BD=BD, INTERPRET=interpreting(), **LAUNCH,
        )
        ctx.save_for_backward(logits, v, o, m_t, z_t, init_max)
        ctx.mark_non_differentiable(final_max)
        ctx.set_materialize_grads(False)
        ctx.init_dtype = None if init_sum is None else init_sum.dtype
        return o, final_max.to(acc), final_sum.to(acc)

    @staticmethod
    def backward(ctx, do, d_final_max, d_final_sum):
        logits, v, o, m_t, z_t, init_max = ctx.saved_tensors
        B, H, T, D = v.shape
        do = torch.zeros_like(v) if do is None else _unit_last_stride(do.to(v.dtype))
        has_final = d_final_sum is not None
        if has_final:
            d_final_sum = d_final_sum.float().contiguous()
        (BD,) = _sequential_blocks(v, B * H, D, cap=BLOCK_D)
        blocks = triton.cdiv(D, BD)
        dv = torch.empty_like(v)
        dl_part = v.new_empty(blocks, B * H, T, dtype=torch.float32)
        d_init_sum = v.new_empty(B, H, D + 1, dtype=torch.float32)
        with _on_device_of(v):
            g = row_dots(o, do)
            cumulative_softmax_bwd_kernel[(B * H, blocks)](
                logits, v, do, m_t, z_t, g, init_max if init_max is not None else m_t,
                d_final_sum if has_final else m_t, dv, dl_part, d_init_sum, T, triton.cdiv(T, CHUNK), H, D,
                *_strides(logits), *_strides(v), *_strides(do), *_strides(dv),
                HAS_INIT=init_max is not None, HAS_DFINAL=has_final, C=CHUNK, BD=BD, INTERPRET=interpreting(),
                **LAUNCH,
            )
        dl = dl_part.sum(0).view(B, H, T).to(logits.dtype)
        d_init = None if ctx.init_dtype is None else d_init_sum.to(ctx.init_dtype)
        return dl, dv, None, d_init
