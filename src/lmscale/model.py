"""GPT-style language model around any registered sequence mixer.

    tokens ─► embedding ─► n_layers × [x + mixer(RMSNorm(x)); x + MLP(RMSNorm(x))] ─► RMSNorm ─► head
The MLP is a SwiGLU, or a mixture of SwiGLU experts in the layers ``cfg.is_moe_layer`` names. The head
shares the embedding matrix. ``forward`` trains and prefills, ``step`` decodes one token from per-layer
states (KV caches for attention, fixed-size matrices for recurrent mixers). Each block's mixer
is ``cfg.mixer_for_layer(i)``, so a hybrid (say GLA with one attention layer in four) is the same model
with a per-layer list of states of different kinds.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmscale.config import ModelConfig
from lmscale.loss import IGNORE_INDEX, linear_cross_entropy
from lmscale.mixers import build_mixer
from lmscale.mlp import MoE, SwiGLU

# projections that write into the residual stream; their init is scaled by 1/√(2·n_layers) (GPT-2)
RESIDUAL_PROJECTIONS = ("o_proj.weight", "down_proj.weight")


class Block(nn.Module):
    """Pre-norm residual block: mixer, then MLP (a mixture of experts where ``cfg.is_moe_layer``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_mixer(cfg, layer_idx)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = (MoE(cfg.d_model, cfg.d_hidden, cfg.moe_experts, cfg.moe_top_k, cfg.moe_capacity_factor,
                        cfg.mlp_activation)
                    if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.d_model, cfg.d_hidden, cfg.mlp_activation))

    def forward(self, x: Tensor, state: Any = None, return_state: bool = False) -> tuple[Tensor, Any]:
        """x [B, T, D] -> (x [B, T, D], the mixer's final state if ``return_state`` else None)."""
        y = self.mixer(self.mixer_norm(x), state, return_state)
        y, state = y if return_state else (y, None)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        y_t, state = self.mixer.step(self.mixer_norm(x_t), state)
        x_t = x_t + y_t
        return x_t + self.mlp(self.mlp_norm(x_t)), state


class LanguageModel(nn.Module):
    """Decoder-only LM; block i's sequence mixer is ``cfg.mixer_for_layer(i)`` (see ModelConfig)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied: one [V, D] matrix reads tokens in and out
        self.checkpoint_blocks = False  # activation checkpointing, set by the trainer (TrainConfig)
        self.moe_aux_loss: Tensor | None = None  # load-balancing loss of the last forward with targets
        # a layer that reads its first M tokens non-causally (JRT-RNN's encoder) lets outputs before
        # M - 1 see their own next tokens, so those targets carry no loss
        self.unscored_prefix = max([block.mixer.prefix_len - 1 for block in self.blocks
                                    if getattr(block.mixer, "noncausal_prefix", False) and block.mixer.prefix_len]
                                   or [0])
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init for every Linear and the embedding, except parameters a mixer marked
        ``_no_reinit`` because its paper prescribes their initialisation (Mamba's Δ projection, LRU's B, C)."""
        std = self.cfg.init_std

        def reinit(p: nn.Parameter | None) -> bool:
            return p is not None and not getattr(p, "_no_reinit", False)

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and reinit(module.weight):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and reinit(module.bias):
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS) and reinit(p):  # residual variance O(1) in depth
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))

    def forward(
        self, idx: Tensor, state: list[Any] | None = None, return_state: bool = False,
        targets: Tensor | None = None, loss_impl: str = "auto", loss_reduction: str = "mean",
        last_only: bool = False,
    ) -> Tensor | tuple[Tensor, list[Any]]:
        """idx [B, T] -> logits [B, T, V], continuing from per-layer ``state`` (None: empty).

        ``last_only`` gives the last position's logits alone, [B, 1, V]: what a prefill needs before
        decoding (at B = 16 and T = 128K, all logits in bf16 would take 200 GB).

        With ``targets`` [B, T] it returns the next-token loss instead of the logits, computed with the
        head chunk by chunk (``lmscale.loss``): the [B·T, V] logits are never materialised. In training
        mode a mixture-of-experts model adds ``moe_aux_loss_coef`` × its load-balancing loss to a mean
        loss (the objective); ``moe_aux_loss`` keeps that loss (detached), averaged over the MoE layers, for logs.
        """
        states = [None] * len(self.blocks) if state is None else state
        x = self.embed(idx)  # (B, T, D)
        new_states = []
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block, layer_state in zip(self.blocks, states, strict=True):
            if recompute:  # keep only each block's input; its activations are recomputed in the backward
                x, layer_state = checkpoint(block, x, layer_state, return_state, use_reentrant=False)
            else:
                x, layer_state = block(x, layer_state, return_state)
            new_states.append(layer_state)
        if targets is not None:
            if self.unscored_prefix and state is None:
                targets = targets.clone()
                targets[..., : self.unscored_prefix] = IGNORE_INDEX
            out = linear_cross_entropy(self.norm(x), self.head.weight, targets, reduction=loss_reduction,
                                       impl=loss_impl)
            if self.cfg.moe_experts:
                aux = torch.stack([b.mlp.aux_loss for b in self.blocks if isinstance(b.mlp, MoE)]).mean()
                self.moe_aux_loss = aux.detach()
                if self.training and loss_reduction == "mean":
                    out = out + self.cfg.moe_aux_loss_coef * aux
        else:
            out = self.head(self.norm(x[:, -1:] if last_only else x))  # (B, T or 1, V)
        return (out, new_states) if return_state else out

    def step(self, idx_t: Tensor, state: list[Any]) -> tuple[Tensor, list[Any]]:
        """Decode one token per sequence: idx_t [B] -> (logits [B, V], new per-layer states)."""
        x_t = self.embed(idx_t)  # (B, D)
        new_states = []
        for block, layer_state in zip(self.blocks, state, strict=True):
            x_t, layer_state = block.step(x_t, layer_state)
            new_states.append(layer_state)
        return self.head(self.norm(x_t)), new_states

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> list[Any]:
        """Per-layer states before any token."""
        return [block.mixer.init_state(batch_size, device, dtype) for block in self.blocks]

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count, the tied embedding/head once; ``non_embedding`` leaves it out (Kaplan's N);
        ``active`` counts, in each mixture of experts, only the ``moe_top_k`` experts a token uses."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            n -= sum(sum(p.numel() for p in b.mlp.experts.parameters()) * (1 - b.mlp.top_k / len(b.mlp.experts))
                     for b in self.blocks if isinstance(b.mlp, MoE))
        return int(n - self.embed.weight.numel() if non_embedding else n)

    def flops_per_token(self, seq_len: int) -> float:
        """Analytic forward FLOPs per token at context ``seq_len``: mixers' cost, the MLPs a token uses
        (``moe_top_k`` experts and the router in an MoE layer) and the head.

        Matmuls only (2·m·n·k), as in ``Mixer.cost``; training is ≈ 3× this (forward + backward).
        """
        cfg = self.cfg
        mixers = sum(block.mixer.cost(seq_len).flops for block in self.blocks) / seq_len
        mlp = 3 * 2 * cfg.d_model * cfg.d_hidden
        moe = cfg.moe_layers * (cfg.moe_top_k * mlp + 2 * cfg.d_model * cfg.moe_experts)
        mlps = (cfg.n_layers - cfg.moe_layers) * mlp + moe
        head = 2 * cfg.d_model * cfg.vocab_size
        return mixers + mlps + head
