"""The Triton chunked gated recurrence equals the naive recurrence: outputs, final states, every gradient.

On a machine without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1
before anything imports them), so sizes are tiny; the chunk sizes are 16 and 32 for speed, and the tile
caps are lowered to 16 in one test to reach several K and V blocks. References run in float64 on the
same float32 inputs, so the tolerance measures the kernels' float32 rounding alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernel_checks import assert_all_close

from lmscale.ops.gated_recurrence import chunk_gated_recurrence as torch_chunk
from lmscale.ops.gated_recurrence import naive_gated_recurrence
from lmscale.ops.triton import chunk as triton_chunk_module
from lmscale.ops.triton import interpreting
from lmscale.ops.triton.chunk import chunk_gated_recurrence
from lmscale.ops.triton.chunk_fwd import GATE_CHANNEL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INPUT_NAMES = ("q", "k", "v", "log_g", "initial_state")
GATES = ["channel", "head", "none"]


def make_inputs(B, H, T, K, V, gate, with_state=True, min_log_g=None, seed=0):
    """float32 inputs; log gates logsigmoid(randn), or uniform in [min_log_g, 0] for strong decays."""
    gen = torch.Generator().manual_seed(seed)
    gate_shape = {"channel": (B, H, T, K), "head": (B, H, T), "none": None}[gate]
    log_g = None
    if gate_shape is not None:
        if min_log_g is None:
            log_g = F.logsigmoid(torch.randn(gate_shape, generator=gen))
        else:
            log_g = min_log_g * torch.rand(gate_shape, generator=gen)
    inputs = {
        "q": torch.randn(B, H, T, K, generator=gen),
        "k": torch.randn(B, H, T, K, generator=gen),
        "v": torch.randn(B, H, T, V, generator=gen),
        "log_g": log_g,
        "initial_state": torch.randn(B, H, K, V, generator=gen) if with_state else None,
    }
    return {n: None if t is None else t.to(DEVICE) for n, t in inputs.items()}


def run(op, inputs, use_output=True, use_final_state=True, **kwargs):
    """Output, final state and the gradients of a random loss over o and/or the final state."""
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items() if t is not None}
    args = {n: leaves.get(n) for n in INPUT_NAMES}
    o, final_state = op(**args, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o)
    d_state = torch.randn(final_state.shape, generator=gen).to(final_state)
    terms = [(o * do).sum()] * use_output + [(final_state * d_state).sum()] * use_final_state
    sum(terms).backward()
    return {"o": o, "final_state": final_state, **{f"d{n}": t.grad for n, t in leaves.items()}}


def reference(inputs, **kwargs):
    as_float64 = {n: None if t is None else t.double() for n, t in inputs.items()}
    return run(naive_gated_recurrence, as_float64, **kwargs)


SHAPES = [  # B, H, T, D_k, D_v, chunk_size, initial state
    pytest.param(2, 1, 1, 16, 16, 16, True, id="T1"),
    pytest.param(2, 2, 37, 16, 32, 16, True, id="T37-chunk16-dk16-dv32"),
    pytest.param(1, 1, 70, 32, 16, 32, True, id="B1-T70-chunk32-dk32-dv16"),
    pytest.param(1, 2, 45, 24, 24, 32, False, id="dim24-no-state"),
]


@pytest.mark.parametrize("B, H, T, K, V, chunk_size, with_state", SHAPES)
@pytest.mark.parametrize("gate", GATES)
def test_triton_chunk_equals_naive(B, H, T, K, V, chunk_size, with_state, gate):
    inputs = make_inputs(B, H, T, K, V, gate, with_state)
    assert_all_close(run(chunk_gated_recurrence, inputs, chunk_size=chunk_size), reference(inputs))


@pytest.mark.parametrize("gate", GATES)
def test_several_key_and_value_blocks(gate, monkeypatch):
    """Tiles of 16 cut D_k = 32 into two blocks and D_v = 24 into a full and a half-masked one (and the
    per-channel diagonal blocks into two channel blocks)."""
    monkeypatch.setattr(triton_chunk_module, "BLOCK", 16)
    monkeypatch.setattr(triton_chunk_module, "SCORES_BLOCK_V", 16)
    monkeypatch.setattr(triton_chunk_module, "DIAG_BLOCK", 16)
    inputs = make_inputs(1, 2, 40, 32, 24, gate)
    assert_all_close(run(chunk_gated_recurrence, inputs, chunk_size=32), reference(inputs))


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_default_chunk_of_64_equals_pytorch_chunk_form(gate):
    """Four sub-chunks of 16 per chunk for per-channel gates; the PyTorch chunk form is the reference."""
    inputs = make_inputs(1, 1, 100, 16, 16, gate)
    assert_all_close(run(chunk_gated_recurrence, inputs), run(torch_chunk, inputs))


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_strong_decays_stay_finite(gate):
    """log g uniform in [−5, 0]: cumulative decays reach ≈ e^−160 within a chunk of 64, whose inverse
    overflows float32 (e^88); every exponent the kernels take is ≤ 0, so they underflow to 0 instead."""
    inputs = make_inputs(2, 1, 96, 16, 16, gate, min_log_g=-5.0)
    got = run(chunk_gated_recurrence, inputs, chunk_size=64)
    assert_all_close(got, reference(inputs))


def test_steep_sub_chunks_take_the_exact_kernels_and_mild_ones_the_tensor_core_form():
    """Per-channel gates: a sub-chunk of 16 rows whose decay exceeds MAX_SPREAD (e^40) is flagged and
    redone by the exact kernels, the others keep the tensor-core form; one input holding both kinds, in
    one chunk and across chunks, matches the reference everywhere."""
    inputs = make_inputs(1, 2, 80, 16, 16, "channel")
    inputs["log_g"][:, :, 40:] *= 20  # ≈ −16 per step from row 40 on
    cumulative = triton_chunk_module._chunk_cumulative(inputs["log_g"], 32)
    _, steep = triton_chunk_module._chunk_scores(inputs["q"], inputs["k"], cumulative, GATE_CHANNEL.value, 32)
    assert 0 < int(steep.sum()) < steep.numel()
    assert_all_close(run(chunk_gated_recurrence, inputs, chunk_size=32), reference(inputs))


@pytest.mark.parametrize("use_output, use_final_state", [(True, False), (False, True)],
                         ids=["output-only", "final-state-only"])
def test_gradient_through_output_or_final_state_alone(use_output, use_final_state):
    inputs = make_inputs(1, 2, 21, 16, 16, "channel")
    flags = {"use_output": use_output, "use_final_state": use_final_state}
    assert_all_close(run(chunk_gated_recurrence, inputs, chunk_size=16, **flags), reference(inputs, **flags))


def test_no_final_state_unless_asked():
    inputs = make_inputs(1, 1, 5, 16, 16, "head")
    o, final_state = chunk_gated_recurrence(**inputs, chunk_size=16)
    assert final_state is None and o.shape == (1, 1, 5, 16)


def test_fixed_gates_get_no_gradient():
    """A gate that does not require grad (RetNet's fixed decays) gets none, and the rest is unchanged."""
    inputs = make_inputs(1, 2, 20, 16, 16, "head")
    log_g = inputs.pop("log_g")
    got = run(lambda **kw: chunk_gated_recurrence(**(kw | {"log_g": log_g}), chunk_size=16), inputs)
    want = reference(inputs | {"log_g": log_g})
    del want["dlog_g"]
    assert_all_close(got, want)


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_views_of_batch_time_head_memory_are_used_in_place(gate):
    """The mixers pass x.view(B, T, H, D).transpose(1, 2): no copies, and o and the gradients come back in
    the same [B, T, H, D] memory order, so transposing back is free (checked on the gradients the
    backward returns: autograd.grad, not .grad, which autograd re-lays out like the leaf)."""
    B, H, T, K, V = 2, 2, 19, 16, 32
    inputs = make_inputs(B, H, T, K, V, gate)
    views = {n: t if n == "initial_state" else t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
             for n, t in inputs.items()}
    assert not views["q"].is_contiguous()
    o, final_state = chunk_gated_recurrence(**views, output_final_state=True, chunk_size=16)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o)
    d_state = torch.randn(final_state.shape, generator=gen).to(final_state)
    names = ("q", "k", "v", "log_g")
    grads = torch.autograd.grad((o * do).sum() + (final_state * d_state).sum(), [views[n] for n in names])
    got = {"o": o, "final_state": final_state, **{f"d{n}": g for n, g in zip(names, grads)}}
    want = reference(inputs)
    assert_all_close(got, {n: want[n] for n in got})
    for name, like in (("o", "v"), ("dq", "q"), ("dk", "k"), ("dv", "v")):
        assert got[name].stride() == views[like].stride(), name
    if gate == "channel":
        assert got["dlog_g"].stride() == views["log_g"].stride()


