"""Transformer-XL's segment recurrence against a reference written from its definition."""

import pytest
import torch

from lmscale.config import ModelConfig
from lmscale.mixers import build_mixer
from lmscale.rope import apply_rope


def _mixer(segment_len, name="transformer_xl"):
    torch.manual_seed(0)
    options = {"segment_len": segment_len} if name == "transformer_xl" else {}
    cfg = ModelConfig(mixer=name, d_model=32, n_heads=4, max_seq_len=128, mixer_options=options)
    return build_mixer(cfg, 0).double()


def _x(T=23, seed=1, grad=False):
    torch.manual_seed(seed)
    return torch.randn(2, T, 32, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("N", [4, 7])
def test_each_query_sees_the_previous_segment_and_its_own_up_to_itself(N):
    mixer, x = _mixer(N), _x()
    B, T, H, D = 2, 23, 4, 8

    def heads(t):
        return t.view(B, T, H, D).transpose(1, 2)

    q = apply_rope(heads(mixer.q_proj(x)), 0, mixer.rope_theta)
    k = apply_rope(heads(mixer.k_proj(x)), 0, mixer.rope_theta)
    v = heads(mixer.v_proj(x))
    outputs = []
    for t in range(T):
        first = max(0, (t // N - 1) * N)  # the start of the previous segment (or of the sequence)
        scores = (q[:, :, t : t + 1] @ k[:, :, first : t + 1].transpose(-1, -2)) / D**0.5
        outputs.append(torch.softmax(scores, -1) @ v[:, :, first : t + 1])
    expected = mixer.o_proj(torch.cat(outputs, 2).transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(mixer(x), expected, rtol=1e-10, atol=1e-12)


def test_one_long_segment_is_causal_attention():
    xl, attention = _mixer(64), _mixer(64, name="attention")
    attention.load_state_dict(xl.state_dict())
    x = _x()
    torch.testing.assert_close(xl(x), attention(x), rtol=1e-10, atol=1e-12)


def test_gradients_stop_at_the_segment_boundary():
    mixer, x = _mixer(8), _x(T=16, grad=True)
    mixer(x)[:, 8:].sum().backward()  # the second segment reads the first through its detached memory
    assert x.grad[:, :8].abs().max() == 0 and x.grad[:, 8:].abs().max() > 0


def test_the_decode_state_is_bounded_by_two_segments():
    mixer = _mixer(16)
    assert max(mixer.state_bytes(L) for L in range(1, 5000)) == mixer.state_bytes(31)
    _, state = mixer(_x(T=40), return_state=True)
    assert state.k.shape[2] == 16 + 40 % 16 and state.position == 40
