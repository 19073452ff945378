"""CUDA-graph decoding (``lmscale.decode``), run eagerly on the CPU: the same static buffers, copy-back,
warm-up, reset and refusals as on a GPU, where only the replay differs.

Every registered mixer is either graphable at a tiny config (then it must decode exactly as
``model.step`` and ``model.forward`` do) or listed in REFUSED with the reason its state is not a fixed
layout; a new mixer lands in one of the two by being registered.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lmscale.config import ModelConfig
from lmscale.decode import GraphedStep, greedy_decode, state_leaves
from lmscale.mixers import available
from lmscale.mixers.base import MIXERS as REGISTRY
from lmscale.model import LanguageModel

SHAPE = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64}
TINY_OPTIONS = {"mamba": {"d_state": 4}, "based": {"feature_dim": 4}, "jrt": {"feature_dim": 4}, "lru": {"d_state": 8}}
REFUSED = {  # mixer -> what the refusal must name: the leaf whose layout a step changes
    "attention": r"layer 0 \('attention'\): state\.k is \[2, 2, 0, 16\] float32 on cpu before a step and "
                 r"\[2, 2, 1, 16\] float32 on cpu after one: its shape changes",
    "jrt": r"layer 0 \('jrt'\): state\.position is 0 before a step and 1 after one: a CUDA graph would replay",
    "leap": r"layer 0 \('leap'\): state\.query\.block_logits is \[2, 2, 0\]",  # auto window: layer 0 sees 4 tokens
    "infini_attention": r"layer 0 \('infini_attention'\): state\.k is \[2, 2, 0, 16\] float32 on cpu before a step and "
                        r"\[2, 2, 1, 16\] float32 on cpu after one: its shape changes",
    "transformer_xl": r"layer 0 \('transformer_xl'\): state\.k is \[2, 2, 0, 16\] float32 on cpu before a step and "
                      r"\[2, 2, 1, 16\] float32 on cpu after one: its shape changes",
}
GRAPHABLE = [pytest.param(name, {}, id=name) for name in available() if name not in REFUSED]
GRAPHABLE.append(pytest.param("leap", {"window": "global"}, id="leap-global"))
GRAPHABLE.append(pytest.param("attention", {"kv_cache": "static"}, id="attention-static"))
GRAPHABLE.append(pytest.param("attention", {"kv_cache": "static", "window": 4, "n_kv_heads": 1},
                              id="attention-static-window-mqa"))


def make_model(name, options=None, dtype=torch.float32, **fields):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=name, mixer_options={**TINY_OPTIONS.get(name, {}), **(options or {})},
                      **{**SHAPE, **fields})
    return LanguageModel(cfg).to(dtype).eval()


def random_tokens(B=2, T=12, seed=1):
    torch.manual_seed(seed)
    return torch.randint(0, SHAPE["vocab_size"], (B, T))


def tensors(state):
    return [leaf for layer in state for _, leaf in state_leaves(layer) if isinstance(leaf, torch.Tensor)]


def assert_state_equal(state, expected):
    for got, want in zip(tensors(state), tensors(expected), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def eager_greedy(model, prompt, n_new):
    logits, state = model(prompt, return_state=True)
    tokens, token = [], logits[:, -1].argmax(-1)
    for _ in range(n_new):
        tokens.append(token)
        logits_t, state = model.step(token, state)
        token = logits_t.argmax(-1)
    return torch.stack(tokens, dim=1) if tokens else prompt[:, :0]


def test_every_registered_mixer_is_graphable_or_refused():
    assert set(REFUSED) <= set(available())
    assert {p.values[0] for p in GRAPHABLE} | set(REFUSED) == set(available())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: every state keeps its dtype too
@pytest.mark.parametrize("name, options", GRAPHABLE)
def test_steps_equal_eager_steps(name, options, dtype):
    model, idx = make_model(name, options, dtype=dtype), random_tokens(T=6)
    step = GraphedStep(model, 2, "cpu", dtype)
    assert not step.graphed
    assert_state_equal(step.state, model.init_state(2, "cpu", dtype))  # warm-up did not leak
    state = model.init_state(2, "cpu", dtype)
    with torch.no_grad():
        for t in range(idx.shape[1]):
            expected, state = model.step(idx[:, t], state)
            torch.testing.assert_close(step(idx[:, t]), expected, rtol=1e-6, atol=1e-6)
    assert_state_equal(step.state, state)


@pytest.mark.parametrize("name, options", GRAPHABLE)
def test_prefill_then_steps_equal_forward(name, options):
    model, idx = make_model(name, options, dtype=torch.float64), random_tokens()
    with torch.no_grad():
        full = model(idx)
        step = GraphedStep(model, 2, "cpu", torch.float64)
        got = [step.prefill(idx[:, :7]).clone()]
        got += [step(idx[:, t]).clone() for t in range(7, idx.shape[1])]
    torch.testing.assert_close(torch.stack(got, dim=1), full[:, 6:], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, options", GRAPHABLE)
def test_reset_restores_the_initial_state(name, options):
    model, idx = make_model(name, options), random_tokens(T=4)
    step = GraphedStep(model, 2, "cpu", torch.float32)
    first = [step(idx[:, t]).clone() for t in range(4)]
    step.prefill(random_tokens(T=5, seed=2))
    step.reset()
    assert_state_equal(step.state, model.init_state(2, "cpu", torch.float32))
    for t in range(4):
        torch.testing.assert_close(step(idx[:, t]), first[t], rtol=0, atol=0)


def test_rewound_static_cache_decodes_its_window_again_past_its_size():
    """The inference bench's energy window decodes one window of positions again and again, for longer than
    the cache holds: after a rewind the same tokens give the same logits, and the context stays bounded."""
    model, idx = make_model("attention", {"kv_cache": "static"}, max_seq_len=12), random_tokens(T=10)
    step = GraphedStep(model, 2, "cpu", torch.float32)
    step.prefill(idx[:, :6])
    first = torch.stack([step(idx[:, t]).clone() for t in range(6, 10)])
    for _ in range(3):  # 12 steps after a 6-token prompt: past the 12 slots without the rewinds
        step.rewind_kv_caches(6)
        torch.testing.assert_close(torch.stack([step(idx[:, t]).clone() for t in range(6, 10)]), first, rtol=0, atol=0)
    assert step.position == 10
    for bad in (11, -1, 2.0):
        with pytest.raises(ValueError, match="position must be an integer from 0 to the current position 10"):
            step.rewind_kv_caches(bad)
    recurrent = GraphedStep(make_model("gla"), 2, "cpu", torch.float32)
    recurrent.prefill(idx[:, :6])
    before = [t.clone() for t in tensors(recurrent.state)]
    recurrent.rewind_kv_caches(3)  # no KV cache: only the count moves, the recurrent state goes on
    assert recurrent.position == 3 and all(torch.equal(a, b) for a, b in zip(before, tensors(recurrent.state)))


@pytest.mark.parametrize("name", ["mamba", "deltanet"])  # dataclass states of two tensors each
def test_static_buffers_keep_their_identity(name):
    model, idx = make_model(name), random_tokens(B=1, T=3)
    step = GraphedStep(model, 1, "cpu", torch.float32)
    buffers = [t.data_ptr() for t in tensors(step.state)]
    out = step(idx[:, 0])
    assert step(idx[:, 1]) is out and step.prefill(idx) is out
    step.reset()
    assert step(idx[:, 2]) is out and out.data_ptr() == step(idx[:, 0]).data_ptr()
    assert [t.data_ptr() for t in tensors(step.state)] == buffers


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refuses_state_that_is_not_fixed_size(name):
    model = make_model(name)
    with pytest.raises(ValueError, match=REFUSED[name]):
        GraphedStep(model, 2, "cpu", torch.float32)
    with pytest.raises(ValueError, match=REFUSED[name]):
        greedy_decode(model, random_tokens(), 3)


@pytest.mark.parametrize("mixer, fields, message", [
    # a sliding window bounds the cache, but it fills first (and then its offset moves every step)
    ("attention", {"mixer_options": {"window": 4}}, r"layer 0 \('attention'\): state\.k is \[2, 2, 0, 16\]"),
    ("gla", {"attention_every": 2}, r"layer 1 \('attention'\): state\.k"),
    ("based", {"mixer_options": {"pattern": ["conv", "sliding"]}}, r"layer 1 \('based' \(its attention\)\)"),
])
def test_refuses_hybrids_and_windows_naming_the_layer(mixer, fields, message):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(mixer=mixer, **{**SHAPE, **fields})).eval()
    with pytest.raises(ValueError, match=message):
        GraphedStep(model, 2, "cpu", torch.float32)


def test_sliding_window_state_keeps_changing_after_the_window_fills():
    """Even past the window, when the KV cache has a fixed shape, its Python offset moves every step."""
    model = make_model("attention", {"window": 4})
    _, state = model(random_tokens(T=6), return_state=True)
    _, after = model.step(random_tokens(T=1)[:, 0], state)
    assert state[0].k.shape == after[0].k.shape and (state[0].offset, after[0].offset) == (2, 3)


def test_refuses_bad_arguments():
    model = make_model("gla")
    for batch_size in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            GraphedStep(model, batch_size, "cpu", torch.float32)
    with pytest.raises(ValueError, match="graph=True needs a CUDA device"):
        GraphedStep(model, 2, "cpu", torch.float32, graph=True)
    with pytest.raises(ValueError, match="parameters are on cpu but decoding was asked for meta"):
        GraphedStep(model, 2, "meta", torch.float32)
    step = GraphedStep(model, 2, "cpu", torch.float32)
    for bad in (torch.zeros(3, dtype=torch.long), torch.zeros(2), torch.zeros(2, 1, dtype=torch.long), [0, 1]):
        with pytest.raises(ValueError, match=r"idx_t must be an integer tensor of token ids of shape \[2\]"):
            step(bad)
    for bad in (torch.zeros(3, 4, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match=r"prompts must be an integer tensor \[2, T\] with T >= 1"):
            step.prefill(bad)
    for n_new in (-1, 2.0):
        with pytest.raises(ValueError, match="n_new must be a non-negative integer"):
            greedy_decode(model, random_tokens(), n_new)


def test_refuses_training_mode_and_leaves_the_mode_alone():
    model = make_model("gla").train()
    with pytest.raises(ValueError, match=r"training mode; call model\.eval\(\)"):
        GraphedStep(model, 2, "cpu", torch.float32)
    assert model.training


def test_refuses_a_dtype_the_step_does_not_keep():
    """Mamba's conv window takes the activations' dtype: a bf16 initial state for a float32 model changes."""
    with pytest.raises(ValueError, match=r"state\.conv is \[2, 64, 3\] bfloat16 on cpu before a step and "
                                         r"\[2, 64, 3\] float32 on cpu after one: init_state and step disagree"):
        GraphedStep(make_model("mamba"), 2, "cpu", torch.bfloat16)


@pytest.mark.parametrize("name, options", GRAPHABLE)
def test_greedy_decode_equals_eager_loop(name, options):
    model, prompt = make_model(name, options), random_tokens(T=5)
    with torch.no_grad():
        expected = eager_greedy(model, prompt, 6)
    tokens = greedy_decode(model, prompt, 6)
    assert tokens.shape == (2, 6) and tokens.dtype == torch.long
    assert torch.equal(tokens, expected)


def test_greedy_decode_short_prompts_and_lengths():
    model = make_model("mamba")
    prompt = random_tokens(B=1, T=1)
    with torch.no_grad():
        for n_new in (0, 1, 3):
            assert torch.equal(greedy_decode(model, prompt, n_new), eager_greedy(model, prompt, n_new))


class ShiftMixer(nn.Module):
    """State (x_{t−1}, x_{t−2}) as two tensors: the new second leaf IS the old first one, so copying
    the new state back into the static buffers in order would overwrite it before it is read."""

    def init_state(self, batch_size, device, dtype):
        return (torch.zeros(batch_size, SHAPE["d_model"], device=device, dtype=dtype),
                torch.zeros(batch_size, SHAPE["d_model"], device=device, dtype=dtype))

    def step(self, x_t, state):
        return x_t + 0.5 * state[0] - 0.25 * state[1], (x_t, state[0])

    def forward(self, x, state=None, return_state=False):
        state = self.init_state(x.shape[0], x.device, x.dtype) if state is None else state
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return (torch.stack(ys, dim=1), state) if return_state else torch.stack(ys, dim=1)


class InPlaceMixer(ShiftMixer):
    """A running sum updated in place and returned, as a Triton step kernel does."""

    def init_state(self, batch_size, device, dtype):
        return torch.zeros(batch_size, SHAPE["d_model"], device=device, dtype=dtype)

    def step(self, x_t, state):
        state.mul_(0.5).add_(x_t)
        return state * 1.0, state


@pytest.mark.parametrize("mixer", [ShiftMixer, InPlaceMixer])
def test_state_that_aliases_the_static_buffers(mixer):
    model = make_model("gla")
    model.blocks[0].mixer = mixer()
    idx = random_tokens(T=6)
    with torch.no_grad():
        full = model(idx)
        step = GraphedStep(model, 2, "cpu", torch.float32)
        got = torch.stack([step(idx[:, t]).clone() for t in range(6)], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("impl" not in REGISTRY["gla"].options, reason="GLA has no Triton step yet")
def test_triton_step_that_updates_the_state_in_place():
    """GLA's Triton step kernel (through Triton's interpreter on a CPU, in a CUDA graph on a GPU) writes the
    static state itself, and decodes what the PyTorch step decodes."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    idx = random_tokens(T=4).to(device)
    with torch.no_grad():
        expected = greedy_decode(make_model("gla", {"impl": "torch"}).to(device), idx, 4)
        assert torch.equal(greedy_decode(make_model("gla", {"impl": "triton"}).to(device), idx, 4), expected)


