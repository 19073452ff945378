"""The channel mixers of a block: the dense SwiGLU MLP, and a mixture of SwiGLU experts (Mixtral style).

A mixture-of-experts layer routes each token to ``top_k`` of ``experts`` SwiGLU MLPs (Shazeer et al.
2017; Lepikhin et al. 2021; Fedus et al. 2022; Jiang et al. 2024): a linear router scores the experts, a softmax over all of
them gives probabilities, the ``top_k`` highest are kept and renormalised to sum to one (Mixtral), and
the token's output is their weighted sum. Two things make it train:

- **load balance.** The auxiliary loss of Switch Transformer, ``E · Σ_e f_e · P_e``, with ``f_e`` the
  share of the (token, choice) assignments that went to expert e and ``P_e`` the mean router
  probability of e. It is 1 when routing is uniform and grows as it collapses onto few experts.
- **capacity.** With ``capacity_factor`` c, an expert takes at most ``⌈c · N · k / E⌉`` of a batch's N
  tokens. Assignments are served first choices first, then in token order (GShard); the ones past
  capacity are dropped, so that token gets only its other experts (and the residual). ``None`` is
  dropless: no assignment is ever dropped, as in Mixtral and MegaBlocks.

The balance loss is taken over the tokens of one forward: under DDP or FSDP, each process's share of
a micro-batch (as in Switch and Mixtral). So unlike a dense model, a mixture-of-experts run's objective
depends a little on how its global batch is laid out over processes and micro-steps.

Every expert runs in every forward, on however many tokens it got (zero included), so each expert
is in the autograd graph: DDP then needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"silu": F.silu, "relu": F.relu}


class SwiGLU(nn.Module):
    """Gated MLP: down(act(gate(x)) ⊙ up(x)), hidden width ``d_hidden``. ``act`` is SiLU (SwiGLU) or ReLU
    (ReGLU, Shazeer 2020): ReLU's exact zeros are events an event-driven chip can skip."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """``top_k`` of ``experts`` SwiGLU MLPs per token, chosen by a linear router.

    After each forward, ``aux_loss`` holds the load-balancing loss of that batch (a tensor in the
    graph), ``dropped`` the number of (token, choice) assignments past capacity, and ``load`` each
    expert's share of the assignments (both detached, for logs and tests).
    """

    def __init__(self, d_model: int, d_hidden: int, experts: int, top_k: int, capacity_factor: float | None = None,
                 activation: str = "silu"):
        super().__init__()
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, d_hidden, activation) for _ in range(experts))
        self.aux_loss: Tensor | None = None
        self.dropped: int = 0
        self.load: Tensor | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last batch's balance loss, a tensor of that batch's graph."""
        return {**self.__dict__, "aux_loss": None}

    def capacity(self, tokens: int) -> int | None:
        """Most assignments one expert takes from a batch of ``tokens`` tokens (None: no limit)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / len(self.experts))

    def forward(self, x: Tensor) -> Tensor:
        shape, n_experts = x.shape, len(self.experts)
        x = x.reshape(-1, shape[-1])
        tokens = x.shape[0]
        # [N, E], at least float32 whatever the autocast: bf16 probabilities would tie and flip choices
        probs = self.router(x).softmax(dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # assignments in serving order: every token's first choice, then every token's second, ...
        expert_of = chosen.t().reshape(-1)
        token_of = torch.arange(tokens, device=x.device).repeat(self.top_k)
        weight_of = weights.t().reshape(-1)
        order = torch.argsort(expert_of, stable=True)  # grouped by expert, serving order kept within
        counts = torch.bincount(expert_of, minlength=n_experts)
        load = counts.float() / expert_of.numel()
        self.aux_loss = n_experts * (load * probs.mean(dim=0)).sum()
        self.load = load.detach()
        capacity = self.capacity(tokens)
        served = counts if capacity is None else counts.clamp(max=capacity)
        self.dropped = int(expert_of.numel() - served.sum())
        out = torch.zeros_like(x)
        starts = [0, *torch.cumsum(counts, 0).tolist()]
        for e, (expert, n) in enumerate(zip(self.experts, served.tolist(), strict=True)):
            picked = order[starts[e] : starts[e] + n]
            rows = token_of[picked]
            y = expert(x[rows]) * weight_of[picked, None].to(x.dtype)
            out = out.index_add(0, rows, y.to(out.dtype))
        return out.reshape(shape)
