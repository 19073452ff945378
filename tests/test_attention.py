"""Softmax attention's options: grouped-query heads and a sliding window, against plain references."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers import build_mixer
from lmscale.mixers.attention import attended_pairs
from lmscale.rope import apply_rope

D, H = 32, 4


def make(options=None, dtype=torch.float64, max_seq_len=128, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(mixer="attention", d_model=D, n_heads=H, max_seq_len=max_seq_len,
                      mixer_options=options or {})
    return build_mixer(cfg, layer_idx=0).to(dtype)


def random_input(B=2, T=21, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(B, T, D, dtype=dtype)


def reference_attention(mixer, x, window=None):
    """Token by token from the definition: query t attends to keys t − window … t, with their own kv head."""
    B, T, _ = x.shape
    Dh, group = mixer.head_dim, mixer.n_heads // mixer.n_kv_heads
    q = apply_rope(mixer.q_proj(x).view(B, T, -1, Dh).transpose(1, 2), 0, mixer.rope_theta)
    k = apply_rope(mixer.k_proj(x).view(B, T, -1, Dh).transpose(1, 2), 0, mixer.rope_theta)
    v = mixer.v_proj(x).view(B, T, -1, Dh).transpose(1, 2)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # head h reads kv head h // group
    out = torch.zeros_like(q)
    for t in range(T):
        lo = 0 if window is None else max(0, t - window)
        scores = q[:, :, t : t + 1] @ k[:, :, lo : t + 1].transpose(-1, -2) / Dh**0.5  # (B, H, 1, n)
        out[:, :, t] = (scores.softmax(-1) @ v[:, :, lo : t + 1]).squeeze(2)
    return mixer.o_proj(out.transpose(1, 2).reshape(B, T, D))


OPTION_CASES = [
    pytest.param({"n_kv_heads": 2}, id="gqa2"),
    pytest.param({"n_kv_heads": 1}, id="mqa"),
    pytest.param({"window": 5}, id="window5"),
    pytest.param({"window": 1}, id="window1"),
    pytest.param({"window": 6, "n_kv_heads": 2}, id="window6-gqa2"),
]


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_gqa_with_as_many_kv_heads_as_heads_is_plain_attention(impl):
    plain, explicit = make({"impl": impl}), make({"impl": impl, "n_kv_heads": H})
    explicit.load_state_dict(plain.state_dict())
    x = random_input()
    torch.testing.assert_close(explicit(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_gqa_equals_attention_with_each_kv_head_repeated_over_its_group(impl):
    gqa, mha = make({"impl": impl, "n_kv_heads": 2}), make({"impl": impl})
    Dh, group = gqa.head_dim, H // 2
    weights = gqa.state_dict()
    for name in ("k_proj.weight", "v_proj.weight"):  # [H_kv·Dh, D] -> [H·Dh, D], head h reads kv head h // group
        weights[name] = weights[name].view(2, Dh, D).repeat_interleave(group, dim=0).reshape(H * Dh, D)
    mha.load_state_dict(weights)
    x = random_input()
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("options", OPTION_CASES)
def test_equals_token_by_token_reference(impl, options):
    mixer, x = make({"impl": impl, **options}), random_input()
    torch.testing.assert_close(mixer(x), reference_attention(mixer, x, options.get("window")),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("options", OPTION_CASES)
def test_windowed_and_grouped_decoding_equals_full(impl, options):
    """Prefill, chunked prefill and decoding with a cache that drops positions older than the window."""
    mixer, x = make({"impl": impl, **options}), random_input(T=30)
    full = mixer(x)
    y, state = mixer(x[:, :11], return_state=True)
    y2, state = mixer(x[:, 11:17], state=state, return_state=True)
    outputs = [y, y2]
    window = options.get("window")
    for t in range(17, 30):
        y_t, state = mixer.step(x[:, t], state)
        outputs.append(y_t.unsqueeze(1))
        cached = t + 1 if window is None else min(t + 1, window)
        assert state.k.shape == (2, mixer.n_kv_heads, cached, mixer.head_dim)
        assert state.position == t + 1 and state.offset == t + 1 - cached  # RoPE positions stay absolute
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", OPTION_CASES)
def test_step_from_empty_cache_equals_full_and_state_bytes_is_honest(options):
    mixer, x = make(options), random_input(T=12)
    state, steps = mixer.init_state(2, "cpu", torch.float64), []
    for t in range(12):
        y_t, state = mixer.step(x[:, t], state)
        steps.append(y_t)
        carried = (state.k.numel() * state.k.element_size() + state.v.numel() * state.v.element_size()) // 2
        assert mixer.state_bytes(t + 1, torch.float64) == carried
    torch.testing.assert_close(torch.stack(steps, dim=1), mixer(x), rtol=1e-10, atol=1e-12)


def test_windowed_state_and_decode_cost_are_bounded():
    mixer = make({"window": 16, "n_kv_heads": 2})
    per_position = 2 * 2 * mixer.head_dim * 4  # k and v, 2 kv heads, float32
    assert mixer.state_bytes(10) == 10 * per_position
    assert mixer.state_bytes(16) == mixer.state_bytes(100_000) == 16 * per_position
    assert mixer.step_cost(16) == mixer.step_cost(100_000)
    assert make().state_bytes(100) == 2 * make({"n_kv_heads": 2}).state_bytes(100)


def test_sdpa_and_math_agree_including_parameter_gradients():
    for options in ({"window": 7}, {"window": 7, "n_kv_heads": 1}):
        sdpa, math = make({"impl": "sdpa", **options}), make({"impl": "math", **options})
        math.load_state_dict(sdpa.state_dict())
        x, dy = random_input(T=40), random_input(T=40, seed=2)
        results = []
        for mixer in (sdpa, math):
            x_leaf = x.clone().requires_grad_()
            (mixer(x_leaf) * dy).sum().backward()
            results.append([x_leaf.grad] + [p.grad for p in mixer.parameters()])
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_window_wider_than_the_sequence_is_full_attention():
    windowed, full = make({"window": 200}), make()
    x = random_input()
    torch.testing.assert_close(windowed(x), full(x), rtol=1e-12, atol=1e-12)
    assert windowed.cost(21) == full.cost(21)


def test_window_does_not_lift_the_max_seq_len_bound():
    mixer = make({"window": 4}, max_seq_len=16)
    _, state = mixer(random_input(T=16), return_state=True)
    with pytest.raises(ConfigError, match="max_seq_len"):
        mixer.step(random_input(T=1)[:, 0], state)


@pytest.mark.parametrize(
    "options, field, hint",
    [
        ({"n_kv_heads": 3}, "mixer_options['n_kv_heads']", "divide n_heads=4"),
        ({"n_kv_heads": 0}, "mixer_options['n_kv_heads']", "positive integer dividing n_heads"),
        ({"window": 0}, "mixer_options['window']", "positive integer"),
        ({"window": 2.5}, "mixer_options['window']", "positive integer"),
        ({"window": True}, "mixer_options['window']", "positive integer"),
    ],
)
def test_bad_options_raise_config_error(options, field, hint):
    with pytest.raises(ConfigError) as excinfo:
        make(options)
    assert excinfo.value.field == field and hint in str(excinfo.value)


def count_flops(mixer, T):
    with FlopCounterMode(display=False) as counter:
        mixer(torch.randn(1, T, D))
    return counter.get_total_flops()


@pytest.mark.parametrize("options", [{}, {"window": 8}, {"window": 8, "n_kv_heads": 2}])
def test_attention_cost_matches_flop_counter(options):
    """Exact, once the counter's conventions are accounted for (no tolerance needed: both are integer sums).

    ``impl="math"`` multiplies the whole T×T square and masks afterwards, so the counter sees
    4·d FLOPs for each of the T² − pairs masked (query, key) pairs that ``cost`` leaves out. On CPU the
    fused SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula, so the
    counter sees only the projections; on GPU it would count the full square, like ``math``.
    """
    T, d = 64, D
    math, sdpa = make({"impl": "math", **options}, torch.float32), make(options, torch.float32)
    predicted = math.cost(T).flops
    core = 4 * attended_pairs(T, options.get("window")) * d
    masked = 4 * (T * T - attended_pairs(T, options.get("window"))) * d
    assert count_flops(math, T) == predicted + masked
    assert count_flops(sdpa, T) == predicted - core
    assert sdpa.cost(T) == math.cost(T)