@dataclasses.dataclass(frozen=True)
class Inner:
    a: torch.Tensor
    n: int


def test_state_leaves_walks_tensors_tuples_lists_and_dataclasses():
    t = torch.zeros(1)
    leaves = state_leaves((t, [Inner(t, 3), None]))
    assert [path for path, _ in leaves] == ["state[0]", "state[1][0].a", "state[1][0].n", "state[1][1]"]
    assert [leaf for _, leaf in leaves][2:] == [3, None]
    with pytest.raises(TypeError, match=r"state\[0\] is a dict; decoding states must be tensors"):
        state_leaves(({"k": t},))


@pytest.mark.parametrize("options, chunk", [({}, 5), ({"window": 3}, 1), ({"window": 3, "n_kv_heads": 1}, 2)])
def test_static_kv_cache_in_chunks_equals_one_forward(options, chunk):
    """Tokens fed a few at a time into a static cache (the ring wraps with a window) give the logits of
    one pass over the whole sequence, and the cache holds the positions the next query needs."""
    dynamic = make_model("attention", options, dtype=torch.float64)
    static = make_model("attention", {**options, "kv_cache": "static"}, dtype=torch.float64)
    idx = random_tokens(T=13)
    with torch.no_grad():
        state, pieces = static.init_state(2, "cpu", torch.float64), []
        for start in range(0, 13, chunk):
            logits, state = static(idx[:, start:start + chunk], state, return_state=True)
            pieces.append(logits)
        torch.testing.assert_close(torch.cat(pieces, dim=1), dynamic(idx), rtol=1e-10, atol=1e-12)
    cache = state[0]
    assert int(cache.position) == 13
    window = options.get("window")
    expected = [-1] * (64 - 13) + list(range(13)) if window is None else list(range(13 - window - 1, 13))
    assert sorted(cache.slots.tolist()) == expected


