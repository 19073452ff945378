"""Backward kernels of the chunked delta rule (notation of ``delta_rule_fwd``).

Per chunk n, with S_n the state entering it, U' its pseudo-values, P = tril(Q Kᵀ ⊙ Γ) (diagonal
included), K̃ = K ⊙ exp(b_L − b) and G_n the gradient w.r.t. the state leaving it (S_{n+1}):

    o = scale · (diag(γ) Q S_n + P U'),   U' = U − W S_n,   S_{n+1} = γ_L S_n + K̃ᵀ U'
    dU' = scale · Pᵀ dO + K̃ G_n                                     (= dU: U enters U' with sign +)
    G_{n−1} = scale · (diag(γ) Q)ᵀ dO + γ_L G_n − Wᵀ dU'             (G_{−1}: the initial state's)

1. (gated only) ``delta_intra_grads_kernel``, grid (N, B·H): scale · Pᵀ dO into the dU' buffer; then
   ``delta_state_grads_kernel``, grid (B·H, ⌈D_v/BV⌉), reverse over chunks, all key channels in one
   block: adds K̃ G_n to it (without gates it forms Pᵀ dO itself) and stores G_n ([B·H, N, D_k, D_v],
   input dtype); dU' is [B, H, T, D_v] in the input dtype.
2. ``delta_grads_kernel``, grid (N, B·H), everything else of one chunk, in three passes over the V
   blocks for the sums over value channels:
       dQ = scale · [diag(γ) dO S_nᵀ + (dP ⊙ Γ) K],  dP = tril(dO U'ᵀ)
       dK̃ = U' G_nᵀ,   dW = −dU' S_nᵀ
       W = T diag(βγ) K, U = T diag(β) V:  dT = dW (βγK)ᵀ + dU (βV)ᵀ, dV = diag(β) Tᵀ dU
       T = (I + A)⁻¹:  dA = −Tᵀ dT Tᵀ (strictly lower part)
       A = diag(β)(K Kᵀ ⊙ Γ):  dK += (dA ⊙ Γ ⊙ β)K + (dA ⊙ Γ ⊙ β)ᵀK
   and dβ, and the gradient of each b_t (through γ, Γ, exp(b_L − b) and γ_L), which is summed from the
   chunk's end to give d log α_t = Σ_{u ≥ t} db_u (b is a cumulative sum).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmscale.ops.triton.chunk_fwd import load_gate_rows, load_state, load_tile, store_state, store_tile
from lmscale.ops.triton.delta_rule_fwd import chunk_gates, load_inverse


@triton.jit
def delta_intra_grads_kernel(
    q, k, do, log_a, du, scale, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_a_b, stride_a_h, stride_a_t,
    stride_du_b, stride_du_h, stride_du_t,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Pass 1a (gated): scale · Pᵀ dO into du, the part of dU' that does not depend on the carried state gradient
    (the sequential pass adds K̃ G_n in place). Out of that pass's loop, its C × C tile is not alive beside
    the carried [D_k, BV] gradient there."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    q += i_b * stride_q_b + i_h * stride_q_h
    k += i_b * stride_k_b + i_h * stride_k_h
    do += i_b * stride_do_b + i_h * stride_do_h
    log_a += i_b * stride_a_b + i_h * stride_a_h
    du += i_b * stride_du_b + i_h * stride_du_h
    t0 = i_n * C
    dt = q.dtype.element_ty
    rows = tl.arange(0, C)
    q_n = load_tile(q, stride_q_t, t0, T, 0, K, C, BK)
    k_n = load_tile(k, stride_k_t, t0, T, 0, K, C, BK)
    pt = tl.dot(k_n, tl.trans(q_n), input_precision="ieee")  # [s, t] = k_s · q_t
    b = tl.cumsum(load_gate_rows(log_a, stride_a_t, t0, T, C), 0)
    pt *= tl.exp(tl.where(rows[:, None] <= rows[None, :], b[None, :] - b[:, None], float("-inf")))  # s ≤ t
    pt = (pt * scale).to(dt)
    for v0 in range(0, V, BV):
        do_n = load_tile(do, stride_do_t, t0, T, v0, V, C, BV)
        store_tile(du, stride_du_t, t0, T, v0, V, tl.dot(pt, do_n, input_precision="ieee"), C, BV)


@triton.jit
def delta_state_grad_step(q, k, w, do, log_a, du, stride_q_t, stride_k_t, stride_w_t, stride_do_t, stride_a_t,
                          stride_du_t, t0, T, v0, d_state, scale, K: tl.constexpr, V: tl.constexpr,
                          GATED: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One chunk backwards: store dU', return the gradient w.r.t. the state entering the chunk. Gated, du
    already holds scale · Pᵀ dO (``delta_intra_grads_kernel``); without gates the pass forms it here.
    H100, T = 2K, fwd+bwd (state-gradient passes): gated 1.12 ms in the loop, 0.20 + 0.77 split; without
    gates 0.55 in the loop, 0.18 + 0.73 split (the gated loop spilled its decayed C × C tile)."""
    dt = q.dtype.element_ty
    q_n = load_tile(q, stride_q_t, t0, T, 0, K, C, BK)
    k_n = load_tile(k, stride_k_t, t0, T, 0, K, C, BK)
    do_n = (load_tile(do, stride_do_t, t0, T, v0, V, C, BV) * scale).to(dt)
    if GATED:
        g = load_gate_rows(log_a, stride_a_t, t0, T, C)
        b, b_last = tl.cumsum(g, 0), tl.sum(g, 0)
        k_n = (k_n * tl.exp(b_last - b)[:, None]).to(dt)
        q_n = (q_n * tl.exp(b)[:, None]).to(dt)
        d_pseudo = load_tile(du, stride_du_t, t0, T, v0, V, C, BV).to(tl.float32)
    else:
        rows = tl.arange(0, C)
        pt = tl.where(rows[:, None] <= rows[None, :], tl.dot(k_n, tl.trans(q_n), input_precision="ieee"), 0.0)
        d_pseudo = tl.dot(pt.to(dt), do_n, input_precision="ieee")  # [s, t] = k_s · q_t for s ≤ t
    d_pseudo += tl.dot(k_n, d_state.to(dt), input_precision="ieee")
    store_tile(du, stride_du_t, t0, T, v0, V, d_pseudo, C, BV)
    if GATED:
        d_state *= tl.exp(b_last)
    w_n = load_tile(w, stride_w_t, t0, T, 0, K, C, BK)
    d_state += tl.dot(tl.trans(q_n), do_n, input_precision="ieee")
    return d_state - tl.dot(tl.trans(w_n), d_pseudo.to(dt), input_precision="ieee")


