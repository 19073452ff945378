"""The Triton cumulative softmax (global and windowed) equals the token-by-token one: outputs, final
states, gradients.

On a machine without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1
first). The kernels walk chunks of 64 rows, so T > 64 and T not a multiple of 64 exercise the carried
aggregate and the padded last chunk. References run in float64 on the same float32 inputs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import assert_all_close, assert_layer_on_kernels_equals_pytorch

from lmscale.ops.cumulative_softmax import CumulativeSoftmaxState, naive_cumulative_softmax
from lmscale.ops.triton import cumulative_softmax as triton_module
from lmscale.ops.triton import cumulative_softmax_window as triton_window_module
from lmscale.ops.triton import interpreting
from lmscale.ops.triton.cumulative_softmax import cumulative_softmax
from lmscale.ops.triton.cumulative_softmax_window import windowed_cumulative_softmax

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, H, T, D, with_state=True, logit_scale=3.0, seed=0):
    """Logits N(0, logit_scale²), values N(0, 1); a state as decoding would carry it (z > 0)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {"logits": torch.randn(B, H, T, generator=gen) * logit_scale, "v": torch.randn(B, H, T, D, generator=gen)}
    if with_state:
        inputs["max"] = torch.randn(B, H, generator=gen) * logit_scale
        inputs["sum"] = torch.cat([torch.randn(B, H, D, generator=gen), torch.rand(B, H, 1, generator=gen) + 0.5], -1)
    return {n: t.to(DEVICE) for n, t in inputs.items()}


def run(op, inputs, dtype=torch.float32, v_dtype=None, use_output=True, use_final_state=True):
    """Output, final state and the gradients of a random loss over o and/or the final state's sums; v in
    ``v_dtype`` if given (LEAP's logits stay float32 when its values are bf16)."""
    leaves = {n: t.detach().to(v_dtype if n == "v" and v_dtype else dtype).clone().requires_grad_(n != "max")
              for n, t in inputs.items()}
    state = CumulativeSoftmaxState(leaves["max"], leaves["sum"]) if "max" in leaves else None
    o, final = op(leaves["logits"], leaves["v"], initial_state=state, output_final_state=True)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o)
    d_sum = torch.randn(final.sum.shape, generator=gen).to(final.sum)
    terms = [(o * do).sum()] * use_output + [(final.sum * d_sum).sum()] * use_final_state
    sum(terms).backward()
    return {"o": o, "final_max": final.max, "final_sum": final.sum,
            **{f"d{n}": t.grad for n, t in leaves.items() if n != "max"}}


def reference(inputs, **kwargs):
    return run(naive_cumulative_softmax, inputs, torch.float64, **kwargs)


@pytest.mark.parametrize("B, H, T, D, with_state", [
    pytest.param(2, 1, 1, 16, True, id="T1"),
    pytest.param(1, 2, 64, 24, False, id="one-full-chunk-no-state"),
    pytest.param(1, 2, 100, 16, True, id="T100"),
    pytest.param(2, 1, 150, 40, True, id="T150-D40"),
])
def test_triton_cumulative_softmax_equals_naive(B, H, T, D, with_state):
    inputs = make_inputs(B, H, T, D, with_state)
    assert_all_close(run(cumulative_softmax, inputs), reference(inputs), rtol=1e-5)


def test_several_value_blocks(monkeypatch):
    """Blocks of 16 cut D = 40 into two full blocks and a half-masked one; dl sums their parts."""
    monkeypatch.setattr(triton_module, "BLOCK_D", 16)
    inputs = make_inputs(1, 2, 90, 40)
    assert_all_close(run(cumulative_softmax, inputs), reference(inputs), rtol=1e-5)


def test_large_logits_stay_finite():
    """Logits of ±200: e^{l} overflows float32 (e^{88}); every weight the kernels form is e^{l − m} ≤ 1."""
    inputs = make_inputs(1, 2, 130, 16, logit_scale=60.0)
    assert_all_close(run(cumulative_softmax, inputs), reference(inputs), rtol=1e-4)


@pytest.mark.parametrize("use_output, use_final_state", [(True, False), (False, True)],
                         ids=["output-only", "final-state-only"])
def test_gradient_through_output_or_final_state_alone(use_output, use_final_state):
    inputs = make_inputs(1, 2, 77, 16)
    flags = {"use_output": use_output, "use_final_state": use_final_state}
    assert_all_close(run(cumulative_softmax, inputs, **flags), reference(inputs, **flags), rtol=1e-5)


