"""Backward kernels of the chunked gated linear recurrence (notation as in ``chunk_fwd``).

With dS_n the gradient w.r.t. the state *leaving* chunk n (dS_{N−1} = the final state's gradient, or 0),
h_n the state entering chunk n, A_ts = Σ_j q_tj k_sj exp(b_tj − b_sj) and dP_ts = do_t · v_s:
    dS_{n−1} = diag(exp(b_L)) dS_n + scale · (q ⊙ exp(b))ᵀ do                 (dS_{−1}: initial state)
    dq_t = scale · [exp(b_t) ⊙ (h_n do_t) + Σ_{s≤t} dP_ts exp(b_t − b_s) ⊙ k_s]
    dk_s = exp(b_L − b_s) ⊙ (dS_n v_s) + scale · Σ_{t≥s} dP_ts exp(b_t − b_s) ⊙ q_t
    dv_s = dS_nᵀ (k_s ⊙ exp(b_L − b_s)) + scale · Σ_{t≥s} A_ts do_t
    db_t = q_t ⊙ dq_t − k_t ⊙ dk_t  (+ Σ_v (h_{n+1} ⊙ dS_n) at t = L, through b_L in the state update)
    d log g_t = Σ_{u≥t in the chunk} db_u                                      (b is a cumulative sum)
Per-head gates sum db over the key channels (per key block here; the blocks are summed in PyTorch).

Passes, after ``chunk_states_kernel`` recomputes h_0 … h_N (cheaper than keeping [N+1, D_k, D_v] per
layer alive between forward and backward):
3. ``chunk_state_grads_kernel``, grid (B·H, ⌈D_k/BK⌉, ⌈D_v/BV⌉), reverse over chunks: stores dS_n
   ([B·H, N, D_k, D_v] in the input dtype; the recurrence runs in float32) and the initial state's
   gradient (float32). Per chunk 2·C·D_k·D_v FLOPs; reads q, do, log g, writes D_k·D_v.
4. ``chunk_dv_kernel``, grid (N, B·H, ⌈D_v/BV⌉): needs A over all of D_k. Per chunk 2·C·D_k·D_v +
   2·C²·(D_k + D_v) FLOPs; reads q, k, log g, do and dS_n, writes dv.
5. ``chunk_dqkg_kernel``, grid (N, B·H, ⌈D_k/BK⌉): needs dP, h_n do and dS_n v over all of D_v, so it
   loops over V blocks. Per chunk 4·C·D_k·D_v + 2·C²·D_v + 4·C²·D_k FLOPs (per-channel gates: 4·C²·D_v,
   dP is formed for query and key sub-chunks separately); reads q, k, log g, v, do, h_n, dS_n (and
   h_{n+1} for the gate gradient), writes dq, dk, d log g.
Per-channel gates split pass 5 like the forward's scores: ``chunk_dscores_kernel`` writes dA = dP masked
to t ≥ s (float32 [B·H, N, C, C]), ``chunk_intra_grads_kernel`` turns it into the intra-chunk parts of
dq and dk (per sub-chunk of 16 rows and block of channels, tensor-core dots through one reference row;
its EXACT launch redoes steep sub-chunks with every exponent ≤ 0), and
``chunk_dqkg_kernel`` adds the state terms and forms d log g on whole-chunk tiles; pass 4 reads A as
the forward's ``chunk_fwd.chunk_scores_kernel`` left it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmscale.ops.triton.chunk_fwd import (
    GATE_CHANNEL,
    GATE_SCALAR,
    MAX_SPREAD,
    SUB,
    cumulative_before,
    diagonal_decay,
    load_cumulative,
    load_cumulative_row,
    load_gate_rows,
    load_state,
    load_tile,
    store_state,
    store_tile,
)


@triton.jit
def state_grad_step(q, do, log_g, stride_q_t, stride_do_t, stride_g_t, t0, T, k0, v0, d_state, scale,
                    K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr):
    """The gradient w.r.t. the state entering the chunk at rows t0 … t0+C−1, from the one leaving it:
    diag(exp(b_L)) dS + scale · (q ⊙ exp(b))ᵀ do."""
    q_n = load_tile(q, stride_q_t, t0, T, k0, K, C, BK)
    do_n = load_tile(do, stride_do_t, t0, T, v0, V, C, BV)
    if GATE == GATE_CHANNEL:
        q_n = (q_n * tl.exp(load_cumulative(log_g, stride_g_t, t0, T, k0, K, C, BK, C))).to(do_n.dtype)
        d_state *= tl.exp(load_cumulative_row(log_g, stride_g_t, t0 + C - 1, T, k0, K, BK, C))[:, None]
    elif GATE == GATE_SCALAR:
        g = load_gate_rows(log_g, stride_g_t, t0, T, C)
        q_n = (q_n * tl.exp(tl.cumsum(g, 0))[:, None]).to(do_n.dtype)
        d_state *= tl.exp(tl.sum(g, 0))
    return d_state + scale * tl.dot(tl.trans(q_n), do_n, input_precision="ieee")


@triton.jit
def chunk_state_grads_kernel(
    q, do, log_g, dht, dh, dh0, scale, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_g_b, stride_g_h, stride_g_t,
    K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr, HAS_DHT: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 3: dh[bh, n] = dS_n, reverse over chunks; dh0[bh] = the initial state's gradient."""
    i_bh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    q += i_b * stride_q_b + i_h * stride_q_h
    do += i_b * stride_do_b + i_h * stride_do_h
    log_g += i_b * stride_g_b + i_h * stride_g_h
    dh += i_bh.to(tl.int64) * N * K * V
    k0, v0 = i_k * BK, i_v * BV

    if HAS_DHT:
        d_state = load_state(dht + i_bh.to(tl.int64) * K * V, k0, K, v0, V, BK, BV)
    else:
        d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if INTERPRET:  # see chunk_fwd's ``INTERPRET_LOOP_NOTE``
        n = N - 1
        while n >= 0:
            store_state(dh + tl.cast(n, tl.int64) * K * V, k0, K, v0, V, d_state, BK, BV)
            d_state = state_grad_step(q, do, log_g, stride_q_t, stride_do_t, stride_g_t, n * C, T, k0, v0,
                                      d_state, scale, K, V, GATE, C, BK, BV)
            n -= 1
    else:
        for m in range(N):
            n = N - 1 - m
            store_state(dh + tl.cast(n, tl.int64) * K * V, k0, K, v0, V, d_state, BK, BV)
            d_state = state_grad_step(q, do, log_g, stride_q_t, stride_do_t, stride_g_t, n * C, T, k0, v0,
                                      d_state, scale, K, V, GATE, C, BK, BV)
    store_state(dh0 + i_bh.to(tl.int64) * K * V, k0, K, v0, V, d_state, BK, BV)


