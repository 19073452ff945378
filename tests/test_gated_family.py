"""What is particular to the gated-recurrence mixers (linear attention, RetNet, GLA, simple GLA).

The contract every mixer keeps (forms agree, prefix + step = full, causality, state size) is checked by
tests/test_mixers.py; here: each layer against its paper's equations written out independently, the
options, the analytic cost against torch's FLOP counter, and low-precision long sequences.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers import build_mixer
from lmscale.model import LanguageModel
from lmscale.rope import apply_rope

D, H, T = 32, 4, 21
FAMILY = ["linear_attention", "retnet", "gla", "simple_gla"]


def make_mixer(name, dtype=torch.float64, **options):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=name, d_model=D, n_heads=H, max_seq_len=128, mixer_options=options)
    return build_mixer(cfg, layer_idx=0).to(dtype)


def random_input(B=2, T=T, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(B, T, D, dtype=dtype)


def split_heads(t):
    """[B, T, D] -> [B, H, T, D/H]."""
    return t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)


def causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


# --- each layer against its paper's equations, written out as attention with a causal mask ---------


@pytest.mark.parametrize("form", ["chunk", "parallel", "naive"])
def test_linear_attention_is_kernelised_causal_attention(form):
    """Katharopoulos et al. 2020, section 3: o_t = Σ_{s≤t} φ(q_t)·φ(k_s) v_s / Σ_{s≤t} φ(q_t)·φ(k_s), φ = elu + 1."""
    mixer, x = make_mixer("linear_attention", form=form, chunk_size=8), random_input()
    phi = lambda t: F.elu(t) + 1
    q, k, v = phi(split_heads(mixer.q_proj(x))), phi(split_heads(mixer.k_proj(x))), split_heads(mixer.v_proj(x))
    weights = (q @ k.transpose(-1, -2)).masked_fill(~causal(T), 0.0)  # (B, H, T, T)
    o = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)
    want = mixer.o_proj(o.transpose(1, 2).reshape(2, T, D))
    torch.testing.assert_close(mixer(x), want, rtol=1e-10, atol=1e-12)


def test_linear_attention_state_holds_the_normaliser():
    """The state's last column is z_t = Σ_s φ(k_s); without normalising the state is Dh columns wide."""
    mixer, x = make_mixer("linear_attention"), random_input()
    _, state = mixer(x, return_state=True)
    z = (F.elu(split_heads(mixer.k_proj(x))) + 1).sum(dim=2)  # (B, H, Dh)
    torch.testing.assert_close(state[..., -1], z)
    plain = make_mixer("linear_attention", feature_map="identity", normalize=False)
    assert plain.init_state(2, "cpu", torch.float64).shape == (2, H, D // H, D // H)


def test_unnormalised_identity_linear_attention_is_masked_attention_without_softmax():
    mixer, x = make_mixer("linear_attention", feature_map="identity", normalize=False), random_input()
    q, k, v = (split_heads(p(x)) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    scores = (q @ k.transpose(-1, -2)).masked_fill(~causal(T), 0.0) / math.sqrt(D // H)
    want = mixer.o_proj((scores @ v).transpose(1, 2).reshape(2, T, D))
    torch.testing.assert_close(mixer(x), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["chunk", "parallel", "naive"])
def test_retnet_is_multi_scale_retention(form):
    """Sun et al. 2023, section 2: Retention = (Q Kᵀ ⊙ D) V, D_ts = γ_h^(t−s), γ_h = 1 − 2^(−5−h), rotated q, k;
    y = W_O (swish(W_G x) ⊙ GroupNorm(heads))."""
    mixer, x = make_mixer("retnet", form=form, chunk_size=8), random_input()
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
    t = torch.arange(T, dtype=torch.float64)
    decay = gamma[:, None, None] ** (t[:, None] - t[None, :]).clamp(min=0) * causal(T)  # (H, T, T)
    q = apply_rope(split_heads(mixer.q_proj(x)), 0, 10000.0)
    k = apply_rope(split_heads(mixer.k_proj(x)), 0, 10000.0)
    retention = ((q @ k.transpose(-1, -2)) / math.sqrt(D // H) * decay) @ split_heads(mixer.v_proj(x))
    heads = retention.transpose(1, 2).reshape(2 * T, D)
    normed = F.group_norm(heads, H, mixer.group_norm.weight, mixer.group_norm.bias, eps=1e-5).view(2, T, D)
    want = mixer.o_proj(F.silu(mixer.gate_proj(x)) * normed)
    torch.testing.assert_close(mixer(x), want, rtol=1e-10, atol=1e-12)


def test_retnet_state_carries_the_rotary_position():
    """One position per sequence, in a tensor (so a CUDA graph of the step advances it on the device)."""
    mixer, x = make_mixer("retnet"), random_input()
    _, state = mixer(x[:, :9], return_state=True)
    assert state.position.tolist() == [9, 9]
    _, state = mixer.step(x[:, 9], state)
    assert state.position.tolist() == [10, 10]
    assert mixer.init_state(2, "cpu", torch.float64).position.tolist() == [0, 0]


def test_rope_with_one_start_per_sequence_equals_rope_at_each_start():
    x = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    starts = torch.tensor([0, 7, 1000])
    got = apply_rope(x, starts, 10000.0)
    for b, start in enumerate(starts.tolist()):
        torch.testing.assert_close(got[b], apply_rope(x[b : b + 1], start, 10000.0)[0], rtol=0, atol=0)


def test_retnet_rejects_odd_head_dims():
    with pytest.raises(ConfigError) as excinfo:
        build_mixer(ModelConfig(mixer="retnet", d_model=12, n_heads=4), layer_idx=0)
    assert excinfo.value.field == "d_model" and "even" in str(excinfo.value)


@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_simple_gla_is_gated_attention_with_a_scalar_decay_per_head(form):
    """o_t = Σ_{s≤t} (α_{s+1} ⋯ α_t) q_t·k_s v_s / √d, log α_t = −exp(A_log) softplus(W x_t + dt_bias)."""
    mixer, x = make_mixer("simple_gla", form=form, chunk_size=8), random_input()
    log_alpha = -mixer.A_log.exp() * F.softplus(mixer.dt_proj(x) + mixer.dt_bias)  # (B, T, H)
    b = log_alpha.transpose(1, 2).cumsum(-1)  # (B, H, T)
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal(T), -math.inf).exp()
    q, k, v = (split_heads(p(x)) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    o = ((q @ k.transpose(-1, -2)) * decay / math.sqrt(D // H)) @ v  # (B, H, T, Dh)
    o = F.rms_norm(o.transpose(1, 2), (D // H,), mixer.o_norm.weight, eps=1e-5)
    want = mixer.o_proj((o * F.silu(mixer.out_gate_proj(x)).view(2, T, H, -1)).reshape(2, T, D))
    torch.testing.assert_close(mixer(x), want, rtol=1e-10, atol=1e-12)


def test_simple_gla_starts_with_mamba2_decay_spread_that_model_init_keeps():
    """A ∈ [1, 16] and Δ ∈ [0.001, 0.1] at init: per-token decays between e^−1.6 and e^−0.001; the
    model's Linear init (zeroed biases) must not collapse them onto one value."""
    torch.manual_seed(0)
    cfg = ModelConfig(mixer="simple_gla", d_model=D, n_heads=8, n_layers=2, vocab_size=64)
    for block in LanguageModel(cfg).blocks:
        mixer = block.mixer
        rate = mixer.A_log.exp() * F.softplus(mixer.dt_bias)  # −log α at x = 0, per head
        assert (rate >= 1e-3 * 1.0 - 1e-9).all() and (rate <= 0.1 * 16.0 + 1e-9).all()
        assert rate.max() / rate.min() > 2  # distinct memory lengths across heads
        assert 1e-3 <= F.softplus(mixer.dt_bias).min() and F.softplus(mixer.dt_bias).max() <= 0.1


# --- GLA's options -----------------------------------------------------------------------------------


def test_gla_gate_temperature_divides_the_log_decay():
    x = random_input()
    _, _, _, log_g16 = make_mixer("gla")._project(x)
    _, _, _, log_g4 = make_mixer("gla", gate_temperature=4)._project(x)
    torch.testing.assert_close(log_g4, 4 * log_g16)


def test_gla_gate_low_rank_sets_the_decay_projection_rank():
    mixer = make_mixer("gla", gate_low_rank=5)
    assert mixer.decay_proj[0].weight.shape == (5, D) and mixer.decay_proj[1].weight.shape == (D // 2, 5)


def test_gla_without_output_gate():
    """y = W_o RMSNorm_head(o): no gate projection, d_model² fewer weights and 2·T·d_model² fewer FLOPs."""
    gated, plain = make_mixer("gla"), make_mixer("gla", output_gate=False)
    assert plain.out_gate_proj is None
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(gated) - n(plain) == D * D
    assert gated.cost(64).flops - plain.cost(64).flops == 2 * 64 * D * D
    x = random_input()
    state = plain.init_state(2, "cpu", torch.float64)
    steps = []
    for t in range(T):
        y_t, state = plain.step(x[:, t], state)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), plain(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "name, options, field, hint",
    [
        ("gla", {"gate_temperature": 0}, "mixer_options['gate_temperature']", "positive number"),
        ("gla", {"gate_low_rank": 1.5}, "mixer_options['gate_low_rank']", "positive integer"),
        ("gla", {"output_gate": "yes"}, "mixer_options['output_gate']", "True or False"),
        ("linear_attention", {"feature_map": "relu"}, "mixer_options['feature_map']", "'elu+1', 'identity'"),
        ("linear_attention", {"normalize": 1}, "mixer_options['normalize']", "True or False"),
        ("linear_attention", {"feature_map": "identity"}, "mixer_options['normalize']", "normalize=False"),
        ("linear_attention", {"form": "fast"}, "mixer_options['form']", "'chunk', 'parallel', 'naive'"),
        ("retnet", {"chunk_size": 0}, "mixer_options['chunk_size']", "positive integer"),
        ("retnet", {"gamma": 0.9}, "mixer_options['gamma']", "chunk_size, form"),
        ("simple_gla", {"form": "scan"}, "mixer_options['form']", "'chunk', 'parallel', 'naive'"),
    ],
)
def test_bad_options_raise_config_error(name, options, field, hint):
    with pytest.raises(ConfigError) as excinfo:
        make_mixer(name, **options)
    assert excinfo.value.field == field and hint in str(excinfo.value)


# --- analytic cost against the FLOP counter ---------------------------------------------------------


def _check_cost_against_flop_counter(name, d_k, d_v, dense, **options):
    """Projections are counted exactly (mm/addmm). The core: ``cost`` counts causal pairs only, as a
    kernel that skips masked tiles would; the PyTorch forms multiply dense blocks — the parallel form's
    T×T, the chunk form's C×C (per-head or no gate) — and zero the masked upper triangle, so the counter
    sees exactly H·n_blocks·(block·(block−1)/2)·2·(d_k + d_v) more. GLA's per-channel chunk form uses
    c×c sub-chunks plus each sub-chunk's queries against all earlier keys, so it multiplies only part of
    that excess: there the difference lies between 0 and it."""
    seq_len = 64
    mixer = make_mixer(name, torch.float32, **options)
    with FlopCounterMode(display=False) as counter:
        mixer(random_input(B=1, T=seq_len, dtype=torch.float32))
    block = seq_len if options.get("form") == "parallel" else mixer.chunk_size
    n_blocks = -(-seq_len // block)
    masked = H * n_blocks * (block * (block - 1) // 2) * 2 * (d_k + d_v)
    excess = counter.get_total_flops() - mixer.cost(seq_len).flops
    if dense:
        assert excess == masked
    else:
        assert 0 <= excess <= masked


@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_linear_attention_cost_matches_flop_counter(form):
    _check_cost_against_flop_counter("linear_attention", D // H, D // H + 1, dense=True, form=form)


@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_retnet_cost_matches_flop_counter(form):
    _check_cost_against_flop_counter("retnet", D // H, D // H, dense=True, form=form)


@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_gla_cost_matches_flop_counter(form):
    _check_cost_against_flop_counter("gla", D // 2 // H, D // H, dense=form == "parallel", form=form)


@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_simple_gla_cost_matches_flop_counter(form):
    _check_cost_against_flop_counter("simple_gla", D // H, D // H, dense=True, form=form)


@pytest.mark.parametrize("name", FAMILY)
def test_chunk_cost_is_linear_and_decode_cost_is_constant(name):
    mixer = make_mixer(name, chunk_size=16)
    assert mixer.cost(128).flops == 2 * mixer.cost(64).flops
    assert mixer.step_cost(10) == mixer.step_cost(10_000)
    assert mixer.cost(64, torch.bfloat16).bytes * 2 == mixer.cost(64, torch.float32).bytes


# --- low precision, long sequences --------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_bfloat16_long_sequence_is_finite_and_close_to_float32(name):
    """A bf16 layer over 2048 tokens: finite, and within bf16's resolution of the float32 layer.

    The op runs in float32 inside; bf16 enters through the rounded weights and activations of the
    projections and norms (relative error ~2^−8 each, a few in sequence; about 1% observed), hence 3%
    of the largest output.
    """
    x = random_input(B=1, T=2048, dtype=torch.float32)
    want = make_mixer(name, torch.float32)(x)
    got = make_mixer(name, torch.bfloat16)(x.bfloat16())
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max() <= 3e-2 * want.abs().max()
