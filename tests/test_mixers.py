"""Every registered mixer keeps the contract: causal, prefix + step = full, forms agree, honest state size.

The cases are drawn from the registry: each mixer, in each value of its ``forms_option``. A new mixer
is checked here by being registered; its own test file covers what is particular to it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers import Mixer, UnknownMixerError, available, build_mixer, register
from lmscale.mixers.base import MIXERS as REGISTRY


def _forms(name):
    option = REGISTRY[name].forms_option
    return [] if option is None else [(option, form) for form in REGISTRY[name].options[option].choices]


def _cases():
    for name in available():
        forms = _forms(name)
        if not forms and "segment_len" in REGISTRY[name].options:  # several segments, the last partial, at T=21
            yield pytest.param(name, {"segment_len": 8}, id=f"{name}-seg8")
            if "update" in REGISTRY[name].options:
                yield pytest.param(name, {"segment_len": 5, "update": "linear"}, id=f"{name}-seg5-linear")
            else:
                yield pytest.param(name, {"segment_len": 5}, id=f"{name}-seg5")
        elif not forms:
            yield pytest.param(name, {}, id=name)
        for option, form in forms:
            options = {option: form}
            if "chunk_size" in REGISTRY[name].options:
                options["chunk_size"] = 8  # several chunks, the last one partial, at T=21
            yield pytest.param(name, options, id=f"{name}-{form}")


MIXERS = list(_cases())


def make_mixer(name, options, dtype=torch.float64, **cfg_fields):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=name, d_model=32, n_heads=4, max_seq_len=128, mixer_options=options, **cfg_fields)
    return build_mixer(cfg, layer_idx=0).to(dtype)


def random_input(B=2, T=21, D=32, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(B, T, D, dtype=dtype)


def state_tensors(state):
    """Every tensor a state holds, whatever its structure (tensor, dataclass, tuple, list, dict)."""
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [state]
    if dataclasses.is_dataclass(state):
        state = [getattr(state, f.name) for f in dataclasses.fields(state)]
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        return [t for part in state for t in state_tensors(part)]
    return []


@pytest.mark.parametrize("name, options", MIXERS)
def test_prefix_then_step_equals_full(name, options):
    mixer, x = make_mixer(name, options), random_input()
    full = mixer(x)
    y, state = mixer(x[:, :13], return_state=True)
    steps = []
    for t in range(13, x.shape[1]):
        y_t, state = mixer.step(x[:, t], state)
        steps.append(y_t)
    torch.testing.assert_close(torch.cat([y, torch.stack(steps, dim=1)], dim=1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, options", MIXERS)
def test_step_from_init_state_equals_full(name, options):
    mixer, x = make_mixer(name, options), random_input(T=6)
    state = mixer.init_state(2, "cpu", torch.float64)
    steps = []
    for t in range(x.shape[1]):
        y_t, state = mixer.step(x[:, t], state)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, dim=1), mixer(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, options", MIXERS)
def test_chunked_prefill_equals_full(name, options):
    mixer, x = make_mixer(name, options), random_input()
    y1, state = mixer(x[:, :9], return_state=True)
    y2, state = mixer(x[:, 9:17], state=state, return_state=True)
    y3 = mixer(x[:, 17:], state=state)
    torch.testing.assert_close(torch.cat([y1, y2, y3], dim=1), mixer(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, options", MIXERS)
def test_causality(name, options):
    mixer, x = make_mixer(name, options), random_input()
    t = 11
    changed = x.clone()
    changed[:, t:] = torch.randn_like(changed[:, t:])
    y, y_changed = mixer(x), mixer(changed)
    torch.testing.assert_close(y_changed[:, :t], y[:, :t], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y_changed[:, t:], y[:, t:])


@pytest.mark.parametrize("name, options", MIXERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_bytes_equals_carried_state(name, options, dtype):
    B, L = 3, 10
    mixer, x = make_mixer(name, options, dtype), random_input(B=B, T=L, dtype=dtype)
    state = mixer.init_state(B, "cpu", dtype)
    for t in range(L):
        _, state = mixer.step(x[:, t], state)
    carried = sum(s.numel() * s.element_size() for s in state_tensors(state)) // B
    assert mixer.state_bytes(L, dtype) == carried


@pytest.mark.parametrize("name", [n for n in available() if _forms(n)])
def test_forms_agree_including_parameter_gradients(name):
    mixers = [make_mixer(name, {key: form}) for key, form in _forms(name)]
    for mixer in mixers[1:]:
        mixer.load_state_dict(mixers[0].state_dict())
    x = random_input(T=70)  # more than one chunk of the default 64
    dy = torch.randn_like(x)
    results = []
    for mixer in mixers:
        x_leaf = x.clone().requires_grad_()
        (mixer(x_leaf) * dy).sum().backward()
        grads = {n: p.grad for n, p in mixer.named_parameters()}
        results.append((mixer(x), x_leaf.grad, grads))
    y_ref, dx_ref, grads_ref = results[0]
    for y, dx, grads in results[1:]:
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
        for n in grads_ref:
            torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_cost_scaling():
    """Attention's core is quadratic in T; GLA's chunk form is linear in whole chunks."""
    attention = make_mixer("attention", {})
    gla = make_mixer("gla", {"chunk_size": 16})
    assert attention.cost(128).flops > 2 * attention.cost(64).flops
    assert gla.cost(128).flops == 2 * gla.cost(64).flops
    for mixer in (attention, gla):
        assert mixer.cost(64).bytes > mixer.weight_bytes(torch.float32)
        assert mixer.cost(64, torch.bfloat16).bytes * 2 == mixer.cost(64, torch.float32).bytes


def test_registry_lists_mixers_sorted():
    assert available() == sorted(available())
    assert {"attention", "gla"} <= set(available())
    with pytest.raises(ValueError, match="already registered"):
        register("gla")(type("Impostor", (Mixer,), {}))


def test_unknown_mixer_error_lists_valid_names_and_suggests():
    with pytest.raises(UnknownMixerError) as excinfo:
        build_mixer(ModelConfig(mixer="glaa", d_model=32, n_heads=4), layer_idx=0)
    message = str(excinfo.value)
    assert "'mixer'" in message and ", ".join(available()) in message and "Did you mean 'gla'?" in message
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(
    "name, options, field, hint",
    [
        ("attention", {"impl": "flash"}, "mixer_options['impl']", "'sdpa', 'math'"),
        ("attention", {"form": "chunk"}, "mixer_options['form']", "valid options: impl"),
        ("gla", {"form": "fast"}, "mixer_options['form']", "'chunk', 'parallel', 'naive'"),
        ("gla", {"chunk_size": 0}, "mixer_options['chunk_size']", "positive integer"),
        ("gla", {"expand_k": 0.3}, "mixer_options['expand_k']", "multiple of n_heads"),
        ("gla", {"impl": "math"}, "mixer_options['impl']", "'auto', 'triton', 'torch'"),
        ("gla", {"kernel": "triton"}, "mixer_options['kernel']", "chunk_size, expand_k, form"),
    ],
)
def test_bad_options_raise_config_error(name, options, field, hint):
    with pytest.raises(ConfigError) as excinfo:
        make_mixer(name, options)
    assert excinfo.value.field == field
    assert hint in str(excinfo.value)


@pytest.mark.parametrize("name", ["attention", "retnet", "transformer_xl", "infini_attention"])
def test_rope_mixers_refuse_an_odd_head_width(name):
    with pytest.raises(ConfigError, match="must be even: RoPE rotates channel pairs"):
        build_mixer(ModelConfig(mixer=name, d_model=30, n_heads=2), layer_idx=0)


def test_attention_refuses_positions_beyond_max_seq_len():
    mixer = make_mixer("attention", {})
    _, state = mixer(random_input(T=125), return_state=True)
    with pytest.raises(ConfigError, match="max_seq_len"):
        mixer(random_input(T=5), state=state)


@pytest.mark.parametrize("name", available())
def test_every_mixer_names_its_family_and_paper(name):
    bib = (Path(__file__).resolve().parents[1] / "book" / "references.bib").read_text()
    cls = REGISTRY[name]
    assert cls.family and re.search(r"@\w+\{" + re.escape(cls.paper) + ",", bib), cls.paper


@pytest.mark.parametrize("name", available())
def test_decode_cost_does_not_exceed_a_forward_over_the_context(name):
    mixer = make_mixer(name, {})
    one = mixer.step_cost(64)
    assert 0 < one.flops <= mixer.cost(65).flops and one.bytes > mixer.weight_bytes(torch.float32)