@triton.jit
def chunk_dv_kernel(
    q, k, log_g, a, do, dh, dv, scale, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_g_b, stride_g_h, stride_g_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_dv_b, stride_dv_h, stride_dv_t,
    K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Pass 4: dv = (k ⊙ exp(b_L − b)) dS_n + scale · Aᵀ do (A masked to t ≥ s), one chunk and V block.
    Per-channel gates read A from ``chunk_scores_kernel``'s output."""
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    q += i_b * stride_q_b + i_h * stride_q_h
    k += i_b * stride_k_b + i_h * stride_k_h
    log_g += i_b * stride_g_b + i_h * stride_g_h
    do += i_b * stride_do_b + i_h * stride_do_h
    dv += i_b * stride_dv_b + i_h * stride_dv_h
    dh += (i_bh.to(tl.int64) * N + i_n) * K * V  # dS_n
    t0, v0 = i_n * C, i_v * BV
    dt = q.dtype.element_ty
    rows = tl.arange(0, C)

    scores_t = tl.zeros([C, C], dtype=tl.float32)  # [s, t]
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_n = load_tile(k, stride_k_t, t0, T, k0, K, C, BK)
        d_state = load_state(dh, k0, K, v0, V, BK, BV)
        if GATE == GATE_CHANNEL:
            b = load_cumulative(log_g, stride_g_t, t0, T, k0, K, C, BK, C)
            b_last = load_cumulative_row(log_g, stride_g_t, t0 + C - 1, T, k0, K, BK, C)
            k_n = (k_n * tl.exp(b_last[None, :] - b)).to(dt)
        else:
            q_n = load_tile(q, stride_q_t, t0, T, k0, K, C, BK)
            scores_t += tl.dot(k_n, tl.trans(q_n), input_precision="ieee")
        acc += tl.dot(k_n, d_state.to(dt), input_precision="ieee")
    causal_t = rows[:, None] <= rows[None, :]
    if GATE == GATE_CHANNEL:
        a += (i_bh.to(tl.int64) * N + i_n) * C * C
        scores_t = tl.load(a + rows[None, :] * C + rows[:, None], mask=causal_t, other=0.0).to(tl.float32)
    elif GATE == GATE_SCALAR:
        g = load_gate_rows(log_g, stride_g_t, t0, T, C)
        b = tl.cumsum(g, 0)
        acc *= tl.exp(tl.sum(g, 0) - b)[:, None]
        scores_t *= tl.exp(tl.where(causal_t, b[None, :] - b[:, None], float("-inf")))
    else:
        scores_t = tl.where(causal_t, scores_t, 0.0)
    do_n = load_tile(do, stride_do_t, t0, T, v0, V, C, BV)
    acc += tl.dot((scale * scores_t).to(dt), do_n, input_precision="ieee")
    store_tile(dv, stride_dv_t, t0, T, v0, V, acc, C, BV)


@triton.jit
def chunk_dscores_kernel(
    v, do, da, scale, T, N, H,
    stride_v_b, stride_v_h, stride_v_t,
    stride_do_b, stride_do_h, stride_do_t,
    V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
):
    """Per-channel gates, pass 5a: dA = scale · do vᵀ masked to t ≥ s (float32 [B·H, N, C, C]), the
    gradient of the intra-chunk scores, read by ``chunk_intra_grads_kernel``."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    v += i_b * stride_v_b + i_h * stride_v_h
    do += i_b * stride_do_b + i_h * stride_do_h
    da += (i_bh.to(tl.int64) * N + i_n) * C * C
    t0 = i_n * C
    rows = tl.arange(0, C)

    dp = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        do_n = load_tile(do, stride_do_t, t0, T, v0, V, C, BV)
        v_n = load_tile(v, stride_v_t, t0, T, v0, V, C, BV)
        dp += tl.dot(do_n, tl.trans(v_n), input_precision="ieee")
    tl.store(da + rows[:, None] * C + rows[None, :], scale * tl.where(rows[:, None] >= rows[None, :], dp, 0.0))


@triton.jit
def chunk_intra_grads_kernel(
    q, k, log_g, da, steep, dqi, dki, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_g_b, stride_g_h, stride_g_t,
    K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, EXACT: tl.constexpr,
):
    """Per-channel gates, pass 5b: the intra-chunk parts of dq and dk for the rows of sub-chunk i,
    dq_t = Σ_{s≤t} dA_ts exp(b_t − b_s) ⊙ k_s and dk_s = Σ_{t≥s} dA_ts exp(b_t − b_s) ⊙ q_t, into
    float32 [B·H, N·C, D_k] buffers that ``chunk_dqkg_kernel`` adds. Every channel's terms are
    independent. Launched twice.

    EXACT = False, one program per sub-chunk and block of BK channels: both go through r = b at the row
    before the sub-chunk, one [SUB, C] × [C, BK] tensor-core dot each:
    dq_i = exp(b_i − r) ⊙ dA_i,: (k ⊙ exp(min(r − b, MAX_SPREAD))) and
    dk_i = exp(min(r − b_i, MAX_SPREAD)) ⊙ dA_:,iᵀ (q ⊙ exp(min(b − r, 0))), exact wherever the
    sub-chunk's decay spread is ≤ MAX_SPREAD (dA is 0 above the diagonal, where the clamps act).

    EXACT = True, after that, one program per sub-chunk looping over the channel blocks (the flag test
    is all most programs do, and fewer programs launch faster): redoes the sub-chunks the forward's
    ``chunk_scores_kernel`` flagged steep, every exponent ≤ 0. Keys before the sub-chunk meet it through
    r, queries after it through e = b at its last row, each in one dot with the chunk's other rows
    masked out of dA; the diagonal block takes all its (t, s, channel) terms at once
    (``diagonal_decay``)."""
    if EXACT:
        i = tl.program_id(0)
    else:
        i, k_block = tl.program_id(0) // tl.cdiv(K, BK), tl.program_id(0) % tl.cdiv(K, BK)
    i_n, i_bh = tl.program_id(1), tl.program_id(2)
    if EXACT:  # noqa: SIM102 — compile-time branch; Triton keeps it apart from the run-time test
        if tl.load(steep + (i_bh.to(tl.int64) * N + i_n) * (C // SUB) + i) == 0:
            return
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    q += i_b * stride_q_b + i_h * stride_q_h
    k += i_b * stride_k_b + i_h * stride_k_h
    log_g += i_b * stride_g_b + i_h * stride_g_h
    da += (i_bh.to(tl.int64) * N + i_n) * C * C
    t0 = i_n * C
    ts = t0 + i * SUB  # first row of sub-chunk i
    dqi += (i_bh.to(tl.int64) * N * C + ts) * K
    dki += (i_bh.to(tl.int64) * N * C + ts) * K
    dt = q.dtype.element_ty
    sub, rows = tl.arange(0, SUB), tl.arange(0, C)

    if EXACT:
        for k0 in range(0, K, BK):  # blocks of channels, independent (one program per sub-chunk: the
            # flag check is the only work of most programs, so fewer of them launch faster)
            cols = k0 + tl.arange(0, BK)
            b = load_cumulative(log_g, stride_g_t, t0, T, k0, K, C, BK, C)
            r = cumulative_before(log_g, stride_g_t, i, t0, T, k0, K, BK, C)
            e = load_cumulative_row(log_g, stride_g_t, ts + SUB - 1, T, k0, K, BK, C)  # b at its last row
            c = load_cumulative(log_g, stride_g_t, ts, T, k0, K, SUB, BK, C) - r[None, :]  # b − r in it
            k_r = load_tile(k, stride_k_t, t0, T, k0, K, C, BK) * tl.exp(tl.minimum(r[None, :] - b, 0.0))
            da_left = tl.load(da + (i * SUB + sub)[:, None] * C + rows[None, :], mask=rows[None, :] < i * SUB, other=0.0)
            dq = tl.dot(da_left.to(dt), k_r.to(dt), input_precision="ieee") * tl.exp(c)
            q_e = load_tile(q, stride_q_t, t0, T, k0, K, C, BK) * tl.exp(tl.minimum(b - e[None, :], 0.0))
            da_below = tl.load(da + rows[None, :] * C + i * SUB + sub[:, None], mask=rows[None, :] >= (i + 1) * SUB,
                               other=0.0)  # dA[t, s] as [s, t]
            dk = tl.dot(da_below.to(dt), q_e.to(dt), input_precision="ieee") * tl.exp((e - r)[None, :] - c)
            # diagonal block: w[t, s, j] = dA_ts exp(b_tj − b_sj), t ≥ s
            w = tl.load(da + (i * SUB + sub)[:, None] * C + i * SUB + sub[None, :])[:, :, None] * diagonal_decay(
                log_g, stride_g_t, ts, T, k0, K, BK, C)
            k_i = load_tile(k, stride_k_t, ts, T, k0, K, SUB, BK).to(tl.float32)
            q_i = load_tile(q, stride_q_t, ts, T, k0, K, SUB, BK).to(tl.float32)
            mask = cols[None, :] < K
            tl.store(dqi + sub[:, None] * K + cols[None, :], dq + tl.sum(w * k_i[None, :, :], 1), mask=mask)
            tl.store(dki + sub[:, None] * K + cols[None, :], dk + tl.sum(w * q_i[:, None, :], 0), mask=mask)
    else:
        k0 = k_block * BK
        cols = k0 + tl.arange(0, BK)
        b = load_cumulative(log_g, stride_g_t, t0, T, k0, K, C, BK, C)
        r = cumulative_before(log_g, stride_g_t, i, t0, T, k0, K, BK, C)
        b_i = load_cumulative(log_g, stride_g_t, ts, T, k0, K, SUB, BK, C)
        k_r = load_tile(k, stride_k_t, t0, T, k0, K, C, BK) * tl.exp(tl.minimum(r[None, :] - b, MAX_SPREAD))
        da_rows = tl.load(da + (i * SUB + sub)[:, None] * C + rows[None, :])  # dA[t, s], t in sub-chunk i
        dq = tl.dot(da_rows.to(dt), k_r.to(dt), input_precision="ieee") * tl.exp(b_i - r[None, :])
        q_r = load_tile(q, stride_q_t, t0, T, k0, K, C, BK) * tl.exp(tl.minimum(b - r[None, :], 0.0))
        da_cols = tl.load(da + rows[:, None] * C + i * SUB + sub[None, :])  # dA[t, s], s in sub-chunk i
        dk = tl.dot(tl.trans(da_cols).to(dt), q_r.to(dt), input_precision="ieee")
        dk *= tl.exp(tl.minimum(r[None, :] - b_i, MAX_SPREAD))
        mask = cols[None, :] < K
        tl.store(dqi + sub[:, None] * K + cols[None, :], dq, mask=mask)
        tl.store(dki + sub[:, None] * K + cols[None, :], dk, mask=mask)


@triton.jit
def chunk_dqkg_kernel(
    q, k, v, log_g, do, h, dh, dqi, dki, dq, dk, dg, scale, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_g_b, stride_g_h, stride_g_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_dq_b, stride_dq_h, stride_dq_t,
    stride_dk_b, stride_dk_h, stride_dk_t,
    stride_dg_b, stride_dg_h, stride_dg_t,
    K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr, NEED_DG: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """Pass 5: dq, dk and d log g of one chunk and K block. Per-head gates write this K block's share of
    d log g into dg[i_k] ([⌈D_k/BK⌉, B·H, T], contiguous); per-channel gates write d log g itself and add
    the intra-chunk parts from ``chunk_intra_grads_kernel`` (dqi, dki: float32 [B·H, N·C, D_k])."""
    i_n, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    q += i_b * stride_q_b + i_h * stride_q_h
    k += i_b * stride_k_b + i_h * stride_k_h
    v += i_b * stride_v_b + i_h * stride_v_h
    log_g += i_b * stride_g_b + i_h * stride_g_h
    do += i_b * stride_do_b + i_h * stride_do_h
    dq += i_b * stride_dq_b + i_h * stride_dq_h
    dk += i_b * stride_dk_b + i_h * stride_dk_h
    h += (i_bh.to(tl.int64) * (N + 1) + i_n) * K * V  # h_n; h_{n+1} follows it
    dh += (i_bh.to(tl.int64) * N + i_n) * K * V  # dS_n
    t0, k0 = i_n * C, i_k * BK
    dt = q.dtype.element_ty
    rows = tl.arange(0, C)

    # d log g through b_L in the state update: Σ_v h_{n+1} ⊙ dS_n, reaching every row of the chunk
    end_term = tl.zeros([BK], dtype=tl.float32)
    if NEED_DG:
        for v0 in range(0, V, BV):
            h_next = load_state(h + K * V, k0, K, v0, V, BK, BV).to(tl.float32)
            end_term += tl.sum(h_next * load_state(dh, k0, K, v0, V, BK, BV).to(tl.float32), 1)

    dp = tl.zeros([C, C], dtype=tl.float32)
    dq_n = tl.zeros([C, BK], dtype=tl.float32)
    dk_n = tl.zeros([C, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        do_n = load_tile(do, stride_do_t, t0, T, v0, V, C, BV)
        v_n = load_tile(v, stride_v_t, t0, T, v0, V, C, BV)
        h_n = load_state(h, k0, K, v0, V, BK, BV).to(dt)
        d_state = load_state(dh, k0, K, v0, V, BK, BV).to(dt)
        if GATE != GATE_CHANNEL:
            dp += tl.dot(do_n, tl.trans(v_n), input_precision="ieee")
        dq_n += tl.dot(do_n, tl.trans(h_n), input_precision="ieee")
        dk_n += tl.dot(v_n, tl.trans(d_state), input_precision="ieee")
    q_n = load_tile(q, stride_q_t, t0, T, k0, K, C, BK)
    k_n = load_tile(k, stride_k_t, t0, T, k0, K, C, BK)
    if GATE == GATE_CHANNEL:
        b = load_cumulative(log_g, stride_g_t, t0, T, k0, K, C, BK, C)
        b_last = load_cumulative_row(log_g, stride_g_t, t0 + C - 1, T, k0, K, BK, C)
        intra = (i_bh.to(tl.int64) * N + i_n) * C * K
        dq_n = scale * tl.exp(b) * dq_n + load_tile(dqi + intra, K, 0, C, k0, K, C, BK)
        dk_n = tl.exp(b_last[None, :] - b) * dk_n + load_tile(dki + intra, K, 0, C, k0, K, C, BK)
    else:
        causal = rows[:, None] >= rows[None, :]
        if GATE == GATE_SCALAR:
            g = load_gate_rows(log_g, stride_g_t, t0, T, C)
            b = tl.cumsum(g, 0)
            dq_n *= tl.exp(b)[:, None]
            dk_n *= tl.exp(tl.sum(g, 0) - b)[:, None]
            dp *= tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        else:
            dp = tl.where(causal, dp, 0.0)
        dq_n = scale * (dq_n + tl.dot(dp.to(dt), k_n, input_precision="ieee"))
        dk_n += scale * tl.dot(tl.trans(dp).to(dt), q_n, input_precision="ieee")
    store_tile(dq, stride_dq_t, t0, T, k0, K, dq_n, C, BK)
    store_tile(dk, stride_dk_t, t0, T, k0, K, dk_n, C, BK)
    if NEED_DG:
        if GATE == GATE_CHANNEL:
            db = q_n * dq_n - k_n * dk_n
            dg += i_b * stride_dg_b + i_h * stride_dg_h
            store_tile(dg, stride_dg_t, t0, T, k0, K, tl.cumsum(db, 0, reverse=True) + end_term[None, :], C, BK)
        elif GATE == GATE_SCALAR:
            db = tl.sum(q_n * dq_n - k_n * dk_n, 1) + tl.where(rows == C - 1, tl.sum(end_term, 0), 0.0)
            dg += (i_k.to(tl.int64) * tl.num_programs(1) + i_bh) * T
            tl.store(dg + t0 + rows, tl.cumsum(db, 0, reverse=True), mask=t0 + rows < T)
