"""What GLA and simple GLA share: a layer around the gated recurrence with a single matrix state.

Both project x to q, k, v and a log decay, run ``gated_recurrence`` (chunked, or the Triton kernel)
over the sequence and ``recurrent_step`` to decode, and read the output out through their own norm
and gate; they differ only in how they project (the decay's shape) and read out. RetNet keeps its own
layer: its state also carries the position its rotary phases continue from.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from lmscale.mixers.base import Mixer
from lmscale.ops.gated_recurrence import gated_recurrence, recurrent_step
from lmscale.ops.gated_recurrence.naive import compute_dtype


class GatedLinearMixer(Mixer):
    """A gated-recurrence layer whose state is one [H, head_k_dim, head_v_dim] matrix.

    Subclasses set ``n_heads``, ``head_k_dim``, ``head_v_dim``, ``form``, ``chunk_size``, ``impl`` and
    define ``_project`` (x -> q, k, v, log_g in [B, H, T, ·]) and ``_readout`` (o, x -> y).
    """

    n_heads: int
    head_k_dim: int
    head_v_dim: int
    form: str
    chunk_size: int
    impl: str

    @abc.abstractmethod
    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...

    @abc.abstractmethod
    def _readout(self, o: Tensor, x: Tensor) -> Tensor: ...

    def forward(
        self, x: Tensor, state: Tensor | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        q, k, v, log_g = self._project(x)
        o, final_state = gated_recurrence(q, k, v, log_g, form=self.form, chunk_size=self.chunk_size,
                                          initial_state=state, output_final_state=return_state, impl=self.impl)
        y = self._readout(o, x)
        return (y, final_state) if return_state else y

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v, log_g = (t[:, :, 0] for t in self._project(x_t.unsqueeze(1)))  # (B, H[, D])
        o_t, state = recurrent_step(q, k, v, log_g, state, impl=self.impl)
        return self._readout(o_t.unsqueeze(2), x_t.unsqueeze(1)).squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        shape = (batch_size, self.n_heads, self.head_k_dim, self.head_v_dim)
        return torch.zeros(shape, device=device, dtype=compute_dtype(dtype))

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """One [H, D_k, D_v] matrix whatever the context length, kept in at least float32."""
        return self.n_heads * self.head_k_dim * self.head_v_dim * compute_dtype(dtype).itemsize
