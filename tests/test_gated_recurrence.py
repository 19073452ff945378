"""The three forms of the gated linear recurrence agree: outputs, final states and every gradient."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lmscale.ops import (
    chunk_gated_recurrence,
    gated_recurrence_step,
    naive_gated_recurrence,
    parallel_gated_recurrence,
)

INPUT_NAMES = ("q", "k", "v", "log_g", "initial_state")


def make_inputs(B, H, T, K, V, dtype, gated=True, with_state=True, min_log_g=None, seed=0):
    """Random inputs; log gates from logsigmoid(randn), or uniform in [min_log_g, 0] for strong decays."""
    torch.manual_seed(seed)
    if min_log_g is None:
        log_g = F.logsigmoid(torch.randn(B, H, T, K, dtype=dtype))
    else:
        log_g = min_log_g * torch.rand(B, H, T, K, dtype=dtype)
    return {
        "q": torch.randn(B, H, T, K, dtype=dtype),
        "k": torch.randn(B, H, T, K, dtype=dtype),
        "v": torch.randn(B, H, T, V, dtype=dtype),
        "log_g": log_g if gated else None,
        "initial_state": torch.randn(B, H, K, V, dtype=dtype) if with_state else None,
    }


def run(op, inputs, scale=None):
    """Output, final state and the gradients of a fixed random loss w.r.t. every given input."""
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items() if t is not None}
    args = {n: leaves.get(n) for n in INPUT_NAMES}
    o, final_state = op(**args, scale=scale, output_final_state=True)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, dtype=o.dtype, generator=gen)
    d_state = torch.randn(final_state.shape, dtype=final_state.dtype, generator=gen)
    ((o * do).sum() + (final_state * d_state).sum()).backward()
    return {"o": o, "final_state": final_state, **{f"d{n}": t.grad for n, t in leaves.items()}}


def assert_all_close(got, want, rtol):
    """Relative max error per tensor: |got − want|∞ ≤ rtol · |want|∞ (floored at 1e-3 for all-zero grads)."""
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        ref = want[name].abs().max().item()
        assert err <= rtol * max(ref, 1e-3), f"{name}: max error {err:.3g} vs max |ref| {ref:.3g}"


SHAPES = [  # B, H, T, D_k, D_v, chunk_size
    pytest.param(2, 2, 1, 16, 16, 16, id="T1"),
    pytest.param(2, 3, 67, 16, 32, 16, id="T67-chunk16"),
    pytest.param(1, 2, 64, 64, 64, 64, id="B1-dim64-one-chunk"),
    pytest.param(1, 1, 40, 64, 16, 8, id="B1-dk64-dv16"),
]


@pytest.mark.parametrize("B, H, T, K, V, chunk_size", SHAPES)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_parallel_and_chunk_equal_naive_float64(B, H, T, K, V, chunk_size, gated, with_state):
    inputs = make_inputs(B, H, T, K, V, torch.float64, gated, with_state)
    want = run(naive_gated_recurrence, inputs)
    assert_all_close(run(parallel_gated_recurrence, inputs), want, rtol=1e-10)
    assert_all_close(run(partial(chunk_gated_recurrence, chunk_size=chunk_size), inputs), want, rtol=1e-10)


@pytest.mark.parametrize("B, H, T, K, V, chunk_size", SHAPES)
def test_parallel_and_chunk_equal_naive_float32(B, H, T, K, V, chunk_size):
    inputs = make_inputs(B, H, T, K, V, torch.float32)
    want = run(naive_gated_recurrence, inputs)
    assert_all_close(run(parallel_gated_recurrence, inputs), want, rtol=1e-5)
    assert_all_close(run(partial(chunk_gated_recurrence, chunk_size=chunk_size), inputs), want, rtol=1e-5)


def test_explicit_scale_and_default_chunk_size():
    inputs = make_inputs(2, 2, 100, 16, 16, torch.float64)
    want = run(naive_gated_recurrence, inputs, scale=0.3)
    assert_all_close(run(chunk_gated_recurrence, inputs, scale=0.3), want, rtol=1e-10)


def test_strong_decays_stay_finite_in_chunk_form():
    """log g down to −5 per step: cumulative decays reach e^−600 within a chunk of 64; no inf, no nan."""
    inputs = make_inputs(2, 2, 256, 32, 32, torch.float32, min_log_g=-5.0)
    got = run(chunk_gated_recurrence, inputs)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert_all_close(got, run(naive_gated_recurrence, inputs), rtol=1e-5)


def test_step_matches_definition():
    """One step is S = diag(exp(log_g)) S₀ + k vᵀ and o = scale · Sᵀ q."""
    x = make_inputs(2, 3, 1, 8, 4, torch.float64)
    q, k, v, log_g = (x[n][:, :, 0] for n in ("q", "k", "v", "log_g"))
    o, state = gated_recurrence_step(q, k, v, log_g, x["initial_state"], scale=0.5)
    want_state = log_g.exp()[..., None] * x["initial_state"] + k[..., None] * v[..., None, :]
    torch.testing.assert_close(state, want_state)
    torch.testing.assert_close(o, 0.5 * (want_state * q[..., None]).sum(-2))


def test_low_precision_inputs_accumulate_in_float32():
    x = make_inputs(1, 2, 20, 16, 16, torch.float32)
    bf16 = {n: t.bfloat16() for n, t in x.items()}
    o, state = chunk_gated_recurrence(**bf16, chunk_size=8, output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    want, _ = naive_gated_recurrence(**x)
    assert (o.float() - want).abs().max() <= 2e-2 * want.abs().max()
