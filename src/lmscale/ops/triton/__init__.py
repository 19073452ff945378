"""Triton kernels for the recurrent ops, and the rule that decides when a mixer uses them.

The PyTorch forms in the sibling packages are the references; every kernel here is tested against
them (outputs, gradients, final states), on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, set before this package is imported) and on the GPU at full size by
``lmscale bench kernels`` before it times anything.

``impl`` is the mixers' option: ``"auto"`` runs Triton on CUDA tensors when Triton is installed and
PyTorch otherwise; ``"triton"`` insists (an error says why it cannot); ``"torch"`` never uses Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

IMPLS = ("auto", "triton", "torch")
# Head widths the gated-recurrence kernels are tested at. Every kernel tiles D_k and D_v, so this bounds
# what the tests cover rather than a register budget: up to Based's and JRT's widest Taylor feature map,
# 1 + F + F² = 1057 key channels at F = 32.
MAX_HEAD_DIM = 1057
# the delta rule's sequential passes hold all D_k key channels of a state block in registers
DELTA_RULE_MAX_HEAD_DIM = 128
KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's CPU interpreter runs kernels on CPU tensors (slowly): what CI tests them with."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def use_triton(impl: str, x: Tensor, head_dims: tuple[int, ...] = (), max_head_dim: int = MAX_HEAD_DIM) -> bool:
    """Whether an op on ``x`` runs its Triton kernel under the mixer option ``impl``.

    ``head_dims``: the per-head widths the kernel must hold (e.g. D_k, D_v). Shapes or dtypes the
    kernels do not cover (float64, heads wider than ``MAX_HEAD_DIM``) run in PyTorch under ``"auto"``
    and are an error under ``"triton"``. ``max_head_dim``: the
    op's own limit where lower (the delta rule's ``DELTA_RULE_MAX_HEAD_DIM``).
    """
    if impl == "torch":
        return False
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, not {impl!r}")
    covered = x.dtype in KERNEL_DTYPES and all(d <= max_head_dim for d in head_dims)
    if impl == "auto":
        return x.is_cuda and covered and triton_installed()
    if not covered:
        raise ValueError(f"impl='triton' covers dtypes {[str(d) for d in KERNEL_DTYPES]} and head widths up to "
                         f"{max_head_dim}, got {x.dtype} and widths {list(head_dims)}; use impl='auto' or 'torch'")
    if not triton_installed():
        raise RuntimeError("impl='triton' needs the triton package (pip install triton, or a CUDA "
                           "build of torch, which ships it); impl='auto' falls back to PyTorch")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(f"impl='triton' needs CUDA tensors, got a {x.device.type} tensor; run on a GPU, "
                           "set TRITON_INTERPRET=1 before importing lmscale to interpret the kernels on "
                           "the CPU (slow), or use impl='auto'")
    return True
