"""The Triton chunked delta rule equals the token-by-token delta rule: outputs, final states, every gradient.

On a machine without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1
first), so sizes are small. The kernels' chunk is always 64 (a blocked 4 × 16 inverse), so T > 64 and
T not a multiple of 64 exercise the state passing and the padded last chunk. References run in float64
on the same float32 inputs: the tolerance measures the kernels' float32 rounding alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernel_checks import assert_all_close, assert_layer_on_kernels_equals_pytorch

from lmscale.ops.delta_rule import naive_delta_rule
from lmscale.ops.triton import delta_rule as triton_delta_module
from lmscale.ops.triton import interpreting
from lmscale.ops.triton.delta_rule import chunk_delta_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INPUT_NAMES = ("q", "k", "v", "beta", "log_alpha", "initial_state")


def make_inputs(B, H, T, K, V, gated=True, with_state=True, min_log_alpha=None, seed=0):
    """float32 inputs as the mixers make them: k L2-normalised, β in (0, 1), log α = logsigmoid(·) ≤ 0
    (or uniform in [min_log_alpha, 0] for strong decays)."""
    gen = torch.Generator().manual_seed(seed)
    log_alpha = None
    if gated:
        log_alpha = (F.logsigmoid(torch.randn(B, H, T, generator=gen) + 2) if min_log_alpha is None
                     else min_log_alpha * torch.rand(B, H, T, generator=gen))
    inputs = {
        "q": torch.randn(B, H, T, K, generator=gen),
        "k": F.normalize(torch.randn(B, H, T, K, generator=gen), dim=-1),
        "v": torch.randn(B, H, T, V, generator=gen),
        "beta": torch.rand(B, H, T, generator=gen),
        "log_alpha": log_alpha,
        "initial_state": torch.randn(B, H, K, V, generator=gen) if with_state else None,
    }
    return {n: None if t is None else t.to(DEVICE) for n, t in inputs.items()}


def run(op, inputs, use_output=True, use_final_state=True):
    """Output, final state and the gradients of a random loss over o and/or the final state."""
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items() if t is not None}
    o, final_state = op(**{n: leaves.get(n) for n in INPUT_NAMES}, output_final_state=True)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o)
    d_state = torch.randn(final_state.shape, generator=gen).to(final_state)
    terms = [(o * do).sum()] * use_output + [(final_state * d_state).sum()] * use_final_state
    sum(terms).backward()
    return {"o": o, "final_state": final_state, **{f"d{n}": t.grad for n, t in leaves.items()}}


def reference(inputs, **kwargs):
    return run(naive_delta_rule, {n: None if t is None else t.double() for n, t in inputs.items()}, **kwargs)


SHAPES = [  # B, H, T, D_k, D_v, initial state
    pytest.param(2, 1, 1, 16, 16, True, id="T1"),
    pytest.param(1, 2, 64, 16, 32, False, id="one-full-chunk-dk16-dv32"),
    pytest.param(1, 2, 100, 32, 16, True, id="T100-dk32-dv16"),
    pytest.param(2, 1, 150, 24, 40, True, id="T150-dim24-dim40"),
]


@pytest.mark.parametrize("B, H, T, K, V, with_state", SHAPES)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "deltanet"])
def test_triton_delta_rule_equals_naive(B, H, T, K, V, with_state, gated):
    inputs = make_inputs(B, H, T, K, V, gated, with_state)
    assert_all_close(run(chunk_delta_rule, inputs), reference(inputs))


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "deltanet"])
def test_several_value_blocks(gated, monkeypatch):
    """Value blocks of 16 cut D_v = 40 into two full blocks and a half-masked one, in the sequential
    passes and in the gradient kernel's loop over value channels."""
    monkeypatch.setattr(triton_delta_module, "SEQUENTIAL_BLOCK_V", 16)
    inputs = make_inputs(1, 2, 90, 16, 40, gated)
    assert_all_close(run(chunk_delta_rule, inputs), reference(inputs))