@triton.jit
def delta_state_grads_kernel(
    q, k, w, do, log_a, dht, dh, du, dh0, scale, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_w_b, stride_w_h, stride_w_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_a_b, stride_a_h, stride_a_t,
    stride_du_b, stride_du_h, stride_du_t,
    K: tl.constexpr, V: tl.constexpr, GATED: tl.constexpr, HAS_DHT: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 1b: dh[bh, n] = G_n and dU' (completing pass 1a's du), reverse over chunks; dh0[bh] = the
    initial state's gradient."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    q += i_b * stride_q_b + i_h * stride_q_h
    k += i_b * stride_k_b + i_h * stride_k_h
    w += i_b * stride_w_b + i_h * stride_w_h
    do += i_b * stride_do_b + i_h * stride_do_h
    log_a += i_b * stride_a_b + i_h * stride_a_h
    du += i_b * stride_du_b + i_h * stride_du_h
    dh += i_bh.to(tl.int64) * N * K * V
    v0 = i_v * BV

    if HAS_DHT:
        d_state = load_state(dht + i_bh.to(tl.int64) * K * V, 0, K, v0, V, BK, BV).to(tl.float32)
    else:
        d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if INTERPRET:  # see chunk_fwd's ``INTERPRET_LOOP_NOTE``
        n = N - 1
        while n >= 0:
            store_state(dh + tl.cast(n, tl.int64) * K * V, 0, K, v0, V, d_state, BK, BV)
            d_state = delta_state_grad_step(q, k, w, do, log_a, du, stride_q_t, stride_k_t, stride_w_t, stride_do_t,
                                            stride_a_t, stride_du_t, n * C, T, v0, d_state, scale,
                                            K, V, GATED, C, BK, BV)
            n -= 1
    else:
        for m in range(N):
            n = N - 1 - m
            store_state(dh + tl.cast(n, tl.int64) * K * V, 0, K, v0, V, d_state, BK, BV)
            d_state = delta_state_grad_step(q, k, w, do, log_a, du, stride_q_t, stride_k_t, stride_w_t, stride_do_t,
                                            stride_a_t, stride_du_t, n * C, T, v0, d_state, scale,
                                            K, V, GATED, C, BK, BV)
    store_state(dh0 + i_bh.to(tl.int64) * K * V, 0, K, v0, V, d_state, BK, BV)


