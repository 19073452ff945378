"""JRT-Prompt (Arora et al. 2024, "Just read twice"): show a model the context twice before the question.

A fixed-size recurrent state has to choose what to keep while it reads, before it knows what the
question will ask; on the second copy it has seen everything once, so it can keep what matters. The
transform is data only, so it works with any mixer:

    prompt = context ⧺ separator ⧺ context ⧺ question

Separators as in the paper's prompts (its lm-eval tasks, e.g. FDA: the document with trailing newlines
stripped, a newline, the document again, then " Key:"): trailing separators are dropped from the
context, the two copies are joined by exactly one separator, and the question follows the second copy
directly (any space it needs in front is part of its own ids, as GPT-2 tokens carry their spaces).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NEWLINE_ID = 198  # GPT-2's "\n"


def _strip_trailing(context: Tensor, separator: Tensor) -> Tensor:
    """Drop whole separators from the end of context [..., T] while every row ends with one."""
    n = separator.numel()
    while n and context.shape[-1] >= n and bool((context[..., -n:] == separator).all()):
        context = context[..., :-n]
    return context


def jrt_prompt(
    context: Sequence[int] | Tensor, question: Sequence[int] | Tensor, separator: Sequence[int] = (NEWLINE_ID,)
) -> list[int] | Tensor:
    """context ⧺ separator ⧺ context ⧺ question, with trailing separators first stripped from the context.

    Lists (or tuples) of token ids give a list; tensors [..., T] (e.g. a batch [B, T] of synthetic
    recall examples) give a tensor [..., T'], joined along the last dimension, where a separator is
    stripped only if every row ends with it. The question starts at ``len(prompt) - len(question)``.
    """
    as_list = not isinstance(context, Tensor)
    context_t = torch.tensor(list(context), dtype=torch.long) if as_list else context
    question_t = torch.as_tensor(question if isinstance(question, Tensor) else list(question),
                                 dtype=context_t.dtype, device=context_t.device)
    if context_t.shape[:-1] != question_t.shape[:-1]:
        raise ValueError(f"context {tuple(context_t.shape)} and question {tuple(question_t.shape)} must share "
                         "their leading (batch) dimensions")
    sep = torch.as_tensor(list(separator), dtype=context_t.dtype, device=context_t.device)
    context_t = _strip_trailing(context_t, sep)
    sep = sep.expand(*context_t.shape[:-1], sep.numel())
    prompt = torch.cat([context_t, sep, context_t, question_t], dim=-1)
    return prompt.tolist() if as_list else prompt
