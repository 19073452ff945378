"""Cumulative softmax-weighted sums (LEAP) agree in every form, stay finite at any length, and the
LEAP mixer's windows, state size and cost say what it does."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers import build_mixer
from lmscale.ops.cumulative_softmax import (
    CumulativeSoftmaxState,
    chunk_cumulative_softmax,
    cumulative_softmax_flops,
    cumulative_softmax_step,
    naive_cumulative_softmax,
    parallel_cumulative_softmax,
)

STATE_FIELDS = [f.name for f in dataclasses.fields(CumulativeSoftmaxState)]
# the running maxima are references, detached in every form: compared by value, carry no gradient
DETACHED = {"max", "suffix_max"}


def make_inputs(B, H, T, D, dtype, spread=3.0, seed=0):
    torch.manual_seed(seed)
    return spread * torch.randn(B, H, T, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype)


def prefix_state(logits, v, window):
    """A genuine mid-sequence state: the naive form's, after a prefix of random tokens."""
    _, state = naive_cumulative_softmax(logits, v, window, output_final_state=True)
    return state


def state_tensors(state):
    return {name: getattr(state, name) for name in STATE_FIELDS if getattr(state, name) is not None}


def run(op, logits, v, window, initial_state=None):
    """Output, final state and the gradients of a fixed random loss w.r.t. every input and state tensor."""
    leaves = {"logits": logits.clone().requires_grad_(), "v": v.clone().requires_grad_()}
    if initial_state is not None:
        init = {n: t.clone().requires_grad_() for n, t in state_tensors(initial_state).items()}
        leaves.update({f"state.{n}": t for n, t in init.items()})
        initial_state = CumulativeSoftmaxState(**init)
    o, final = op(leaves["logits"], leaves["v"], window=window, initial_state=initial_state,
                  output_final_state=True)
    gen = torch.Generator().manual_seed(1)
    finals = state_tensors(final)
    loss = (o * torch.randn(o.shape, dtype=o.dtype, generator=gen)).sum()
    for name, t in finals.items():
        if name not in DETACHED:
            loss = loss + (t * torch.randn(t.shape, dtype=t.dtype, generator=gen)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    out = {"o": o, **{f"final.{n}": t for n, t in finals.items()}}
    out.update({f"d{n}": torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(leaves, grads)})
    return out


def assert_all_close(got, want, rtol, floor=1e-3):
    """Relative max error per tensor: |got − want|∞ ≤ rtol · max(|want|∞, floor).

    In float32 the floor is the inputs' scale, 1: a gradient that vanishes mathematically (window 1
    makes o_t = v_t whatever the logits) is rounding noise of size ε·|v|·|do| in every form.
    """
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        if got[name].numel() == 0:
            continue
        err = (got[name].double() - want[name].double()).abs().max().item()
        ref = want[name].double().abs().max().item()
        assert err <= rtol * max(ref, floor), f"{name}: max error {err:.3g} vs max |ref| {ref:.3g}"


CASES = [  # B, H, T, D, window, chunk_size
    pytest.param(2, 2, 1, 16, None, 16, id="T1-global"),
    pytest.param(2, 2, 1, 16, 4, 16, id="T1-window4"),
    pytest.param(2, 3, 67, 16, None, 16, id="T67-global-chunk16"),
    pytest.param(2, 2, 67, 16, 1, 16, id="T67-window1"),
    pytest.param(2, 2, 67, 16, 5, 4, id="T67-window5-chunk4"),
    pytest.param(1, 2, 70, 16, 24, 16, id="B1-window24-chunk16"),
    pytest.param(1, 2, 64, 64, 64, 64, id="B1-D64-window64"),
    pytest.param(1, 1, 37, 64, 100, 16, id="window-beyond-T"),
    pytest.param(1, 1, 40, 128, 8, 64, id="D128-window8"),
]


@pytest.mark.parametrize("B, H, T, D, window, chunk_size", CASES)
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
def test_parallel_and_chunk_equal_naive_float64(B, H, T, D, window, chunk_size, with_state):
    logits, v = make_inputs(B, H, T, D, torch.float64)
    state = None
    if with_state:  # a prefix ending mid-block, so state tokens, aggregates and suffixes all matter
        state = prefix_state(*make_inputs(B, H, 2 * (window or 3) + 3, D, torch.float64, seed=2), window)
    want = run(naive_cumulative_softmax, logits, v, window, state)
    assert_all_close(run(parallel_cumulative_softmax, logits, v, window, state), want, rtol=1e-10)
    chunk = partial(chunk_cumulative_softmax, chunk_size=chunk_size)
    assert_all_close(run(chunk, logits, v, window, state), want, rtol=1e-10)


@pytest.mark.parametrize("B, H, T, D, window, chunk_size", CASES)
def test_parallel_and_chunk_equal_naive_float32(B, H, T, D, window, chunk_size):
    logits, v = make_inputs(B, H, T, D, torch.float32)
    state = prefix_state(*make_inputs(B, H, (window or 3) + 2, D, torch.float32, seed=2), window)
    want = run(naive_cumulative_softmax, logits, v, window, state)
    assert_all_close(run(parallel_cumulative_softmax, logits, v, window, state), want, rtol=1e-5, floor=1.0)
    chunk = partial(chunk_cumulative_softmax, chunk_size=chunk_size)
    assert_all_close(run(chunk, logits, v, window, state), want, rtol=1e-5, floor=1.0)


def masked_softmax_reference(logits, v, window):
    """The definition, as plainly as possible: softmax over each window's logits, times its values."""
    T = logits.shape[-1]
    t, s = torch.arange(T).unsqueeze(1), torch.arange(T)
    see = (s <= t) & (s > t - (T if window is None else window))
    return logits.unsqueeze(-2).masked_fill(~see, float("-inf")).softmax(dim=-1) @ v


@pytest.mark.parametrize("window", [None, 1, 3, 16, 33, 200])
def test_chunk_form_equals_masked_softmax(window):
    logits, v = make_inputs(2, 2, 150, 8, torch.float64, spread=10.0)
    o, _ = chunk_cumulative_softmax(logits, v, window, chunk_size=16)
    torch.testing.assert_close(o, masked_softmax_reference(logits, v, window), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("split", [1, 7, 20])  # one token, a whole block, mid-block
def test_a_state_from_any_form_continues_in_any_form(window, split):
    logits, v = make_inputs(2, 2, 40, 8, torch.float64)
    whole, _ = parallel_cumulative_softmax(logits, v, window)
    forms = [naive_cumulative_softmax, parallel_cumulative_softmax, partial(chunk_cumulative_softmax, chunk_size=4)]
    for first in forms:
        o1, state = first(logits[:, :, :split], v[:, :, :split], window, output_final_state=True)
        for second in forms:
            o2, _ = second(logits[:, :, split:], v[:, :, split:], window, initial_state=state)
            torch.testing.assert_close(torch.cat([o1, o2], dim=2), whole, rtol=1e-12, atol=1e-12)


def test_step_matches_definition():
    """One token on an empty state returns its value; the second averages two by their softmax."""
    logits, v = make_inputs(2, 3, 2, 4, torch.float64)
    state = CumulativeSoftmaxState.empty(2, 3, 4, None, "cpu", torch.float64)
    o0, state = cumulative_softmax_step(logits[:, :, 0], v[:, :, 0], state)
    o1, state = cumulative_softmax_step(logits[:, :, 1], v[:, :, 1], state)
    torch.testing.assert_close(o0, v[:, :, 0])
    torch.testing.assert_close(o1, (logits.softmax(-1).unsqueeze(-1) * v).sum(2))


@pytest.mark.parametrize("window", [1, 4, 6])
def test_window_state_holds_current_block_and_needed_suffixes(window):
    """After L tokens: r = L mod k block tokens and k−1−r suffixes of the previous block (0 before one)."""
    logits, v = make_inputs(1, 1, 3 * window + 2, 4, torch.float64)
    for L in range(1, logits.shape[-1] + 1):
        state = prefix_state(logits[:, :, :L], v[:, :, :L], window)
        r = L % window
        assert state.block_logits.shape[-1] == r
        assert state.suffix_max.shape[-1] == (0 if L < window else window - 1 - r)


# --- stability: a running max instead of raw exp-cumsums, block suffixes instead of subtraction ---


def leap_difference_of_cumsums(logits, v, window):
    """LEAP's eq. 10 taken literally (float32 cumulative sums of exp, subtracted): what not to do."""
    w = logits.exp().unsqueeze(-1)
    s, z = (w * v).cumsum(2), w.cumsum(2)
    shift = torch.nn.functional.pad(s, (0, 0, window, 0))[:, :, :-window]
    z_shift = torch.nn.functional.pad(z, (0, 0, window, 0))[:, :, :-window]
    return (s - shift) / (z - z_shift)


def test_a_dominant_token_leaving_the_window_leaves_no_trace():
    """Logit 20 at t = 5, then ordinary ones. Once it leaves the window of 8, LEAP's subtraction
    cancels e^20 ≈ 5e8 against itself in float32 (spacing 32) and the window's normaliser, about 8,
    comes out 0 or garbage: 0/0. Block suffixes never subtract and stay exact."""
    logits, v = make_inputs(1, 2, 64, 8, torch.float32, spread=1.0)
    logits[:, :, 5] = 20.0
    want = masked_softmax_reference(logits.double(), v.double(), 8)
    for op in (partial(chunk_cumulative_softmax, chunk_size=4), naive_cumulative_softmax):
        got, _ = op(logits, v, 8)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not torch.isfinite(leap_difference_of_cumsums(logits, v, 8)[:, :, 13:]).all()


@pytest.mark.parametrize("dtype, T", [(torch.bfloat16, 65536), (torch.float32, 16384)])
@pytest.mark.parametrize("window", [None, 1000])
def test_long_sequences_stay_finite(dtype, T, window):
    """Logits drifting up to ~1000 (e^1000 overflows every float format), T up to 65,536 in bfloat16."""
    torch.manual_seed(0)
    logits = (10 * torch.randn(1, 1, T) + torch.linspace(0, 1000, T)).to(dtype)
    v = torch.randn(1, 1, T, 4).to(dtype)
    assert not torch.isfinite(logits.float().exp().cumsum(-1)).all()  # the raw exp-cumsum would overflow
    o, state = chunk_cumulative_softmax(logits, v, window, output_final_state=True)
    assert o.dtype == dtype and torch.isfinite(o).all()
    assert all(torch.isfinite(t).all() for t in state_tensors(state).values())
    assert o.float().abs().max() <= v.float().abs().max() * (1 + 1e-2)  # a weighted mean of the values


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("window", [None, 100])
def test_low_precision_agrees_with_float64(dtype, rtol, window):
    """At T = 2048 with logits spread over ±30: float32 within 1e-5 of float64 on the same inputs;
    bfloat16 outputs within one bfloat16 rounding (2⁻⁸ relative) since sums run in float32."""
    logits, v = make_inputs(1, 2, 2048, 16, dtype, spread=10.0)
    want, _ = chunk_cumulative_softmax(logits.double(), v.double(), window)
    got, _ = chunk_cumulative_softmax(logits, v, window)
    assert (got.double() - want).abs().max() <= rtol * want.abs().max()


# --- cost of the op ---


@pytest.mark.parametrize("window, T, C", [(None, 100, 16), (None, 64, 64), (5, 100, 16), (24, 70, 16)])
def test_chunk_flops_are_the_counted_matmuls_minus_the_masked_triangles(window, T, C):
    """The chunk form's only matmuls are its dense C×C chunk products; the analytic count keeps the
    causal half, C(C+1)/2 of C² pairs, so counted − analytic = the C(C−1)/2 masked pairs per chunk."""
    H, D = 2, 8
    logits, v = make_inputs(1, H, T, D, torch.float32)
    with FlopCounterMode(display=False) as counter:
        chunk_cumulative_softmax(logits, v, window, chunk_size=C)
    c = C if window is None else min(C, window)
    passes, chunks = (1, -(-T // C)) if window is None else (2, -(-T // window) * -(-window // c))
    masked = passes * H * chunks * (c * (c - 1) // 2) * 2 * (D + 1)
    assert counter.get_total_flops() == cumulative_softmax_flops(T, H, D, window, "chunk", C) + masked


def test_chunk_flops_are_linear_in_T_and_independent_of_the_window():
    flops = partial(cumulative_softmax_flops, n_heads=2, dim=16, form="chunk", chunk_size=64)
    for window in (None, 64, 256, 1024):
        assert flops(8192, window=window) == 2 * flops(4096, window=window)
    assert flops(8192, window=256) == flops(8192, window=1024)  # windows ≥ C: two passes, any k
    assert cumulative_softmax_flops(512, 2, 16, 64, "parallel") < cumulative_softmax_flops(512, 2, 16, None, "parallel")


# --- the LEAP mixer ---


def make_leap(window="auto", form="chunk", layer_idx=0, n_layers=2, max_seq_len=128, **options):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer="leap", d_model=32, n_heads=4, n_layers=n_layers, max_seq_len=max_seq_len,
                      mixer_options={"window": window, "form": form, **options})
    return build_mixer(cfg, layer_idx).double()


def test_auto_windows_double_per_layer_and_the_last_layer_is_global():
    windows = [make_leap(layer_idx=i, n_layers=6, max_seq_len=1024).window for i in range(6)]
    assert windows == [4, 8, 16, 32, 64, None]  # LEAP's [4, 8, 16, 32, 64, global]
    short = [make_leap(layer_idx=i, n_layers=6, max_seq_len=32).window for i in range(6)]
    assert short == [4, 8, 16, None, None, None]  # a window reaching max_seq_len is global
    assert make_leap("global").window is None and make_leap(7, layer_idx=1).window == 7


@pytest.mark.parametrize("window, hint", [(0, "integer ≥ 1"), ("local", "'auto', 'global'"), (True, "integer"),
                                          (129, "max_seq_len=128")])
def test_bad_windows_raise_config_error(window, hint):
    with pytest.raises(ConfigError) as excinfo:
        make_leap(window)
    assert excinfo.value.field == "mixer_options['window']" and hint in str(excinfo.value)


@pytest.mark.parametrize("window", ["global", 5, 128])
def test_prefix_then_steps_equal_full_and_forms_agree(window):
    """The contract tests run the default (window 4 at layer 0); here the global and wider cases."""
    torch.manual_seed(1)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    mixers = [make_leap(window, form) for form in ("chunk", "parallel", "naive")]
    full = mixers[0](x)
    y, state = mixers[0](x[:, :11], return_state=True)
    for t in range(11, 19):
        y_t, state = mixers[2].step(x[:, t], state)
        y = torch.cat([y, y_t.unsqueeze(1)], dim=1)
    torch.testing.assert_close(y, full, rtol=1e-10, atol=1e-12)
    for mixer in mixers[1:]:
        torch.testing.assert_close(mixer(x), full, rtol=1e-10, atol=1e-12)


def test_state_grows_with_the_window_not_the_context():
    glob, small, large = make_leap("global"), make_leap(8), make_leap(64)
    assert glob.state_bytes(10) == glob.state_bytes(100_000)
    assert max(small.state_bytes(L) for L in range(2000, 2100)) < min(large.state_bytes(L) for L in range(2000, 2100))
    for mixer in (small, large):  # bounded by about 2 states · k (D_h + 2) numbers per head
        bound = 2 * 4 * (mixer.window + 1) * (8 + 2) * 4
        assert max(mixer.state_bytes(L) for L in range(10_000, 10_200)) <= bound
    assert small.step_cost(10_000).flops == small.step_cost(10).flops


@pytest.mark.parametrize("window", ["auto", "global"])
def test_leap_cost_matches_flop_counter(window):
    """FlopCounterMode sees every matmul of the chunk forward: the five projections, the focus
    logits (a [D_h] × [D_h, 1] product per token and head) and the chunk products, which it counts
    densely. cost() counts causal pairs only, so the two differ by exactly the masked upper triangles
    of the chunk products, C(C−1)/2 pairs per chunk and pass; everything else is elementwise."""
    torch.manual_seed(0)
    T, H, Dh, C = 64, 4, 8, 64
    mixer = make_leap(window)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mixer(torch.randn(1, T, 32, dtype=torch.float64))
    c = C if mixer.window is None else min(C, mixer.window)
    chunks = -(-T // C) if mixer.window is None else 2 * -(-T // mixer.window) * -(-mixer.window // c)
    masked = 2 * H * chunks * (c * (c - 1) // 2) * 2 * (Dh + 1)  # two ops
    assert counter.get_total_flops() == mixer.cost(T).flops + masked
