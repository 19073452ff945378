"""The three forms of the gated linear recurrence agree: outputs, final states and every gradient.

Gates come in three kinds: one log decay per key channel (GLA), one per head broadcast over the
channels (RetNet, Mamba-2), and none (linear attention).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lmscale.ops.gated_recurrence import (
    FORMS,
    chunk_gated_recurrence,
    gated_recurrence,
    gated_recurrence_flops,
    gated_recurrence_step,
    naive_gated_recurrence,
    parallel_gated_recurrence,
)

INPUT_NAMES = ("q", "k", "v", "log_g", "initial_state")
GATES = ["channel", "head", "none"]


def make_inputs(B, H, T, K, V, dtype, gate="channel", with_state=True, min_log_g=None, seed=0):
    """Random inputs; log gates from logsigmoid(randn), or uniform in [min_log_g, 0] for strong decays."""
    torch.manual_seed(seed)
    gate_shape = {"channel": (B, H, T, K), "head": (B, H, T), "none": None}[gate]
    log_g = None
    if gate_shape is not None and min_log_g is None:
        log_g = F.logsigmoid(torch.randn(gate_shape, dtype=dtype))
    elif gate_shape is not None:
        log_g = min_log_g * torch.rand(gate_shape, dtype=dtype)
    return {
        "q": torch.randn(B, H, T, K, dtype=dtype),
        "k": torch.randn(B, H, T, K, dtype=dtype),
        "v": torch.randn(B, H, T, V, dtype=dtype),
        "log_g": log_g,
        "initial_state": torch.randn(B, H, K, V, dtype=dtype) if with_state else None,
    }


def run(op, inputs, scale=None):
    """Output, final state and the gradients of a fixed random loss w.r.t. every given input."""
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items() if t is not None}
    args = {n: leaves.get(n) for n in INPUT_NAMES}
    o, final_state = op(**args, scale=scale, output_final_state=True)
    gen = torch.Generator().manual_seed(1)  # cotangents rounded to bf16: every dtype sees the same loss
    do = torch.randn(o.shape, generator=gen).bfloat16().to(o.dtype)
    d_state = torch.randn(final_state.shape, generator=gen).bfloat16().to(final_state.dtype)
    ((o * do).sum() + (final_state * d_state).sum()).backward()
    return {"o": o, "final_state": final_state, **{f"d{n}": t.grad for n, t in leaves.items()}}


def assert_all_close(got, want, rtol, rtols=None):
    """Relative max error per tensor: |got − want|∞ ≤ rtol · |want|∞ (floored at 1e-3 for all-zero grads)."""
    assert got.keys() == want.keys()
    for name in want:
        tol = (rtols or {}).get(name, rtol)
        err = (got[name].double() - want[name].double()).abs().max().item()
        ref = want[name].abs().max().item()
        assert err <= tol * max(ref, 1e-3), f"{name}: max error {err:.3g} vs max |ref| {ref:.3g}"


SHAPES = [  # B, H, T, D_k, D_v, chunk_size
    pytest.param(2, 2, 1, 16, 16, 16, id="T1"),
    pytest.param(2, 3, 67, 16, 32, 16, id="T67-chunk16"),
    pytest.param(1, 2, 64, 64, 64, 64, id="B1-dim64-one-chunk-4-subchunks"),
    pytest.param(1, 1, 40, 64, 16, 8, id="B1-dk64-dv16"),
    pytest.param(1, 1, 100, 16, 16, 48, id="chunk48-3-subchunks"),
]


@pytest.mark.parametrize("B, H, T, K, V, chunk_size", SHAPES)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_parallel_and_chunk_equal_naive_float64(B, H, T, K, V, chunk_size, gate, with_state):
    inputs = make_inputs(B, H, T, K, V, torch.float64, gate, with_state)
    want = run(naive_gated_recurrence, inputs)
    assert_all_close(run(parallel_gated_recurrence, inputs), want, rtol=1e-10)
    assert_all_close(run(partial(chunk_gated_recurrence, chunk_size=chunk_size), inputs), want, rtol=1e-10)


@pytest.mark.parametrize("B, H, T, K, V, chunk_size", SHAPES)
@pytest.mark.parametrize("gate", GATES)
def test_parallel_and_chunk_equal_naive_float32(B, H, T, K, V, chunk_size, gate):
    inputs = make_inputs(B, H, T, K, V, torch.float32, gate)
    want = run(naive_gated_recurrence, inputs)
    assert_all_close(run(parallel_gated_recurrence, inputs), want, rtol=1e-5)
    assert_all_close(run(partial(chunk_gated_recurrence, chunk_size=chunk_size), inputs), want, rtol=1e-5)


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_head_dim_128(gate):
    inputs = make_inputs(1, 1, 37, 128, 128, torch.float64, gate)
    want = run(naive_gated_recurrence, inputs)
    assert_all_close(run(partial(chunk_gated_recurrence, chunk_size=32), inputs), want, rtol=1e-10)


@pytest.mark.parametrize("sub_chunk_size", [1, 4, 16, 32])
def test_every_sub_chunk_size_is_exact(sub_chunk_size):
    """Sub-chunks change only how the intra-chunk pairs are grouped, never the result."""
    inputs = make_inputs(2, 2, 45, 8, 8, torch.float64, min_log_g=-3.0)
    op = partial(chunk_gated_recurrence, chunk_size=32, sub_chunk_size=sub_chunk_size)
    assert_all_close(run(op, inputs), run(naive_gated_recurrence, inputs), rtol=1e-10)


def test_per_head_gate_equals_the_same_gate_on_every_channel():
    inputs = make_inputs(2, 2, 30, 8, 4, torch.float64, "head")
    o_head, s_head = chunk_gated_recurrence(**inputs, chunk_size=8, output_final_state=True)
    per_channel = dict(inputs, log_g=inputs["log_g"].unsqueeze(-1).expand(-1, -1, -1, 8))
    o_channel, s_channel = chunk_gated_recurrence(**per_channel, chunk_size=8, output_final_state=True)
    torch.testing.assert_close(o_head, o_channel, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_head, s_channel, rtol=1e-12, atol=1e-12)


def test_explicit_scale_and_default_chunk_size():
    inputs = make_inputs(2, 2, 100, 16, 16, torch.float64)
    want = run(naive_gated_recurrence, inputs, scale=0.3)
    assert_all_close(run(chunk_gated_recurrence, inputs, scale=0.3), want, rtol=1e-10)


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_strong_decays_stay_finite_in_chunk_form(gate):
    """log g down to −5 per step: cumulative decays reach e^−600 within a chunk of 64; no inf, no nan."""
    inputs = make_inputs(2, 2, 256, 32, 32, torch.float32, gate, min_log_g=-5.0)
    got = run(chunk_gated_recurrence, inputs)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert_all_close(got, run(naive_gated_recurrence, inputs), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("gate", ["channel", "head"])
def test_sixteen_thousand_tokens_of_strong_decays(dtype, gate):
    """T = 16384, log g uniform in [−20, 0]: outputs, state and gradients finite, and the end is right.

    Cumulative decays reach e^−160000, far below the smallest float32; every exponent the chunk form
    takes is ≤ 0, so they underflow to 0 and nothing overflows. Over 448 tokens even the slowest channel
    has forgotten everything (expected log decay −4480), so the last chunk must equal the naive
    recurrence restarted 512 tokens before the end.
    """
    T, tail = 16384, 512
    inputs = make_inputs(1, 1, T, 16, 16, dtype, gate, with_state=False, min_log_g=-20.0)
    got = run(chunk_gated_recurrence, inputs)
    assert all(torch.isfinite(t).all() for t in got.values())
    restarted, _ = naive_gated_recurrence(**{n: t[:, :, -tail:] for n, t in inputs.items() if t is not None})
    end = got["o"][:, :, -64:].float()
    assert (end - restarted[:, :, -64:].float()).abs().max() <= 1e-5 * end.abs().max()


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_bfloat16_inputs_match_the_float64_reference(gate):
    """bf16 in, float32 inside: outputs and input gradients carry only their final rounding to bf16.

    Rounding to nearest errs by at most half a bf16 ulp, 2^−9 of the value, so |error|∞ ≤ 2^−8 · |ref|∞
    leaves a factor 2 for float32 accumulation; the final state stays float32 (1e-5).
    """
    inputs = make_inputs(2, 2, 300, 16, 16, torch.float32, gate, min_log_g=-5.0)
    inputs = {n: t.bfloat16() for n, t in inputs.items()}
    want = run(naive_gated_recurrence, {n: t.double() for n, t in inputs.items()})
    for op in (chunk_gated_recurrence, parallel_gated_recurrence):
        got = run(op, inputs)
        assert got["o"].dtype == torch.bfloat16 and got["final_state"].dtype == torch.float32
        assert_all_close(got, want, rtol=2**-8, rtols={"final_state": 1e-5})


@pytest.mark.parametrize("gate", GATES)
def test_step_matches_definition(gate):
    """One step is S = diag(exp(log_g)) S₀ + k vᵀ and o = scale · Sᵀ q."""
    x = make_inputs(2, 3, 1, 8, 4, torch.float64, gate)
    q, k, v = (x[n][:, :, 0] for n in ("q", "k", "v"))
    log_g = None if x["log_g"] is None else x["log_g"][:, :, 0]
    o, state = gated_recurrence_step(q, k, v, log_g, x["initial_state"], scale=0.5)
    decay = {"channel": lambda: log_g.exp()[..., None], "head": lambda: log_g.exp()[..., None, None],
             "none": lambda: 1.0}[gate]()
    want_state = decay * x["initial_state"] + k[..., None] * v[..., None, :]
    torch.testing.assert_close(state, want_state)
    torch.testing.assert_close(o, 0.5 * (want_state * q[..., None]).sum(-2))


def test_low_precision_inputs_accumulate_in_float32():
    x = make_inputs(1, 2, 20, 16, 16, torch.float32)
    bf16 = {n: t.bfloat16() for n, t in x.items()}
    o, state = chunk_gated_recurrence(**bf16, chunk_size=8, output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    want, _ = naive_gated_recurrence(**x)
    assert (o.float() - want).abs().max() <= 2e-2 * want.abs().max()


def test_forms_by_name():
    x = make_inputs(1, 2, 20, 8, 8, torch.float64)
    want, _ = naive_gated_recurrence(**x)
    for form in FORMS:
        o, _ = gated_recurrence(**x, form=form, chunk_size=8)
        torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="chunk, parallel, naive"):
        gated_recurrence(**x, form="fast")


@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("gate", GATES)
def test_flops_match_flop_counter(form, gate):
    """The counter sees what PyTorch multiplies: dense diagonal blocks (the parallel form's T×T, the
    chunk form's C×C or, per channel, c×c sub-chunks plus each sub-chunk's queries against all earlier
    keys), whose masked upper triangles are computed and then zeroed. ``gated_recurrence_flops`` counts
    causal pairs only, as a kernel that skips masked tiles would; so counted − predicted lies between 0
    and the FLOPs of the masked pairs."""
    B, H, T, K, V, C = 1, 2, 100, 8, 16, 32
    x = make_inputs(B, H, T, K, V, torch.float32, gate, with_state=False)
    with FlopCounterMode(display=False) as counter:
        gated_recurrence(**x, form=form, chunk_size=C)
    predicted = gated_recurrence_flops(T, H, K, V, form, C)
    block, n_blocks = (T, 1) if form == "parallel" else (C, -(-T // C))
    masked = H * n_blocks * (block * (block - 1) // 2) * 2 * (K + V)
    assert 0 <= counter.get_total_flops() - predicted <= masked


def test_naive_flops_count_the_write_the_counter_misses():
    """Per token the naive form writes k vᵀ (an outer product: elementwise to the counter) and reads Sᵀq."""
    x = make_inputs(1, 2, 10, 8, 16, torch.float32, with_state=False)
    with FlopCounterMode(display=False) as counter:
        naive_gated_recurrence(**x)
    assert 2 * counter.get_total_flops() == gated_recurrence_flops(10, 2, 8, 16, "naive")
