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

Passes, after ``chunk_states_kernel`` recomputes h_0 … h_N (cheaper than keeping [N+1, D_k, D_v] float32
per layer alive between forward and backward):
3. ``chunk_state_grads_kernel``, grid (B·H, ⌈D_k/BK⌉, ⌈D_v/BV⌉), reverse over chunks: stores dS_n
   (float32 [B·H, N, D_k, D_v]) and the initial state's gradient. Per chunk 2·C·D_k·D_v FLOPs; reads q,
   do, log g, writes D_k·D_v float32.
4. ``chunk_dv_kernel``, grid (N, B·H, ⌈D_v/BV⌉): needs A over all of D_k. Per chunk 2·C·D_k·D_v +
   2·C²·(D_k + D_v) FLOPs; reads q, k, log g, do and dS_n, writes dv.
5. ``chunk_dqkg_kernel``, grid (N, B·H, ⌈D_k/BK⌉): needs dP, h_n do and dS_n v over all of D_v, so it
   loops over V blocks. Per chunk 4·C·D_k·D_v + 2·C²·D_v + 4·C²·D_k FLOPs (per-channel gates: 4·C²·D_v,
   dP is formed for query and key sub-chunks separately); reads q, k, log g, v, do, h_n, dS_n (and
   h_{n+1} for the gate gradient), writes dq, dk, d log g.
