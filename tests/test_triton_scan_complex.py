"""The LRU's Triton scan equals the naive complex scan: outputs, final states and every gradient
(PyTorch's conjugate-Wirtinger convention), and the LRU mixer gives the same function through it.

Inputs are drawn on the CPU and moved to the GPU when there is one; without one the kernels run in
Triton's interpreter (conftest sets TRITON_INTERPRET=1), so sizes are tiny.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmscale.config import ModelConfig
from lmscale.mixers import build_mixer
from lmscale.ops.diagonal_scan import naive_diagonal_scan

pytest.importorskip("triton")
from lmscale.ops.triton.scan_complex import complex_diagonal_scan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, T, N, dtype, with_state=True, seed=0):
    """λ [N] with |λ| uniform in (0, 1) and any phase; b [B, T, N], h0 [B, N] complex Gaussians."""
    torch.manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    lam = torch.polar(torch.rand(N, dtype=real), math.pi * (2 * torch.rand(N, dtype=real) - 1))
    b = torch.randn(B, T, N, dtype=dtype)
    h0 = torch.randn(B, N, dtype=dtype) if with_state else None
    return lam.to(DEVICE), b.to(DEVICE), None if h0 is None else h0.to(DEVICE)


def run(op, lam, b, h0, use_h=True, use_final=True):
    """Output, final state and the gradients of a random real loss of h and/or the final state."""
    leaves = [t.clone().requires_grad_() for t in (lam, b, h0) if t is not None]
    h, final = op(*leaves[:2], leaves[2] if h0 is not None else None, output_final_state=True)
    gen = torch.Generator().manual_seed(1)
    dh, dfinal = (torch.randn(t.shape, dtype=t.dtype, generator=gen).to(DEVICE) for t in (h, final))
    loss = use_h * (h * dh).real.sum() + use_final * (final * dfinal).real.sum()
    loss.backward()
    return [h, final, *(t.grad for t in leaves)]


def assert_all_close(got, want, rtol):
    assert len(got) == len(want)
    for name, g, w in zip(["h", "final", "dλ", "db", "dh0"], got, want):
        assert g.dtype == w.dtype, name
        err, ref = (g - w).abs().max().item(), w.abs().max().item()
        assert err <= rtol * ref, f"{name}: max error {err:.3g} vs max |ref| {ref:.3g}"


@pytest.mark.parametrize("B, T, N", [(2, 1, 8), (1, 37, 70), (2, 20, 5)], ids=["T1", "B1-two-blocks", "N5"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
@pytest.mark.parametrize("dtype, rtol", [(torch.complex64, 1e-5), (torch.complex128, 1e-12)],
                         ids=["c64", "c128"])
def test_equals_naive_scan_with_gradients(B, T, N, with_state, dtype, rtol):
    inputs = make_inputs(B, T, N, dtype, with_state)
    assert_all_close(run(complex_diagonal_scan, *inputs), run(naive_diagonal_scan, *inputs), rtol)


@pytest.mark.parametrize("use_h, use_final", [(True, False), (False, True)], ids=["h-only", "final-only"])
def test_a_loss_of_one_output_only(use_h, use_final):
    """The other output gets no cotangent (None reaches the backward): it must count as zero."""
    inputs = make_inputs(2, 11, 6, torch.complex128)
    got = run(complex_diagonal_scan, *inputs, use_h=use_h, use_final=use_final)
    assert_all_close(got, run(naive_diagonal_scan, *inputs, use_h=use_h, use_final=use_final), 1e-12)


def test_gradcheck_complex128():
    """Finite differences of the real and imaginary parts, as torch.autograd.gradcheck does for complex."""
    lam, b, h0 = make_inputs(1, 5, 3, torch.complex128)
    inputs = tuple(t.requires_grad_() for t in (lam, b, h0))
    assert torch.autograd.gradcheck(lambda *x: complex_diagonal_scan(*x, output_final_state=True), inputs)


def test_final_state_only_when_asked_and_inputs_checked():
    lam, b, _ = make_inputs(2, 4, 3, torch.complex64)
    h, final = complex_diagonal_scan(lam, b)
    assert final is None and h.shape == b.shape and h.dtype == torch.complex64
    with pytest.raises(ValueError, match="complex a"):
        complex_diagonal_scan(lam.abs(), b)
    with pytest.raises(ValueError, match="initial_state must be"):
        complex_diagonal_scan(lam, b, torch.zeros(2, 4, dtype=torch.complex64, device=DEVICE))


def test_lru_mixer_triton_equals_torch():
    """Output, final state and every parameter gradient, from a given state; then one decoding step."""
    def make(impl):
        torch.manual_seed(0)
        cfg = ModelConfig(mixer="lru", d_model=16, n_heads=2, mixer_options={"impl": impl, "d_state": 12})
        return build_mixer(cfg, layer_idx=0).to(DEVICE)

    torch.manual_seed(1)
    x, dy, h0 = torch.randn(2, 13, 16), torch.randn(2, 13, 16), torch.randn(2, 12, dtype=torch.complex64)
    x, dy, h0 = x.to(DEVICE), dy.to(DEVICE), h0.to(DEVICE)
    results = []
    for impl in ("torch", "triton"):
        mixer = make(impl)
        y, state = mixer(x, state=h0, return_state=True)
        ((y * dy).sum() + state.abs().sum()).backward()
        y_t, step_state = mixer.step(x[:, 0], state)
        results.append([y, state, y_t, step_state, *(p.grad for p in mixer.parameters())])
    for got, want in zip(*reversed(results), strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
