"""What the Triton kernel tests share: the closeness rule, and a layer on the kernels against itself on
PyTorch (imported by the ``test_triton_*`` files; pytest puts this folder on the import path)."""

from __future__ import annotations

import torch

from lmscale.config import ModelConfig
from lmscale.mixers import build_mixer


def assert_all_close(got, want, rtol=1e-4, floor=1e-6):
    """|got − want|∞ ≤ rtol · max(|want|∞, floor) per tensor, every tensor finite; a gradient the
    reference does not have (None) must be absent or zero."""
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None or not got[name].any(), f"{name} should be zero"
            continue
        assert torch.isfinite(got[name]).all(), f"{name} is not finite"
        err = (got[name].double() - want[name].double()).abs().max().item()
        ref = want[name].abs().max().item()
        assert err <= rtol * max(ref, floor), f"{name}: max error {err:.3g} vs max |ref| {ref:.3g}"


def assert_layer_on_kernels_equals_pytorch(mixer, options, device, rtol=1e-4):
    """impl='triton' (the interpreter on the CPU, the GPU there) against impl='torch' with the same
    weights: the layer's output and every parameter's gradient, at a small width over 70 tokens."""
    torch.manual_seed(0)
    cfgs = {impl: ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, mixer=mixer,
                              mixer_options={**options, "impl": impl}) for impl in ("triton", "torch")}
    layers = {impl: build_mixer(cfg, 0).to(device) for impl, cfg in cfgs.items()}
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(2, 70, 32, device=device)
    out = {}
    for impl, layer in layers.items():
        y = layer(x)
        y.square().sum().backward()
        out[impl] = {"y": y, **{n: p.grad for n, p in layer.named_parameters()}}
    assert_all_close(out["triton"], out["torch"], rtol=rtol)
