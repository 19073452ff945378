"""Infini-attention against references written from the paper's equations, token by token."""

import pytest
import torch
import torch.nn.functional as F

from lmscale.config import ModelConfig
from lmscale.mixers import build_mixer


def _mixer(segment_len, update="delta", gate=None, name="infini_attention"):
    torch.manual_seed(0)
    options = {"segment_len": segment_len, "update": update} if name == "infini_attention" else {}
    cfg = ModelConfig(mixer=name, d_model=32, n_heads=4, max_seq_len=128, mixer_options=options)
    mixer = build_mixer(cfg, 0).double()
    if gate is not None:
        with torch.no_grad():
            mixer.gate.fill_(gate)
    return mixer


def _x(T=23, seed=1):
    torch.manual_seed(seed)
    return torch.randn(2, T, 32, dtype=torch.float64)


def test_with_the_memory_gated_off_a_long_segment_is_causal_attention():
    infini, attention = _mixer(64, gate=-torch.inf), _mixer(64, name="attention")
    attention.load_state_dict({k: v for k, v in infini.state_dict().items() if k != "gate"})
    x = _x()
    torch.testing.assert_close(infini(x), attention(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_the_memory_path_is_linear_attention_over_completed_segments(update):
    N, T = 5, 23
    mixer, x = _mixer(N, update, gate=torch.inf), _x(T)
    B, H, D = 2, 4, 8
    q = mixer.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = mixer.k_proj(x).view(B, T, H, D).transpose(1, 2)
    v = mixer.v_proj(x).view(B, T, H, D).transpose(1, 2)
    sigma = lambda t: F.elu(t) + 1
    memory, norm = torch.zeros(B, H, D, D, dtype=x.dtype), torch.zeros(B, H, D, dtype=x.dtype)
    outputs = []
    for t in range(T):
        sq = sigma(q[:, :, t])  # [B, H, D]
        outputs.append(torch.einsum("bhk,bhkv->bhv", sq, memory) / (torch.einsum("bhk,bhk->bh", sq, norm)[..., None] + 1e-6))
        if (t + 1) % N == 0:  # segment complete: fold its keys and values, each against the memory before it
            sk, vs = sigma(k[:, :, t + 1 - N : t + 1]), v[:, :, t + 1 - N : t + 1]
            if update == "delta":
                vs = vs - torch.einsum("bhnk,bhkv->bhnv", sk, memory) / (
                    torch.einsum("bhnk,bhk->bhn", sk, norm)[..., None] + 1e-6)
            memory = memory + torch.einsum("bhnk,bhnv->bhkv", sk, vs)
            norm = norm + sk.sum(2)
    expected = mixer.o_proj(torch.stack(outputs, 2).transpose(1, 2).reshape(B, T, 32))
    y, state = mixer(x, return_state=True)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.memory, memory, rtol=1e-10, atol=1e-12)
    assert state.k.shape[2] == T % N and state.position == T


def test_the_gate_and_every_projection_learn():
    mixer, x = _mixer(6), _x()
    mixer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())


def test_the_decode_state_is_bounded_by_the_segment_whatever_the_context():
    mixer = _mixer(16)
    sizes = {mixer.state_bytes(L) for L in range(1000, 5000)}
    assert max(sizes) == mixer.state_bytes(16 * 300 - 1) and min(sizes) == mixer.state_bytes(16 * 300)
    assert mixer.step_cost(16 * 10**5 + 10).flops == mixer.step_cost(10).flops  # same offset in a segment