def test_strong_decays_stay_finite():
    """log α uniform in [−8, 0]: decays within a chunk reach e^−250, beyond float32's range as a ratio;
    every exponent the kernels take is ≤ 0, so they underflow to 0 instead of overflowing."""
    inputs = make_inputs(1, 2, 130, 16, 16, min_log_alpha=-8.0)
    assert_all_close(run(chunk_delta_rule, inputs), reference(inputs))


def test_beta_up_to_two_is_a_reflection_and_stays_exact():
    """β ∈ (0, 2) (negative eigenvalues, as in DeltaProduct-style mixers): the WY inverse has larger entries."""
    inputs = make_inputs(1, 1, 128, 16, 16)
    inputs["beta"] = 2 * inputs["beta"]
    assert_all_close(run(chunk_delta_rule, inputs), reference(inputs), rtol=3e-4)


@pytest.mark.parametrize("use_output, use_final_state", [(True, False), (False, True)],
                         ids=["output-only", "final-state-only"])
def test_gradient_through_output_or_final_state_alone(use_output, use_final_state):
    inputs = make_inputs(1, 2, 77, 16, 16)
    flags = {"use_output": use_output, "use_final_state": use_final_state}
    assert_all_close(run(chunk_delta_rule, inputs, **flags), reference(inputs, **flags))


def test_views_of_batch_time_head_memory_are_used_in_place():
    """The mixers pass x.view(B, T, H, D).transpose(1, 2) and β, log α as [B, T, H].transpose(1, 2):
    nothing is copied and dq, dk, dv, dβ, d log α come back in the inputs' memory order."""
    inputs = make_inputs(2, 2, 70, 16, 32)
    views = {n: t if n == "initial_state" else t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
             for n, t in inputs.items()}
    assert not views["q"].is_contiguous() and not views["beta"].is_contiguous()
    o, final_state = chunk_delta_rule(**views, output_final_state=True)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o)
    d_state = torch.randn(final_state.shape, generator=gen).to(final_state)
    names = ("q", "k", "v", "beta", "log_alpha")
    grads = torch.autograd.grad((o * do).sum() + (final_state * d_state).sum(), [views[n] for n in names])
    got = {"o": o, "final_state": final_state, **{f"d{n}": g for n, g in zip(names, grads)}}
    want = reference(inputs)
    assert_all_close(got, {n: want[n] for n in got})
    for name, like in (("o", "v"), *((f"d{n}", n) for n in names)):
        assert got[name].stride() == views[like].stride(), name


def test_no_final_state_unless_asked():
    o, final_state = chunk_delta_rule(**make_inputs(1, 1, 5, 16, 16))
    assert final_state is None and o.shape == (1, 1, 5, 16)


@pytest.mark.skipif(interpreting(), reason="Triton 3.6's interpreter multiplies bf16 dot operands as raw "
                    "bits (garbage); bf16 is checked on the GPU")
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "deltanet"])
def test_bfloat16_inputs(gated):
    """bf16 in: tensor-core operands in bf16 (W, U', the states, T), float32 accumulation and
    recurrences; o in bf16, the final state in float32."""
    inputs = make_inputs(1, 2, 200, 64, 64, gated)
    inputs = {n: t.bfloat16() if n in ("q", "k", "v") else t for n, t in inputs.items()}
    got = run(chunk_delta_rule, inputs)
    assert got["o"].dtype == torch.bfloat16 and got["final_state"].dtype == torch.float32
    assert got["dq"].dtype == torch.bfloat16 and got["dbeta"].dtype == torch.float32
    assert_all_close(got, reference(inputs), rtol=3e-2)


def test_bad_inputs_are_refused_with_the_fix():
    x = make_inputs(1, 1, 8, 16, 16)
    with pytest.raises(ValueError, match="beta must be a float tensor"):
        chunk_delta_rule(**(x | {"beta": x["beta"][..., :4]}))
    wide = make_inputs(1, 1, 8, 160, 16)
    with pytest.raises(ValueError, match="head dims up to 128"):
        chunk_delta_rule(**wide)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_mixer_on_the_kernels_equals_the_mixer_on_pytorch(name):
    assert_layer_on_kernels_equals_pytorch(name, {}, DEVICE)
