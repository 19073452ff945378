"""The diagonal scan's three forms agree (real and complex), and the LRU and Mamba mixers built on it
keep their promises: paper initialisation, long-sequence stability, cost against the FLOP counter."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers import build_mixer
from lmscale.ops.diagonal_scan import (
    chunk_diagonal_scan,
    diagonal_scan_step,
    naive_diagonal_scan,
    parallel_diagonal_scan,
)

COMPLEX = {torch.float64: torch.complex128, torch.float32: torch.complex64}


def make_inputs(B, T, channels, dtype, kind="real", with_state=True, broadcast_a=False, seed=0):
    """Random a, b, initial state. Real a uniform in (−1, 1), negative values included;
    complex a with |a| uniform in (0, 1) and any phase; ``broadcast_a``: one a per channel, as LRU's λ."""
    torch.manual_seed(seed)
    a_shape = tuple(channels) if broadcast_a else (B, T, *channels)
    if kind == "real":
        a = 2 * torch.rand(a_shape, dtype=dtype) - 1
        b = torch.randn(B, T, *channels, dtype=dtype)
        h0 = torch.randn(B, *channels, dtype=dtype)
    else:
        a = torch.polar(torch.rand(a_shape, dtype=dtype), math.pi * (2 * torch.rand(a_shape, dtype=dtype) - 1))
        b = torch.randn(B, T, *channels, dtype=COMPLEX[dtype])
        h0 = torch.randn(B, *channels, dtype=COMPLEX[dtype])
    return {"a": a, "b": b, "initial_state": h0 if with_state else None}


def run(op, inputs):
    """Output, final state and the gradients of a fixed random real loss w.r.t. every given input."""
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items() if t is not None}
    h, final_state = op(leaves["a"], leaves["b"], leaves.get("initial_state"), output_final_state=True)
    gen = torch.Generator().manual_seed(1)  # the same cotangents whatever the dtype

    def cotangent(like):
        wide = torch.complex128 if like.is_complex() else torch.float64
        return torch.randn(like.shape, dtype=wide, generator=gen).to(like.dtype)

    dh, d_state = cotangent(h), cotangent(final_state)
    ((h * dh).real.sum() + (final_state * d_state).real.sum()).backward()
    # an input that cannot reach the loss (a when T = 1 and there is no initial state) has gradient 0
    grads = {f"d{n}": torch.zeros_like(t) if t.grad is None else t.grad for n, t in leaves.items()}
    return {"h": h, "final_state": final_state, **grads}


def assert_all_close(got, want, rtol):
    """Relative max error per tensor: |got − want|∞ ≤ rtol · |want|∞ (floored at 1e-3 for all-zero grads)."""
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        ref = want[name].abs().max().item()
        assert err <= rtol * max(ref, 1e-3), f"{name}: max error {err:.3g} vs max |ref| {ref:.3g}"


SHAPES = [  # B, T, channels, chunk_size
    pytest.param(2, 1, (16,), 16, id="T1"),
    pytest.param(2, 67, (16,), 16, id="T67-chunk16"),
    pytest.param(1, 64, (64,), 64, id="B1-C64-one-chunk"),
    pytest.param(1, 40, (8, 16), 8, id="B1-mamba-layout"),
]


