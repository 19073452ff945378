"""Forward kernels of the chunked gated linear recurrence, and the tile helpers the backward shares.

Notation (per batch·head, chunk n of C positions t = 0 … C−1): b_t = Σ_{u≤t} log g_u, the cumulative log
decay from the chunk start; h_n = the state entering chunk n. Per-head gates compute b in each kernel
with ``tl.cumsum`` over C values; per-channel gates get it from one pass to memory first
(``chunk_cumsum_kernel``, float32, kept for the backward), because a scan across the rows of a
[C, D_k] tile inside every kernel's loop cost more than reading it. Two passes:

1. ``chunk_states_kernel``, grid (B·H, ⌈D_k/BK⌉, ⌈D_v/BV⌉), sequential over the N chunks:
       h_{n+1} = diag(exp(b_L)) h_n + (k ⊙ exp(b_L − b))ᵀ v        (L = the chunk's last row)
   stores h_0 … h_N in the input dtype, [B·H, N+1, D_k, D_v], and h_N (the final state) again in
   float32. The recurrence runs in float32 registers (the states compound over thousands of chunks);
   what is stored is read as dot operands, cast to the input dtype anyway, so bf16 halves its traffic.
   Per chunk: 2·C·D_k·D_v FLOPs; reads C·(D_k + D_v) input elements and C·D_k log gates (C per head),
   writes D_k·D_v float32 — for D = 128, C = 64 the state write (64 KiB) is twice the k, v read (bf16).
2. ``chunk_output_kernel``, grid (N, B·H, ⌈D_v/BV⌉), parallel over chunks:
       o = scale · [(q ⊙ exp(b)) h_n + intra(q, k, b) v]
   Per chunk: 2·C·D_k·D_v FLOPs for the state, 2·C²·(D_k + D_v) for the intra-chunk pairs (half of
   them masked); reads q, k, log g, v and h_n (D_k·D_v float32), writes o. q, k and the gates are read
   once per V block: BV covers D_v ≤ 128 in one block, so once.

Intra-chunk pairs keep every exponent ≤ 0, so nothing overflows whatever the gates (strong decays
underflow to 0, which is also their true value to float32 precision):
- one decay per head (or none): a C×C masked matmul, exp(b_t − b_s) masked to t ≥ s *before* exp.
- one decay per key channel: ``chunk_scores_kernel`` first writes the chunk's score matrix
  A_ts = Σ_j q_tj k_sj exp(b_tj − b_sj) (s ≤ t, 0 above; float32 [B·H, N, C, C]), one program per query
  sub-chunk of SUB = 16 rows over all of D_k, and the output kernel reads it: o = (q ⊙ exp(b)) h_n + A v,
  plain dots. Query sub-chunk i meets every earlier key through r = b at the last row of sub-chunk i−1:
  (q ⊙ exp(b − r)) (k ⊙ exp(r − b))ᵀ, both ≤ 0 since b never increases; pairs inside sub-chunk i take the
  exact per-channel decay, as a [SUB, SUB, channels] cube (``diagonal_decay``): C·SUB·D_k exps per chunk,
  the kernel's elementwise cost. Splitting A out keeps the output kernel's tiles at C rows (16-row tiles
  waste the tensor cores).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Globals a kernel reads must be tl.constexpr objects (plain ints compile in the interpreter only).
# The GATE constexpr: log_g None, [B, H, T] (per head) or [B, H, T, D_k] (per channel).
GATE_NONE, GATE_SCALAR, GATE_CHANNEL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
SUB = tl.constexpr(16)  # sub-chunk length for per-channel gates: the smallest side tl.dot takes
# Per-channel gates: the largest log decay inside one sub-chunk that its tensor-core form takes (keys
# scaled by up to e^40, queries by down to e^−40, both within bf16's and float32's range with room for
# products); steeper sub-chunks take the exact form, every exponent ≤ 0.
MAX_SPREAD = tl.constexpr(40.0)
# INTERPRET_LOOP_NOTE: the sequential kernels loop over a runtime number of chunks. Triton 3.6's CPU
# interpreter turns `for n in range(N)` into int() of a one-element array, which NumPy ≥ 2.4 refuses, so
# under the interpreter (INTERPRET=True) they loop with `while`; on the GPU `for` lets Triton pipeline
# the next chunk's loads behind this chunk's dot. Head dims are constexpr for the same reason (and so
# the K and V block loops have known trip counts).


@triton.jit
def load_tile(x, stride_t, t0, T, c0, D, R: tl.constexpr, W: tl.constexpr):
    """Rows t0 … t0+R−1, columns c0 … c0+W−1 of a [T, D] slice with unit column stride; 0 outside."""
    r = tl.arange(0, R)
    c = c0 + tl.arange(0, W)
    ptr = x + tl.cast(t0, tl.int64) * stride_t + r[:, None] * stride_t + c[None, :]
    return tl.load(ptr, mask=(t0 + r[:, None] < T) & (c[None, :] < D), other=0.0)


@triton.jit
def store_tile(x, stride_t, t0, T, c0, D, value, R: tl.constexpr, W: tl.constexpr):
    r = tl.arange(0, R)
    c = c0 + tl.arange(0, W)
    ptr = x + tl.cast(t0, tl.int64) * stride_t + r[:, None] * stride_t + c[None, :]
    tl.store(ptr, value.to(x.dtype.element_ty), mask=(t0 + r[:, None] < T) & (c[None, :] < D))


@triton.jit
def load_gate_rows(x, stride_t, t0, T, R: tl.constexpr):
    """Per-head log gates of rows t0 … t0+R−1 as float32 [R]; 0 (no decay) past T."""
    r = tl.arange(0, R)
    g = tl.load(x + tl.cast(t0, tl.int64) * stride_t + r * stride_t, mask=t0 + r < T, other=0.0)
    return g.to(tl.float32)


@triton.jit
def load_state(x, k0, K, v0, V, BK: tl.constexpr, BV: tl.constexpr):
    """Block [k0:k0+BK, v0:v0+BV] of a contiguous [K, V] state, in its dtype."""
    rk = k0 + tl.arange(0, BK)
    rv = v0 + tl.arange(0, BV)
    return tl.load(x + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & (rv[None, :] < V), other=0.0)


@triton.jit
def store_state(x, k0, K, v0, V, value, BK: tl.constexpr, BV: tl.constexpr):
    rk = k0 + tl.arange(0, BK)
    rv = v0 + tl.arange(0, BV)
    tl.store(x + rk[:, None] * V + rv[None, :], value.to(x.dtype.element_ty),
             mask=(rk[:, None] < K) & (rv[None, :] < V))


@triton.jit
def load_row(x, stride_t, t, T, D, W: tl.constexpr):
    """Row t of a [T, D] slice as float32 [W]; 0 past T or D (an L1-cached vector load)."""
    c = tl.arange(0, W)
    return tl.load(x + tl.cast(t, tl.int64) * stride_t + c, mask=(t < T) & (c < D), other=0.0).to(tl.float32)


@triton.jit
def load_cumulative(b, stride_t, t0, T, c0, D, R: tl.constexpr, W: tl.constexpr, C: tl.constexpr):
    """Rows t0 … t0+R−1, columns c0 … c0+W−1 of per-channel gates' in-chunk cumulative log decays b
    (``chunk_cumsum_kernel``'s float32 buffer, whose rows past T repeat the last one: no decay there)."""
    return load_tile(b, stride_t, t0, tl.cdiv(T, C) * C, c0, D, R, W)


@triton.jit
def load_cumulative_row(b, stride_t, t, T, c0, D, W: tl.constexpr, C: tl.constexpr):
    """Row t, columns c0 … c0+W−1 of the cumulative log decays b (see ``load_cumulative``)."""
    return load_row(b + c0, stride_t, t, tl.cdiv(T, C) * C, D - c0, W)


@triton.jit
def cumulative_before(b, stride_t, i, t0, T, k0, K, W: tl.constexpr, C: tl.constexpr):
    """r = b at the row before sub-chunk i of the chunk starting at t0, the reference row through which
    the sub-chunk meets other rows (0 for the chunk's first sub-chunk, whose earlier rows are none)."""
    row = tl.maximum(t0 + i * SUB - 1, t0)
    return tl.where(i > 0, load_cumulative_row(b, stride_t, row, T, k0, K, W, C), 0.0)


@triton.jit
def chunk_cumsum_kernel(
    log_g, b, T, N, H, stride_g_b, stride_g_h, stride_g_t,
    K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
):
    """Per-channel gates, before every other kernel: b_t = Σ_{u≤t in the chunk} log g_u into float32
    [B, H, N·C, D_k] (log g = 0 past T, so rows past T repeat the last). The other kernels read b instead
    of log g: a scan across a tile's rows inside their loops cost more than this one pass."""
    i_n, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    log_g += i_b * stride_g_b + i_h * stride_g_h
    b += (i_bh.to(tl.int64) * N + i_n) * C * K
    t0, k0 = i_n * C, i_k * BK
    g = load_tile(log_g, stride_g_t, t0, T, k0, K, C, BK).to(tl.float32)
    store_tile(b, K, 0, C, k0, K, tl.cumsum(g, 0), C, BK)


@triton.jit
def state_step(k, v, log_g, stride_k_t, stride_v_t, stride_g_t, t0, T, k0, v0, state,
               K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr, C: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    """The state leaving the chunk at rows t0 … t0+C−1: diag(exp(b_L)) h + (k ⊙ exp(b_L − b))ᵀ v."""
    k_n = load_tile(k, stride_k_t, t0, T, k0, K, C, BK)
    v_n = load_tile(v, stride_v_t, t0, T, v0, V, C, BV)
    if GATE == GATE_CHANNEL:
        b = load_cumulative(log_g, stride_g_t, t0, T, k0, K, C, BK, C)
        b_last = load_cumulative_row(log_g, stride_g_t, t0 + C - 1, T, k0, K, BK, C)
        k_n = (k_n * tl.exp(b_last[None, :] - b)).to(k_n.dtype)
        state *= tl.exp(b_last)[:, None]
    elif GATE == GATE_SCALAR:
        g = load_gate_rows(log_g, stride_g_t, t0, T, C)
        b, b_last = tl.cumsum(g, 0), tl.sum(g, 0)
        k_n = (k_n * tl.exp(b_last - b)[:, None]).to(k_n.dtype)
        state *= tl.exp(b_last)
    return state + tl.dot(tl.trans(k_n), v_n, input_precision="ieee")


@triton.jit
def chunk_states_kernel(
    k, v, log_g, h0, h, final, T, N, H,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_g_b, stride_g_h, stride_g_t,
    K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr, HAS_H0: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 1: h[bh, n] = state entering chunk n, n = 0 … N, in h's dtype (the input dtype: its readers
    cast it to that for their dots, or sum products in float32), and the final state h_N in float32
    (``final``). The recurrence itself runs in float32 registers."""
    i_bh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    k += i_b * stride_k_b + i_h * stride_k_h
    v += i_b * stride_v_b + i_h * stride_v_h
    log_g += i_b * stride_g_b + i_h * stride_g_h
    h += i_bh.to(tl.int64) * (N + 1) * K * V
    k0, v0 = i_k * BK, i_v * BV

    if HAS_H0:
        state = load_state(h0 + i_bh.to(tl.int64) * K * V, k0, K, v0, V, BK, BV)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    if INTERPRET:  # see ``INTERPRET_LOOP_NOTE``
        n = 0
        while n < N:
            store_state(h + tl.cast(n, tl.int64) * K * V, k0, K, v0, V, state, BK, BV)
            state = state_step(k, v, log_g, stride_k_t, stride_v_t, stride_g_t, n * C, T, k0, v0, state,
                               K, V, GATE, C, BK, BV)
            n += 1
    else:
        for n in range(N):
            store_state(h + tl.cast(n, tl.int64) * K * V, k0, K, v0, V, state, BK, BV)
            state = state_step(k, v, log_g, stride_k_t, stride_v_t, stride_g_t, n * C, T, k0, v0, state,
                               K, V, GATE, C, BK, BV)
    store_state(h + tl.cast(N, tl.int64) * K * V, k0, K, v0, V, state, BK, BV)
    store_state(final + i_bh.to(tl.int64) * K * V, k0, K, v0, V, state, BK, BV)


@triton.jit
def chunk_scores_kernel(
    q, k, log_g, a, steep, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_g_b, stride_g_h, stride_g_t,
    K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, DK: tl.constexpr, EXACT: tl.constexpr,
):
    """Per-channel gates: rows of query sub-chunk i of the chunk's A ([C, C] in a's dtype, the input
    dtype: the readers cast A to it for their dots anyway; entries above the diagonal are left
    unwritten, readers mask them), A_ts = Σ_j q_tj k_sj exp(b_tj − b_sj) for s ≤ t. Launched twice.

    EXACT = False: every key up to the sub-chunk's end meets its queries through r = b at the row
    before it, in one [SUB, C] tensor-core dot per K block: (q ⊙ exp(b − r)) (k ⊙ exp(min(r − b,
    MAX_SPREAD)))ᵀ. Keys before the sub-chunk have r − b ≤ 0; keys inside it have r − b ≤ the
    sub-chunk's decay spread max_j (r_j − b_j at its last row). Where that spread exceeds MAX_SPREAD,
    the clamp makes the diagonal block wrong (never inf or NaN), so the program sets its ``steep`` flag.

    EXACT = True, after that: redoes the flagged sub-chunks with every exponent ≤ 0 (other programs
    return at once). Keys before the sub-chunk as above but clamped at 0 and stored left of the diagonal
    only; the diagonal block takes every (t, s, channel) term at once, DK channels at a time, masked
    before exp (``diagonal_decay``)."""
    i, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    flag = steep + (i_bh.to(tl.int64) * N + i_n) * (C // SUB) + i
    if EXACT:  # noqa: SIM102 — compile-time branch; Triton keeps it apart from the run-time test
        if tl.load(flag) == 0:
            return
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    q += i_b * stride_q_b + i_h * stride_q_h
    k += i_b * stride_k_b + i_h * stride_k_h
    log_g += i_b * stride_g_b + i_h * stride_g_h
    a += ((i_bh.to(tl.int64) * N + i_n) * C + i * SUB) * C  # row i·SUB of this chunk's A
    t0 = i_n * C
    ts = t0 + i * SUB  # first row of query sub-chunk i
    dt = q.dtype.element_ty
    sub, rows = tl.arange(0, SUB), tl.arange(0, C)

    top = MAX_SPREAD  # keys inside the sub-chunk scaled by up to e^top
    if EXACT:
        top = 0.0
    scores = tl.zeros([SUB, C], dtype=tl.float32)
    spread = 0.0
    for k0 in range(0, K, BK):
        r = cumulative_before(log_g, stride_g_t, i, t0, T, k0, K, BK, C)
        spread = tl.maximum(spread, tl.max(r - load_cumulative_row(log_g, stride_g_t, ts + SUB - 1, T, k0, K, BK, C), 0))
        b = load_cumulative(log_g, stride_g_t, t0, T, k0, K, C, BK, C)
        k_r = load_tile(k, stride_k_t, t0, T, k0, K, C, BK) * tl.exp(tl.minimum(r[None, :] - b, top))
        b_i = load_cumulative(log_g, stride_g_t, ts, T, k0, K, SUB, BK, C)
        q_r = load_tile(q, stride_q_t, ts, T, k0, K, SUB, BK) * tl.exp(b_i - r[None, :])
        scores += tl.dot(q_r.to(dt), tl.trans(k_r.to(dt)), input_precision="ieee")
    if EXACT:
        tl.store(a + sub[:, None] * C + rows[None, :], scores.to(a.dtype.element_ty), mask=rows[None, :] < i * SUB)
        diag = tl.zeros([SUB, SUB], dtype=tl.float32)
        for k0 in range(0, K, DK):  # diagonal block: every (t, s, channel) term at once, DK channels a step
            q_d = load_tile(q, stride_q_t, ts, T, k0, K, SUB, DK).to(tl.float32)
            k_d = load_tile(k, stride_k_t, ts, T, k0, K, SUB, DK).to(tl.float32)
            decay = diagonal_decay(log_g, stride_g_t, ts, T, k0, K, DK, C)
            diag += tl.sum(q_d[:, None, :] * k_d[None, :, :] * decay, 2)
        tl.store(a + sub[:, None] * C + i * SUB + sub[None, :], diag.to(a.dtype.element_ty))
    else:
        tl.store(a + sub[:, None] * C + rows[None, :], scores.to(a.dtype.element_ty),
                 mask=rows[None, :] <= i * SUB + sub[:, None])
        tl.store(flag, (spread > MAX_SPREAD).to(tl.int8))


@triton.jit
def diagonal_decay(b, stride_t, ts, T, k0, K, DK: tl.constexpr, C: tl.constexpr):
    """exp(b_tj − b_sj) for rows t, s of the sub-chunk starting at ts and channels k0 … k0+DK−1, masked
    to t ≥ s before exp (so every exponent is ≤ 0): float32 [SUB, SUB, DK], indexed [t, s, j]. Forming
    the whole cube keeps the diagonal block free of a serial per-row chain (each row's load, exp and
    reduction waiting on the last), which made the row-at-a-time version latency-bound."""
    c = load_cumulative(b, stride_t, ts, T, k0, K, SUB, DK, C)
    sub = tl.arange(0, SUB)
    causal = (sub[:, None] >= sub[None, :])[:, :, None]
    return tl.exp(tl.where(causal, c[:, None, :] - c[None, :, :], float("-inf")))


@triton.jit
def chunk_output_kernel(
    q, k, v, log_g, a, h, o, scale, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_g_b, stride_g_h, stride_g_t,
    stride_o_b, stride_o_h, stride_o_t,
    K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Pass 2: o = scale · [(q ⊙ exp(b)) h_n + intra-chunk pairs], one chunk and V block per program.
    Per-channel gates read the pairs' scores from A ([B·H, N, C, C], ``chunk_scores_kernel``)."""
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    q += i_b * stride_q_b + i_h * stride_q_h
    k += i_b * stride_k_b + i_h * stride_k_h
    v += i_b * stride_v_b + i_h * stride_v_h
    log_g += i_b * stride_g_b + i_h * stride_g_h
    o += i_b * stride_o_b + i_h * stride_o_h
    h += (i_bh.to(tl.int64) * (N + 1) + i_n) * K * V  # h_n
    t0, v0 = i_n * C, i_v * BV
    dt = q.dtype.element_ty
    rows = tl.arange(0, C)

    scores = tl.zeros([C, C], dtype=tl.float32)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        q_n = load_tile(q, stride_q_t, t0, T, k0, K, C, BK)
        h_n = load_state(h, k0, K, v0, V, BK, BV)
        if GATE == GATE_CHANNEL:
            q_n = (q_n * tl.exp(load_cumulative(log_g, stride_g_t, t0, T, k0, K, C, BK, C))).to(dt)
        else:
            k_n = load_tile(k, stride_k_t, t0, T, k0, K, C, BK)
            scores += tl.dot(q_n, tl.trans(k_n), input_precision="ieee")
        acc += tl.dot(q_n, h_n.to(dt), input_precision="ieee")
    causal = rows[:, None] >= rows[None, :]
    if GATE == GATE_CHANNEL:
        a += (i_bh.to(tl.int64) * N + i_n) * C * C
        scores = tl.load(a + rows[:, None] * C + rows[None, :], mask=causal, other=0.0).to(tl.float32)
    elif GATE == GATE_SCALAR:
        b = tl.cumsum(load_gate_rows(log_g, stride_g_t, t0, T, C), 0)
        acc *= tl.exp(b)[:, None]
        scores *= tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    else:
        scores = tl.where(causal, scores, 0.0)
    v_n = load_tile(v, stride_v_t, t0, T, v0, V, C, BV)
    acc += tl.dot(scores.to(dt), v_n, input_precision="ieee")
    store_tile(o, stride_o_t, t0, T, v0, V, acc * scale, C, BV)
