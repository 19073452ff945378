"""The delta rule's forms agree (outputs, final states, every gradient); the mixers' costs, options."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers import build_mixer
from lmscale.ops.delta_rule import chunk_delta_rule, delta_rule_step, naive_delta_rule

INPUT_NAMES = ("q", "k", "v", "beta", "log_alpha", "initial_state")


def make_inputs(B, H, T, K, V, dtype, gated=True, with_state=True, min_log_alpha=None, seed=0):
    """Random inputs as the mixers make them: unit-norm keys, β in (0, 1), per-head log decays ≤ 0."""
    torch.manual_seed(seed)
    if min_log_alpha is None:
        log_alpha = F.logsigmoid(torch.randn(B, H, T, dtype=dtype))
    else:
        log_alpha = min_log_alpha * torch.rand(B, H, T, dtype=dtype)
    return {
        "q": torch.randn(B, H, T, K, dtype=dtype),
        "k": F.normalize(torch.randn(B, H, T, K, dtype=dtype), dim=-1),
        "v": torch.randn(B, H, T, V, dtype=dtype),
        "beta": torch.rand(B, H, T, dtype=dtype),
        "log_alpha": log_alpha if gated else None,
        "initial_state": torch.randn(B, H, K, V, dtype=dtype) if with_state else None,
    }


def run(op, inputs, scale=None, backward=True):
    """Output, final state and the gradients of a fixed random loss w.r.t. every given input."""
    leaves = {n: t.clone().requires_grad_(backward) for n, t in inputs.items() if t is not None}
    args = {n: leaves.get(n) for n in INPUT_NAMES}
    o, final_state = op(**args, scale=scale, output_final_state=True)
    result = {"o": o, "final_state": final_state}
    if backward:
        gen = torch.Generator().manual_seed(1)
        do = torch.randn(o.shape, generator=gen).to(o.dtype)
        d_state = torch.randn(final_state.shape, generator=gen).to(final_state.dtype)
        ((o * do).float().sum() + (final_state * d_state).sum()).backward()
        result |= {f"d{n}": t.grad for n, t in leaves.items()}
    return result


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
def test_chunk_equals_naive_float64(B, H, T, K, V, chunk_size, gated, with_state):
    inputs = make_inputs(B, H, T, K, V, torch.float64, gated, with_state)
    want = run(naive_delta_rule, inputs)
    assert_all_close(run(partial(chunk_delta_rule, chunk_size=chunk_size), inputs), want, rtol=1e-10)


@pytest.mark.parametrize("B, H, T, K, V, chunk_size", SHAPES)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_chunk_equals_naive_float32(B, H, T, K, V, chunk_size, gated):
    inputs = make_inputs(B, H, T, K, V, torch.float32, gated)
    want = run(naive_delta_rule, inputs)
    assert_all_close(run(partial(chunk_delta_rule, chunk_size=chunk_size), inputs), want, rtol=1e-5)


def test_head_dim_128_and_default_chunk_size_with_explicit_scale():
    inputs = make_inputs(1, 1, 70, 128, 128, torch.float64)
    want = run(naive_delta_rule, inputs, scale=0.3)
    assert_all_close(run(chunk_delta_rule, inputs, scale=0.3), want, rtol=1e-10)


def test_step_matches_definition():
    """One step is S = α (I − β k kᵀ) S₀ + β k vᵀ and o = scale · Sᵀ q."""
    x = make_inputs(2, 3, 1, 8, 4, torch.float64)
    q, k, v = (x[n][:, :, 0] for n in ("q", "k", "v"))
    beta, log_alpha, s0 = x["beta"][:, :, 0], x["log_alpha"][:, :, 0], x["initial_state"]
    o, state = delta_rule_step(q, k, v, beta, log_alpha, s0, scale=0.5)
    b = beta[..., None, None]
    householder = torch.eye(8, dtype=torch.float64) - b * k[..., :, None] * k[..., None, :]
    want_state = log_alpha.exp()[..., None, None] * householder @ s0 + b * k[..., :, None] * v[..., None, :]
    torch.testing.assert_close(state, want_state)
    torch.testing.assert_close(o, 0.5 * (want_state * q[..., None]).sum(-2))


def test_full_strength_write_replaces_the_value():
    """With β = 1 and a unit key, the state recalls exactly the value last written under that key."""
    x = make_inputs(1, 2, 2, 16, 8, torch.float64, gated=False)
    k = x["k"][:, :, :1].expand(-1, -1, 2, -1)  # the same key twice, two different values
    _, state = naive_delta_rule(x["q"], k, x["v"], torch.ones(1, 2, 2, dtype=torch.float64),
                                initial_state=x["initial_state"], output_final_state=True)
    torch.testing.assert_close(torch.einsum("bhk,bhkv->bhv", k[:, :, 1], state), x["v"][:, :, 1])


def test_strong_decays_stay_finite_in_chunk_form():
    """log α down to −5 per step: cumulative decays reach e^−300 within a chunk of 64; no inf, no nan."""
    inputs = make_inputs(2, 2, 256, 32, 32, torch.float32, min_log_alpha=-5.0)
    got = run(chunk_delta_rule, inputs)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert_all_close(got, run(naive_delta_rule, inputs), rtol=1e-5)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_long_sequence_stays_finite_and_accurate(gated):
    """T = 16384, 256 chunks of state passing: float32 and bfloat16, forward and backward, stay finite;
    the chunk form still matches the token loop (errors do not compound: with ‖k‖ = 1 and β ≤ 1,
    I − β k kᵀ is a contraction, so the state stays the size of a few values)."""
    inputs = make_inputs(1, 2, 16384, 16, 16, torch.float32, gated)
    want, want_state = naive_delta_rule(**inputs, output_final_state=True)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = run(chunk_delta_rule, {n: t if t is None else t.to(dtype) for n, t in inputs.items()})
        assert all(torch.isfinite(t).all() for t in got.values()), dtype
        assert got["o"].dtype == dtype and got["final_state"].dtype == torch.float32
        assert_all_close({"o": got["o"].float(), "final_state": got["final_state"]},
                         {"o": want, "final_state": want_state}, rtol)
    assert want_state.abs().max() < 10


def test_low_precision_inputs_accumulate_in_float32():
    x = make_inputs(1, 2, 20, 16, 16, torch.float32)
    bf16 = {n: t.bfloat16() for n, t in x.items()}
    o, state = chunk_delta_rule(**bf16, chunk_size=8, output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    want, _ = naive_delta_rule(**x)
    assert (o.float() - want).abs().max() <= 2e-2 * want.abs().max()


# --- the mixers ---------------------------------------------------------------------------------------

def make_mixer(name, dtype=torch.float64, **options):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=name, d_model=32, n_heads=4, max_seq_len=128, mixer_options=options)
    return build_mixer(cfg, layer_idx=0).to(dtype)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("form", ["chunk", "naive"])
@pytest.mark.parametrize("T", [64, 100])
def test_deltanet_cost_matches_flop_counter(name, form, T):
    """The counter sees every matmul, linear and convolution we count, exactly, but not the C × C
    unit-triangular solve of the chunk form (aten's triangular solve has no FLOP formula) nor the naive
    form's rank-1 write (an elementwise broadcast): removing those two, prediction and count are equal.
    T = 100 checks the padded last chunk."""
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=name, d_model=64, n_heads=2, mixer_options={"form": form})
    mixer = build_mixer(cfg, layer_idx=0)
    with FlopCounterMode(display=False) as counter:
        mixer(torch.randn(1, T, 64))
    H, Dh, C = 2, 32, 64
    unseen = H * -(-T // C) * C * C * (C - 1) if form == "chunk" else H * T * 2 * Dh * Dh
    assert counter.get_total_flops() == mixer.cost(T).flops - unseen


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("conv_size", [1, 6])
def test_conv_window_longer_than_prefix_is_carried(name, conv_size):
    """Prefill 2 tokens, then decode: the conv window starts half zeros; conv_size 1 carries an empty one."""
    mixer = make_mixer(name, conv_size=conv_size, chunk_size=8)
    torch.manual_seed(1)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    y, state = mixer(x[:, :2], return_state=True)
    steps = [y]
    for t in range(2, 12):
        y_t, state = mixer.step(x[:, t], state)
        steps.append(y_t.unsqueeze(1))
    torch.testing.assert_close(torch.cat(steps, dim=1), mixer(x), rtol=1e-10, atol=1e-12)
    carried = sum(t.numel() * t.element_size() for t in (state.memory, state.conv)) // 2
    assert carried == mixer.state_bytes(12, torch.float64)


def test_gated_decays_are_data_dependent_and_in_unit_interval():
    mixer = make_mixer("gated_deltanet", torch.float32)
    *_, log_alpha, _ = mixer._project(torch.randn(1, 50, 32), None)  # (B, H, T)
    assert (log_alpha < 0).all() and torch.isfinite(log_alpha).all()
    assert (log_alpha.std(dim=-1) > 0).all()  # every head's gate moves with the input


@pytest.mark.parametrize(
    "options, field, hint",
    [
        ({"form": "parallel"}, "mixer_options['form']", "'chunk', 'naive'"),
        ({"chunk_size": 0}, "mixer_options['chunk_size']", "positive integer"),
        ({"conv_size": 0}, "mixer_options['conv_size']", "positive integer"),
        ({"expand_k": 1}, "mixer_options['expand_k']", "chunk_size, conv_size, form"),
    ],
)
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_bad_options_raise_config_error(name, options, field, hint):
    with pytest.raises(ConfigError) as excinfo:
        make_mixer(name, **options)
    assert excinfo.value.field == field
    assert hint in str(excinfo.value)
