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
Per-channel gates use the sub-chunks of the forward; the reference for a key sub-chunk j meeting later
queries is b at the last row of sub-chunk j. Every exponent stays ≤ 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmscale.ops.triton.chunk_fwd import (
    GATE_CHANNEL,
    GATE_SCALAR,
    SUB,
    diag_scores,
    load_gate_rows,
    load_state,
    load_tile,
    rows_before,
    store_state,
    store_tile,
)


@triton.jit
def diag_grads(q, k, c, dp, SUB: tl.constexpr):
    """Inside one sub-chunk: dq[t] = Σ_{s≤t} dp[t, s] exp(c_t − c_s) ⊙ k_s and
    dk[s] = Σ_{t≥s} dp[t, s] exp(c_t − c_s) ⊙ q_t (without scale). q, k, c: [SUB, BK]; dp: [SUB, SUB]."""
    idx = tl.arange(0, SUB)
    k = k.to(tl.float32)
    dq = tl.zeros(c.shape, dtype=tl.float32)
    dk = tl.zeros(c.shape, dtype=tl.float32)
    for s in range(SUB):
        row = idx[:, None] == s
        k_s = tl.sum(tl.where(row, k, 0.0), 0)
        c_s = tl.sum(tl.where(row, c, 0.0), 0)
        decay = tl.exp(tl.where(idx[:, None] >= s, c - c_s[None, :], float("-inf")))  # [t, j], t ≥ s
        w = tl.sum(tl.where(idx[None, :] == s, dp, 0.0), 1)[:, None] * decay  # dp[t, s] exp(c_t − c_s)
        dq += w * k_s[None, :]
        dk += tl.where(row, tl.sum(w * q, 0)[None, :], 0.0)
    return dq, dk


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
    q, k, log_g, do, dh, dv, scale, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_g_b, stride_g_h, stride_g_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_dv_b, stride_dv_h, stride_dv_t,
    K: tl.constexpr, V: tl.constexpr, GATE: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Pass 4: dv = (k ⊙ exp(b_L − b)) dS_n + scale · Aᵀ do (A masked to t ≥ s), one chunk and V block."""
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

    if GATE == GATE_CHANNEL:
        for j in tl.static_range(C // SUB):
            ts = t0 + j * SUB  # first row of key sub-chunk j
            scores_t = tl.zeros([SUB, C], dtype=tl.float32)  # [s, t]: keys of j × queries of sub-chunks > j
            scores_t_diag = tl.zeros([SUB, SUB], dtype=tl.float32)
            acc = tl.zeros([SUB, BV], dtype=tl.float32)
            for k0 in range(0, K, BK):
                k_j = load_tile(k, stride_k_t, ts, T, k0, K, SUB, BK)
                g_j = load_tile(log_g, stride_g_t, ts, T, k0, K, SUB, BK).to(tl.float32)
                c, total = tl.cumsum(g_j, 0), tl.sum(g_j, 0)
                g = load_tile(log_g, stride_g_t, t0, T, k0, K, C, BK).to(tl.float32)
                r = rows_before(g, (j + 1) * SUB, C)  # b at the end of sub-chunk j
                k_to_r = k_j * tl.exp(total[None, :] - c)  # k_s ⊙ exp(r − b_s)
                d_state = load_state(dh, k0, K, v0, V, BK, BV)
                k_to_end = (k_to_r * tl.exp(tl.sum(g, 0) - r)[None, :]).to(dt)
                acc += tl.dot(k_to_end, d_state.to(dt), input_precision="ieee")
                if j < C // SUB - 1:
                    q_all = load_tile(q, stride_q_t, t0, T, k0, K, C, BK)
                    after = rows[:, None] >= (j + 1) * SUB
                    from_r = tl.where(after, tl.cumsum(g, 0) - r[None, :], float("-inf"))  # b_t − r ≤ 0
                    q_from_r = (q_all * tl.exp(from_r)).to(dt)
                    scores_t += tl.dot(k_to_r.to(dt), tl.trans(q_from_r), input_precision="ieee")
                q_j = load_tile(q, stride_q_t, ts, T, k0, K, SUB, BK)
                scores_t_diag += tl.trans(diag_scores(q_j, k_j, c, SUB))
            do_j = load_tile(do, stride_do_t, ts, T, v0, V, SUB, BV)
            acc += tl.dot((scale * scores_t_diag).to(dt), do_j, input_precision="ieee")
            if j < C // SUB - 1:
                do_all = load_tile(do, stride_do_t, t0, T, v0, V, C, BV)
                acc += tl.dot((scale * scores_t).to(dt), do_all, input_precision="ieee")
            store_tile(dv, stride_dv_t, ts, T, v0, V, acc, SUB, BV)
    else:
        scores_t = tl.zeros([C, C], dtype=tl.float32)  # [s, t]
        acc = tl.zeros([C, BV], dtype=tl.float32)
        for k0 in range(0, K, BK):
            q_n = load_tile(q, stride_q_t, t0, T, k0, K, C, BK)
            k_n = load_tile(k, stride_k_t, t0, T, k0, K, C, BK)
            d_state = load_state(dh, k0, K, v0, V, BK, BV)
            scores_t += tl.dot(k_n, tl.trans(q_n), input_precision="ieee")
            acc += tl.dot(k_n, d_state.to(dt), input_precision="ieee")
        causal_t = rows[:, None] <= rows[None, :]
        if GATE == GATE_SCALAR:
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
def chunk_dqkg_kernel(
    q, k, v, log_g, do, h, dh, dq, dk, dg, scale, T, N, H,
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
    d log g into dg[i_k] ([⌈D_k/BK⌉, B·H, T], contiguous); per-channel gates write d log g itself."""
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

    if GATE == GATE_CHANNEL:
        dg += i_b * stride_dg_b + i_h * stride_dg_h
        g = load_tile(log_g, stride_g_t, t0, T, k0, K, C, BK).to(tl.float32)
        b, b_last = tl.cumsum(g, 0), tl.sum(g, 0)
        carry = end_term  # Σ of db over the rows after the current sub-chunk
        for jj in tl.static_range(C // SUB):
            i = C // SUB - 1 - jj  # sub-chunks last to first, for the reverse cumulative sum
            ts = t0 + i * SUB
            dp_q = tl.zeros([SUB, C], dtype=tl.float32)  # dP[t, s], t in sub-chunk i, s before it
            dp_k = tl.zeros([SUB, C], dtype=tl.float32)  # dP[t, s] as [s, t], s in sub-chunk i, t after it
            dp_diag = tl.zeros([SUB, SUB], dtype=tl.float32)
            dq_state = tl.zeros([SUB, BK], dtype=tl.float32)  # do h_nᵀ
            dk_state = tl.zeros([SUB, BK], dtype=tl.float32)  # v dS_nᵀ
            for v0 in range(0, V, BV):
                do_i = load_tile(do, stride_do_t, ts, T, v0, V, SUB, BV)
                v_i = load_tile(v, stride_v_t, ts, T, v0, V, SUB, BV)
                h_n = load_state(h, k0, K, v0, V, BK, BV).to(dt)
                d_state = load_state(dh, k0, K, v0, V, BK, BV).to(dt)
                dp_diag += tl.dot(do_i, tl.trans(v_i), input_precision="ieee")
                dq_state += tl.dot(do_i, tl.trans(h_n), input_precision="ieee")
                dk_state += tl.dot(v_i, tl.trans(d_state), input_precision="ieee")
                if i > 0:
                    v_all = load_tile(v, stride_v_t, t0, T, v0, V, C, BV)
                    dp_q += tl.dot(do_i, tl.trans(v_all), input_precision="ieee")
                if i < C // SUB - 1:
                    do_all = load_tile(do, stride_do_t, t0, T, v0, V, C, BV)
                    dp_k += tl.dot(v_i, tl.trans(do_all), input_precision="ieee")
            q_i = load_tile(q, stride_q_t, ts, T, k0, K, SUB, BK)
            k_i = load_tile(k, stride_k_t, ts, T, k0, K, SUB, BK)
            g_i = load_tile(log_g, stride_g_t, ts, T, k0, K, SUB, BK).to(tl.float32)
            c, total = tl.cumsum(g_i, 0), tl.sum(g_i, 0)
            r = rows_before(g, i * SUB, C)  # b at the end of sub-chunk i − 1; b = r + c in sub-chunk i
            dq_i = dq_state * tl.exp(c + r[None, :])
            dk_i = tl.zeros([SUB, BK], dtype=tl.float32)
            if i > 0:
                k_all = load_tile(k, stride_k_t, t0, T, k0, K, C, BK)
                k_to_r = k_all * tl.exp(tl.where(rows[:, None] < i * SUB, r[None, :] - b, float("-inf")))
                dq_i += tl.exp(c) * tl.dot(dp_q.to(dt), k_to_r.to(dt), input_precision="ieee")
            if i < C // SUB - 1:
                q_all = load_tile(q, stride_q_t, t0, T, k0, K, C, BK)
                r_end = r + total  # b at the end of sub-chunk i
                from_r = tl.where(rows[:, None] >= (i + 1) * SUB, b - r_end[None, :], float("-inf"))
                q_from_r = q_all * tl.exp(from_r)
                dk_i += tl.exp(total[None, :] - c) * tl.dot(dp_k.to(dt), q_from_r.to(dt),
                                                            input_precision="ieee")
            dq_diag, dk_diag = diag_grads(q_i, k_i, c, dp_diag, SUB)
            dq_i = scale * (dq_i + dq_diag)
            to_end = (b_last - r - total)[None, :] + (total[None, :] - c)  # b_L − b_s ≤ 0
            dk_i = dk_state * tl.exp(to_end) + scale * (dk_i + dk_diag)
            store_tile(dq, stride_dq_t, ts, T, k0, K, dq_i, SUB, BK)
            store_tile(dk, stride_dk_t, ts, T, k0, K, dk_i, SUB, BK)
            if NEED_DG:
                db = q_i * dq_i - k_i * dk_i
                dg_i = tl.cumsum(db, 0, reverse=True) + carry[None, :]
                store_tile(dg, stride_dg_t, ts, T, k0, K, dg_i, SUB, BK)
                carry += tl.sum(db, 0)
    else:
        dp = tl.zeros([C, C], dtype=tl.float32)
        dq_n = tl.zeros([C, BK], dtype=tl.float32)
        dk_n = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, V, BV):
            do_n = load_tile(do, stride_do_t, t0, T, v0, V, C, BV)
            v_n = load_tile(v, stride_v_t, t0, T, v0, V, C, BV)
            h_n = load_state(h, k0, K, v0, V, BK, BV).to(dt)
            d_state = load_state(dh, k0, K, v0, V, BK, BV).to(dt)
            dp += tl.dot(do_n, tl.trans(v_n), input_precision="ieee")
            dq_n += tl.dot(do_n, tl.trans(h_n), input_precision="ieee")
            dk_n += tl.dot(v_n, tl.trans(d_state), input_precision="ieee")
        q_n = load_tile(q, stride_q_t, t0, T, k0, K, C, BK)
        k_n = load_tile(k, stride_k_t, t0, T, k0, K, C, BK)
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
        if GATE == GATE_SCALAR and NEED_DG:
            db = tl.sum(q_n * dq_n - k_n * dk_n, 1) + tl.where(rows == C - 1, tl.sum(end_term, 0), 0.0)
            dg += (i_k.to(tl.int64) * tl.num_programs(1) + i_bh) * T
            tl.store(dg + t0 + rows, tl.cumsum(db, 0, reverse=True), mask=t0 + rows < T)
