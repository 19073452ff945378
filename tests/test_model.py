"""The language model: shapes, tied head, incremental decoding, trainability, honest counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmscale.config import ModelConfig
from lmscale.model import LanguageModel

MIXERS = ["attention", "gla"]


def make_model(mixer, **fields):
    torch.manual_seed(0)
    defaults = {
        "mixer": mixer, "vocab_size": 257, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64,
    }
    return LanguageModel(ModelConfig(**{**defaults, **fields}))


def random_tokens(B=2, T=24, seed=1):
    torch.manual_seed(seed)
    return torch.randint(0, 257, (B, T))


@pytest.mark.parametrize("mixer", MIXERS)
def test_forward_shapes(mixer):
    model = make_model(mixer)
    logits, state = model(random_tokens(B=3, T=10), return_state=True)
    assert logits.shape == (3, 10, 257)
    assert len(state) == 2
    logits_t, _ = model.step(random_tokens(B=3, T=1)[:, 0], state)
    assert logits_t.shape == (3, 257)


def test_head_is_tied_to_embedding():
    model = make_model("attention")
    assert model.head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == model.num_params()


@pytest.mark.parametrize("mixer", MIXERS)
def test_prefix_then_step_equals_full(mixer):
    model, idx = make_model(mixer).double(), random_tokens()
    full = model(idx)
    logits, state = model(idx[:, :15], return_state=True)
    steps = []
    for t in range(15, idx.shape[1]):
        logits_t, state = model.step(idx[:, t], state)
        steps.append(logits_t)
    torch.testing.assert_close(torch.cat([logits, torch.stack(steps, dim=1)], dim=1), full,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mixer", MIXERS)
def test_decoding_from_init_state_equals_full(mixer):
    model, idx = make_model(mixer).double(), random_tokens(T=5)
    state = model.init_state(2, "cpu", torch.float64)
    steps = []
    for t in range(idx.shape[1]):
        logits_t, state = model.step(idx[:, t], state)
        steps.append(logits_t)
    torch.testing.assert_close(torch.stack(steps, dim=1), model(idx), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_every_parameter(mixer):
    model, idx = make_model(mixer), random_tokens()
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mixer", MIXERS)
def test_overfits_one_repeated_batch(mixer):
    """From ln(257) ≈ 5.5 nats to below 0.1 in under 100 AdamW steps on 4 × 32 random tokens."""
    model, idx = make_model(mixer), random_tokens(B=4, T=33)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        if loss.item() < 0.1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_num_params_matches_hand_count():
    V, d, L, d_hidden = 257, 64, 2, ModelConfig(d_model=64).d_hidden
    embedding, final_norm = V * d, d
    mlp_block = 3 * d * d_hidden + 2 * d  # gate, up, down; two RMSNorm weights
    attention = 4 * d * d
    key_dim, head_v_dim, rank = d // 2, d // 4, 16
    gla = 2 * d * key_dim + 3 * d * d + (d * rank + rank * key_dim + key_dim) + head_v_dim
    for mixer, per_layer in (("attention", attention), ("gla", gla)):
        model = make_model(mixer)
        assert model.num_params() == embedding + final_norm + L * (per_layer + mlp_block)
        assert model.num_params(non_embedding=True) == final_norm + L * (per_layer + mlp_block)


def test_residual_projections_start_smaller():
    model = make_model("attention", d_model=128, n_layers=8)
    expected = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert abs(p.std().item() / expected - 1) < 0.1, name
        elif name.endswith(("q_proj.weight", "up_proj.weight")):
            assert abs(p.std().item() / 0.02 - 1) < 0.1, name


def test_flops_per_token_is_two_per_weight_plus_attention():
    """Kaplan et al.: forward ≈ 2 FLOPs per matmul weight, plus QKᵀ and AV over the (causal) context."""
    model, T = make_model("attention"), 32
    d, L = model.cfg.d_model, model.cfg.n_layers
    norm_weights = (2 * L + 1) * d
    matmul_weights = model.num_params() - norm_weights  # the tied matrix is used once, as the head
    assert model.flops_per_token(T) == 2 * matmul_weights + L * 2 * 2 * d * (T + 1) / 2


def test_only_attention_is_bounded_by_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len"):
        make_model("attention", max_seq_len=16)(random_tokens(T=17))
    assert make_model("gla", max_seq_len=16)(random_tokens(T=17)).shape == (2, 17, 257)


def test_model_init_keeps_what_a_mixer_marked_no_reinit():
    torch.manual_seed(0)
    cfg = ModelConfig(mixer="mamba", vocab_size=257, d_model=64, n_layers=2, n_heads=2)
    model = LanguageModel(cfg)
    dt_weight = model.blocks[0].mixer.dt_proj.weight
    bound = dt_weight.shape[1] ** -0.5
    assert dt_weight.abs().max() <= bound and dt_weight.std() > 2 * cfg.init_std  # uniform ±R^-½, not N(0, 0.02)
