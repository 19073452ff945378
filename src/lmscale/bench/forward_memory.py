"""The peak memory of one forward pass, traced on the meta device: what the eager PyTorch forms allocate.

A CPU has no out-of-memory error to catch: an allocation larger than the machine either fails inside
the allocator or, worse, the kernel's OOM killer ends the process and takes a whole sweep with it. The
generic per-token estimate cannot see a form's own intermediates (Mamba's chunk scan holds
[B, T, chunk, d_inner, N] pairwise decays: 24 GiB at 50M, B = 16, T = 1024), so the benchmark traces the
forward instead. On ``meta`` tensors every op runs without data, so the trace costs milliseconds at any
size, and it takes the same PyTorch forms as a CPU (the Triton kernels are for CUDA tensors only).
"""

from __future__ import annotations

import weakref
from typing import Any


def live_bytes_mode():
    """A dispatch mode that counts the bytes of every tensor an op allocates while it is alive, and the peak.

    Outputs that the op's schema declares aliases of an input (views, in-place and ``out=`` results) add
    nothing. Tensors made before the mode (weights, inputs) are not counted: the caller adds what it
    already holds.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self._tracked: set[int] = set()  # ids of the live tensors counted (tensors compare by value)

        def _release(self, key: int, nbytes: int) -> None:
            self._tracked.discard(key)
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            aliased = [r.alias_info is not None for r in func._schema.returns] or [False]
            fresh = [t for i, t in enumerate(tree_flatten(out)[0])  # a list return (split) is one schema entry
                     if isinstance(t, torch.Tensor) and not aliased[min(i, len(aliased) - 1)]]
            for t in fresh:
                if id(t) not in self._tracked:
                    nbytes = t.untyped_storage().nbytes()
                    self._tracked.add(id(t))
                    self.live += nbytes
                    weakref.finalize(t, self._release, id(t), nbytes)
            self.peak = max(self.peak, self.live)
            return out

    return LiveBytes()


def traced_forward_bytes(cfg: Any, batch_size: int, tokens: int, dtype: Any) -> int:
    """Peak bytes a no-grad forward of ``batch_size`` × ``tokens`` allocates beyond the weights, with the
    final state kept and the last position's logits only (the benchmark's prefill call), in ``dtype``."""
    import torch

    from lmscale.model import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(cfg).to(dtype=dtype).eval()
        idx = torch.zeros(batch_size, tokens, dtype=torch.long)
    with torch.no_grad(), live_bytes_mode() as mode:
        model(idx, return_state=True, last_only=True)
    return mode.peak
