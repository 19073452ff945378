"""Low precision for the neuromorphic question: weights, activations and the recurrent state in few bits.

Neuromorphic and edge chips compute in integers (Loihi 2: up to 8-bit weights and graded spikes;
NorthPole: 8, 4 and 2 bits). What precision a mixer survives is measured here by fake quantisation:
values are rounded to the integer grid and scaled back, so the loss is the quantised model's while
the arithmetic stays in floating point (the standard way to measure accuracy; an integer kernel
computes the same numbers). Schemes:

- ``int8``: int8 weights per output channel and int8 activations per token (dynamic), the W8A8
  baseline of LLM post-training quantisation; torchao's fake quantisers.
- ``w4``: int4 weights in groups of ``W4_GROUP`` along the input (one scale per row where the groups do
  not divide the width), round to nearest (the baseline that GPTQ and AWQ improve on); activations in
  float; torchao's fake quantisers.
- ``ternary``: BitNet b1.58 (Ma et al. 2024): weights in {−1, 0, 1} times their mean absolute value,
  activations int8 per token by their absolute maximum. Applied after training it shows how far a
  float model is from ternary; trained with it (``TrainConfig.quantize``, straight-through gradients)
  it is the real method. Written here: torchao has no absmean ternary quantiser.

The linear layers of the blocks (every mixer's projections and the MLPs) are quantised; the
embedding and the tied head stay in float, as in BitNet and in most LLM quantisation studies, and so
do a mixer's small non-matrix parameters (decay rates, convolution taps, norms). ``quantize_model``
reports the share of the blocks' parameters it quantised.

The decode state is quantised by ``quantize_state`` after every step: each row of each state tensor
(its last dimension) to ``bits`` bits by its absolute maximum, real and imaginary parts apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmscale.config import ConfigError

SCHEMES = {
    "int8": "int8 weights per output channel, int8 activations per token",
    "w4": "int4 weights in groups along the input; float activations",
    "ternary": "BitNet b1.58: ternary weights (absmean), int8 activations per token",
}
STATE_BITS = (8, 4)
W4_GROUP = 32


@dataclass(frozen=True)
class QuantReport:
    scheme: str
    layers: int  # linear layers replaced
    quantized_params: int
    block_params: int  # every parameter of the blocks: the quantised share is quantized_params / block_params


def _fake_quantize_rows(x: Tensor, bits: int) -> Tensor:
    """Symmetric, one scale per row of the last dimension: round(x / s)·s with s = max|row| / (2^(bits−1) − 1)."""
    if not x.numel():
        return x
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) / qmax
    return (x / scale).round().clamp(-qmax - 1, qmax) * scale


class BitLinear(nn.Linear):
    """BitNet b1.58's linear layer: ternary absmean weights and int8 absmax activations, straight-through."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        scale = w.abs().mean().clamp_min(1e-5)
        w_q = w + ((w / scale).round().clamp(-1, 1) * scale - w).detach()
        x_q = x + (_fake_quantize_rows(x, 8) - x).detach()
        return nn.functional.linear(x_q, w_q, self.bias)


def _linear_config(scheme: str, in_features: int):
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    if scheme == "int8":
        return {"activation_config": IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                "weight_config": IntxFakeQuantizeConfig(torch.int8, granularity="per_channel")}
    if in_features % W4_GROUP:  # a width the groups do not divide (a solved MLP width): one scale per row
        return {"weight_config": IntxFakeQuantizeConfig(torch.int4, granularity="per_channel")}
    return {"weight_config": IntxFakeQuantizeConfig(torch.int4, group_size=W4_GROUP)}


def supported(model: nn.Module) -> dict[str, str]:
    """The schemes this model can take, each with why not if it cannot (empty string: supported)."""
    why = {}
    linears = [m for block in model.blocks for m in block.modules() if isinstance(m, nn.Linear)]
    for scheme in SCHEMES:
        why[scheme] = "" if linears else "the blocks have no linear layers to quantise"
    return why


def quantize_model(model: nn.Module, scheme: str) -> QuantReport:
    """Replace the blocks' linear layers in place by ``scheme``'s fake-quantised ones (weights shared)."""
    if scheme not in SCHEMES:
        raise ConfigError("quantize", scheme, f"unknown scheme; choose one of {', '.join(SCHEMES)}")
    reasons = supported(model)
    if reasons[scheme]:
        ok = [s for s, r in reasons.items() if not r]
        raise ConfigError("quantize", scheme, f"not supported for mixer {model.cfg.mixer}: {reasons[scheme]}; "
                          f"supported here: {', '.join(ok) or 'none'}")
    block_params = sum(p.numel() for block in model.blocks for p in block.parameters())
    layers = quantized = 0
    for block in model.blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                if scheme == "ternary":
                    new = BitLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=child.weight.device, dtype=child.weight.dtype)
                    new.weight, new.bias = child.weight, child.bias
                else:
                    from torchao.quantization.qat import FakeQuantizedLinear

                    new = FakeQuantizedLinear.from_linear(child, **_linear_config(scheme, child.in_features))
                setattr(parent, name, new)
                layers += 1
                quantized += child.weight.numel()
    return QuantReport(scheme, layers, quantized, block_params)


def quantize_state(state: Any, bits: int) -> Any:
    """The same state with every floating tensor held in ``bits`` bits (row-wise); other leaves unchanged."""
    if bits not in STATE_BITS:
        raise ConfigError("state_bits", bits, f"choose one of {STATE_BITS}")
    if isinstance(state, Tensor):
        if state.is_complex():
            return torch.complex(_fake_quantize_rows(state.real, bits), _fake_quantize_rows(state.imag, bits))
        return _fake_quantize_rows(state, bits) if state.is_floating_point() else state
    if dataclasses.is_dataclass(state):  # e.g. a KV cache: its tensors, not its offsets
        return dataclasses.replace(state, **{f.name: quantize_state(getattr(state, f.name), bits)
                                             for f in dataclasses.fields(state)})
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple
        return type(state)(*(quantize_state(s, bits) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(quantize_state(s, bits) for s in state)
    if isinstance(state, dict):
        return {k: quantize_state(v, bits) for k, v in state.items()}
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise ConfigError("state_bits", bits, f"cannot quantise a state leaf of type {type(state).__name__}; "
                      "the mixer's state must be tensors in dataclasses, tuples, lists or dicts")
