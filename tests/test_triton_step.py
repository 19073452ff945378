"""The fused decoding step equals the naive step: every gate shape, in place, over many tokens, in bf16.

Inputs are drawn on the CPU and moved to the GPU when there is one; without one the kernel runs in
Triton's interpreter (conftest sets TRITON_INTERPRET=1), so sizes are tiny.
"""

from __future__ import annotations

import pytest
import torch

from lmscale.ops.gated_recurrence.naive import gated_recurrence_step as naive_step
from lmscale.ops.gated_recurrence.naive import naive_gated_recurrence

pytest.importorskip("triton")
from lmscale.ops.triton.step import gated_recurrence_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, H, K, V, gate, dtype=torch.float32, seed=0):
    """Random q, k, v, a log gate in (−1, 0) of the given shape, and a random state (never zeros)."""
    torch.manual_seed(seed)
    q, k = torch.randn(B, H, K, dtype=dtype), torch.randn(B, H, K, dtype=dtype)
    v = torch.randn(B, H, V, dtype=dtype)
    log_g = {"channel": -torch.rand(B, H, K), "head": -torch.rand(B, H), "none": None}[gate]
    state = torch.randn(B, H, K, V)
    return tuple(None if t is None else t.to(DEVICE) for t in (q, k, v, log_g, state))


@pytest.mark.parametrize("gate", ["channel", "head", "none"])
@pytest.mark.parametrize("B, H, K, V", [(1, 2, 16, 16), (3, 2, 8, 24), (2, 1, 40, 8)],
                         ids=["B1", "B3-Dk<Dv", "Dk>Dv-not-pow2"])
def test_step_equals_naive_and_updates_in_place(gate, B, H, K, V):
    q, k, v, log_g, state = make_inputs(B, H, K, V, gate)
    want_o, want_state = naive_step(q, k, v, log_g, state.clone(), scale=0.3)
    address = state.data_ptr()
    o, new_state = gated_recurrence_step(q, k, v, log_g, state, scale=0.3)
    assert new_state is state and state.data_ptr() == address
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    assert o.shape == (B, H, V) and o.dtype == q.dtype


@pytest.mark.parametrize("gate", ["channel", "head", "none"])
def test_repeated_steps_equal_the_naive_recurrence(gate):
    B, H, T, K, V = 2, 2, 9, 8, 12
    torch.manual_seed(1)
    q, k, v = torch.randn(B, H, T, K), torch.randn(B, H, T, K), torch.randn(B, H, T, V)
    log_g = {"channel": -torch.rand(B, H, T, K), "head": -torch.rand(B, H, T), "none": None}[gate]
    h0 = torch.randn(B, H, K, V)
    q, k, v, h0 = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), h0.to(DEVICE)
    log_g = None if log_g is None else log_g.to(DEVICE)
    want_o, want_state = naive_gated_recurrence(q, k, v, log_g, initial_state=h0, output_final_state=True)
    state, outputs = h0.clone(), []
    for t in range(T):
        o_t, _ = gated_recurrence_step(q[:, :, t], k[:, :, t], v[:, :, t],
                                       None if log_g is None else log_g[:, :, t], state)
        outputs.append(o_t)
    torch.testing.assert_close(torch.stack(outputs, dim=2), want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_keep_a_float32_state():
    q, k, v, log_g, state = make_inputs(2, 2, 16, 8, "channel", dtype=torch.bfloat16)
    want_o, want_state = naive_step(q, k, v, log_g, state.clone())
    o, state = gated_recurrence_step(q, k, v, log_g, state)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, want_o, rtol=1e-2, atol=1e-2)  # o rounded to bf16 on both sides


def test_strided_inputs_are_read_where_they_lie():
    """q, k, v as views of one [B, H, 3, D] projection, as a mixer would slice it."""
    torch.manual_seed(2)
    qkv = torch.randn(2, 2, 3, 8, device=DEVICE)
    q, k, v = qkv.unbind(2)
    log_g = -torch.rand(2, 4, 2, device=DEVICE).transpose(1, 2)[..., 0]  # [B, H] with a non-unit stride
    state = torch.randn(2, 2, 8, 8, device=DEVICE)
    want_o, want_state = naive_step(q, k, v, log_g, state.clone())
    o, state = gated_recurrence_step(q, k, v, log_g, state)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("state, match", [
    (torch.zeros(1, 2, 8, 8, dtype=torch.float64), "float32"),
    (torch.zeros(1, 2, 8, 8).transpose(2, 3), "non-contiguous"),
    (torch.zeros(1, 2, 8, 4), r"need state \[B, H, D_k, D_v\]"),
])
def test_refuses_a_state_it_cannot_update_in_place(state, match):
    q, k, v, log_g, _ = make_inputs(1, 2, 8, 8, "head")
    with pytest.raises(ValueError, match=match):
        gated_recurrence_step(q, k, v, log_g, state.to(DEVICE))


def test_refuses_a_gate_of_the_wrong_shape():
    q, k, v, _, state = make_inputs(1, 2, 8, 8, "none")
    with pytest.raises(ValueError, match="log_g_t must be"):
        gated_recurrence_step(q, k, v, torch.zeros(1, 2, 4, device=DEVICE), state)
