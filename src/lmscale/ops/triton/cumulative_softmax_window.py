"""LEAP's windowed cumulative softmax on the GPU: o_t = Σ_{t−k<s≤t} e^{l_s} v_s / Σ_{t−k<s≤t} e^{l_s}.

A window is a band: each chunk of C query rows meets the ⌈(k + C − 1) / C⌉ key chunks its windows touch,
and the weights are formed exactly as a banded softmax, flash-attention style: per row a running maximum
m_t over the key chunks seen so far, the sums rescaled by e^{m_old − m_new}, so every weight is ≤ 1 and
nothing is ever subtracted (LEAP's difference of two cumulative sums cancels catastrophically). The
logits are scalars, so a pair costs one multiply-add per value channel: O(T · k · D) work, a fraction of
attention's even at k = T/2, and chunks are independent (no pass along the whole sequence).

Backward, with the stored m_t, z_t and g_t = o_t · dO_t: per key chunk, over the query chunks whose
windows hold it, dv_s = Σ_t w_ts dO_t and dl_s = v_s · dv_s − Σ_t w_ts g_t, w_ts = e^{l_s − m_t} / z_t.

This kernel runs training and prefill from an empty state (``initial_state=None``, no final state): a
windowed decoding state (the blocks of ``CumulativeSoftmaxState``) is built by the PyTorch forms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lmscale.ops.triton import interpreting
from lmscale.ops.triton.chunk import _block, _on_device_of, _strides, _unit_last_stride
from lmscale.ops.triton.chunk_fwd import load_tile, store_tile
from lmscale.ops.triton.cumulative_softmax import BLOCK_D, CHUNK, EMPTY, LAUNCH, check_inputs, row_dots


@triton.jit
def _band(logits, stride_l_t, t0, s0, T, window, C: tl.constexpr):
    """Rows t0 … and keys s0 … of the band: the key logits (EMPTY outside T) and the mask s ∈ (t − k, t]."""
    offs = tl.arange(0, C)
    s = s0 + offs
    l = tl.load(logits + s.to(tl.int64) * stride_l_t, mask=(s >= 0) & (s < T), other=EMPTY).to(tl.float32)
    t = t0 + offs
    inside = (s[None, :] <= t[:, None]) & (s[None, :] > t[:, None] - window) & (s[None, :] >= 0)
    return l, inside


@triton.jit
def _fwd_keys(logits, v, stride_l_t, stride_v_t, t0, s0, T, D, d0, window, m, z, acc, C: tl.constexpr,
              BD: tl.constexpr):
    """Fold key chunk s0 into the query rows' running (m, z, acc), flash-attention style."""
    l, inside = _band(logits, stride_l_t, t0, s0, T, window, C)
    m_new = tl.maximum(m, tl.max(tl.where(inside, l[None, :], EMPTY), 1))
    w = tl.exp(tl.where(inside, l[None, :] - m_new[:, None], float("-inf")))
    rescale = tl.exp(m - m_new)
    v_s = load_tile(v, stride_v_t, s0, T, d0, D, C, BD)
    acc = acc * rescale[:, None] + tl.dot(w.to(v_s.dtype), v_s, input_precision="ieee")
    return m_new, z * rescale + tl.sum(w, 1), acc


@triton.jit
def _bwd_queries(do, m_in, z_in, g_in, stride_do_t, t0, s, l, T, D, d0, window, dv_n, through_g,
                 C: tl.constexpr, BD: tl.constexpr):
    """Add query chunk t0's terms to the keys' dv and Σ_t w_ts g_t."""
    t = t0 + tl.arange(0, C)
    valid = t < T
    m_t = tl.load(m_in + t, mask=valid, other=float("inf"))  # rows past T weigh e^{−∞} = 0
    z_t = tl.load(z_in + t, mask=valid, other=1.0)
    g_t = tl.load(g_in + t, mask=valid, other=0.0)
    inside = (s[:, None] <= t[None, :]) & (s[:, None] > t[None, :] - window)  # [s, t]
    w_t = tl.exp(tl.where(inside, l[:, None] - m_t[None, :], float("-inf"))) / z_t[None, :]
    do_t = load_tile(do, stride_do_t, t0, T, d0, D, C, BD)
    dv_n += tl.dot(w_t.to(do_t.dtype), do_t, input_precision="ieee")
    return dv_n, through_g + tl.sum(w_t * g_t[None, :], 1)