@pytest.mark.skipif(interpreting(), reason="Triton 3.6's interpreter multiplies bf16 dot operands as raw "
                    "bits (garbage); bf16 is checked on the GPU")
@pytest.mark.parametrize("gate", ["channel", "head"])
def test_bfloat16_inputs(gate):
    """bf16 in: tensor-core dot operands in bf16, float32 accumulation and states; o in bf16, final state
    in float32. bf16 operands (8 bits of mantissa) put the error near 1e-2 of the largest value."""
    inputs = make_inputs(1, 2, 40, 16, 16, gate, min_log_g=-1.0)
    inputs = {n: t.bfloat16() if n in ("q", "k", "v") else t for n, t in inputs.items()}
    got = run(chunk_gated_recurrence, inputs, chunk_size=16)
    assert got["o"].dtype == torch.bfloat16 and got["final_state"].dtype == torch.float32
    assert got["dq"].dtype == torch.bfloat16 and got["dlog_g"].dtype == torch.float32
    assert_all_close(got, reference(inputs), rtol=3e-2)


def test_bad_inputs_are_refused_with_the_fix():
    x = make_inputs(1, 1, 8, 16, 16, "channel")
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        chunk_gated_recurrence(**x, chunk_size=48)
    with pytest.raises(ValueError, match="share one dtype"):
        chunk_gated_recurrence(**(x | {"q": x["q"].double()}))
    with pytest.raises(ValueError, match="log_g must be"):
        chunk_gated_recurrence(**(x | {"log_g": x["log_g"][..., :8]}))
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gated_recurrence(**(x | {"initial_state": x["initial_state"][..., :8]}))
    with pytest.raises(ValueError, match="head dims up to 1057"):
        chunk_gated_recurrence(x["q"], x["k"], x["v"].new_zeros(1, 1, 8, 1088), None)


@pytest.mark.parametrize("heads, dims, cap, want", [
    pytest.param(256, (128, 128), None, (64, 64), id="enough-programs"),
    pytest.param(16, (128, 128), None, (32, 32), id="GLA-32K-halved-to-the-floor"),
    pytest.param(16, (128,), 64, (32,), id="one-dim"),
    pytest.param(32, (128,), 64, (32,), id="64-programs-halved-once"),
    pytest.param(64, (128,), 64, (64,), id="128-programs-kept"),
])
def test_passes_along_time_halve_their_tiles_below_one_program_per_two_multiprocessors(heads, dims, cap, want):
    assert triton_chunk_module._blocks_filling(132, heads, dims, cap) == want
