"""Forward kernels of the chunked delta rule (notation of ``lmscale.ops.delta_rule.chunk``).

Per batch·head and chunk of C = 64 positions: b = the in-chunk cumulative log α (0 without gates),
γ = exp(b), Γ_ts = exp(b_t − b_s) for s ≤ t, A = tril(diag(β) (K Kᵀ ⊙ Γ), −1) and T = (I + A)⁻¹.

1. ``delta_inverse_kernel``, grid (N, B·H): T, float32 [B·H, N, C, C]. A is formed as 4 × 4 blocks of
   SUB = 16 rows (tensor-core dots of K's sub-tiles); the diagonal blocks are inverted by forward
   substitution over their 16 rows (``invert_unit_lower``) and the others follow from
   T_ij = −T_ii Σ_{j≤m<i} A_im T_mj, six [16, 16] dots. A 64-row substitution would be a chain of 63
   dependent steps per chunk; blocked, the chain is 15 steps on [16, 16] tiles.
2. ``delta_wu_kernel``, grid (N, B·H): W = T diag(βγ) K and U = T diag(β) V, [B, H, T, D] in the input
   dtype, two C-row dots per block of channels.
3. ``delta_states_kernel``, grid (B·H, ⌈D_v/BV⌉), sequential over the N chunks, all D_k key channels in
   one block (the pseudo-values need W S over every key): stores the state entering each chunk
   ([B·H, N+1, D_k, D_v], input dtype) and the pseudo-values U' = U − W S_n ([B, H, T, D_v]), then
   S_{n+1} = γ_L S_n + (K ⊙ exp(b_L − b))ᵀ U'. The final state is also written in float32.
4. The output is the gated recurrence's ``chunk_output_kernel`` (scalar gate log α, or none) with U'
   in place of v: o = scale · [(Q ⊙ γ) S_n + tril(Q Kᵀ ⊙ Γ) U'].
Columns of the state (value channels) never mix in the delta rule, so V blocks are independent.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmscale.ops.triton.chunk_fwd import SUB, load_gate_rows, load_state, load_tile, store_state, store_tile


@triton.jit
def sub_gates(beta, log_a, stride_beta_t, stride_a_t, ts, T, offset, GATED: tl.constexpr):
    """β and b (cumulative log α from the chunk start, ``offset`` = b before row ts) for the SUB rows
    from ts, float32 [SUB] each, and b at the last of them. β = 0 and log α = 0 past T."""
    beta_s = load_gate_rows(beta, stride_beta_t, ts, T, SUB)
    if GATED:
        g = load_gate_rows(log_a, stride_a_t, ts, T, SUB)
        return beta_s, offset + tl.cumsum(g, 0), offset + tl.sum(g, 0)
    return beta_s, tl.zeros([SUB], dtype=tl.float32), 0.0


@triton.jit
def gated_block(kk, beta_i, b_i, b_j, DIAG: tl.constexpr):
    """Block (i, j) of A from its K Kᵀ block: β_t (k_t · k_s) exp(b_t − b_s), strictly below the diagonal
    for a diagonal block (masked before exp, so every exponent is ≤ 0)."""
    if DIAG:
        rows = tl.arange(0, SUB)
        lower = rows[:, None] > rows[None, :]
        return tl.where(lower, kk * beta_i[:, None] * tl.exp(tl.where(lower, b_i[:, None] - b_j[None, :], 0.0)), 0.0)
    return kk * beta_i[:, None] * tl.exp(b_i[:, None] - b_j[None, :])


@triton.jit
def invert_unit_lower(a):
    """(I + a)⁻¹ for a strictly lower-triangular float32 [SUB, SUB] tile, by forward substitution:
    row r of the inverse is e_r − Σ_{j<r} a_rj (row j), rows above r being final already."""
    rows = tl.arange(0, SUB)
    t = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for r in tl.static_range(1, SUB):
        a_r = tl.sum(tl.where(rows[:, None] == r, a, 0.0), 0)  # row r of a, indexed by column j
        t -= tl.where(rows[:, None] == r, tl.sum(a_r[:, None] * t, 0)[None, :], 0.0)
    return t


@triton.jit
def store_block(x, i: tl.constexpr, j: tl.constexpr, value, C: tl.constexpr):
    """Block (i, j) of SUB × SUB into a contiguous [C, C] matrix."""
    rows = tl.arange(0, SUB)
    tl.store(x + (i * SUB + rows[:, None]) * C + j * SUB + rows[None, :], value)


@triton.jit
def mm(a, b):
    """A float32 [SUB, SUB] product in IEEE float32 (the inverse's entries must not round to tf32)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def delta_inverse_kernel(
    k, beta, log_a, t_inv, T, N, H,
    stride_k_b, stride_k_h, stride_k_t,
    stride_beta_b, stride_beta_h, stride_beta_t,
    stride_a_b, stride_a_h, stride_a_t,
    K: tl.constexpr, GATED: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
):
    """Pass 1: T = (I + A)⁻¹ of one chunk, float32 [C, C] (zeros above the diagonal). C = 4 · SUB."""
    tl.static_assert(C == 4 * SUB, "the blocked inverse is written for C = 64")
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    k += i_b * stride_k_b + i_h * stride_k_h
    beta += i_b * stride_beta_b + i_h * stride_beta_h
    log_a += i_b * stride_a_b + i_h * stride_a_h
    t_inv += (i_bh.to(tl.int64) * N + i_n) * C * C
    t0 = i_n * C

    beta0, b0, end0 = sub_gates(beta, log_a, stride_beta_t, stride_a_t, t0, T, 0.0, GATED)
    beta1, b1, end1 = sub_gates(beta, log_a, stride_beta_t, stride_a_t, t0 + SUB, T, end0, GATED)
    beta2, b2, end2 = sub_gates(beta, log_a, stride_beta_t, stride_a_t, t0 + 2 * SUB, T, end1, GATED)
    beta3, b3, _ = sub_gates(beta, log_a, stride_beta_t, stride_a_t, t0 + 3 * SUB, T, end2, GATED)
    k0 = load_tile(k, stride_k_t, t0, T, 0, K, SUB, BK)
    k1 = load_tile(k, stride_k_t, t0 + SUB, T, 0, K, SUB, BK)
    k2 = load_tile(k, stride_k_t, t0 + 2 * SUB, T, 0, K, SUB, BK)
    k3 = load_tile(k, stride_k_t, t0 + 3 * SUB, T, 0, K, SUB, BK)
    a00 = gated_block(tl.dot(k0, tl.trans(k0), input_precision="ieee"), beta0, b0, b0, True)
    a11 = gated_block(tl.dot(k1, tl.trans(k1), input_precision="ieee"), beta1, b1, b1, True)
    a22 = gated_block(tl.dot(k2, tl.trans(k2), input_precision="ieee"), beta2, b2, b2, True)
    a33 = gated_block(tl.dot(k3, tl.trans(k3), input_precision="ieee"), beta3, b3, b3, True)
    a10 = gated_block(tl.dot(k1, tl.trans(k0), input_precision="ieee"), beta1, b1, b0, False)
    a20 = gated_block(tl.dot(k2, tl.trans(k0), input_precision="ieee"), beta2, b2, b0, False)
    a21 = gated_block(tl.dot(k2, tl.trans(k1), input_precision="ieee"), beta2, b2, b1, False)
    a30 = gated_block(tl.dot(k3, tl.trans(k0), input_precision="ieee"), beta3, b3, b0, False)
    a31 = gated_block(tl.dot(k3, tl.trans(k1), input_precision="ieee"), beta3, b3, b1, False)
    a32 = gated_block(tl.dot(k3, tl.trans(k2), input_precision="ieee"), beta3, b3, b2, False)

    t00 = invert_unit_lower(a00)
    t11 = invert_unit_lower(a11)
    t22 = invert_unit_lower(a22)
    t33 = invert_unit_lower(a33)
    t10 = -mm(t11, mm(a10, t00))
    t21 = -mm(t22, mm(a21, t11))
    t32 = -mm(t33, mm(a32, t22))
    t20 = -mm(t22, mm(a20, t00) + mm(a21, t10))
    t31 = -mm(t33, mm(a31, t11) + mm(a32, t21))
    t30 = -mm(t33, mm(a30, t00) + mm(a31, t10) + mm(a32, t20))

    zero = tl.zeros([SUB, SUB], dtype=tl.float32)
    store_block(t_inv, 0, 0, t00, C)
    store_block(t_inv, 0, 1, zero, C)
    store_block(t_inv, 0, 2, zero, C)
    store_block(t_inv, 0, 3, zero, C)
    store_block(t_inv, 1, 0, t10, C)
    store_block(t_inv, 1, 1, t11, C)
    store_block(t_inv, 1, 2, zero, C)
    store_block(t_inv, 1, 3, zero, C)
    store_block(t_inv, 2, 0, t20, C)
    store_block(t_inv, 2, 1, t21, C)
    store_block(t_inv, 2, 2, t22, C)
    store_block(t_inv, 2, 3, zero, C)
    store_block(t_inv, 3, 0, t30, C)
    store_block(t_inv, 3, 1, t31, C)
    store_block(t_inv, 3, 2, t32, C)
    store_block(t_inv, 3, 3, t33, C)