@triton.jit
def windowed_softmax_fwd_kernel(
    logits, v, o, m_out, z_out, window, T, H, D,
    stride_l_b, stride_l_h, stride_l_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_o_b, stride_o_h, stride_o_t,
    C: tl.constexpr, BD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Query chunk n: o, and each row's m_t and z_t (float32 [B·H, T], from the first V block)."""
    i_n, i_bh, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    logits += i_b * stride_l_b + i_h * stride_l_h
    v += i_b * stride_v_b + i_h * stride_v_h
    o += i_b * stride_o_b + i_h * stride_o_h
    t0, d0 = i_n * C, i_d * BD
    rows = tl.arange(0, C)

    m = tl.full([C], EMPTY, tl.float32)
    z = tl.zeros([C], dtype=tl.float32)
    acc = tl.zeros([C, BD], dtype=tl.float32)
    first_key = tl.maximum(t0 - window + 1, 0) // C * C
    if INTERPRET:  # see chunk_fwd's ``INTERPRET_LOOP_NOTE``
        s0 = first_key
        while s0 < t0 + C:
            m, z, acc = _fwd_keys(logits, v, stride_l_t, stride_v_t, t0, s0, T, D, d0, window, m, z, acc, C, BD)
            s0 += C
    else:
        for s0 in range(first_key, t0 + C, C):
            m, z, acc = _fwd_keys(logits, v, stride_l_t, stride_v_t, t0, s0, T, D, d0, window, m, z, acc, C, BD)
    store_tile(o, stride_o_t, t0, T, d0, D, acc / z[:, None], C, BD)
    valid = (t0 + rows < T) & (i_d == 0)
    tl.store(m_out + i_bh.to(tl.int64) * T + t0 + rows, m, mask=valid)
    tl.store(z_out + i_bh.to(tl.int64) * T + t0 + rows, z, mask=valid)


@triton.jit
def windowed_softmax_bwd_kernel(
    logits, v, do, m_in, z_in, g_in, dv, dl_part, window, T, H, D,
    stride_l_b, stride_l_h, stride_l_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_dv_b, stride_dv_h, stride_dv_t,
    C: tl.constexpr, BD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Key chunk n: dv and this V block's part of dl (float32 [⌈D/BD⌉, B·H, T]; the g terms in block 0's),
    over the query chunks whose windows hold its keys."""
    i_n, i_bh, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    logits += i_b * stride_l_b + i_h * stride_l_h
    v += i_b * stride_v_b + i_h * stride_v_h
    do += i_b * stride_do_b + i_h * stride_do_h
    dv += i_b * stride_dv_b + i_h * stride_dv_h
    m_in += i_bh.to(tl.int64) * T
    z_in += i_bh.to(tl.int64) * T
    g_in += i_bh.to(tl.int64) * T
    dl_part += (i_d.to(tl.int64) * tl.num_programs(1) + i_bh) * T
    s0, d0 = i_n * C, i_d * BD
    s = s0 + tl.arange(0, C)

    l = tl.load(logits + s.to(tl.int64) * stride_l_t, mask=s < T, other=EMPTY).to(tl.float32)
    dv_n = tl.zeros([C, BD], dtype=tl.float32)
    through_g = tl.zeros([C], dtype=tl.float32)
    end = tl.minimum(s0 + C - 1 + window, T)  # one past the last query whose window holds these keys
    if INTERPRET:  # see chunk_fwd's ``INTERPRET_LOOP_NOTE``
        t0 = s0
        while t0 < end:
            dv_n, through_g = _bwd_queries(do, m_in, z_in, g_in, stride_do_t, t0, s, l, T, D, d0, window, dv_n,
                                           through_g, C, BD)
            t0 += C
    else:
        for t0 in range(s0, end, C):
            dv_n, through_g = _bwd_queries(do, m_in, z_in, g_in, stride_do_t, t0, s, l, T, D, d0, window, dv_n,
                                           through_g, C, BD)
    store_tile(dv, stride_dv_t, s0, T, d0, D, dv_n, C, BD)
    v_n = load_tile(v, stride_v_t, s0, T, d0, D, C, BD).to(tl.float32)
    dl = tl.sum(v_n * dv_n, 1) - (i_d == 0).to(tl.float32) * through_g
    tl.store(dl_part + s, dl, mask=s < T)


def windowed_cumulative_softmax(logits: Tensor, v: Tensor, window: int) -> Tensor:
    """Windowed cumulative softmax-weighted sums in Triton from an empty state: logits [B, H, T] (any
    strides), v [B, H, T, D], window k ≥ 1 -> o [B, H, T, D] in v's dtype and layout."""
    check_inputs(logits, v)
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be an integer ≥ 1, got {window!r}")
    with _on_device_of(v):
        return WindowedSoftmax.apply(logits, _unit_last_stride(v), window)


class WindowedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, v, window):
        B, H, T, D = v.shape
        o = torch.empty_like(v)
        m_t, z_t = (v.new_empty(B * H, T, dtype=torch.float32) for _ in range(2))
        BD = _block(D, BLOCK_D)
        windowed_softmax_fwd_kernel[(triton.cdiv(T, CHUNK), B * H, triton.cdiv(D, BD))](
            logits, v, o, m_t, z_t, window, T, H, D, *_strides(logits), *_strides(v), *_strides(o),
            C=CHUNK, BD=BD, INTERPRET=interpreting(), **LAUNCH,
        )
        ctx.save_for_backward(logits, v, o, m_t, z_t)
        ctx.window = window
        return o

    @staticmethod
    def backward(ctx, do):
        logits, v, o, m_t, z_t = ctx.saved_tensors
        B, H, T, D = v.shape
        do = _unit_last_stride(do.to(v.dtype))
        BD = _block(D, BLOCK_D)
        blocks = triton.cdiv(D, BD)
        dv = torch.empty_like(v)
        dl_part = v.new_empty(blocks, B * H, T, dtype=torch.float32)
        with _on_device_of(v):
            g = row_dots(o, do)
            windowed_softmax_bwd_kernel[(triton.cdiv(T, CHUNK), B * H, blocks)](
                logits, v, do, m_t, z_t, g, dv, dl_part, ctx.window, T, H, D,
                *_strides(logits), *_strides(v), *_strides(do), *_strides(dv), C=CHUNK, BD=BD,
                INTERPRET=interpreting(), **LAUNCH,
            )
        return dl_part.sum(0).view(B, H, T).to(logits.dtype), dv, None
