"""Next-token loss computed with the LM head, without the ``[tokens, vocab]`` logits.

The logits are a training step's largest tensor: 32K tokens × 50,257 classes are 6.6 GB in float32,
and their gradient as much again, for a 350M model whose weights and optimiser state take 5.6 GB.
``linear_cross_entropy`` takes the final hidden states and the head's weight and returns the loss;
no more than one chunk of logits ever exists.

Implementations (``impl``):
- ``"chunked"``: PyTorch. One pass over chunks of tokens computes each chunk's logits, its loss and,
  when gradients are needed, the chunk's gradients with respect to the hidden states and the weight
  (softmax minus one-hot times W, and its transpose times the hidden states). The backward only scales
  what the forward kept, so the step does the three matmuls of the plain loss, never a fourth.
- ``"liger"``: Liger-Kernel's fused linear cross-entropy, the same algorithm with the softmax and its
  gradient fused in Triton (CUDA only; taken when the package is installed).
- ``"full"``: the plain head and ``F.cross_entropy`` over all logits; the reference the others are
  tested against, and what a reader would write.
- ``"auto"``: ``liger`` on CUDA when gradients are needed and the package is there, else ``chunked``.

Every implementation works in the hidden states' dtype for the matmuls (bf16 under autocast, as the
plain head's ``nn.Linear`` would) and in float32 for the softmax, logsumexp and the loss.

The fused implementations pad the classes to a multiple of ``PAD_CLASSES_TO`` with zero rows of the
weight whose logits are pushed to ``MASKED_LOGIT`` (a bias for Liger, a fill for the chunked form),
so they get no probability and no gradient: the loss is exactly that of the 50,257 classes. GPT-2's
odd class count makes cuBLAS fall back to unaligned tensor-core kernels (``…_align1``): on an H100
the head's three matmuls took 88 ms of a 320 ms step at 350M (issue 13's first profile).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscale.config import IGNORE_INDEX, LOSS_IMPLS

PAD_CLASSES_TO = 64  # 50,257 -> 50,304 classes: every matmul's class dimension 128-byte aligned in bf16
MASKED_LOGIT = -1e4  # a padded class's logit: exp(-1e4 - max) is 0 in float32, and no inf enters any sum
CHUNK_LOGIT_BYTES = 256 * 2**20  # float32 logits of one chunk: 1,335 tokens at GPT-2's vocabulary


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_impl(impl: str, device: torch.device, needs_grad: bool) -> str:
    """The implementation ``impl`` means on ``device``; raises ValueError naming the fix when it cannot run."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss implementation {impl!r} is unknown; choose one of {', '.join(LOSS_IMPLS)}")
    if impl == "auto":
        return "liger" if device.type == "cuda" and needs_grad and liger_available() else "chunked"
    if impl == "liger":
        if device.type != "cuda":
            raise ValueError(f"loss implementation 'liger' runs on CUDA only, not on {device.type}; use 'chunked'")
        if not liger_available():
            raise ValueError("loss implementation 'liger' needs the liger-kernel package (pip install liger-kernel); "
                             "or use 'chunked'")
    return impl


def chunk_rows(vocab_size: int, n_tokens: int, logit_bytes: int = CHUNK_LOGIT_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits fit in ``logit_bytes`` (at least one token)."""
    return max(1, min(n_tokens, logit_bytes // (4 * vocab_size)))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed loss over chunks of tokens; gradients are formed chunk by chunk in the forward pass.

    hidden [N, D], weight [V', D] (same dtype), targets [N] (int64) -> summed loss (float32 scalar).
    Rows ``classes`` … V' − 1 of the weight are padding: their logits are masked out.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, rows: int, classes: int) -> Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]  # (c, D), (c,)
            logits = (h @ weight.T).float()  # (c, V')
            logits[:, classes:] = MASKED_LOGIT
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += torch.where(valid, lse - target_logit, 0.0).sum()
            if want_hidden or want_weight:
                # d(sum loss)/d logits = softmax - one_hot(target), zero on ignored rows; in place on the logits
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                grad_logits.mul_(valid[:, None])
                grad_logits = grad_logits.to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start : start + rows] = grad_logits @ weight
                if want_weight:
                    grad_weight += grad_logits.T @ h  # summed over chunks in float32
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_total.to(grad_weight.dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, reduction: str = "mean",
                         impl: str = "auto", logit_bytes: int = CHUNK_LOGIT_BYTES) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, without materialising all logits.

    hidden [..., D], weight [V, D], targets [...] (int64; ``IGNORE_INDEX`` entries are skipped).
    ``reduction`` is ``"mean"`` (over the targets that count), ``"sum"``, or ``"none"``: the loss of every
    target, shaped like ``targets`` (0 where ignored), for evaluations by position. ``"none"`` computes
    the logits chunk by chunk in plain PyTorch; under autograd it keeps every chunk's logits, so it is
    meant for evaluation. Under autocast the matmuls run in the autocast dtype, as the plain head's
    would; the loss is float32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction {reduction!r} is not supported; use 'mean', 'sum' or 'none'")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} must agree in all "
                         "but the last dimension")
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    which = resolve_impl(impl, hidden.device, needs_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        if reduction == "none":
            rows = chunk_rows(weight.shape[0], hidden.shape[0], logit_bytes)
            losses = [F.cross_entropy((h @ weight.T).float(), t, ignore_index=IGNORE_INDEX, reduction="none")
                      for h, t in zip(hidden.split(rows), targets.split(rows), strict=True)]
            return torch.cat(losses).reshape(shape)
        if which == "full":
            logits = (hidden @ weight.T).float()
            return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
        classes = weight.shape[0]
        padded = F.pad(weight, (0, 0, 0, -classes % PAD_CLASSES_TO))  # (V', D), zero rows at the end
        if which == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            bias = torch.zeros(padded.shape[0], dtype=padded.dtype, device=padded.device)
            bias[classes:] = MASKED_LOGIT
            return liger_fused_linear_cross_entropy(hidden, padded, targets, bias=bias, ignore_index=IGNORE_INDEX,
                                                    reduction=reduction, accum_dtype=torch.float32)
        rows = chunk_rows(padded.shape[0], hidden.shape[0], logit_bytes)
        total = ChunkedLinearCrossEntropy.apply(hidden, padded, targets, rows, classes)
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
