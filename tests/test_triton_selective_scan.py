"""The fused selective scan equals Mamba's PyTorch computation — discretise, scan, read out — in outputs,
final states and the gradients of every input; and the Mamba mixer gives the same function through it.

Inputs are drawn on the CPU and moved to the GPU when there is one; without one the kernels run in
Triton's interpreter (conftest sets TRITON_INTERPRET=1), so sizes are tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmscale.config import ModelConfig
from lmscale.mixers import build_mixer
from lmscale.ops.diagonal_scan import naive_diagonal_scan

pytest.importorskip("triton")
from lmscale.ops.triton.selective_scan import selective_scan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(u, delta, A, B, C, initial_state=None, output_final_state=False):
    """What mamba.py computes: Ā = exp(ΔA), B̄u = Δ u Bᵀ as [B, T, D, N], the scan, then y = h C."""
    a = torch.exp(delta.unsqueeze(-1) * A)
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(-2)
    h, final = naive_diagonal_scan(a, b, initial_state, output_final_state)
    return (h * C.unsqueeze(-2)).sum(-1), final


def make_inputs(Bsz, T, D, N, dtype, with_state=True, seed=0):
    """Δ = softplus(Gaussian) as the mixer makes it, A = −exp(Gaussian), the rest Gaussian."""
    torch.manual_seed(seed)
    inputs = {
        "u": torch.randn(Bsz, T, D, dtype=dtype),
        "delta": F.softplus(torch.randn(Bsz, T, D, dtype=dtype)),
        "A": -torch.randn(D, N, dtype=dtype).exp(),
        "B": torch.randn(Bsz, T, N, dtype=dtype),
        "C": torch.randn(Bsz, T, N, dtype=dtype),
        "initial_state": torch.randn(Bsz, D, N, dtype=dtype) if with_state else None,
    }
    return {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}


def run(op, inputs, use_y=True, use_final=True, **kwargs):
    """y, the final state, and the gradients of a random loss of them w.r.t. every given input."""
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items() if t is not None}
    y, final = op(**leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    dy, dfinal = (torch.randn(t.shape, dtype=t.dtype, generator=gen).to(DEVICE) for t in (y, final))
    (use_y * (y * dy).sum() + use_final * (final * dfinal).sum()).backward()
    return {"y": y, "final_state": final, **{f"d{n}": t.grad for n, t in leaves.items()}}


def assert_all_close(got, want, rtol):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        err, ref = (got[name] - want[name]).abs().max().item(), want[name].abs().max().item()
        assert err <= rtol * ref, f"{name}: max error {err:.3g} vs max |ref| {ref:.3g}"


SHAPES = [  # B, T, D, N, checkpoint_every
    pytest.param(2, 1, 8, 4, 4, id="T1"),
    pytest.param(2, 37, 40, 5, 8, id="chunks-partial-two-D-blocks"),
    pytest.param(1, 20, 16, 16, 64, id="B1-one-chunk"),
]


@pytest.mark.parametrize("Bsz, T, D, N, chunk", SHAPES)
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_equals_mamba_reference_with_gradients(Bsz, T, D, N, chunk, with_state, dtype, rtol):
    inputs = make_inputs(Bsz, T, D, N, dtype, with_state)
    assert_all_close(run(selective_scan, inputs, checkpoint_every=chunk), run(reference, inputs), rtol)


@pytest.mark.parametrize("use_y, use_final", [(True, False), (False, True)], ids=["y-only", "final-only"])
def test_a_loss_of_one_output_only(use_y, use_final):
    inputs = make_inputs(2, 13, 8, 3, torch.float64)
    got = run(selective_scan, inputs, use_y=use_y, use_final=use_final, checkpoint_every=4)
    assert_all_close(got, run(reference, inputs, use_y=use_y, use_final=use_final), 1e-12)


def test_without_grad_no_checkpoints_and_same_result():
    inputs = make_inputs(1, 9, 8, 4, torch.float32)
    with torch.no_grad():
        y, final = selective_scan(**inputs, output_final_state=True)
    want_y, want_final = reference(**inputs, output_final_state=True)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, want_final, rtol=1e-5, atol=1e-5)
    assert selective_scan(**inputs)[1] is None


def test_shapes_are_checked():
    inputs = make_inputs(1, 9, 8, 4, torch.float32)
    inputs["C"] = inputs["C"][:, :, :3]
    with pytest.raises(ValueError, match=r"so C must be \(1, 9, 4\)"):
        selective_scan(**inputs)


def make_mamba(impl):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer="mamba", d_model=16, n_heads=2, mixer_options={"impl": impl, "d_state": 5})
    return build_mixer(cfg, layer_idx=0).to(DEVICE)  # d_inner 32, N 5


def test_mamba_mixer_triton_equals_torch():
    """Output, final state (conv window and h) and every parameter gradient, from a random state."""
    torch.manual_seed(1)
    x, dy = torch.randn(2, 13, 16).to(DEVICE), torch.randn(2, 13, 16).to(DEVICE)
    results = []
    for impl in ("torch", "triton"):
        mixer = make_mamba(impl)
        state = mixer.init_state(2, "cpu", torch.float32)
        torch.manual_seed(2)
        state = type(state)(torch.randn_like(state.conv).to(DEVICE), torch.randn_like(state.ssm).to(DEVICE))
        y, final = mixer(x, state=state, return_state=True)
        ((y * dy).sum() + final.ssm.square().sum()).backward()
        results.append([y, final.conv, final.ssm, *(p.grad for p in mixer.parameters())])
    for got, want in zip(*reversed(results), strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_mamba_step_through_the_kernel_equals_torch():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 16).to(DEVICE)
    outputs = []
    for impl in ("torch", "triton"):
        mixer = make_mamba(impl)
        y, state = mixer(x[:, :4], return_state=True)
        steps = []
        for t in range(4, 6):
            y_t, state = mixer.step(x[:, t], state)
            steps.append(y_t)
        outputs.append([y, torch.stack(steps, 1), state.ssm])
    for got, want in zip(*outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