@pytest.mark.parametrize("B, T, channels, chunk_size", SHAPES)
@pytest.mark.parametrize("kind", ["real", "complex"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_parallel_and_chunk_equal_naive_float64(B, T, channels, chunk_size, kind, with_state):
    inputs = make_inputs(B, T, channels, torch.float64, kind, with_state)
    want = run(naive_diagonal_scan, inputs)
    assert_all_close(run(parallel_diagonal_scan, inputs), want, rtol=1e-10)
    assert_all_close(run(partial(chunk_diagonal_scan, chunk_size=chunk_size), inputs), want, rtol=1e-10)


@pytest.mark.parametrize("B, T, channels, chunk_size", SHAPES)
@pytest.mark.parametrize("kind", ["real", "complex"])
def test_parallel_and_chunk_equal_naive_float32(B, T, channels, chunk_size, kind):
    inputs = make_inputs(B, T, channels, torch.float32, kind)
    want = run(naive_diagonal_scan, inputs)
    assert_all_close(run(parallel_diagonal_scan, inputs), want, rtol=1e-5)
    assert_all_close(run(partial(chunk_diagonal_scan, chunk_size=chunk_size), inputs), want, rtol=1e-5)


@pytest.mark.parametrize("kind", ["real", "complex"])
def test_time_invariant_a_broadcasts_and_gets_summed_gradients(kind):
    """LRU passes one λ per channel; its gradient sums over batch and time, the same in every form."""
    inputs = make_inputs(2, 50, (128,), torch.float64, kind, broadcast_a=True)
    want = run(naive_diagonal_scan, inputs)
    assert want["da"].shape == (128,)
    assert_all_close(run(parallel_diagonal_scan, inputs), want, rtol=1e-10)
    assert_all_close(run(chunk_diagonal_scan, inputs), want, rtol=1e-10)


def test_step_matches_definition():
    x = make_inputs(3, 1, (5,), torch.float64, "complex")
    h, state = diagonal_scan_step(x["a"][:, 0], x["b"][:, 0], x["initial_state"])
    torch.testing.assert_close(state, x["a"][:, 0] * x["initial_state"] + x["b"][:, 0])
    assert torch.equal(h, state)


def test_vanishing_and_zero_decays_agree_in_every_form():
    """|a| down to 1e-17, 10 % exact zeros: products near underflow, cumprod's backward meets zeros.

    (Below float32's normal range, 1e-38, cumprod's backward divides denormals: see chunk_diagonal_scan.)
    """
    inputs = make_inputs(2, 100, (16,), torch.float32, "real")
    inputs["a"] = inputs["a"] ** 5 * (torch.rand(inputs["a"].shape) > 0.1)
    assert inputs["a"].abs().min() == 0 and inputs["a"][inputs["a"] != 0].abs().min() < 1e-15
    want = run(naive_diagonal_scan, inputs)
    for op in (parallel_diagonal_scan, partial(chunk_diagonal_scan, chunk_size=32)):
        got = run(op, inputs)
        assert all(torch.isfinite(t).all() for t in got.values())
        assert_all_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forms_agree_over_16384_steps(dtype):
    """Decays near 1 (memory of thousands of steps) accumulate in float32 whatever the input dtype."""
    torch.manual_seed(0)
    a = (1 - 1e-3 * torch.rand(1, 16384, 4)).to(dtype)
    b = torch.randn(1, 16384, 4).to(dtype)
    want, want_state = naive_diagonal_scan(a, b, output_final_state=True)
    assert want.dtype == dtype and want_state.dtype == torch.float32
    rtol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16 outputs are rounded to 8 bits
    for op in (parallel_diagonal_scan, chunk_diagonal_scan):
        h, state = op(a, b, output_final_state=True)
        assert torch.isfinite(h).all() and h.dtype == dtype
        assert (h.float() - want.float()).abs().max() <= rtol * want.float().abs().max()
        assert (state - want_state).abs().max() <= 1e-5 * want_state.abs().max()


# --- the mixers ---------------------------------------------------------------------------------


def make_mixer(name, dtype=torch.float64, d_model=32, **options):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=name, d_model=d_model, n_heads=4, max_seq_len=128, mixer_options=options)
    return build_mixer(cfg, layer_idx=0).to(dtype)


def test_lru_init_puts_lambda_on_the_ring():
    lru = make_mixer("lru", d_model=64, d_state=512, r_min=0.4, r_max=0.9, max_phase=math.pi / 10)
    lam, gamma = lru._lambda_gamma(torch.float64)
    assert lam.shape == (512,)
    assert lam.abs().min() >= 0.4 - 1e-12 and lam.abs().max() <= 0.9 + 1e-12
    assert lam.angle().min() >= 0 and lam.angle().max() <= math.pi / 10 + 1e-12
    # uniform on the ring's area: |λ|² uniform in [r_min², r_max²], mean (0.16 + 0.81) / 2
    assert abs((lam.abs() ** 2).mean().item() - 0.485) < 0.03
    torch.testing.assert_close(gamma, torch.sqrt(1 - lam.abs() ** 2))
    assert make_mixer("lru").d_state == 32  # d_state defaults to d_model


def test_mamba_init_follows_the_paper():
    mamba = make_mixer("mamba")
    assert (mamba.d_inner, mamba.d_state, mamba.dt_rank, mamba.conv_size) == (64, 16, 2, 4)
    torch.testing.assert_close(-mamba.A_log.exp(), -torch.arange(1.0, 17.0, dtype=torch.float64).expand(64, 16))
    dt = F.softplus(mamba.dt_bias)
    assert dt.min() >= 0.001 - 1e-9 and dt.max() <= 0.1 + 1e-9
    assert torch.equal(mamba.D, torch.ones(64, dtype=torch.float64))


@pytest.mark.parametrize("name", ["lru", "mamba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_16384_tokens_stay_finite(name, dtype):
    mixer = make_mixer(name, dtype, d_model=8, d_state=4, chunk_size=16)
    torch.manual_seed(1)
    x = torch.randn(1, 16384, 8, dtype=dtype)
    with torch.no_grad():
        y, state = mixer(x, return_state=True)
    assert y.dtype == dtype and torch.isfinite(y).all()
    tensors = [state] if name == "lru" else [state.conv, state.ssm]
    assert all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("name", ["lru", "mamba"])
def test_low_precision_activations_keep_a_float32_state(name):
    mixer = make_mixer(name, torch.bfloat16)
    x = torch.randn(2, 10, 32, dtype=torch.bfloat16)
    y, state = mixer(x, return_state=True)
    ssm = state if name == "lru" else state.ssm
    assert y.dtype == torch.bfloat16 and ssm.dtype in (torch.complex64, torch.float32)
    reference = make_mixer(name, torch.float32)(x.float())
    assert (y.float() - reference).abs().max() <= 5e-2 * reference.abs().max()


def assert_cost_matches_flop_counter(name, scan):
    """The counter sees the matmuls (and Mamba's depthwise conv); cost counts exactly those.

    Neither side counts the scan, which contains no matmul in any form, nor the discretisation, γ, gates
    or skips (elementwise): so the two must agree exactly, in every form, not just within a tolerance.
    """
    mixer = make_mixer(name, torch.float32, scan=scan)
    x = torch.randn(1, 64, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mixer(x)
    assert counter.get_total_flops() == mixer.cost(64).flops
    assert mixer.cost(128).flops == 2 * mixer.cost(64).flops  # linear in T
    assert mixer.cost(64, torch.bfloat16).bytes * 2 == mixer.cost(64).bytes


@pytest.mark.parametrize("scan", ["chunk", "parallel"])
def test_lru_cost_matches_flop_counter(scan):
    assert_cost_matches_flop_counter("lru", scan)


@pytest.mark.parametrize("scan", ["chunk", "parallel"])
def test_mamba_cost_matches_flop_counter(scan):
    assert_cost_matches_flop_counter("mamba", scan)


def test_mamba_state_is_the_conv_window_and_h():
    mamba = make_mixer("mamba", conv_size=3, d_state=5)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    _, state = mamba(x, return_state=True)
    assert state.conv.shape == (2, 64, 2) and state.ssm.shape == (2, 64, 5)
    torch.testing.assert_close(state.conv, mamba.in_proj(x)[:, -2:, :64].transpose(1, 2))  # last 2 conv inputs
    assert mamba.state_bytes(7, torch.float64) == 64 * (2 + 5) * 8
    assert make_mixer("mamba", conv_size=1).state_bytes(7, torch.float32) == 64 * 16 * 4


@pytest.mark.parametrize(
    "name, options, field, hint",
    [
        ("lru", {"scan": "fft"}, "mixer_options['scan']", "'chunk', 'parallel', 'sequential'"),
        ("lru", {"r_max": 1.0}, "mixer_options['r_max']", "[0, 1)"),
        ("lru", {"r_min": 0.99, "r_max": 0.9}, "mixer_options['r_min']", "must not exceed r_max"),
        ("lru", {"max_phase": 0}, "mixer_options['max_phase']", "(0, 2π]"),
        ("lru", {"d_state": 0}, "mixer_options['d_state']", "None for d_model"),
        ("mamba", {"scan": "naive"}, "mixer_options['scan']", "'chunk', 'parallel', 'sequential'"),
        ("mamba", {"expand": 1.5}, "mixer_options['expand']", "positive integer"),
        ("mamba", {"conv_size": 0}, "mixer_options['conv_size']", "positive integer"),
        ("mamba", {"dt_rank": 4}, "mixer_options['dt_rank']", "valid options: chunk_size, conv_size"),
    ],
)
def test_bad_options_raise_config_error(name, options, field, hint):
    with pytest.raises(ConfigError) as excinfo:
        make_mixer(name, **options)
    assert excinfo.value.field == field
    assert hint in str(excinfo.value)