def test_views_of_batch_time_head_memory_are_used_in_place():
    """LEAP passes [B, T, H, D] memory seen as [B, H, T, D]; o and dv come back in that layout."""
    inputs = make_inputs(2, 2, 70, 16, with_state=False)
    logits = inputs["logits"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    v = inputs["v"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    o, _ = cumulative_softmax(logits, v)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
    dl, dv = torch.autograd.grad((o * do).sum(), [logits, v])
    want = run(naive_cumulative_softmax, inputs, torch.float64, use_final_state=False)
    assert_all_close({"o": o, "dlogits": dl, "dv": dv}, {n: want[n] for n in ("o", "dlogits", "dv")}, rtol=1e-5)
    assert o.stride() == v.stride() and dv.stride() == v.stride()


@pytest.mark.skipif(interpreting(), reason="bf16 is checked on the GPU (the interpreter's bf16 dots are wrong)")
def test_bfloat16_values():
    inputs = make_inputs(1, 2, 200, 64)
    got = run(cumulative_softmax, inputs, v_dtype=torch.bfloat16)
    assert got["o"].dtype == torch.bfloat16
    assert_all_close(got, reference(inputs), rtol=2e-2)


def test_a_windowed_state_is_refused_with_the_fix():
    inputs = make_inputs(1, 1, 8, 16, with_state=False)
    state = CumulativeSoftmaxState.empty(1, 1, 16, 4, DEVICE, torch.float32)
    with pytest.raises(ValueError, match="windowed state runs the PyTorch forms"):
        cumulative_softmax(inputs["logits"], inputs["v"], initial_state=state)


def windowed(window):
    """The windowed kernel with the PyTorch forms' signature (it starts from an empty state)."""
    def op(logits, v, initial_state=None, output_final_state=False):
        return windowed_cumulative_softmax(logits, v, window), None
    return op


def run_windowed(op, inputs, dtype=torch.float32, v_dtype=None):
    leaves = {n: inputs[n].detach().to(v_dtype if n == "v" and v_dtype else dtype).clone().requires_grad_()
              for n in ("logits", "v")}
    o, _ = op(leaves["logits"], leaves["v"])
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
    (o * do).sum().backward()
    return {"o": o, "dlogits": leaves["logits"].grad, "dv": leaves["v"].grad}


@pytest.mark.parametrize("T, D, window", [
    pytest.param(100, 16, 4, id="T100-k4"),
    pytest.param(130, 24, 64, id="T130-k64"),
    pytest.param(150, 40, 100, id="T150-D40-k100"),
    pytest.param(200, 16, 500, id="k-beyond-T"),
])
def test_windowed_kernel_equals_naive(T, D, window):
    """Windows shorter than, equal to and longer than a chunk of 64, and longer than the sequence."""
    inputs = make_inputs(1, 2, T, D, with_state=False)
    want = run_windowed(lambda logits, v: naive_cumulative_softmax(logits, v, window=window), inputs, torch.float64)
    assert_all_close(run_windowed(windowed(window), inputs), want, rtol=1e-5)


def test_window_of_one_token_is_the_token_itself():
    """k = 1: o_t = v_t, and the logits get no gradient (up to rounding: v·dv − o·dO cancels)."""
    inputs = make_inputs(1, 1, 70, 16, with_state=False)
    got = run_windowed(windowed(1), inputs)
    torch.testing.assert_close(got["o"], inputs["v"])
    assert got["dlogits"].abs().max() < 1e-5


def test_windowed_large_logits_and_several_value_blocks(monkeypatch):
    """Logits of ±200 (the largest leaves and enters windows) and value blocks of 16 over D = 40."""
    monkeypatch.setattr(triton_window_module, "BLOCK_D", 16)
    inputs = make_inputs(1, 2, 130, 40, with_state=False, logit_scale=60.0)
    want = run_windowed(lambda logits, v: naive_cumulative_softmax(logits, v, window=30), inputs, torch.float64)
    assert_all_close(run_windowed(windowed(30), inputs), want, rtol=1e-4)


@pytest.mark.skipif(interpreting(), reason="bf16 is checked on the GPU (the interpreter's bf16 dots are wrong)")
def test_windowed_bfloat16_values():
    inputs = make_inputs(1, 2, 200, 64, with_state=False)
    want = run_windowed(lambda logits, v: naive_cumulative_softmax(logits, v, window=64), inputs, torch.float64)
    got = run_windowed(windowed(64), inputs, v_dtype=torch.bfloat16)
    assert got["o"].dtype == torch.bfloat16
    assert_all_close(got, want, rtol=2e-2)


@pytest.mark.parametrize("window", ["global", 8], ids=["global", "window8"])
def test_leap_on_the_kernels_equals_leap_on_pytorch(window):
    """A global layer and a windowed one: output and every parameter's gradient."""
    assert_layer_on_kernels_equals_pytorch("leap", {"window": window}, DEVICE)