def test_static_kv_cache_refuses_to_decode_past_max_seq_len():
    model = make_model("attention", {"kv_cache": "static"}, max_seq_len=8)
    step = GraphedStep(model, 2, "cpu", torch.float32)
    step.prefill(random_tokens(T=7))
    step(random_tokens(T=1)[:, 0])
    with pytest.raises(ValueError, match=r"make the context 9 tokens, but the model's static KV cache holds "
                                         r"max_seq_len = 8; build the model with a larger max_seq_len"):
        step(random_tokens(T=1)[:, 0])
    with pytest.raises(ValueError, match=r"this prefill would make the context 9 tokens"):
        step.prefill(random_tokens(T=9))
    step.reset()
    step(random_tokens(T=1)[:, 0])  # a new sequence has room again


def test_prefill_computes_only_the_last_logits():
    model, idx = make_model("gla"), random_tokens(T=9)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
@pytest.mark.parametrize("options", [{}, {"window": 4, "n_kv_heads": 1}], ids=["full", "window-mqa"])
def test_static_kv_cache_replays_in_a_cuda_graph_as_the_eager_loop_decodes(options):
    """On a GPU: the whole Transformer step, static cache included, is one CUDA graph, and it decodes token
    for token what the eager loop over the growing cache decodes."""
    dynamic = make_model("attention", options).cuda()
    static = make_model("attention", {**options, "kv_cache": "static"}).cuda()
    prompt = random_tokens(T=9).cuda()
    with torch.no_grad():
        expected = eager_greedy(dynamic, prompt, 20)
        step = GraphedStep(static, 2, "cuda", torch.float32)
        assert step.graphed
        got = [step.prefill(prompt).argmax(-1)]
        for _ in range(19):
            got.append(step(got[-1]).argmax(-1))
    assert torch.equal(torch.stack(got, dim=1), expected)