Per-channel gates split pass 5 like the forward's scores: ``chunk_dscores_kernel`` writes dA = dP masked
to t ≥ s (float32 [B·H, N, C, C]), ``chunk_intra_grads_kernel`` turns it into the intra-chunk parts of
dq and dk (per sub-chunk of 16 rows over all of D_k, references at the sub-chunk's start and end, every
exponent ≤ 0), and ``chunk_dqkg_kernel`` adds the state terms and forms d log g on whole-chunk tiles;
pass 4 reads A from ``chunk_fwd.chunk_scores_kernel``, rerun in the backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmscale.ops.triton.chunk_fwd import (
    GATE_CHANNEL,
    GATE_SCALAR,
    SUB,
    load_gate_rows,
    load_row,
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
        g = load_tile(log_g, stride_g_t, t0, T, k0, K, C, BK).to(tl.float32)
        q_n = (q_n * tl.exp(tl.cumsum(g, 0))).to(do_n.dtype)
        d_state *= tl.exp(tl.sum(g, 0))[:, None]
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
            g = load_tile(log_g, stride_g_t, t0, T, k0, K, C, BK).to(tl.float32)
            k_n = (k_n * tl.exp(tl.sum(g, 0)[None, :] - tl.cumsum(g, 0))).to(dt)
        else:
            q_n = load_tile(q, stride_q_t, t0, T, k0, K, C, BK)
            scores_t += tl.dot(k_n, tl.trans(q_n), input_precision="ieee")
        acc += tl.dot(k_n, d_state.to(dt), input_precision="ieee")
    causal_t = rows[:, None] <= rows[None, :]
    if GATE == GATE_CHANNEL:
        a += (i_bh.to(tl.int64) * N + i_n) * C * C
        scores_t = tl.load(a + rows[None, :] * C + rows[:, None], mask=causal_t, other=0.0)
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
    q, k, log_g, da, dqi, dki, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_g_b, stride_g_h, stride_g_t,
    K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
):
    """Per-channel gates, pass 5b: the intra-chunk parts of dq and dk for the rows of sub-chunk i,
    dq_t = Σ_{s≤t} dA_ts exp(b_t − b_s) ⊙ k_s and dk_s = Σ_{t≥s} dA_ts exp(b_t − b_s) ⊙ q_t, into
    float32 [B·H, N·C, D_k] buffers that ``chunk_dqkg_kernel`` adds. BK covers all of D_k, every tile has
    SUB rows. Earlier (later) sub-chunks meet sub-chunk i through b at its start (end), one [SUB, SUB]
    block of dA at a time; the diagonal block goes one row at a time, every operand a vector load, so no
    reductions."""
    i_n, i_bh, i = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    sub, cols = tl.arange(0, SUB), tl.arange(0, BK)

    g_i = load_tile(log_g, stride_g_t, ts, T, 0, K, SUB, BK).to(tl.float32)
    c, total = tl.cumsum(g_i, 0), tl.sum(g_i, 0)  # b − r in sub-chunk i (r = b before it), and at its end
    dq = tl.zeros([SUB, BK], dtype=tl.float32)
    to_r = tl.zeros([BK], dtype=tl.float32)  # r − b at the end of sub-chunk j, ≤ 0
    for jj in tl.static_range(C // SUB):  # keys of sub-chunks j = i−1 … 0
        j = C // SUB - 1 - jj
        if j < i:
            g_j = load_tile(log_g, stride_g_t, t0 + j * SUB, T, 0, K, SUB, BK).to(tl.float32)
            total_j = tl.sum(g_j, 0)
            k_j = load_tile(k, stride_k_t, t0 + j * SUB, T, 0, K, SUB, BK)
            k_to_r = (k_j * tl.exp(to_r[None, :] + total_j[None, :] - tl.cumsum(g_j, 0))).to(dt)
            da_ij = tl.load(da + (i * SUB + sub)[:, None] * C + j * SUB + sub[None, :])  # dA[t, s]
            dq += tl.dot(da_ij.to(dt), k_to_r, input_precision="ieee")
            to_r += total_j
    dq *= tl.exp(c)
    dk = tl.zeros([SUB, BK], dtype=tl.float32)
    from_end = tl.zeros([BK], dtype=tl.float32)  # b at the start of sub-chunk j − b at the end of i, ≤ 0
    for j in tl.static_range(C // SUB):  # queries of sub-chunks j = i+1 …
        if j > i:
            g_j = load_tile(log_g, stride_g_t, t0 + j * SUB, T, 0, K, SUB, BK).to(tl.float32)
            q_j = load_tile(q, stride_q_t, t0 + j * SUB, T, 0, K, SUB, BK)
            q_from_end = (q_j * tl.exp(from_end[None, :] + tl.cumsum(g_j, 0))).to(dt)
            da_ji = tl.load(da + (j * SUB + sub[None, :]) * C + i * SUB + sub[:, None])  # dA[t, s] as [s, t]
            dk += tl.dot(da_ji.to(dt), q_from_end, input_precision="ieee")
            from_end += tl.sum(g_j, 0)
    dk *= tl.exp(total[None, :] - c)
    c_s = tl.zeros([BK], dtype=tl.float32)
    for s in range(SUB):  # diagonal block: row s as the key of dq's pairs and the query of dk's
        k_s = load_row(k, stride_k_t, ts + s, T, K, BK)
        q_s = load_row(q, stride_q_t, ts + s, T, K, BK)
        c_s += load_row(log_g, stride_g_t, ts + s, T, K, BK)
        da_col = tl.load(da + (i * SUB + sub) * C + i * SUB + s)  # dA[t, s]
        da_row = tl.load(da + (i * SUB + s) * C + i * SUB + sub)  # dA[s, u]
        dq += da_col[:, None] * tl.exp(tl.where(sub[:, None] >= s, c - c_s[None, :], float("-inf"))) * k_s[None, :]
        dk += da_row[:, None] * tl.exp(tl.where(sub[:, None] <= s, c_s[None, :] - c, float("-inf"))) * q_s[None, :]
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
            h_next = load_state(h + K * V, k0, K, v0, V, BK, BV)
            end_term += tl.sum(h_next * load_state(dh, k0, K, v0, V, BK, BV), 1)

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
        g = load_tile(log_g, stride_g_t, t0, T, k0, K, C, BK).to(tl.float32)
        b = tl.cumsum(g, 0)
        intra = (i_bh.to(tl.int64) * N + i_n) * C * K
        dq_n = scale * tl.exp(b) * dq_n + load_tile(dqi + intra, K, 0, C, k0, K, C, BK)
        dk_n = tl.exp(tl.sum(g, 0)[None, :] - b) * dk_n + load_tile(dki + intra, K, 0, C, k0, K, C, BK)
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
