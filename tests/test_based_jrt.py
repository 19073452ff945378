"""Based's three layer kinds, JRT's prefix linear attention and JRT-Prompt, against their definitions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lmscale.config import ConfigError, ModelConfig
from lmscale.data.jrt_prompt import NEWLINE_ID, jrt_prompt
from lmscale.mixers import build_mixer
from lmscale.mixers.attention import attended_pairs
from lmscale.mixers.based import PAPER_PATTERN, layer_kind, taylor_feature_map
from lmscale.model import LanguageModel

D, H = 32, 4


def make(name, options=None, dtype=torch.float64, layer_idx=0, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(mixer=name, d_model=D, n_heads=H, n_layers=5, max_seq_len=128, mixer_options=options or {})
    return build_mixer(cfg, layer_idx).to(dtype)


def random_input(B=2, T=21, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(B, T, D, dtype=dtype)


def carried_bytes(state):
    """Bytes per sequence of every tensor in a state (a tensor, or a dataclass such as a KV cache)."""
    parts = [state] if isinstance(state, torch.Tensor) else [getattr(state, f.name) for f in dataclasses.fields(state)]
    tensors = [t for t in parts if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) // tensors[0].shape[0]


def steps(mixer, x, state):
    outputs = []
    for t in range(x.shape[1]):
        y_t, state = mixer.step(x[:, t], state)
        outputs.append(y_t)
    return torch.stack(outputs, dim=1), state


KIND_CASES = [  # Based options that make layer 0 each kind, small enough to run fast
    pytest.param({"pattern": ["conv"]}, id="conv"),
    pytest.param({"pattern": ["linear"], "chunk_size": 8}, id="linear-chunk"),
    pytest.param({"pattern": ["linear"], "form": "parallel"}, id="linear-parallel"),
    pytest.param({"pattern": ["linear"], "form": "naive", "feature_dim": 4}, id="linear-naive-f4"),
    pytest.param({"pattern": ["sliding"], "window": 5}, id="sliding5"),
]


# ---- Based ---------------------------------------------------------------------------------------------


def test_paper_pattern_reproduces_the_released_layer_indices():
    """based-360m.yaml: linear attention in layers 1, 6, 11, 16, 21; sliding windows in 2, 7, 12, 17, 22."""
    kinds = [layer_kind(i) for i in range(23)]
    assert [i for i, k in enumerate(kinds) if k == "linear"] == [1, 6, 11, 16, 21]
    assert [i for i, k in enumerate(kinds) if k == "sliding"] == [2, 7, 12, 17, 22]
    assert layer_kind(3, ["linear", "sliding"]) == "sliding"
    assert PAPER_PATTERN.count("conv") == 3


def test_a_based_model_mixes_the_kinds_by_layer_and_decodes_like_its_forward():
    torch.manual_seed(0)
    cfg = ModelConfig(mixer="based", vocab_size=61, d_model=D, n_heads=H, n_layers=5, max_seq_len=64,
                      mixer_options={"window": 4, "chunk_size": 8})
    model = LanguageModel(cfg).double()
    assert [block.mixer.kind for block in model.blocks] == ["conv", "linear", "sliding", "conv", "conv"]
    idx = torch.randint(0, 61, (2, 19))
    logits, state = model(idx[:, :11], return_state=True)
    decoded = []
    for t in range(11, 19):
        logits_t, state = model.step(idx[:, t], state)
        decoded.append(logits_t)
    torch.testing.assert_close(torch.cat([logits, torch.stack(decoded, 1)], 1), model(idx), rtol=1e-10, atol=1e-10)
    assert model.blocks[2].mixer.state_bytes(1000) == 2 * 4 * D * 4  # a window of 4 keys and values


@pytest.mark.parametrize("options", KIND_CASES)
def test_each_kind_keeps_the_mixer_contract(options):
    """prefix + step = full; step from init_state = full; chunked prefill = full; causal; honest state_bytes."""
    mixer, x = make("based", options), random_input()
    full = mixer(x)
    y, state = mixer(x[:, :13], return_state=True)
    y_steps, _ = steps(mixer, x[:, 13:], state)
    torch.testing.assert_close(torch.cat([y, y_steps], 1), full, rtol=1e-10, atol=1e-12)

    y_steps, state = steps(mixer, x[:, :10], mixer.init_state(2, "cpu", torch.float64))
    torch.testing.assert_close(y_steps, full[:, :10], rtol=1e-10, atol=1e-12)
    assert mixer.state_bytes(10, torch.float64) == carried_bytes(state)

    y1, state = mixer(x[:, :9], return_state=True)
    y2, state = mixer(x[:, 9:17], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2, mixer(x[:, 17:], state=state)], 1), full, rtol=1e-10, atol=1e-12)

    changed = x.clone()
    changed[:, 11:] = torch.randn_like(changed[:, 11:])
    torch.testing.assert_close(mixer(changed)[:, :11], full[:, :11], rtol=1e-12, atol=1e-12)


def test_linear_forms_agree_including_parameter_gradients():
    options = {"pattern": ["linear"], "chunk_size": 16, "feature_dim": 8}
    mixers = [make("based", {**options, "form": form}) for form in ("chunk", "parallel", "naive")]
    x, dy = random_input(T=37), random_input(T=37, seed=2)
    results = []
    for mixer in mixers:
        mixer.load_state_dict(mixers[0].state_dict())
        x_leaf = x.clone().requires_grad_()
        (mixer(x_leaf) * dy).sum().backward()
        results.append([x_leaf.grad] + [p.grad for p in mixer.parameters()])
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_taylor_feature_map_is_the_second_order_expansion_of_exp():
    torch.manual_seed(0)
    q, k = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    s = (q * k).sum(-1) / 16**0.5
    torch.testing.assert_close((taylor_feature_map(q) * taylor_feature_map(k)).sum(-1), 1 + s + s**2 / 2)
    assert taylor_feature_map(q).shape == (5, 1 + 16 + 256)


def test_linear_attention_equals_its_normalised_quadratic_form():
    """y_t = Σ_{s≤t} w_ts v_s / Σ_{s≤t} w_ts, w_ts = 1 + q_t·k_s/√F + (q_t·k_s)²/2F, straight from the projections."""
    mixer, x = make("based", {"pattern": ["linear"], "chunk_size": 8}), random_input()
    inner = mixer.layer
    B, T, _ = x.shape
    q = inner.q_proj(x).view(B, T, H, -1).transpose(1, 2)
    k = inner.k_proj(x).view(B, T, H, -1).transpose(1, 2)
    v = inner.v_proj(x).view(B, T, H, -1).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / 16**0.5
    w = (1 + s + s**2 / 2).tril()  # (B, H, T, T)
    y = (w @ v) / w.sum(-1, keepdim=True)
    torch.testing.assert_close(mixer(x), inner.o_proj(y.transpose(1, 2).reshape(B, T, D)), rtol=1e-10, atol=1e-12)


def test_gated_convolution_equals_its_definition():
    """y_t = W_o (silu(Σ_j w_j u_{t−2+j}) ⊙ g_t), with u_{<0} = 0: a causal 3-tap depthwise convolution."""
    mixer, x = make("based", {"pattern": ["conv"]}), random_input()
    inner = mixer.layer
    u, g = inner.in_proj(x).chunk(2, dim=-1)
    w = inner.conv_weight  # (inner, 3)
    padded = F.pad(u, (0, 0, 2, 0))
    conv = sum(padded[:, j : j + x.shape[1]] * w[:, j] for j in range(3))
    torch.testing.assert_close(mixer(x), inner.o_proj(F.silu(conv) * g), rtol=1e-12, atol=1e-12)


def test_sliding_layers_are_windowed_attention():
    based = make("based", {"pattern": ["sliding"], "window": 6})
    attention = make("attention", {"window": 6})
    attention.load_state_dict(based.layer.state_dict())
    x = random_input()
    torch.testing.assert_close(based(x), attention(x), rtol=0, atol=0)


def test_state_bytes_per_kind():
    linear, conv, sliding = (make("based", {"pattern": [k]}) for k in ("linear", "conv", "sliding"))
    assert linear.state_bytes(10) == linear.state_bytes(10_000) == H * 273 * (D // H + 1) * 4
    assert linear.state_bytes(10, torch.bfloat16) == linear.state_bytes(10)  # accumulated in float32
    assert conv.state_bytes(10_000) == 2 * 2 * D * 4
    assert sliding.state_bytes(10) == 2 * 10 * D * 4 and sliding.state_bytes(10_000) == 2 * 64 * D * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, options", [("based", {"pattern": ["linear"]}), ("jrt", {"prefix_len": 1000})])
def test_linear_attention_is_finite_over_a_long_sequence(name, options, dtype):
    """T = 16384: the normaliser grows with t, but numerator and denominator grow together, in float32."""
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=name, d_model=16, n_heads=2, max_seq_len=16384, mixer_options=options)
    mixer = build_mixer(cfg, 0).to(dtype)
    y = mixer(torch.randn(1, 16384, 16).to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "options, field, hint",
    [
        ({"feature_dim": 33}, "mixer_options['feature_dim']", "from 1 to 32"),
        ({"feature_dim": 0}, "mixer_options['feature_dim']", "grows as F²"),
        ({"pattern": ["conv", "mamba"]}, "mixer_options['pattern']", "'conv', 'linear', 'sliding'"),
        ({"pattern": []}, "mixer_options['pattern']", "non-empty"),
        ({"window": 0}, "mixer_options['window']", "positive integer"),
        ({"form": "fused"}, "mixer_options['form']", "'chunk', 'parallel', 'naive'"),
        ({"prefix_len": 4}, "mixer_options['prefix_len']", "valid options: chunk_size, feature_dim, form"),
    ],
)
def test_based_bad_options_raise_config_error(options, field, hint):
    with pytest.raises(ConfigError) as excinfo:
        make("based", options)
    assert excinfo.value.field == field and hint in str(excinfo.value)


def count_flops(mixer, T=64):
    with FlopCounterMode(display=False) as counter:
        mixer(torch.randn(1, T, D))
    return counter.get_total_flops()


def linear_dense_overcount(mixer, T):
    """What a dense chunk/parallel form computes above the diagonal: (C² − C(C+1)/2) pairs per chunk."""
    inner = getattr(mixer, "layer", mixer)
    K, V = inner.expanded_dim, inner.head_dim + 1
    C = inner.chunk_size if inner.form == "chunk" else T
    masked_pairs = -(-T // C) * (C * C - C * (C + 1) // 2)
    return H * masked_pairs * 2 * (K + V)


def test_based_cost_matches_flop_counter():
    """Exact per kind once the counter's conventions are accounted for (integer sums, no tolerance needed).

    conv: projections and the depthwise convolution, both seen exactly. linear (chunk, the default form,
    and parallel): the dense op also multiplies the masked upper triangle of each C×C block, which
    ``cost`` leaves out. sliding: the CPU SDPA kernel has no FLOP formula, so only projections are seen.
    """
    T = 64
    conv = make("based", {}, torch.float32)  # layer 0 of the paper's pattern
    assert conv.kind == "conv" and count_flops(conv, T) == conv.cost(T).flops
    for form in ("chunk", "parallel"):
        linear = make("based", {"form": form}, torch.float32, layer_idx=1)
        assert linear.kind == "linear"
        assert count_flops(linear, T) == linear.cost(T).flops + linear_dense_overcount(linear, T)
    sliding = make("based", {}, torch.float32, layer_idx=2)
    core = 4 * attended_pairs(T, 64) * D
    assert sliding.kind == "sliding" and count_flops(sliding, T) == sliding.cost(T).flops - core


# ---- JRT: prefix linear attention ----------------------------------------------------------------------


def test_jrt_declares_its_noncausal_prefix():
    mixer = make("jrt", {"prefix_len": 7})
    assert type(mixer).noncausal_prefix and mixer.prefix_len == 7
    assert make("jrt").prefix_len == 0


@pytest.mark.parametrize("form", ["chunk", "parallel", "naive"])
def test_jrt_is_causal_from_the_prefix_on_and_not_before(form):
    M = 8
    mixer, x = make("jrt", {"prefix_len": M, "form": form, "chunk_size": 8}), random_input()
    y = mixer(x)
    for t in (M, 13):  # change everything from t on: outputs before t keep still
        changed = x.clone()
        changed[:, t:] = torch.randn_like(changed[:, t:])
        y_changed = mixer(changed)
        torch.testing.assert_close(y_changed[:, :t], y[:, :t], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(y_changed[:, t:], y[:, t:])
    changed = x.clone()
    changed[:, M - 1] = torch.randn_like(changed[:, M - 1])  # the last prefix token reaches every output
    assert not torch.isclose(mixer(changed), y).all(dim=-1).any()


def test_jrt_equals_the_prefix_linear_attention_equation():
    """y_t = W_o [φ(q_t)ᵀ(E + D_t)] numerator / normaliser, E over the whole prefix, D_t causal."""
    M = 6
    mixer, x = make("jrt", {"prefix_len": M, "feature_dim": 4}), random_input(T=11)
    B, T, _ = x.shape

    def heads(t):
        return t.view(B, T, H, -1).transpose(1, 2)

    phi_q = taylor_feature_map(heads(mixer.q_proj(x)))
    phi_k, phi_ke = taylor_feature_map(heads(mixer.k_proj(x))), taylor_feature_map(heads(mixer.k_enc_proj(x)))
    v, v_e = heads(mixer.v_proj(x)), heads(mixer.v_enc_proj(x))
    w_dec = (phi_q @ phi_k.transpose(-1, -2)).tril()  # (B, H, T, T), causal
    w_enc = phi_q @ phi_ke[:, :, :M].transpose(-1, -2)  # (B, H, T, M), every output sees the whole prefix
    y = (w_dec @ v + w_enc @ v_e[:, :, :M]) / (w_dec.sum(-1, keepdim=True) + w_enc.sum(-1, keepdim=True))
    torch.testing.assert_close(mixer(x), mixer.o_proj(y.transpose(1, 2).reshape(B, T, D)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["chunk", "parallel", "naive"])
def test_jrt_prefill_covering_the_prefix_then_decoding_equals_full(form):
    M = 9
    mixer, x = make("jrt", {"prefix_len": M, "form": form, "chunk_size": 8}), random_input()
    full = mixer(x)
    y, state = mixer(x[:, :M], return_state=True)  # exactly the prefix
    y_steps, state = steps(mixer, x[:, M:], state)
    torch.testing.assert_close(torch.cat([y, y_steps], 1), full, rtol=1e-10, atol=1e-12)
    assert state.position == 21 and mixer.state_bytes(21, torch.float64) == carried_bytes(state)

    y1, state = mixer(x[:, :13], return_state=True)  # more than the prefix, then chunks
    y2, state = mixer(x[:, 13:17], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2, mixer(x[:, 17:], state=state)], 1), full, rtol=1e-10, atol=1e-12)


def test_jrt_stepping_through_the_prefix_sees_the_prefix_so_far():
    """Step p < M outputs what a forward over tokens 0 … p gives; after M steps the state equals the prefill's."""
    M = 6
    mixer, x = make("jrt", {"prefix_len": M, "chunk_size": 4}), random_input(T=10)
    y_steps, state = steps(mixer, x[:, :M], mixer.init_state(2, "cpu", torch.float64))
    for p in range(M):
        torch.testing.assert_close(y_steps[:, p], mixer(x[:, : p + 1])[:, p], rtol=1e-10, atol=1e-12)
    _, prefilled = mixer(x[:, :M], return_state=True)
    torch.testing.assert_close(state.kv, prefilled.kv, rtol=1e-10, atol=1e-12)
    assert state.position == prefilled.position == M
    y_rest, _ = steps(mixer, x[:, M:], state)
    torch.testing.assert_close(y_rest, mixer(x)[:, M:], rtol=1e-10, atol=1e-12)


