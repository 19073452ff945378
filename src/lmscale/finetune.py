"""LoRA and QLoRA fine-tuning of a saved lmscale model, through peft.

A saved model (``LmscaleForCausalLM.save_pretrained``) is loaded with ``from_pretrained``, its mixers'
and MLPs' projections get low-rank adapters (Hu et al. 2022), and only those train. The adapter saves
alone (a few MB), reloads onto the same base, and merges into it: W + (α / r)·B·A per adapted layer.
QLoRA (Dettmers et al. 2023) holds the frozen base in 4-bit NF4 through bitsandbytes, which needs CUDA;
elsewhere it is refused with the reason rather than run in full precision unannounced.

The adapted layers are every ``*_proj`` linear layer of a block's mixer and MLP (``LORA_TARGETS``), which
covers attention's q/k/v/o and the recurrent mixers' input, gate and output projections alike; the
embedding and its tied head stay frozen.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

LORA_TARGETS = r"lm\.blocks\.\d+\.(mixer|mlp)\.(.*\.)?\w+_proj"  # linear layers whose names match this


def qlora_support(device: torch.device | str) -> str | None:
    """None if 4-bit QLoRA can run on ``device``, else why not (in words, with the fix)."""
    import importlib.util

    if torch.device(device).type != "cuda":
        return f"QLoRA's 4-bit base runs on CUDA only (bitsandbytes); this is {device}. Use plain LoRA here"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA needs bitsandbytes: pip install bitsandbytes"
    return None


def lora_model(model_or_path: Any, r: int = 8, alpha: int = 16, dropout: float = 0.0, quantize: str | None = None,
               device: torch.device | str = "cpu"):
    """A peft ``PeftModel`` around a saved lmscale model (a path) or a loaded ``LmscaleForCausalLM``, with LoRA
    adapters of rank ``r`` on every mixer and MLP projection. ``quantize="4bit"`` is QLoRA (CUDA only)."""
    from peft import LoraConfig, get_peft_model

    from lmscale.hf import LmscaleForCausalLM

    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"the LoRA rank r must be a positive integer, got {r!r}")
    if quantize not in (None, "4bit"):
        raise ValueError(f"quantize must be None (LoRA) or '4bit' (QLoRA), got {quantize!r}")
    kwargs: dict[str, Any] = {}
    if quantize == "4bit":
        why = qlora_support(device)
        if why:
            raise RuntimeError(why)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    if isinstance(model_or_path, (str, Path)):
        if not (Path(model_or_path) / "config.json").is_file():
            raise FileNotFoundError(f"{model_or_path} holds no saved model (config.json is missing); save one with "
                                    "LmscaleForCausalLM.save_pretrained(folder)")
        model = LmscaleForCausalLM.from_pretrained(model_or_path, **kwargs)
    else:
        model = model_or_path
    targets = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, name)]
    if not targets:
        linear = sorted({name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"no layer of this model matches LORA_TARGETS ({LORA_TARGETS}); its linear layers: {linear}")
    # the matched linear layers by name: a regex would also match a container named *_proj (GLA's decay_proj)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model.to(device) if quantize is None else model, config)


def _batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Random windows of seq_len + 1 tokens from a token array, batch_size at a time, forever."""
    rng = np.random.default_rng(seed)
    if len(tokens) < seq_len + 2:
        raise ValueError(f"the fine-tuning text has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        yield torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))


def finetune(model, tokens: np.ndarray, steps: int, batch_size: int = 8, seq_len: int = 128, lr: float = 1e-3,
             seed: int = 0) -> list[float]:
    """Train the adapters (every parameter that requires grad) on windows of ``tokens``; the losses per step."""
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _, batch in zip(range(steps), _batches(tokens, batch_size, seq_len, seed)):
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the fine-tuning loss is {loss.item()} at step {len(losses)}; lower the learning "
                                     f"rate (lr={lr})")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