@triton.jit
def chunk_gates(beta, log_a, stride_beta_t, stride_a_t, t0, T, C: tl.constexpr, GATED: tl.constexpr):
    """β, b (float32 [C]) and b at the chunk's last row, for the chunk starting at t0."""
    beta_n = load_gate_rows(beta, stride_beta_t, t0, T, C)
    if GATED:
        g = load_gate_rows(log_a, stride_a_t, t0, T, C)
        return beta_n, tl.cumsum(g, 0), tl.sum(g, 0)
    return beta_n, tl.zeros([C], dtype=tl.float32), 0.0


@triton.jit
def load_inverse(t_inv, i_bh, i_n, N, C: tl.constexpr):
    """The chunk's T = (I + A)⁻¹, float32 [C, C]."""
    rows = tl.arange(0, C)
    return tl.load(t_inv + (i_bh.to(tl.int64) * N + i_n) * C * C + rows[:, None] * C + rows[None, :])


@triton.jit
def delta_wu_kernel(
    k, v, beta, log_a, t_inv, w, u, T, N, H,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_beta_b, stride_beta_h, stride_beta_t,
    stride_a_b, stride_a_h, stride_a_t,
    stride_w_b, stride_w_h, stride_w_t,
    stride_u_b, stride_u_h, stride_u_t,
    K: tl.constexpr, V: tl.constexpr, GATED: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Pass 2: W = T diag(βγ) K and U = T diag(β) V of one chunk, in the input dtype."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    k += i_b * stride_k_b + i_h * stride_k_h
    v += i_b * stride_v_b + i_h * stride_v_h
    beta += i_b * stride_beta_b + i_h * stride_beta_h
    log_a += i_b * stride_a_b + i_h * stride_a_h
    w += i_b * stride_w_b + i_h * stride_w_h
    u += i_b * stride_u_b + i_h * stride_u_h
    t0 = i_n * C
    dt = k.dtype.element_ty

    beta_n, b, _ = chunk_gates(beta, log_a, stride_beta_t, stride_a_t, t0, T, C, GATED)
    t_n = load_inverse(t_inv, i_bh, i_n, N, C).to(dt)
    for k0 in range(0, K, BK):
        x = load_tile(k, stride_k_t, t0, T, k0, K, C, BK) * (beta_n * tl.exp(b))[:, None]
        store_tile(w, stride_w_t, t0, T, k0, K, tl.dot(t_n, x.to(dt), input_precision="ieee"), C, BK)
    for v0 in range(0, V, BV):
        y = load_tile(v, stride_v_t, t0, T, v0, V, C, BV) * beta_n[:, None]
        store_tile(u, stride_u_t, t0, T, v0, V, tl.dot(t_n, y.to(dt), input_precision="ieee"), C, BV)


@triton.jit
def delta_state_step(k, w, u, log_a, u_new, stride_k_t, stride_w_t, stride_u_t, stride_a_t, stride_n_t,
                     t0, T, v0, state, K: tl.constexpr, V: tl.constexpr, GATED: tl.constexpr,
                     C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One chunk: store U' = U − W S, return γ_L S + (K ⊙ exp(b_L − b))ᵀ U'."""
    dt = k.dtype.element_ty
    w_n = load_tile(w, stride_w_t, t0, T, 0, K, C, BK)
    pseudo = load_tile(u, stride_u_t, t0, T, v0, V, C, BV).to(tl.float32)
    pseudo -= tl.dot(w_n, state.to(dt), input_precision="ieee")
    store_tile(u_new, stride_n_t, t0, T, v0, V, pseudo, C, BV)
    k_n = load_tile(k, stride_k_t, t0, T, 0, K, C, BK)
    if GATED:
        g = load_gate_rows(log_a, stride_a_t, t0, T, C)
        b, b_last = tl.cumsum(g, 0), tl.sum(g, 0)
        k_n = (k_n * tl.exp(b_last - b)[:, None]).to(dt)
        state *= tl.exp(b_last)
    return state + tl.dot(tl.trans(k_n), pseudo.to(dt), input_precision="ieee")


@triton.jit
def delta_states_kernel(
    k, w, u, log_a, h0, h, u_new, final, T, N, H,
    stride_k_b, stride_k_h, stride_k_t,
    stride_w_b, stride_w_h, stride_w_t,
    stride_u_b, stride_u_h, stride_u_t,
    stride_a_b, stride_a_h, stride_a_t,
    stride_n_b, stride_n_h, stride_n_t,
    K: tl.constexpr, V: tl.constexpr, GATED: tl.constexpr, HAS_H0: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 3: h[bh, n] = the state entering chunk n (input dtype), the pseudo-values U' and the final
    state (float32). The recurrence runs in float32 registers."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    k += i_b * stride_k_b + i_h * stride_k_h
    w += i_b * stride_w_b + i_h * stride_w_h
    u += i_b * stride_u_b + i_h * stride_u_h
    log_a += i_b * stride_a_b + i_h * stride_a_h
    u_new += i_b * stride_n_b + i_h * stride_n_h
    h += i_bh.to(tl.int64) * (N + 1) * K * V
    v0 = i_v * BV

    if HAS_H0:
        state = load_state(h0 + i_bh.to(tl.int64) * K * V, 0, K, v0, V, BK, BV).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    if INTERPRET:  # see chunk_fwd's ``INTERPRET_LOOP_NOTE``
        n = 0
        while n < N:
            store_state(h + tl.cast(n, tl.int64) * K * V, 0, K, v0, V, state, BK, BV)
            state = delta_state_step(k, w, u, log_a, u_new, stride_k_t, stride_w_t, stride_u_t, stride_a_t,
                                     stride_n_t, n * C, T, v0, state, K, V, GATED, C, BK, BV)
            n += 1
    else:
        for n in range(N):
            store_state(h + tl.cast(n, tl.int64) * K * V, 0, K, v0, V, state, BK, BV)
            state = delta_state_step(k, w, u, log_a, u_new, stride_k_t, stride_w_t, stride_u_t, stride_a_t,
                                     stride_n_t, n * C, T, v0, state, K, V, GATED, C, BK, BV)
    store_state(h + tl.cast(N, tl.int64) * K * V, 0, K, v0, V, state, BK, BV)
    store_state(final + i_bh.to(tl.int64) * K * V, 0, K, v0, V, state, BK, BV)