def test_jrt_forms_agree_including_encoder_gradients():
    options = {"prefix_len": 11, "chunk_size": 8, "feature_dim": 8}
    mixers = [make("jrt", {**options, "form": form}) for form in ("chunk", "parallel", "naive")]
    x, dy = random_input(T=27), random_input(T=27, seed=2)
    results = []
    for mixer in mixers:
        mixer.load_state_dict(mixers[0].state_dict())
        x_leaf = x.clone().requires_grad_()
        (mixer(x_leaf) * dy).sum().backward()
        results.append([x_leaf.grad] + [p.grad for p in mixer.parameters()])
    assert results[0][-1].abs().sum() > 0  # the encoder's value projection is trained
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_jrt_without_prefix_is_based_linear_attention():
    jrt, based = make("jrt", {"chunk_size": 8}), make("based", {"pattern": ["linear"], "chunk_size": 8})
    based.layer.load_state_dict(jrt.state_dict())
    x = random_input()
    torch.testing.assert_close(jrt(x), based(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "options, field, hint",
    [
        ({"prefix_len": 129}, "mixer_options['prefix_len']", "at most max_seq_len=128"),
        ({"prefix_len": -1}, "mixer_options['prefix_len']", "non-negative integer"),
        ({"feature_dim": 64}, "mixer_options['feature_dim']", "from 1 to 32"),
        ({"window": 64}, "mixer_options['window']", "valid options: chunk_size, feature_dim, form, impl, prefix_len"),
    ],
)
def test_jrt_bad_options_raise_config_error(options, field, hint):
    with pytest.raises(ConfigError) as excinfo:
        make("jrt", options)
    assert excinfo.value.field == field and hint in str(excinfo.value)


@pytest.mark.parametrize("prefix_len", [0, 20])
def test_jrt_cost_matches_flop_counter(prefix_len):
    """Exact with the dense upper triangle added (see test_based_cost_matches_flop_counter).

    The parallel form also reads the prefix state E at every position (the op's initial-state term),
    which ``cost`` counts for that form; the chunk form reads it as part of each chunk's entering state.
    """
    T = 64
    for form in ("chunk", "parallel"):
        mixer = make("jrt", {"prefix_len": prefix_len, "form": form}, torch.float32)
        assert count_flops(mixer, T) == mixer.cost(T).flops + linear_dense_overcount(mixer, T)
    inside, after = mixer.step_cost(prefix_len - 1), mixer.step_cost(prefix_len)
    assert inside.flops >= after.flops and inside.bytes >= after.bytes


# ---- JRT-Prompt ----------------------------------------------------------------------------------------


def test_jrt_prompt_repeats_the_context_then_asks():
    context, question = [11, 12, 13], [21, 22]
    assert jrt_prompt(context, question) == [11, 12, 13, NEWLINE_ID, 11, 12, 13, 21, 22]
    assert jrt_prompt(context, question, separator=[7, 8]) == [11, 12, 13, 7, 8, 11, 12, 13, 21, 22]
    assert jrt_prompt(context, question, separator=[]) == [11, 12, 13, 11, 12, 13, 21, 22]


def test_jrt_prompt_joins_the_copies_with_exactly_one_separator():
    """The paper strips the document's trailing newlines before inserting one between the copies."""
    assert jrt_prompt([11, 12, NEWLINE_ID, NEWLINE_ID], [21]) == [11, 12, NEWLINE_ID, 11, 12, 21]
    assert jrt_prompt((11, 7, 8), (21,), separator=(7, 8)) == [11, 7, 8, 11, 21]


def test_jrt_prompt_on_a_batch_of_tensors():
    context = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    question = torch.tensor([[9], [8]], dtype=torch.int32)
    prompt = jrt_prompt(context, question, separator=[0])
    assert prompt.dtype == torch.int32
    assert prompt.tolist() == [[1, 2, 3, 0, 1, 2, 3, 9], [4, 5, 6, 0, 4, 5, 6, 8]]
    ragged_end = torch.tensor([[1, 0], [2, 3]])  # only one row ends with the separator: nothing is stripped
    assert jrt_prompt(ragged_end, question, separator=[0]).shape == (2, 2 + 1 + 2 + 1)
    with pytest.raises(ValueError, match="leading"):
        jrt_prompt(context, torch.tensor([9]))


def test_jrt_prompt_feeds_any_mixer():
    """The transform is data only: a model of any mixer takes the prompt, and the question sits at its end."""
    torch.manual_seed(0)
    context, question = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 3))
    prompt = jrt_prompt(context, question, separator=[60])
    assert torch.equal(prompt[:, -3:], question) and prompt.shape[1] == 2 * 6 + 1 + 3
    for mixer in ("based", "jrt", "attention"):
        cfg = ModelConfig(mixer=mixer, vocab_size=64, d_model=D, n_heads=H, n_layers=2, max_seq_len=32)
        assert LanguageModel(cfg)(prompt).shape == (2, 16, 64)


@pytest.mark.parametrize("name, options", [
    pytest.param("based", {"pattern": ["linear"]}, id="based-linear"),
    pytest.param("jrt", {"prefix_len": 11}, id="jrt-prefix11"),
])
def test_linear_layers_on_the_kernels_equal_pytorch(name, options):
    """impl='triton' (Triton's interpreter here, the GPU there) against impl='torch' at the paper's
    feature_dim = 16: 273 key channels (five key blocks of the chunk kernel, the last masked), Dh + 1 = 9
    value channels; the output and every parameter's gradient, in float32 (the kernels' dtypes)."""
    pytest.importorskip("triton")
    mixers = {impl: make(name, {**options, "impl": impl}, torch.float32) for impl in ("triton", "torch")}
    mixers["triton"].load_state_dict(mixers["torch"].state_dict())
    x, dy = random_input(T=70, dtype=torch.float32), random_input(T=70, dtype=torch.float32, seed=2)
    results = {}
    for impl, mixer in mixers.items():
        x_leaf = x.clone().requires_grad_()
        y = mixer(x_leaf)
        (y * dy).sum().backward()
        results[impl] = [y, x_leaf.grad] + [p.grad for p in mixer.parameters()]
    for got, want in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