@triton.jit
def delta_grads_kernel(
    q, k, v, beta, log_a, t_inv, h, dh, u, du, do, dq, dk, dv, dbeta, dlog_a, scale, T, N, H,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_beta_b, stride_beta_h, stride_beta_t,
    stride_a_b, stride_a_h, stride_a_t,
    stride_u_b, stride_u_h, stride_u_t,
    stride_du_b, stride_du_h, stride_du_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_dq_b, stride_dq_h, stride_dq_t,
    stride_dk_b, stride_dk_h, stride_dk_t,
    stride_dv_b, stride_dv_h, stride_dv_t,
    stride_db_b, stride_db_h, stride_db_t,
    stride_da_b, stride_da_h, stride_da_t,
    K: tl.constexpr, V: tl.constexpr, GATED: tl.constexpr, NEED_DA: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """Pass 2: dq, dk, dv, dβ and d log α of one chunk (all key channels in one block)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    q += i_b * stride_q_b + i_h * stride_q_h
    k += i_b * stride_k_b + i_h * stride_k_h
    v += i_b * stride_v_b + i_h * stride_v_h
    beta += i_b * stride_beta_b + i_h * stride_beta_h
    log_a += i_b * stride_a_b + i_h * stride_a_h
    u += i_b * stride_u_b + i_h * stride_u_h
    du += i_b * stride_du_b + i_h * stride_du_h
    do += i_b * stride_do_b + i_h * stride_do_h
    dq += i_b * stride_dq_b + i_h * stride_dq_h
    dk += i_b * stride_dk_b + i_h * stride_dk_h
    dv += i_b * stride_dv_b + i_h * stride_dv_h
    dbeta += i_b * stride_db_b + i_h * stride_db_h
    dlog_a += i_b * stride_da_b + i_h * stride_da_h
    h += (i_bh.to(tl.int64) * (N + 1) + i_n) * K * V  # S_n
    dh += (i_bh.to(tl.int64) * N + i_n) * K * V  # G_n
    t0 = i_n * C
    dt = q.dtype.element_ty
    rows = tl.arange(0, C)

    q_n = load_tile(q, stride_q_t, t0, T, 0, K, C, BK)
    k_n = load_tile(k, stride_k_t, t0, T, 0, K, C, BK)
    beta_n, b, b_last = chunk_gates(beta, log_a, stride_beta_t, stride_a_t, t0, T, C, GATED)

    gamma = tl.exp(b)
    causal = rows[:, None] >= rows[None, :]
    # outputs, o = diag(γ) Q S_n + P U' (scale folded into dO). Three passes over the value channels,
    # each consuming its accumulators before the next: 255 registers spilled when all lived at once
    d_qs = tl.zeros([C, BK], dtype=tl.float32)
    d_p = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        s_n = load_state(h, 0, K, v0, V, BK, BV)
        do_n = (load_tile(do, stride_do_t, t0, T, v0, V, C, BV) * scale).to(dt)
        d_qs += tl.dot(do_n, tl.trans(s_n.to(dt)), input_precision="ieee")
        d_p += tl.dot(do_n, tl.trans(load_tile(u, stride_u_t, t0, T, v0, V, C, BV)), input_precision="ieee")
    d_p *= tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))  # ⊙ Γ, 0 above the diagonal
    d_q = gamma[:, None] * d_qs + tl.dot(d_p.to(dt), k_n, input_precision="ieee")
    store_tile(dq, stride_dq_t, t0, T, 0, K, d_q, C, BK)
    m = d_p * tl.dot(q_n, tl.trans(k_n), input_precision="ieee")  # dP ⊙ P: b_t gains it, b_s loses it
    d_b = gamma * tl.sum(d_qs * q_n.to(tl.float32), 1) + tl.sum(m, 1) - tl.sum(m, 0)
    # U = T diag(β) V and U' = U − W S_n: a second pass for dU (βV)ᵀ, dv and dW = −dU' S_nᵀ
    t_t = tl.trans(load_inverse(t_inv, i_bh, i_n, N, C)).to(dt)
    d_w = tl.zeros([C, BK], dtype=tl.float32)
    d_t = tl.zeros([C, C], dtype=tl.float32)  # dU (βV)ᵀ, then + dW (βγK)ᵀ
    d_beta = tl.zeros([C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        du_n = load_tile(du, stride_du_t, t0, T, v0, V, C, BV)
        v_n = load_tile(v, stride_v_t, t0, T, v0, V, C, BV)
        d_w -= tl.dot(du_n, tl.trans(load_state(h, 0, K, v0, V, BK, BV).to(dt)), input_precision="ieee")
        d_t += tl.dot(du_n, tl.trans((v_n * beta_n[:, None]).to(dt)), input_precision="ieee")
        d_y = tl.dot(t_t, du_n, input_precision="ieee")  # Tᵀ dU: the gradient of βV
        store_tile(dv, stride_dv_t, t0, T, v0, V, d_y * beta_n[:, None], C, BV)
        d_beta += tl.sum(d_y * v_n.to(tl.float32), 1)
    # W = T diag(βγ) K
    scale_w = beta_n * gamma
    d_t += tl.dot(d_w.to(dt), tl.trans((k_n * scale_w[:, None]).to(dt)), input_precision="ieee")
    d_k = tl.dot(t_t, d_w.to(dt), input_precision="ieee")  # the gradient of βγK
    through_w = tl.sum(d_k * k_n.to(tl.float32), 1)
    d_beta += through_w * gamma
    d_b += through_w * scale_w
    d_k *= scale_w[:, None]
    # S_{n+1} = γ_L S_n + K̃ᵀ U', K̃ = K ⊙ exp(b_L − b): a third pass for dK̃ = U' G_nᵀ and γ_L's gradient
    d_kt = tl.zeros([C, BK], dtype=tl.float32)
    d_gamma_last = 0.0  # Σ G_n ⊙ S_n
    for v0 in range(0, V, BV):
        g_n = load_state(dh, 0, K, v0, V, BK, BV)
        d_kt += tl.dot(load_tile(u, stride_u_t, t0, T, v0, V, C, BV), tl.trans(g_n.to(dt)), input_precision="ieee")
        d_gamma_last += tl.sum(g_n.to(tl.float32) * load_state(h, 0, K, v0, V, BK, BV).to(tl.float32))
    to_end = tl.exp(b_last - b)
    d_k += d_kt * to_end[:, None]
    through_end = tl.sum(d_kt * k_n.to(tl.float32), 1) * to_end  # ⟨dK̃_t, K̃_t⟩
    d_b -= through_end
    d_b_last = tl.sum(through_end, 0) + tl.exp(b_last) * d_gamma_last
    d_b += tl.where(rows == C - 1, d_b_last, 0.0)
    d_k += tl.dot(tl.trans(d_p).to(dt), q_n, input_precision="ieee")  # the outputs' P
    # T = (I + A)⁻¹, A = tril(diag(β) (K Kᵀ ⊙ Γ), −1)
    d_t = tl.where(causal, d_t, 0.0)  # T is lower triangular: its upper part reaches nothing
    d_a = -tl.dot(tl.dot(t_t, d_t.to(dt), input_precision="ieee").to(dt), t_t, input_precision="ieee")
    strict = rows[:, None] > rows[None, :]
    d_a *= tl.exp(tl.where(strict, b[:, None] - b[None, :], float("-inf")))  # dA ⊙ Γ, strictly lower
    kk = tl.dot(k_n, tl.trans(k_n), input_precision="ieee")
    d_beta += tl.sum(d_a * kk, 1)
    d_a *= beta_n[:, None]
    d_k += tl.dot(d_a.to(dt), k_n, input_precision="ieee") + tl.dot(tl.trans(d_a).to(dt), k_n, input_precision="ieee")
    m = d_a * kk  # dA ⊙ A
    d_b += tl.sum(m, 1) - tl.sum(m, 0)

    store_tile(dk, stride_dk_t, t0, T, 0, K, d_k, C, BK)
    tl.store(dbeta + (t0 + rows).to(tl.int64) * stride_db_t, d_beta.to(dbeta.dtype.element_ty), mask=t0 + rows < T)
    if NEED_DA:
        d_log_a = tl.cumsum(d_b, 0, reverse=True)
        tl.store(dlog_a + (t0 + rows).to(tl.int64) * stride_da_t, d_log_a.to(dlog_a.dtype.element_ty),
                 mask=t0 + rows < T)
